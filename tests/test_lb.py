"""The load balancer tier: routes and static files served without Python."""

import gzip
import http.client
import os
import time

import pytest

from conftest import app


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
