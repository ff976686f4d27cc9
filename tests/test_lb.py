"""The load balancer tier: routes and static files served without Python."""

import gzip
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest
import requests

from conftest import STRATA, app, exchange, free_port, wait_until


@pytest.fixture
def static_site(tmp_path):
    """A collectstatic-like directory, with precompressed siblings, a hashed name, a large
    file, and things that must never be served: a symlink out, a hidden file, a file beside
    the root."""
    root = tmp_path / "static"
    (root / "css").mkdir(parents=True)
    css = b"body { color: #333; }\n" * 50
    (root / "css" / "site.css").write_bytes(css)
    (root / "css" / "site.css.gz").write_bytes(gzip.compress(css))
    (root / "css" / "site.css.br").write_bytes(b"pretend-brotli")
    (root / "css" / "site.0123456789ab.css").write_bytes(css)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / ".env").write_text("SECRET=1\n")
    (tmp_path / "outside.txt").write_text("outside the root\n")
    (root / "escape.txt").symlink_to(tmp_path / "outside.txt")
    (root / "inside-link.css").symlink_to(root / "css" / "site.css")
    return root


@pytest.fixture
def lb(strata, static_site):
    config = ("[[lb.routes]]\n"
              'path_prefix = "/static/"\n'
              f'static_dir = "{static_site}"\n')
    return strata(*app("hello"), config=config)


def get(server, path, method="GET", **headers):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def test_static_files_are_served_with_validators_and_cache_lifetimes(lb, static_site):
    response, body = get(lb, "/static/css/site.css")
    assert response.status == 200
    assert body == (static_site / "css" / "site.css").read_bytes()
    assert response.getheader("Content-Type") == "text/css; charset=utf-8"
    assert response.getheader("Cache-Control") == "public, max-age=60"
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("Vary") == "Accept-Encoding"
    assert response.getheader("ETag").startswith('"')
    assert response.getheader("Last-Modified").endswith("GMT")
    hashed, _ = get(lb, "/static/css/site.0123456789ab.css")
    assert hashed.getheader("Cache-Control") == "public, max-age=31536000, immutable"
    # HEAD: the same headers, no body.
    head, body = get(lb, "/static/css/site.css", method="HEAD")
    assert head.status == 200 and body == b""
    assert head.getheader("Content-Length") == str(len(
        (static_site / "css" / "site.css").read_bytes()))
    # Not under the prefix: the app answers.
    response, body = get(lb, "/hello")
    assert response.status == 200 and body == b"Hello, World!"


def test_precompressed_siblings_follow_accept_encoding(lb, static_site):
    response, body = get(lb, "/static/css/site.css", **{"Accept-Encoding": "gzip"})
    assert response.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(body) == (static_site / "css" / "site.css").read_bytes()
    response, body = get(lb, "/static/css/site.css", **{"Accept-Encoding": "gzip, br"})
    assert response.getheader("Content-Encoding") == "br" and body == b"pretend-brotli"
    response, body = get(lb, "/static/css/site.css", **{"Accept-Encoding": "br;q=0, gzip"})
    assert response.getheader("Content-Encoding") == "gzip"
    response, body = get(lb, "/static/css/site.css", **{"Accept-Encoding": "identity"})
    assert response.getheader("Content-Encoding") is None
    # Each representation has its own validator.
    plain, _ = get(lb, "/static/css/site.css")
    zipped, _ = get(lb, "/static/css/site.css", **{"Accept-Encoding": "gzip"})
    assert plain.getheader("ETag") != zipped.getheader("ETag")


def test_conditional_requests(lb, static_site):
    first, _ = get(lb, "/static/css/site.css")
    etag, modified = first.getheader("ETag"), first.getheader("Last-Modified")
    response, body = get(lb, "/static/css/site.css", **{"If-None-Match": etag})
    assert response.status == 304 and body == b""
    assert response.getheader("ETag") == etag
    response, _ = get(lb, "/static/css/site.css", **{"If-Modified-Since": modified})
    assert response.status == 304
    response, _ = get(lb, "/static/css/site.css", **{"If-None-Match": '"other"'})
    assert response.status == 200
    response, _ = get(lb, "/static/css/site.css", **{"If-Match": '"other"'})
    assert response.status == 412
    # A changed file has a new validator.
    time.sleep(0.01)
    (static_site / "css" / "site.css").write_bytes(b"changed\n")
    response, body = get(lb, "/static/css/site.css", **{"If-None-Match": etag})
    assert response.status == 200 and body == b"changed\n"
    assert response.getheader("ETag") != etag


def test_range_requests(lb, static_site):
    data = (static_site / "big.bin").read_bytes()
    response, body = get(lb, "/static/big.bin", Range="bytes=0-99")
    assert response.status == 206 and body == data[:100]
    assert response.getheader("Content-Range") == f"bytes 0-99/{len(data)}"
    middle = len(data) // 2
    response, body = get(lb, "/static/big.bin", Range=f"bytes={middle}-")
    assert response.status == 206 and body == data[middle:]
    response, body = get(lb, "/static/big.bin", Range="bytes=-10")
    assert response.status == 206 and body == data[-10:]
    response, body = get(lb, "/static/big.bin", Range=f"bytes={len(data)}-")
    assert response.status == 416
    assert response.getheader("Content-Range") == f"bytes */{len(data)}"
    etag = response.getheader("ETag") or get(lb, "/static/big.bin", method="HEAD")[0] \
        .getheader("ETag")
    response, body = get(lb, "/static/big.bin", Range="bytes=0-9", **{"If-Range": etag})
    assert response.status == 206 and body == data[:10]
    response, body = get(lb, "/static/big.bin", Range="bytes=0-9", **{"If-Range": '"stale"'})
    assert response.status == 200 and body == data
    # A range asks for the file itself, never a compressed sibling.
    response, body = get(lb, "/static/css/site.css", Range="bytes=0-3",
                         **{"Accept-Encoding": "gzip"})
    assert response.status == 206 and response.getheader("Content-Encoding") is None
    assert body == (static_site / "css" / "site.css").read_bytes()[:4]


@pytest.mark.parametrize("path", [
    "/static/../outside.txt",
    "/static/%2e%2e/outside.txt",
    "/static/css/..%2f..%2foutside.txt",
    "/static/escape.txt",
    "/static/.env",
    "/static/css",
    "/static/css/missing.css",
    "/static/%ff",
])
def test_paths_out_of_the_root_or_hidden_are_not_found(lb, path):
    response, body = get(lb, path)
    assert response.status == 404
    assert b"outside the root" not in body and b"SECRET" not in body


def test_symlinks_inside_the_root_are_followed_and_writes_refused(lb, static_site):
    response, body = get(lb, "/static/inside-link.css")
    assert response.status == 200
    assert body == (static_site / "css" / "site.css").read_bytes()
    response, _ = get(lb, "/static/css/site.css", method="POST")
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"


def test_routes_by_host(strata, static_site):
    config = ("[[lb.routes]]\n"
              'host = "static.example.com"\n'
              f'static_dir = "{static_site}"\n')
    server = strata(*app("hello"), config=config)
    response, body = get(server, "/css/site.css", Host="static.example.com:8000")
    assert response.status == 200 and body.startswith(b"body")
    response, body = get(server, "/hello", Host="www.example.com")
    assert response.status == 200 and body == b"Hello, World!"


def curl(*args):
    """curl's answer: (HTTP version, status, body)."""
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_version} %{http_code}",
                          *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.rpartition("\n")
    version, status = tail.split()
    return version, int(status), body


@pytest.fixture
def https_server(strata, test_ca, tmp_path, static_site):
    """The probe app behind HTTP and HTTPS listeners; the certificate files are copies the test
    may replace."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(test_ca["cert"], cert)
    shutil.copy(test_ca["key"], key)
    port = free_port()
    config = ("[lb]\n"
              f'tls_bind = "127.0.0.1:{port}"\n'
              f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
              "[[lb.routes]]\n"
              'path_prefix = "/static/"\n'
              f'static_dir = "{static_site}"\n')
    server = strata(*app("probe"), config=config)
    server.tls_port, server.cert, server.key = port, cert, key
    return server


def test_https_speaks_http2_and_http1_by_alpn(https_server, test_ca):
    url = f"https://localhost:{https_server.tls_port}/environ"
    version, status, body = curl("--cacert", str(test_ca["ca"]), "--http2", url)
    assert (version, status) == ("2", 200)
    environ = json.loads(body)
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["http"]["HTTP_HOST"] == f"localhost:{https_server.tls_port}"
    assert environ["PATH_INFO"] == "/environ"
    version, status, body = curl("--cacert", str(test_ca["ca"]), "--http1.1", url)
    assert (version, status) == ("1.1", 200)
    assert json.loads(body)["wsgi.url_scheme"] == "https"
    # Static files and a POST body over HTTP/2.
    version, status, body = curl("--cacert", str(test_ca["ca"]), "--http2",
                                 f"https://localhost:{https_server.tls_port}/static/css/site.css")
    assert (version, status) == ("2", 200) and body.startswith("body")
    version, status, body = curl("--cacert", str(test_ca["ca"]), "--http2", "--data-binary",
                                 "x" * 100000,
                                 f"https://localhost:{https_server.tls_port}/echo-size")
    assert (version, status) == ("2", 200) and body == "x" * 100000
    # A Python (OpenSSL) client checking the chain, and one that does not trust the CA.
    response = requests.get(url, verify=str(test_ca["ca"]), timeout=10)
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, verify=str(test_ca["other_ca"]), timeout=10)
    # The plain listener still serves HTTP/1.1 only.
    version, status, _ = curl(https_server.url("/environ"))
    assert (version, status) == ("1.1", 200)


def test_garbage_and_plain_http_on_the_tls_port_harm_no_one(https_server, test_ca):
    with socket.create_connection(("127.0.0.1", https_server.tls_port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(100)
    with socket.create_connection(("127.0.0.1", https_server.tls_port), timeout=10) as sock:
        sock.sendall(os.urandom(3000))
    version, status, _ = curl("--cacert", str(test_ca["ca"]),
                              f"https://localhost:{https_server.tls_port}/environ")
    assert status == 200


def h2_frames(data):
    """The (type, payload) of each whole HTTP/2 frame in `data`."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        frames.append((data[3], data[9:9 + length]))
        data = data[9 + length:]
    return frames


def test_alpn_h2_means_http2_only(https_server, test_ca):
    """RFC 9113 §3.2 and §3.4: once ALPN chose h2 the connection is HTTP/2; an HTTP/1.1
    request instead of the preface gets a GOAWAY with PROTOCOL_ERROR and the connection
    closes, rather than an HTTP/1.1 answer."""
    context = ssl.create_default_context(cafile=str(test_ca["ca"]))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", https_server.tls_port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            tls.sendall(b"GET /environ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            try:
                while chunk := tls.recv(65536):
                    data += chunk
            except (ConnectionResetError, ssl.SSLError):
                pass
    assert not data.startswith(b"HTTP/"), data
    goaways = [payload for kind, payload in h2_frames(data) if kind == 0x7]
    assert goaways, data
    assert int.from_bytes(goaways[-1][4:8], "big") == 0x1, goaways  # PROTOCOL_ERROR


def served_certificate(port):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_certificates_are_reloaded_when_their_files_change(https_server, test_ca, tmp_path):
    def der(path):
        return ssl.PEM_cert_to_DER_cert(path.read_text())

    assert served_certificate(https_server.tls_port) == der(https_server.cert)
    # A new certificate for the same name, signed by the same CA.
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp_path / "new.key"), "-out",
                    str(tmp_path / "new.csr"), "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(tmp_path / "new.csr"), "-CA",
                    str(test_ca["ca"]), "-CAkey", str(test_ca["ca"].with_name("ca.key")),
                    "-CAcreateserial", "-out", str(tmp_path / "new.pem"), "-days", "2",
                    "-extfile", str(tmp_path / "ext.cnf")], check=True, capture_output=True)
    # A broken pair first: the old certificate stays.
    https_server.key.write_text("not a key\n")
    assert wait_until(lambda: "do not load" in https_server.log())
    assert served_certificate(https_server.tls_port) == der(https_server.cert)
    shutil.copy(tmp_path / "new.key", https_server.key)
    shutil.copy(tmp_path / "new.pem", https_server.cert)
    assert wait_until(lambda: served_certificate(https_server.tls_port) == der(tmp_path / "new.pem"))
    version, status, _ = curl("--cacert", str(test_ca["ca"]),
                              f"https://localhost:{https_server.tls_port}/environ")
    assert status == 200


def test_h2c_where_configured(strata):
    server = strata(*app("probe"), config="[lb]\nh2c = true\n")
    version, status, body = curl("--http2-prior-knowledge", server.url("/environ"))
    assert (version, status) == ("2", 200)
    assert json.loads(body)["wsgi.url_scheme"] == "http"
    version, status, _ = curl(server.url("/environ"))
    assert (version, status) == ("1.1", 200)
    plain = strata(*app("probe"))
    out = subprocess.run(["curl", "-sS", "--max-time", "5", "--http2-prior-knowledge",
                          plain.url("/environ")], capture_output=True)
    assert out.returncode != 0


def test_response_header_values_go_out_trimmed_on_http1_and_http2(strata):
    """RFC 9110 §5.5 and RFC 9113 §8.2.1: a field value has no leading or trailing
    whitespace; an application's padded values (Django's `Set-Cookie` has a leading space)
    are sent trimmed, which HTTP/2 clients otherwise reject."""
    server = strata(*app("probe"), config="[lb]\nh2c = true\n")
    answer = exchange(server.port, b"GET /spaced-headers HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
    assert b"\r\nset-cookie: csrftoken=abc; Path=/\r\n" in answer, answer
    assert b"\r\nx-padded: both ends\r\n" in answer, answer
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-D", "-",
                          "-o", "/dev/null", server.url("/spaced-headers")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/2 200"), out.stdout
    lines = out.stdout.splitlines()
    assert "set-cookie: csrftoken=abc; Path=/" in lines, lines
    assert "x-padded: both ends" in lines, lines


def test_tls_settings_are_checked(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text('[lb]\ntls_bind = "127.0.0.1:8443"\n')
    out = subprocess.run([str(STRATA), "check", "--config", str(config)], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "lb.tls_cert_file" in out.stderr


def environ_after(port, header):
    """The probe's environ for a request sent after `header` (read as HTTP, chunked or not)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(header + b"GET /environ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        return json.loads(response.read())


def test_the_proxy_protocol_names_the_client(strata):
    server = strata(*app("probe"), config="[lb]\nproxy_protocol = true\n")
    request = b"GET /environ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    environ = environ_after(server.port, b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 80\r\n")
    assert environ["REMOTE_ADDR"] == "203.0.113.7"
    assert environ["http"]["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"
    v2 = (b"\r\n\r\n\0\r\nQUIT\n" + bytes([0x21, 0x11]) + (12).to_bytes(2, "big")
          + bytes([198, 51, 100, 9, 127, 0, 0, 1]) + (4321).to_bytes(2, "big")
          + (80).to_bytes(2, "big"))
    assert environ_after(server.port, v2)["REMOTE_ADDR"] == "198.51.100.9"
    # Without the header, or with a broken one: refused, and the listener goes on.
    assert exchange(server.port, request) == b""
    assert exchange(server.port, b"PROXY TCP4 nonsense\r\n" + request) == b""
    assert environ_after(server.port, b"PROXY UNKNOWN\r\n")["REMOTE_ADDR"] == "127.0.0.1"


def test_connections_past_the_limit_wait_their_turn(strata):
    server = strata(*app("hello"), config="[lb]\nmax_connections = 1\n")
    first = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    first.request("GET", "/")
    assert first.getresponse().read() == b"Hello, World!"
    # The first connection is still open: a second one is accepted only once it closes.
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    waiting.settimeout(0.5)
    with pytest.raises(socket.timeout):
        waiting.recv(100)
    first.close()
    waiting.settimeout(10)
    assert b"Hello, World!" in waiting.recv(1000) + waiting.recv(1000)
    waiting.close()


def test_a_stalled_request_body_times_out(strata):
    server = strata(*app("hello"), config='[lb]\nbody_read_timeout = "300ms"\n')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        started = time.monotonic()
        answer = sock.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5
    # A body that keeps coming, however slowly, is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
        for byte in b"abcd":
            time.sleep(0.15)
            sock.sendall(bytes([byte]))
        assert sock.recv(1000).startswith(b"HTTP/1.1 200")


def test_a_request_head_trickled_in_is_cut_off_at_the_head_timeout(strata):
    """Slowloris: a head that keeps coming a byte at a time still has to be whole in time."""
    server = strata(*app("hello"), config='[lb]\nheader_read_timeout = "500ms"\n')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        sock.settimeout(0.1)
        closed = False
        while not closed and time.monotonic() - started < 5:
            try:
                sock.sendall(b"a")
                closed = sock.recv(1000) == b""
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "the server kept a trickling head open"
        assert 0.4 < time.monotonic() - started < 3


def test_idle_keep_alive_connections_are_closed_after_the_head_timeout(strata):
    server = strata(*app("hello"), config='[lb]\nheader_read_timeout = "500ms"\n')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1000).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        rest = sock.recv(1000)
        # Closed by the server (perhaps after a 408), not by this client's timeout.
        assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest
        assert 0.3 < time.monotonic() - started < 5
