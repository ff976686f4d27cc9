"""PEP 3333 compliance, checked by `wsgiref.validate` inside the application."""

import http.client
import json
import os
import time

import pytest
import requests

from conftest import app, wait_until


def probe(strata, tmp_path, *extra, **env):
    env.setdefault("PROBE_CLOSE_LOG", str(tmp_path / "closed.log"))
    return strata(*app("probe", *extra), env=env)


def raw_get(server, path, headers):
    """A GET with the path and headers exactly as given (no client normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders()
    body = conn.getresponse().read()
    conn.close()
    return json.loads(body)


def no_violations(server):
    log = server.log()
    assert "AssertionError" not in log and "Warning" not in log, log


def test_environ_get_with_and_without_query(strata, tmp_path):
    server = probe(strata, tmp_path)
    view = requests.get(server.url("/environ?a=1&b=%20"), headers={"X-Custom": "yes"}).json()
    assert view["REQUEST_METHOD"] == "GET"
    assert view["QUERY_STRING"] == "a=1&b=%20"
    assert view["PATH_INFO"] == "/environ"
    assert view["SCRIPT_NAME"] == ""
    assert view["SERVER_NAME"] == "127.0.0.1"
    assert view["SERVER_PORT"] == str(server.port)
    assert view["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert view["REMOTE_ADDR"] == "127.0.0.1"
    assert view["wsgi.url_scheme"] == "http"
    assert view["wsgi.version"] == [1, 0]
    assert view["wsgi.multiprocess"] is True and view["wsgi.multithread"] is False
    assert view["http"]["HTTP_X_CUSTOM"] == "yes"
    bare = requests.get(server.url("/environ")).json()
    assert bare["QUERY_STRING"] == ""
    no_violations(server)


def test_path_info_is_decoded_latin1_and_script_name_mounts(strata, tmp_path):
    server = probe(strata, tmp_path)
    view = raw_get(server, "/environ%2Fx/caf%C3%A9", [("Host", "example.org:81")])
    # Bytes as code points, per PEP 3333: UTF-8 é arrives as two latin-1 characters.
    assert view["PATH_INFO"] == "/environ/x/caf\u00c3\u00a9"
    assert view["SERVER_NAME"] == "example.org" and view["SERVER_PORT"] == "81"


def test_header_names_past_the_workers_key_cache_still_arrive(strata, tmp_path):
    # A worker keeps the environ keys it has made, up to 256 names; header names are the
    # client's choice, so names past that get a fresh key each time and must arrive all the same.
    server = probe(strata, tmp_path, "--workers", "1")
    with requests.Session() as session:
        for i in range(300):
            view = session.get(server.url("/environ"),
                               headers={f"X-Name-{i}": f"v{i}", "X-Stable": "s"}).json()
            custom = {k: v for k, v in view["http"].items()
                      if k.startswith(("HTTP_X_NAME_", "HTTP_X_STABLE"))}
            assert custom == {f"HTTP_X_NAME_{i}": f"v{i}", "HTTP_X_STABLE": "s"}, (i, custom)
    no_violations(server)


def test_script_name(strata, tmp_path):
    server = strata(*app("probe"), config='[app]\nscript_name = "/mount"\n')
    view = requests.get(server.url("/mount/environ")).json()
    assert (view["SCRIPT_NAME"], view["PATH_INFO"]) == ("/mount", "/environ")
    no_violations(server)


def test_headers_with_underscores_are_dropped(strata, tmp_path):
    server = probe(strata, tmp_path)
    view = raw_get(server, "/environ", [("Host", "x"), ("X-User", "real"), ("X_User", "spoofed")])
    assert view["http"]["HTTP_X_USER"] == "real"


def test_post_bodies_content_length_and_chunked(strata, tmp_path):
    server = probe(strata, tmp_path)
    payload = os.urandom(300_000)
    assert requests.post(server.url("/echo"), data=payload).content == payload
    # A generator body makes requests send Transfer-Encoding: chunked.
    chunks = [payload[i:i + 7000] for i in range(0, len(payload), 7000)]
    response = requests.post(server.url("/echo-size?777"), data=iter(chunks))
    assert response.content == payload
    no_violations(server)


def test_requests_either_side_of_a_queue_cell_arrive_whole(strata, tmp_path):
    # A request frame up to a cell of the shared queue (4 KiB with its header) travels in the
    # cell; a larger one is fetched over the worker's socket. Sizes straddle the boundary.
    server = probe(strata, tmp_path, "--workers", "1")
    with requests.Session() as session:
        for size in range(2800, 4300, 11):
            payload = os.urandom(size)
            assert session.post(server.url("/echo"), data=payload).content == payload, size
    no_violations(server)


def test_streamed_body_larger_than_the_buffer(strata, tmp_path):
    server = strata(*app("probe"), config="[app]\nbuffer_body_bytes = 4096\n")
    payload = os.urandom(2_000_000)
    chunks = [payload[i:i + 65536] for i in range(0, len(payload), 65536)]
    assert requests.post(server.url("/echo-size?10000"), data=iter(chunks)).content == payload
    assert requests.post(server.url("/echo"), data=payload).content == payload
    no_violations(server)


def test_body_read_after_the_head_was_written(strata, tmp_path):
    server = strata(*app("probe"), config="[app]\nbuffer_body_bytes = 1024\n")
    payload = os.urandom(200_000)
    response = requests.post(server.url("/write-then-read"), data=payload)
    assert response.text == "head start;read 200000 bytes"
    no_violations(server)


def test_readline_readlines_and_iteration(strata, tmp_path):
    server = probe(strata, tmp_path)
    body = b"first line\nsecond\nthird\nfourth"
    first, second, rest = requests.post(server.url("/lines"), data=body).json()
    assert first == "first line\n"
    assert second == "sec"
    assert rest == ["ond\n", "third\n", "fourth"]
    assert requests.post(server.url("/iterate"), data=body).json() == [
        "first line\n", "second\n", "third\n", "fourth"]
    no_violations(server)


def test_streaming_generator_write_and_close(strata, tmp_path):
    server = probe(strata, tmp_path)
    response = requests.get(server.url("/stream"))
    assert response.text == "one\ntwo\nthree\n"
    assert requests.get(server.url("/generator")).text == "".join(f"chunk {i}\n" for i in range(5))
    assert requests.get(server.url("/write")).text == "written and returned"
    assert (tmp_path / "closed.log").read_text().splitlines() == ["stream"]
    no_violations(server)


def test_file_wrapper(strata, tmp_path):
    data = os.urandom(1_000_000)
    (tmp_path / "blob").write_bytes(data)
    server = strata(*app("probe"), env={"PROBE_FILE": str(tmp_path / "blob")})
    response = requests.get(server.url("/file"))
    assert response.content == data
    no_violations(server)


def test_exc_info_replaces_unsent_response(strata, tmp_path):
    server = probe(strata, tmp_path)
    response = requests.get(server.url("/exc-info"))
    assert response.status_code == 500
    assert response.text == "recovered with exc_info"
    no_violations(server)


def test_head_has_headers_and_no_body(strata, tmp_path):
    server = probe(strata, tmp_path)
    response = requests.head(server.url("/head"))
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["Content-Length"] == str(len(b"body of a HEAD"))
    # A HEAD response is complete at its head, so close() may run just after the client has it.
    closed = tmp_path / "closed.log"
    for _ in range(100):
        if closed.exists() and closed.read_text():
            break
        time.sleep(0.02)
    assert closed.read_text().splitlines() == ["head"]
    assert requests.get(server.url("/head")).text == "body of a GET"
    no_violations(server)


def test_statuses_pass_through(strata, tmp_path):
    server = probe(strata, tmp_path)
    assert requests.get(server.url("/empty")).status_code == 204
    assert requests.get(server.url("/status")).status_code == 418
    assert requests.get(server.url("/nowhere")).status_code == 404
    no_violations(server)


def test_invalid_responses_become_500_and_are_logged(strata, tmp_path):
    server = strata(*app("unvalidated"))
    for path in ["/bad-header", "/bad-status", "/str-body", "/no-start", "/raise"]:
        response = requests.get(server.url(path))
        assert response.status_code == 500, path
        assert "X-Injected" not in response.headers
    log = server.log()
    assert "invalid value for response header" in log
    assert "invalid status" in log
    assert "must be bytes" in log
    assert "RuntimeError: raised before start_response" in log
    # The worker survived all of it.
    assert requests.get(server.url("/hop-by-hop")).text == "hop"


def test_hop_by_hop_headers_are_dropped(strata, tmp_path):
    server = strata(*app("unvalidated"))
    session = requests.Session()
    first = session.get(server.url("/hop-by-hop"))
    assert "close" not in first.headers.get("Connection", "")
    assert session.get(server.url("/hop-by-hop")).text == "hop"


def test_failure_mid_response_cuts_the_response(strata, tmp_path):
    server = strata(*app("unvalidated"))
    # A response whose application failed must not end cleanly.
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(server.url("/raise-midway"))
    assert "RuntimeError: raised mid-response" in server.log()
    assert requests.get(server.url("/hop-by-hop")).text == "hop"


def test_wsgi_errors_go_to_the_log(strata, tmp_path):
    server = strata(*app("unvalidated"))
    assert requests.get(server.url("/errors")).text == "logged"
    assert "a line for the log from wsgi.errors" in server.log()


def resident_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_objects_handed_to_the_application_may_be_used_and_freed_on_other_threads(strata):
    """wsgi.input, wsgi.errors, start_response, its write(), the file wrapper and the side
    channel, used from a thread pool and freed there (last reference, or the collector running
    on that thread): no error, and the worker's memory stays flat over 10,000 requests."""
    server = strata(*app("threaded", "--workers", "1"))
    [pid] = server.worker_pids()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = b"x" * 4096

    def post(count, query=""):
        for _ in range(count):
            conn.request("POST", "/" + query, body=body)
            response = conn.getresponse()
            assert response.status == 200 and response.read().startswith(b"4096 ")

    post(1, "?errors")
    assert wait_until(lambda: "from a pool thread" in server.log())
    post(2000)
    before = resident_kb(pid)
    post(10000)
    grown = resident_kb(pid) - before
    conn.close()
    assert server.worker_pids() == [pid]
    log = server.log()
    assert "unsendable" not in log and "Traceback" not in log, log[-3000:]
    # Leaking what each request handed over would be 40 MB here (4 KB of body alone).
    assert grown < 4096, f"the worker grew by {grown} kB over 10,000 requests"
