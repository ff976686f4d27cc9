"""The bundled example Django site, served the way `make run` serves it."""

import hashlib
import os
import re
import socket
import subprocess
import sys
import time

import requests


def csrf_token(html):
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)


def test_anonymous_page_is_cacheable(example):
    server = example()
    response = requests.get(server.url("/"))
    assert response.status_code == 200
    assert "Article 20" in response.text
    assert "public" in response.headers["Cache-Control"]
    assert "Set-Cookie" not in response.headers
    assert requests.get(server.url("/static/site.css")).status_code == 200


def test_front_page_is_cached_and_purged_by_a_comment(example):
    """The front page comes from the accelerator until a comment on one of its articles
    commits: the model signal purges the page's surrogate key in-process."""
    server = example()
    first = requests.get(server.url("/"))
    assert "stored" in first.headers["Cache-Status"]
    assert "Surrogate-Key" not in first.headers
    hit = requests.get(server.url("/"), cookies={"_ga": "GA1.1"})
    assert hit.headers["Cache-Status"].startswith("strata; hit") and hit.text == first.text
    session = requests.Session()
    token = csrf_token(session.get(server.url("/articles/1/")).text)
    posted = session.post(server.url("/articles/1/"),
                          data={"csrfmiddlewaretoken": token, "author": "ada", "text": "Hi"},
                          headers={"Referer": server.url("/articles/1/")})
    assert posted.status_code == 200
    after = requests.get(server.url("/"))
    assert "uri-miss" in after.headers["Cache-Status"]


def test_form_with_csrf(example):
    server = example()
    session = requests.Session()
    page = session.get(server.url("/articles/1/"))
    token = csrf_token(page.text)
    posted = session.post(server.url("/articles/1/"),
                          data={"csrfmiddlewaretoken": token, "author": "ada", "text": "Nice"},
                          headers={"Referer": server.url("/articles/1/")})
    assert posted.status_code == 200 and posted.history[0].status_code == 302
    assert "<b>ada</b>: Nice" in posted.text
    forged = requests.post(server.url("/articles/1/"), data={"author": "eve", "text": "x"})
    assert forged.status_code == 403


def test_login_and_personal_page(example):
    server = example()
    anonymous = requests.get(server.url("/me/"), allow_redirects=False)
    assert anonymous.status_code == 302 and "/accounts/login/" in anonymous.headers["Location"]
    session = requests.Session()
    token = csrf_token(session.get(server.url("/accounts/login/")).text)
    response = session.post(server.url("/accounts/login/"),
                            data={"csrfmiddlewaretoken": token, "username": "demo",
                                  "password": "demo", "next": "/me/"},
                            headers={"Referer": server.url("/accounts/login/")})
    assert response.status_code == 200
    assert "Hello, demo" in response.text
    assert "private" in response.headers.get("Cache-Control", "") or "Cookie" in response.headers.get("Vary", "")


def test_broken_and_slow_views(example):
    server = example()
    assert requests.get(server.url("/boom/")).status_code == 500
    assert "RuntimeError: boom" in server.log()
    started = time.monotonic()
    assert "slept 0.5s" in requests.get(server.url("/slow/?seconds=0.5")).text
    assert time.monotonic() - started >= 0.5


def test_streaming_view_arrives_piece_by_piece(example):
    server = example()
    started = time.monotonic()
    arrivals = []
    with requests.get(server.url("/stream/?count=4&delay=0.3"), stream=True) as response:
        for line in response.iter_lines():
            arrivals.append((time.monotonic() - started, line))
    assert [line for _, line in arrivals] == [b"line 0", b"line 1", b"line 2", b"line 3"]
    # The first line arrives long before the last one is produced: nothing is buffered whole.
    assert arrivals[0][0] < 0.6 and arrivals[-1][0] >= 0.9


def test_upload_and_download(example, tmp_path):
    blob = os.urandom(3 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(blob)
    server = example(env={"EXAMPLE_DOWNLOADS": str(tmp_path)})
    session = requests.Session()
    token = csrf_token(session.get(server.url("/upload/")).text)
    response = session.post(server.url("/upload/"), data={"csrfmiddlewaretoken": token},
                            files={"file": ("big.bin", blob)},
                            headers={"Referer": server.url("/upload/")})
    assert f"{len(blob)} bytes, sha256 {hashlib.sha256(blob).hexdigest()}" in response.text
    download = requests.get(server.url("/download/big.bin"))
    assert download.content == blob
    assert "attachment" in download.headers["Content-Disposition"]
    assert requests.get(server.url("/download/..%2Fdb.sqlite3")).status_code == 404


def test_views_count_in_the_nodes_cache_tier(example):
    """The example's `node` cache is the node's cache tier, reached from the workers: the
    count goes up across workers, and memcached clients see the same item."""
    server = example("--tiers", "lb,accelerator,app,cache", "--workers", "2")
    counts = [requests.get(server.url("/visits/"), timeout=10).text for _ in range(5)]
    assert counts == ["1\n", "2\n", "3\n", "4\n", "5\n"], counts
    with socket.create_connection(("127.0.0.1", server.cache_port), timeout=10) as sock:
        sock.sendall(b"get :1:visits\r\n")
        answer = b""
        while not answer.endswith(b"END\r\n"):
            answer += sock.recv(4096)
    assert answer.split(b"\r\n")[1] == b"5", answer


def test_workers_start_warm(example):
    server = example("--workers", "2")
    log = server.log()
    assert "django warmed: url resolver" in log
    # The URLconf was imported in the zygote: the first request needs no import.
    for _ in range(3):
        assert requests.get(server.url("/articles/2/")).status_code == 200


def test_make_run_configuration_serves_the_example(strata, example_db, tmp_path):
    """`make run` serves config/strata.toml from the repository root."""
    from conftest import ROOT

    db = tmp_path / "db.sqlite3"
    db.write_bytes(example_db.read_bytes())
    # As make run does: static files collected under hashed names, with gzip siblings.
    env = {**os.environ, "EXAMPLE_DB": str(db), "EXAMPLE_MANIFEST_STATIC": "1"}
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"],
                   cwd=ROOT / "example", env=env, check=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "precompress.py"),
                    str(ROOT / "example" / "staticfiles")], check=True)
    server = strata("--config", str(ROOT / "config" / "strata.toml"), cwd=ROOT,
                    env={"EXAMPLE_DB": str(db), "EXAMPLE_MANIFEST_STATIC": "1"})
    assert "warm-up GET / -> 200 OK" in server.log()
    response = requests.get(server.url("/"))
    assert response.status_code == 200 and "Latest articles" in response.text
    assert len(server.status()["app"]["workers"]) == 2
    # The page links the stylesheet by its hashed name; the load balancer serves it from
    # STATIC_ROOT, compressed and immutable, without a request reaching a worker.
    stylesheet = re.search(r'href="(/static/site\.[0-9a-f]{12}\.css)"', response.text).group(1)
    def app_requests():
        return sum(float(line.split()[-1]) for line in server.admin("/metrics").text.splitlines()
                   if line.startswith("strata_app_requests_total{"))

    served = app_requests()
    css = requests.get(server.url(stylesheet), headers={"Accept-Encoding": "gzip"})
    assert css.status_code == 200 and css.headers["Content-Encoding"] == "gzip"
    assert css.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert css.text == (ROOT / "example" / "static" / "site.css").read_text()
    assert app_requests() == served > 0
