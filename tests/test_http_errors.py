"""Bad input is answered by the listener and never reaches Python."""

import pytest
import requests

from conftest import app, exchange


@pytest.fixture
def counted(strata, tmp_path):
    count = tmp_path / "count"
    count.write_text("")
    server = strata(*app("unvalidated"), env={"COUNT_FILE": str(count)},
                    config="[lb]\nmax_body_bytes = 100000\nmax_header_bytes = 16384\n")
    server.count = lambda: len(count.read_text())
    return server


def test_malformed_request_is_400(counted):
    for raw in [b"NOT HTTP AT ALL\r\n\r\n", b"GET /count HTTP/1.1\r\nHost x\r\n\r\n",
                b"GET /count HTTP/9.9\r\n\r\n"]:
        assert exchange(counted.port, raw).startswith(b"HTTP/1.1 400"), raw
    assert counted.count() == 0


def test_host_is_required_once_on_http_1_1(counted):
    """RFC 9112 §3.2: no Host on HTTP/1.1, two Hosts on any version, or a Host that is not
    `host[:port]` is a 400, at once, even when a body is announced (the listener does not wait
    for it)."""
    for raw in [b"GET /count HTTP/1.1\r\n\r\n",
                b"POST /count HTTP/1.1\r\nContent-Length: 10\r\n\r\n",
                b"GET /count HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                b"GET /count HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: example.com/count\r\n\r\n",
                b"GET /count HTTP/1.1\r\nHost: user@example.com\r\n\r\n",
                b"GET /count HTTP/1.1\r\nHost: a b\r\n\r\n"]:
        answer = exchange(counted.port, raw)
        assert answer.split(b" ")[1] == b"400", (raw, answer)
    assert counted.count() == 0
    # HTTP/1.0 may leave Host out.
    assert exchange(counted.port, b"GET /count HTTP/1.0\r\n\r\n").split(b" ")[1] == b"200"
    assert counted.count() == 1


def test_the_head_limit_holds_however_the_head_is_cut(strata):
    """lb.max_header_bytes (the default, 64 KiB) is the same limit for a head sent in one
    write and in 8 KB pieces (hyper alone let heads of up to about 114 KB through when they
    came in one burst); a head under it is served."""
    server = strata(*app("hello"))

    def head(size):
        return (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
                + b"a" * size + b"\r\n\r\n")
    for size in [70_000, 100_000, 110_000]:
        for piece in [len(head(size)), 8192]:
            answer = exchange(server.port, head(size), piece)
            assert answer.startswith(b"HTTP/1.1 431"), (size, piece, answer[:100])
    for piece in [len(head(60_000)), 8192]:
        assert exchange(server.port, head(60_000), piece).startswith(b"HTTP/1.1 200")


def test_oversized_head_is_431(counted):
    huge = b"GET /count HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    assert exchange(counted.port, huge).startswith(b"HTTP/1.1 431")
    many = b"GET /count HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
    assert exchange(counted.port, many).startswith(b"HTTP/1.1 431")
    assert counted.count() == 0


def test_body_over_limit_is_413(counted):
    declared = requests.post(counted.url("/count"), data=b"x" * 200_000)
    assert declared.status_code == 413
    chunked = requests.post(counted.url("/count"), data=iter([b"y" * 50_000] * 4))
    assert chunked.status_code == 413
    assert counted.count() == 0
    assert requests.post(counted.url("/count"), data=b"z" * 1000).status_code == 200
    assert counted.count() == 1
