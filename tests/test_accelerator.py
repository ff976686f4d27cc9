"""The accelerator in front of the app server: a WSGI origin (tests/apps/origin.py) that logs
every call it serves, so each test can count what reached Python."""

import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import APPS, Origin, app, free_port, metric, status_of, wait_for_port, wait_until


def test_fresh_hits_carry_age_and_cache_status(origin):
    path = "/a?cc=max-age=60"
    first = origin.get(path)
    assert first.status_code == 200
    assert "fwd=uri-miss; stored" in status_of(first)
    time.sleep(1.1)
    second = origin.get(path)
    assert second.text == first.text
    assert status_of(second).startswith("strata; hit")
    assert int(second.headers["Age"]) >= 1
    assert origin.calls(path) == 1
    head = requests.head(origin.server.url(path), timeout=10)
    assert head.status_code == 200 and status_of(head).startswith("strata; hit")
    assert int(head.headers["Content-Length"]) == len(first.content)
    assert origin.calls(path) == 1


def test_a_thousand_concurrent_requests_to_a_cold_slow_url_reach_the_app_once(origin):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 2500, "the test needs 1000 sockets"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2500), hard))
    path = "/cold?cc=max-age=60&sleep=1"
    request = (f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").encode()
    sockets = []
    for _ in range(1000):
        sock = socket.create_connection(("127.0.0.1", origin.server.port), timeout=60)
        sock.sendall(request)
        sockets.append(sock)
    answers = []
    for sock in sockets:
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        sock.close()
        answers.append(b"".join(chunks))
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    bodies = {a.split(b"\r\n\r\n", 1)[1] for a in answers}
    assert len(bodies) == 1, "every client got the one response the app produced"
    assert origin.calls(path) == 1
    assert sum(b"collapsed" in a for a in answers) >= 900


def test_uncacheable_answers_release_waiters_and_are_remembered(origin):
    path = "/private?cc=private&sleep=0.3"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: origin.get(path), range(6)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.text for a in answers}) == 6, "each waiter went to the app itself"
    assert origin.calls(path) == 6
    later = status_of(origin.get(path))
    # One `detail` per entry (RFC 9211 is a structured field: a repeated parameter keeps only
    # its last value), naming both why it went forward and why it was not stored.
    assert later.count("detail=") == 1, later
    assert 'detail="hit-for-miss private"' in later, later


def test_vary_keeps_one_variant_per_header_value(origin):
    path = "/v?cc=max-age=60&h=Vary:Accept-Language"
    en = origin.get(path, headers={"Accept-Language": "en"})
    fr = origin.get(path, headers={"Accept-Language": "fr"})
    assert en.text != fr.text
    assert origin.get(path, headers={"Accept-Language": "en"}).text == en.text
    assert origin.get(path, headers={"Accept-Language": "fr"}).text == fr.text
    assert origin.calls(path) == 2
    star = "/star?cc=max-age=60&h=Vary:Accept,*"
    origin.get(star)
    assert 'detail="hit-for-miss vary-star"' in status_of(origin.get(star))
    assert origin.calls(star) == 2


def test_cookies_session_passes_analytics_ignored_csrf_keyed(origin):
    page = "/page?cc=max-age=60"
    anonymous = origin.get(page)
    with_analytics = origin.get(page, cookies={"_ga": "GA1.2.3", "_gid": "x"})
    assert with_analytics.text == anonymous.text
    assert status_of(with_analytics).startswith("strata; hit")
    session = origin.get(page, cookies={"sessionid": "abc", "_ga": "1"})
    assert "fwd=bypass" in status_of(session) and "sessionid" in status_of(session)
    assert "cookie=" in session.text and "sessionid=abc" in session.text
    assert origin.calls(page) == 2
    # A page that varies on Cookie is keyed on the CSRF cookie only.
    form = "/form?cc=max-age=60&h=Vary:Cookie"
    a1 = origin.get(form, cookies={"csrftoken": "A", "_ga": "1"})
    a2 = origin.get(form, cookies={"csrftoken": "A", "_ga": "2"})
    b = origin.get(form, cookies={"csrftoken": "B"})
    assert a1.text == a2.text and b.text != a1.text
    assert origin.calls(form) == 2


def test_set_cookie_and_authorization_are_not_stored_unless_allowed(origin):
    cookie = "/c?cc=max-age=60&h=Set-Cookie:csrftoken=x"
    first = origin.get(cookie)
    assert first.cookies.get("csrftoken") == "x"
    assert "detail=set-cookie" in status_of(first)
    assert origin.get(cookie).text != first.text
    # A targeted directive allows storing; the stored copy never carries the cookie.
    allowed = "/c2?cc=max-age=60&h=Set-Cookie:csrftoken=y&h=CDN-Cache-Control:max-age=60"
    first = origin.get(allowed)
    assert first.cookies.get("csrftoken") == "y"
    second = origin.get(allowed)
    assert status_of(second).startswith("strata; hit")
    assert "Set-Cookie" not in second.headers and "CDN-Cache-Control" not in second.headers
    auth = "/auth?cc=max-age=60"
    origin.get(auth, headers={"Authorization": "Bearer t"})
    assert "strata; hit" not in status_of(origin.get(auth))
    public = "/auth-public?cc=public,max-age=60"
    origin.get(public, headers={"Authorization": "Bearer t"})
    assert status_of(origin.get(public)).startswith("strata; hit")
    assert origin.calls(auth) == 2 and origin.calls(public) == 1


def test_successful_unsafe_methods_invalidate_the_url_and_location(origin):
    page, other = "/item?cc=max-age=60", "/list?cc=max-age=60"
    origin.get(page)
    origin.get(other)
    failed = requests.post(origin.server.url("/item?cc=max-age=60&status=500"), timeout=10)
    assert failed.status_code == 500
    assert status_of(origin.get(page)).startswith("strata; hit"), "an error invalidates nothing"
    location = origin.server.url("/list?cc=max-age=60")
    posted = requests.post(origin.server.url("/item?cc=max-age=60"), timeout=10)
    assert posted.status_code == 200 and "fwd=method" in status_of(posted)
    assert "uri-miss" in status_of(origin.get(page))
    moved = requests.post(origin.server.url(f"/x?status=303&h=Location:{location}"),
                          timeout=10, allow_redirects=False)
    assert moved.status_code == 303
    assert "uri-miss" in status_of(origin.get(other))


def test_grace_serves_stale_while_one_background_refresh_runs(origin):
    path = "/g?cc=max-age=1,stale-while-revalidate=30"
    first = origin.get(path)
    time.sleep(1.5)
    stale = origin.get(path)
    assert stale.text == first.text
    assert "detail=stale-while-revalidate" in status_of(stale)
    assert wait_until(lambda: origin.calls(path) == 2)
    fresh = origin.get(path)
    assert fresh.text != first.text and status_of(fresh).startswith("strata; hit")
    assert origin.calls(path) == 2


def test_stale_if_error_serves_stale_while_the_app_is_down(origin):
    kept = "/e?cc=max-age=1,stale-if-error=60"
    plain = "/p?cc=max-age=1"
    first = origin.get(kept)
    origin.get(plain)
    origin.down.touch()
    time.sleep(1.5)
    answer = origin.get(kept)
    assert answer.status_code == 200 and answer.text == first.text
    assert "detail=stale-if-error" in status_of(answer)
    assert origin.get(plain).status_code == 503
    origin.down.unlink()
    assert origin.get(kept).text != first.text


def test_stale_if_error_when_the_upstream_is_stopped(strata):
    """With the accelerator alone in front of another server, stopping that server leaves
    the stale copy to serve."""
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(APPS / "raw_origin.py"), str(port)])
    try:
        assert wait_for_port(port, 10, upstream)
        server = strata("--tiers", "lb,accelerator", "--upstream", f"http://127.0.0.1:{port}")
        page = "/page?h=Cache-Control:max-age=1, stale-if-error=60"
        first = requests.get(server.url(page), timeout=10)
        assert "stored" in status_of(first)
    finally:
        upstream.kill()
        upstream.wait()
    time.sleep(1.5)
    stale = requests.get(server.url(page), timeout=10)
    assert stale.status_code == 200 and stale.text == first.text
    assert "detail=stale-if-error" in status_of(stale)
    assert requests.get(server.url("/other"), timeout=10).status_code == 502


def test_conditional_requests_are_answered_from_the_store(origin):
    path = "/cond?cc=max-age=60&h=ETag:\"v1\""
    origin.get(path)
    answer = origin.get(path, headers={"If-None-Match": '"v1"'})
    assert answer.status_code == 304 and answer.headers["ETag"] == '"v1"'
    assert origin.get(path, headers={"If-None-Match": '"v0"'}).status_code == 200
    assert origin.calls(path) == 1


def test_stale_responses_are_revalidated_with_a_conditional_request(origin):
    path = "/reval?cc=max-age=1&h=ETag:\"v1\""
    first = origin.get(path)
    time.sleep(1.5)
    again = origin.get(path)
    # The origin answers 200 again (it ignores the condition): a full refresh.
    assert again.status_code == 200 and "fwd=stale" in status_of(again)
    assert origin.calls(path) == 2 and again.text != first.text


def test_purge_from_trusted_addresses_removes_all_variants(origin):
    path = "/pv?cc=max-age=60&h=Vary:Accept-Language"
    for lang in ("en", "fr"):
        origin.get(path, headers={"Accept-Language": lang})
    purge = requests.request("PURGE", origin.server.url(path), timeout=10)
    assert purge.status_code == 200 and purge.headers["Strata-Purged"] == "2"
    for lang in ("en", "fr"):
        assert "uri-miss" in status_of(origin.get(path, headers={"Accept-Language": lang}))
    # Wagtail purges a URL nothing is stored for, and expects 200; the log says which host
    # and path found nothing (a Host visitors do not use is the usual cause), once a minute
    # per host.
    for path, host in [("/nothing", "wagtail.local:8000"), ("/nothing2", "wagtail.local:8000"),
                       ("/other", "www.example.com")]:
        empty = requests.request("PURGE", origin.server.url(path), headers={"Host": host},
                                 timeout=10)
        assert empty.status_code == 200 and empty.headers["Strata-Purged"] == "0"
    lines = [line for line in origin.server.log().splitlines() if "PURGE found nothing" in line]
    assert len(lines) == 2, lines
    assert "wagtail.local:8000" in lines[0] and "/nothing" in lines[0], lines
    assert "www.example.com" in lines[1] and "/other" in lines[1], lines


def test_purge_is_refused_from_untrusted_addresses(strata, tmp_path):
    origin = Origin(strata, tmp_path, config='[accelerator]\npurge_from = ["10.0.0.0/8"]\n')
    path = "/a?cc=max-age=60"
    origin.get(path)
    refused = requests.request("PURGE", origin.server.url(path), timeout=10)
    assert refused.status_code == 403
    assert status_of(origin.get(path)).startswith("strata; hit")


def test_tag_purge_ban_and_soft_purge_through_the_admin_listener(origin):
    tagged = ["/t1?cc=max-age=60&h=Surrogate-Key:post-1 blog",
              "/t2?cc=max-age=60&h=Cache-Tag:post-2,blog"]
    for path in tagged:
        origin.get(path)
        assert "Surrogate-Key" not in origin.get(path).headers
    answer = origin.admin_post("/cache/purge?tag=post-1")
    assert answer.json()["purged"] == 1
    assert "uri-miss" in status_of(origin.get(tagged[0]))
    assert status_of(origin.get(tagged[1])).startswith("strata; hit")
    assert origin.admin_post("/cache/purge?tag=blog").json()["purged"] == 2
    blog = ["/blog/1?cc=max-age=60", "/blog/2?cc=max-age=60", "/shop?cc=max-age=60"]
    for path in blog:
        origin.get(path)
    assert origin.admin_post("/cache/purge?ban=*/blog/*").json()["purged"] == 2
    assert status_of(origin.get(blog[2])).startswith("strata; hit")
    assert "uri-miss" in status_of(origin.get(blog[0]))
    # Soft: the next visitor still gets the page at once, and it is refreshed behind them.
    soft = "/soft?cc=max-age=600"
    first = origin.get(soft)
    url = f"http://127.0.0.1:{origin.server.port}/soft?cc=max-age=600"
    assert origin.admin_post(f"/cache/purge?url={requests.utils.quote(url, safe='')}&soft=1"
                             ).json() == {"purged": 1, "soft": True, "missed": []}
    stale = origin.get(soft)
    assert stale.text == first.text and "stale-while-revalidate" in status_of(stale)
    assert wait_until(lambda: origin.calls(soft) == 2)
    assert wait_until(lambda: origin.get(soft).text != first.text)
    assert origin.admin_post("/cache/purge?nope=1").status_code == 400


def test_application_code_purges_in_process(origin):
    pages = ["/n1?cc=max-age=60", "/n2?cc=max-age=60&h=Surrogate-Key:news"]
    for page in pages:
        origin.get(page)
    quote = requests.utils.quote
    answer = origin.get(f"/publish?purge={quote(pages[0], safe='')}&purge_tag=news")
    assert answer.headers["Purged"] == "2"
    for page in pages:
        assert "uri-miss" in status_of(origin.get(page))
    # Absolute URLs name their host; soft purges keep serving while refreshing.
    url = f"http://127.0.0.1:{origin.server.port}{pages[0]}"
    answer = origin.get(f"/publish2?purge={quote(url, safe='')}&soft=1")
    assert answer.headers["Purged"] == "1"
    assert "stale-while-revalidate" in status_of(origin.get(pages[0]))
    assert "Purged" not in origin.get(pages[0]).headers


def test_purging_needs_the_accelerator_tier(strata, tmp_path):
    server = strata(*app("origin", tiers="lb,app"))
    answer = requests.get(server.url("/p?purge=/x&purge_tag=t"), timeout=10)
    assert answer.status_code == 200 and answer.headers["Purged"] == "0"


def test_large_responses_stream_through_without_being_stored(strata, tmp_path):
    origin = Origin(strata, tmp_path, config="[accelerator]\nmax_object_bytes = 100000\n")
    big = "/big?cc=max-age=60&size=300000"
    for _ in range(2):
        answer = origin.get(big)
        assert len(answer.content) == 300000
    assert origin.calls(big) == 2
    small = "/small?cc=max-age=60&size=50000"
    origin.get(small)
    assert len(origin.get(small).content) == 50000
    assert origin.calls(small) == 1


def test_the_store_survives_a_rolling_reload(origin):
    path = "/r?cc=max-age=600"
    first = origin.get(path)
    assert origin.admin_post("/reload").status_code == 200
    assert origin.get(path).text == first.text
    assert origin.calls(path) == 1


def test_metrics_and_status_report_the_cache(origin):
    path = "/blog/m?cc=max-age=60"
    origin.get(path)
    origin.get(path)
    origin.get("/blog/uncached")
    assert metric(origin.server, 'strata_accelerator_requests_total{result="hit"}') >= 1
    assert metric(origin.server, 'strata_accelerator_requests_total{result="miss"}') >= 2
    assert metric(origin.server, "strata_accelerator_stored_bytes") > 0
    routes = {r["route"]: r for r in origin.server.status()["accelerator"]["routes"]}
    assert routes["/blog/"]["lookups"] == 3 and routes["/blog/"]["hits"] == 1


def test_microcache_default_ttl_and_grace_for_pages_that_state_no_freshness(strata, tmp_path):
    """`default_ttl` and `grace` make a one-second microcache of anonymous pages that give no
    freshness themselves; personal and cookie-setting answers still pass."""
    origin = Origin(strata, tmp_path, config='[accelerator]\ndefault_ttl = "1s"\ngrace = "30s"\n')
    page = "/micro"
    first = origin.get(page)
    assert "stored" in status_of(first)
    assert status_of(origin.get(page)).startswith("strata; hit")
    time.sleep(1.2)
    stale = origin.get(page)
    assert stale.text == first.text and "stale-while-revalidate" in status_of(stale)
    assert wait_until(lambda: origin.calls(page) == 2)
    for personal in ("/micro?cc=private", "/micro2?h=Set-Cookie:a=b"):
        origin.get(personal)
        assert not status_of(origin.get(personal)).startswith("strata; hit")
    origin.get(page, cookies={"sessionid": "s"})
    assert origin.calls(page) == 3
