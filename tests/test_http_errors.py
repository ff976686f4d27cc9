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
