"""Conformance of the accelerator, written from the specifications section by section: RFC 9111
(HTTP Caching), RFC 5861 (stale-while-revalidate, stale-if-error), RFC 9211 (Cache-Status) and
RFC 9213 (targeted cache control). Each test names the section it checks. The origin is
tests/apps/origin.py, which logs every call, so "served from the store" is checked by counting
what reached the application, not by trusting the cache's own headers."""

import subprocess
import sys
import time
from email.utils import formatdate

import requests

from conftest import APPS, free_port, status_of, wait_for_port


def hit(response):
    return status_of(response).startswith("strata; hit")


def test_3_a_response_without_freshness_is_not_reused(origin):
    """RFC 9111 §3 and §4.2: no explicit freshness and no default TTL → never reused."""
    path = "/s3?x=1"
    origin.get(path)
    origin.get(path)
    assert origin.calls(path) == 2


def test_3_only_final_storable_statuses_with_freshness(origin):
    """RFC 9111 §3: any final status with explicit freshness may be stored (here 404 and 500);
    a 206 or a 304 never stands alone in the store."""
    for status in ("404", "500"):
        path = f"/s3s?cc=max-age=60&status={status}"
        origin.get(path)
        again = origin.get(path)
        assert again.status_code == int(status) and hit(again)
        assert origin.calls(path) == 1
    partial = "/s3p?cc=max-age=60&status=206&h=Content-Range:bytes 0-1/10"
    origin.get(partial)
    origin.get(partial)
    assert origin.calls(partial) == 2


def test_3_1_hop_by_hop_and_connection_listed_fields_are_not_stored(strata):
    """RFC 9111 §3.1: fields named in Connection are not stored (a plain HTTP origin, since
    a WSGI application may not send Connection at all)."""
    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(APPS / "raw_origin.py"), str(port)])
    try:
        assert wait_for_port(port, 10, upstream)
        server = strata("--tiers", "lb,accelerator", "--upstream", f"http://127.0.0.1:{port}")
        url = server.url("/s31?h=Cache-Control:max-age=60&h=Connection:X-Hop&h=X-Hop:1&h=X-Kept:1")
        first = requests.get(url, timeout=10)
        again = requests.get(url, timeout=10)
    finally:
        upstream.kill()
        upstream.wait()
    assert hit(again) and again.text == first.text
    assert "X-Hop" not in again.headers and again.headers["X-Kept"] == "1"


def test_3_2_and_4_3_4_a_304_refreshes_and_updates_the_stored_response(origin):
    """RFC 9111 §4.3.1: a stale response with an ETag is revalidated with If-None-Match;
    §4.3.4: the 304's fields replace the stored ones (Origin-Time), the body is kept."""
    path = '/s32?cc=max-age=1&h=ETag:"v1"&validate=1'
    first = origin.get(path)
    time.sleep(1.5)
    revalidated = origin.get(path)
    assert revalidated.status_code == 200 and revalidated.text == first.text
    assert "fwd-status=304" in status_of(revalidated)
    assert revalidated.headers["Origin-Time"] != first.headers["Origin-Time"]
    fresh_again = origin.get(path)
    assert hit(fresh_again) and fresh_again.headers["Origin-Time"] == revalidated.headers["Origin-Time"]
    assert origin.calls(path) == 2


def test_3_5_responses_to_authorized_requests(origin):
    """RFC 9111 §3.5: not stored unless public, s-maxage or must-revalidate allows it."""
    for cc, stored in (("max-age=60", False), ("s-maxage=60", True),
                       ("max-age=60,must-revalidate", True)):
        path = f"/s35?cc={cc}"
        origin.get(path, headers={"Authorization": "Basic dTpw"})
        assert hit(origin.get(path)) == stored, cc


def test_4_1_vary_selects_variants_and_star_never_matches(origin):
    """RFC 9111 §4.1: a stored response is used only when the Vary-named request fields
    match; `*` anywhere in Vary never matches."""
    path = "/s41?cc=max-age=60&h=Vary:X-Lang, X-Dev"
    a = origin.get(path, headers={"X-Lang": "en", "X-Dev": "m"})
    assert hit(origin.get(path, headers={"X-Lang": "en", "X-Dev": "m"}))
    b = origin.get(path, headers={"X-Lang": "en", "X-Dev": "d"})
    assert b.text != a.text
    assert not hit(origin.get(path, headers={"X-Lang": "en"}))
    star = "/s41s?cc=max-age=60&h=Vary:X-Lang&h=Vary:*"
    origin.get(star)
    assert not hit(origin.get(star))


def test_4_2_1_s_maxage_wins_over_max_age_wins_over_expires(origin):
    """RFC 9111 §4.2.1: a shared cache uses s-maxage, then max-age, then Expires − Date."""
    expires = formatdate(time.time() + 600, usegmt=True)
    path = f"/s421?cc=max-age=600,s-maxage=1&h=Expires:{expires}"
    origin.get(path)
    time.sleep(1.5)
    assert not hit(origin.get(path))
    path = f"/s421b?cc=max-age=1&h=Expires:{expires}"
    origin.get(path)
    time.sleep(1.5)
    assert not hit(origin.get(path))
    path = f"/s421c?h=Expires:{expires}"
    origin.get(path)
    assert hit(origin.get(path))


def test_4_2_3_age_includes_the_age_the_response_arrived_with(origin):
    """RFC 9111 §4.2.3: current_age counts the upstream Age; §5.1: Age is sent on hits."""
    path = "/s423?cc=max-age=100&h=Age:95"
    origin.get(path)
    again = origin.get(path)
    assert hit(again) and int(again.headers["Age"]) >= 95
    time.sleep(5.2)
    assert not hit(origin.get(path))


def test_4_2_4_must_revalidate_forbids_serving_stale_on_error(origin):
    """RFC 9111 §4.2.4 and §5.2.2.2: must-revalidate → never stale, even when the origin
    fails (RFC 5861 §4 does not override it)."""
    path = "/s424?cc=max-age=1,must-revalidate,stale-if-error=60"
    origin.get(path)
    origin.down.touch()
    time.sleep(1.5)
    assert origin.get(path).status_code == 503


def test_4_3_2_conditional_requests_are_answered_from_the_store(origin):
    """RFC 9111 §4.3.2: If-None-Match (weak comparison) and If-Modified-Since are evaluated
    against the stored response."""
    modified = formatdate(time.time() - 3600, usegmt=True)
    path = f'/s432?cc=max-age=60&h=ETag:W/"a"&h=Last-Modified:{modified}'
    origin.get(path)
    assert origin.get(path, headers={"If-None-Match": '"a"'}).status_code == 304
    assert origin.get(path, headers={"If-None-Match": '"b"'}).status_code == 200
    since = formatdate(time.time(), usegmt=True)
    assert origin.get(path, headers={"If-Modified-Since": since}).status_code == 304
    assert origin.calls(path) == 1


def test_4_4_unsafe_methods_invalidate_unknown_methods_too(origin):
    """RFC 9111 §4.4: a non-error response to an unsafe (or unknown) method invalidates the
    target URI; an error response does not."""
    path = "/s44?cc=max-age=60"
    origin.get(path)
    assert requests.request("M-SEARCH", origin.server.url(path), timeout=10).status_code == 200
    assert not hit(origin.get(path))
    assert hit(origin.get(path))
    requests.delete(origin.server.url(path + "&status=404"), timeout=10)
    assert hit(origin.get(path))


def test_5_2_1_7_only_if_cached(origin):
    """RFC 9111 §5.2.1.7: only-if-cached answers 504 when nothing is stored."""
    path = "/s5217?cc=max-age=60"
    answer = origin.get(path, headers={"Cache-Control": "only-if-cached"})
    assert answer.status_code == 504 and origin.calls(path) == 0
    origin.get(path)
    assert origin.get(path, headers={"Cache-Control": "only-if-cached"}).status_code == 200


def test_5_2_2_response_directives(origin):
    """RFC 9111 §5.2.2.4 no-cache (stored, always revalidated), §5.2.2.5 no-store, §5.2.2.7
    private, §5.2.2.3 must-understand with an unknown status."""
    no_cache = '/s522a?cc=no-cache&h=ETag:"n"&validate=1'
    origin.get(no_cache)
    again = origin.get(no_cache)
    assert "fwd-status=304" in status_of(again) and origin.calls(no_cache) == 2
    for cc in ("no-store,max-age=60", "private,max-age=60"):
        path = f"/s522b?cc={cc}"
        origin.get(path)
        assert not hit(origin.get(path))
    unknown = "/s522c?cc=max-age=60,must-understand&status=599"
    origin.get(unknown)
    assert not hit(origin.get(unknown))


def test_5_3_an_invalid_expires_means_already_expired(origin):
    """RFC 9111 §5.3: an invalid Expires (such as 0) means the response is already stale."""
    path = "/s53?h=Expires:0"
    origin.get(path)
    assert not hit(origin.get(path))


def test_rfc5861_3_stale_while_revalidate_window(origin):
    """RFC 5861 §3: within the window the stale response is served and refreshed behind the
    client; past it, the client waits for the origin."""
    path = "/swr?cc=max-age=1,stale-while-revalidate=1"
    origin.get(path)
    time.sleep(1.3)
    assert "stale-while-revalidate" in status_of(origin.get(path))
    time.sleep(2.5)
    assert "stale-while-revalidate" not in status_of(origin.get(path))


def test_rfc9211_cache_status_reports_hits_forwards_and_reasons(origin):
    """RFC 9211 §2: hit, fwd with its reason, stored, ttl, detail."""
    path = "/cs?cc=max-age=60"
    miss = status_of(origin.get(path))
    assert miss.startswith("strata; fwd=uri-miss") and "stored" in miss and "ttl=60" in miss
    assert status_of(origin.get(path)).startswith("strata; hit; ttl=")
    assert "detail=private" in status_of(origin.get("/cs2?cc=private"))
    assert "fwd=method" in status_of(requests.post(origin.server.url("/cs3"), timeout=10))


def test_rfc9213_targeted_field_wins_and_is_not_forwarded(origin):
    """RFC 9213 §2.1: CDN-Cache-Control overrides Cache-Control for this cache (both ways),
    and is consumed rather than passed downstream."""
    longer = "/tc?cc=no-store&h=CDN-Cache-Control:max-age=60"
    origin.get(longer)
    again = origin.get(longer)
    assert hit(again) and again.headers["Cache-Control"] == "no-store"
    assert "CDN-Cache-Control" not in again.headers
    shorter = "/tc2?cc=max-age=60&h=CDN-Cache-Control:no-store"
    origin.get(shorter)
    assert not hit(origin.get(shorter))
    surrogate = "/tc3?cc=private&h=Surrogate-Control:max-age=60"
    origin.get(surrogate)
    assert hit(origin.get(surrogate))
