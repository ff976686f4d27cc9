"""The cache tier: Strata's memcached, driven by real clients (pymemcache, Django's
PyMemcacheCache) and by raw bytes for the error paths."""

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from conftest import APPS, app, metric


@pytest.fixture
def cache(strata, tmp_path):
    server = strata("--tiers", "cache", config="[cache]\ncapacity_bytes = 16777216\n")
    return server


def client(server, **kwargs):
    return Client(("127.0.0.1", server.cache_port), timeout=5, default_noreply=False, **kwargs)


def raw(server, payload, expect_close=False):
    """Sends raw bytes and returns everything answered until the server goes quiet."""
    with socket.create_connection(("127.0.0.1", server.cache_port), timeout=2) as sock:
        sock.sendall(payload)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if not expect_close and data.endswith(b"\r\n") and len(data) > 0:
                    sock.settimeout(0.3)
        except TimeoutError:
            pass
        return data


def test_classic_commands_through_pymemcache(cache):
    mc = client(cache)
    assert mc.version().startswith(b"1.6")
    assert mc.set("k", b"v", expire=0) is True
    assert mc.get("k") == b"v"
    assert mc.add("k", b"x") is False and mc.add("k2", b"x") is True
    assert mc.replace("nope", b"x") is False and mc.replace("k2", b"y") is True
    assert mc.append("k", b"+end") and mc.prepend("k", b"start+")
    assert mc.get("k") == b"start+v+end"
    value, cas = mc.gets("k")
    assert mc.cas("k", b"new", cas) is True
    assert mc.cas("k", b"newer", cas) is False
    assert mc.get_many(["k", "k2", "missing"]) == {"k": b"new", "k2": b"y"}
    assert mc.set("n", b"10") and mc.incr("n", 5) == 15 and mc.decr("n", 20) == 0
    assert mc.incr("missing", 1) is None
    with pytest.raises(MemcacheClientError, match="non-numeric"):
        mc.incr("k", 1)
    assert mc.touch("k", 100) is True and mc.touch("missing", 100) is False
    assert mc.delete("k") is True and mc.get("k") is None
    assert mc.set_many({"a": b"1", "b": b"2"}, noreply=False) == []
    assert mc.get_many(["a", "b"]) == {"a": b"1", "b": b"2"}
    mc.set("quiet", b"1", noreply=True)
    assert mc.get("quiet") == b"1"
    stats = mc.stats()
    assert stats[b"get_hits"] >= 5 and stats[b"curr_items"] >= 3
    assert mc.flush_all() is True and mc.get("a") is None


def test_flags_are_echoed_and_expiry_follows_memcached(cache):
    mc = client(cache)
    assert raw(cache, b"set f 4294967295 0 1\r\nx\r\nget f\r\n") == \
        b"STORED\r\nVALUE f 4294967295 1\r\nx\r\nEND\r\n"
    mc.set("neg", b"1", expire=-1)
    assert mc.get("neg") is None
    mc.set("abs", b"1", expire=int(time.time()) + 3600)
    mc.set("past", b"1", expire=int(time.time()) - 3600 + 0)
    assert mc.get("abs") == b"1" and mc.get("past") is None
    mc.set("short", b"1", expire=1)
    time.sleep(1.1)
    assert mc.get("short") is None


def test_bad_input_gets_memcached_answers_and_harms_no_one(cache):
    other = client(cache)
    other.set("safe", b"kept")
    long_key = b"k" * 251
    assert raw(cache, b"get " + long_key + b"\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    assert raw(cache, b"bogus\r\n") == b"ERROR\r\n"
    assert raw(cache, b"set k 0 0 3\r\nabcde\r\nget safe\r\n").startswith(
        b"CLIENT_ERROR bad data chunk\r\n")
    assert raw(cache, b"incr safe x\r\n") == b"CLIENT_ERROR invalid numeric delta argument\r\n"
    # A value over the 1 MiB limit is refused without being buffered; the old value is gone,
    # and the connection goes on with the next command.
    other.set("big", b"old")
    payload = b"x" * (2 * 1024 * 1024)
    answer = raw(cache, b"set big 0 0 %d\r\n" % len(payload) + payload + b"\r\nget safe\r\n")
    assert answer == b"SERVER_ERROR object too large for cache\r\nVALUE safe 0 4\r\nkept\r\nEND\r\n"
    assert other.get("big") is None
    with pytest.raises(MemcacheServerError):
        other.set("big", payload)
    garbage = bytes(range(256)) * 4
    assert raw(cache, garbage + b"\r\n").startswith(b"ERROR")
    assert raw(cache, b"a" * 10000, expect_close=True) == b"CLIENT_ERROR line too long\r\n"
    assert other.get("safe") == b"kept"


def test_meta_commands_and_leases(cache):
    answer = raw(cache, b"ms m 2 T0 F7\r\nhi\r\nmg m v f c s k\r\nmg none v\r\nmg none v q\r\nmn\r\n")
    lines = answer.split(b"\r\n")
    assert lines[0] == b"HD"
    assert lines[1].startswith(b"VA 2 ") and b" f7" in lines[1] and b" s2" in lines[1]
    assert lines[2] == b"hi" and lines[3] == b"EN" and lines[4] == b"MN"
    # The first miss wins the right to compute; the others are told someone is on it.
    first = raw(cache, b"mg lease v N30\r\n")
    second = raw(cache, b"mg lease v N30\r\n")
    assert first.startswith(b"VA 0 W") and second.startswith(b"VA 0 Z")
    # A value marked stale is still served, once with the right to recompute.
    raw(cache, b"ms s 3\r\nold\r\n")
    assert raw(cache, b"md s I\r\n") == b"HD\r\n"
    stale = raw(cache, b"mg s v\r\n")
    assert stale.startswith(b"VA 3 X W") and stale.endswith(b"old\r\n")  # memcached's order
    assert raw(cache, b"mg s v\r\n").startswith(b"VA 3 Z X")
    assert raw(cache, b"ma cnt N0 J10 v\r\nma cnt D5 v\r\nma cnt MD D20 v\r\n") == \
        b"VA 2\r\n10\r\nVA 2\r\n15\r\nVA 1\r\n0\r\n"
    assert raw(cache, b"md m\r\nmd m\r\n") == b"HD\r\nNF\r\n"


def test_a_full_store_keeps_the_newest_writes(cache):
    """100 MB of 10 KB values into the 16 MiB store: like memcached, the least recently used
    go, so what was just written can be read (every set answered STORED)."""
    c = client(cache)
    value = b"v" * 10_000
    keys = [f"newest:{i}" for i in range(10_000)]
    for start in range(0, len(keys), 100):
        failed = c.set_many({k: value for k in keys[start:start + 100]}, noreply=False)
        assert failed == []
    recent = c.get_many(keys[-1000:])
    assert len(recent) == 1000, f"only {len(recent)} of the last 1,000 writes remain"
    assert c.get_many(keys[:1000]) == {}
    stats = c.stats()
    assert stats[b"evictions"] > 8000 and stats[b"bytes"] <= 16 * 1024 * 1024


def test_django_pymemcache_backend_works_unchanged(cache):
    result = subprocess.run(
        [sys.executable, str(APPS / "django_cache_check.py"),
         "django.core.cache.backends.memcached.PyMemcacheCache",
         f"127.0.0.1:{cache.cache_port}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_unix_socket_and_consistent_hashing_over_two_nodes(strata, tmp_path):
    sock = tmp_path / "cache.sock"
    one = strata("--tiers", "cache", config=f'[cache]\nunix_socket = "{sock}"\n')
    two = strata("--tiers", "cache")
    local = Client(str(sock), timeout=5, default_noreply=False)
    assert local.set("u", b"1") and local.get("u") == b"1"
    both = HashClient([("127.0.0.1", one.cache_port), ("127.0.0.1", two.cache_port)],
                     timeout=5, default_noreply=False)
    keys = [f"key-{i}" for i in range(200)]
    for key in keys:
        both.set(key, key.encode())
    assert all(both.get(key) == key.encode() for key in keys)
    counts = [client(node).stats()[b"curr_items"] for node in (one, two)]
    assert counts[0] > 20 and counts[1] > 20, counts


def test_metrics_and_connection_limit(strata):
    server = strata("--tiers", "cache", config="[cache]\nmax_connections = 2\n")
    mc = client(server)
    mc.set("a", b"1")
    mc.get("a")
    mc.get("b")
    assert metric(server, 'strata_cache_commands_total{outcome="get_hit"}') == 1
    assert metric(server, 'strata_cache_commands_total{outcome="get_miss"}') == 1
    assert metric(server, "strata_cache_items") == 1
    held = [socket.create_connection(("127.0.0.1", server.cache_port)) for _ in range(2)]
    time.sleep(0.2)
    refused = raw(server, b"version\r\n", expect_close=True)
    assert refused == b"SERVER_ERROR too many open connections\r\n"
    for sock in held:
        sock.close()


def test_strata_cache_backend_over_the_worker_channel(strata, tmp_path):
    log = tmp_path / "dogpile.log"
    log.touch()
    server = strata(*app("dogpile", "--workers", "4", tiers="lb,app,cache"),
                    env={"DOGPILE_LOG": str(log)})
    assert requests.get(server.url("/ops"), timeout=10).text == "ok"
    # The values are the ones TCP clients see (pymemcache's encoding).
    assert client(server).get(":1:b") == b"4"


def test_get_or_set_is_computed_once_across_workers(strata, tmp_path):
    log = tmp_path / "dogpile.log"
    log.touch()
    server = strata(*app("dogpile", "--workers", "4", tiers="lb,app,cache"),
                    env={"DOGPILE_LOG": str(log)})
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda _: requests.get(server.url("/hot"), timeout=30).text,
                               range(32)))
    assert len(set(bodies)) == 1, "everyone got the one computed value"
    runs = log.read_text().split()
    assert len(runs) == 1, runs
    # Marked stale: one worker recomputes, the others are served the stale value meanwhile.
    assert requests.get(server.url("/mark-stale"), timeout=10).text == "HD\r\n"
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _: requests.get(server.url("/hot"), timeout=30).text,
                              range(8)))
    assert len(log.read_text().split()) == 2
    assert bodies[0] in after, "the stale value was served while the winner recomputed"
    assert metric(server, 'strata_cache_commands_total{outcome="get_hit"}') > 0
    assert metric(server, 'strata_cache_leases_total{result="won"}') == 2
    assert metric(server, 'strata_cache_leases_total{result="waited"}') >= 1


def test_strata_cache_backend_outside_strata_falls_back_to_a_local_store(tmp_path):
    script = (
        "import warnings\n"
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(CACHES={'default': {'BACKEND': 'strata.django.StrataCache'}})\n"
        "django.setup()\n"
        "from django.core.cache import cache\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    cache.set('k', 'v')\n"
        "    assert cache.get('k') == 'v'\n"
        "    assert cache.get_or_set('x', lambda: 1) == 1\n"
        "    cache.set('t', 1, tags=['a'])\n"
        "    cache.delete_tags('a')\n"
        "    assert cache.get('t') is None\n"
        "    cache.set('p:1', 1)\n"
        "    assert cache.delete_prefix('p:') == 1\n"
        "assert any('local in-process cache' in str(w.message) for w in caught), caught\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_memccapable_suite_passes(cache):
    """libmemcached's protocol checks (memccapable, 27 text-protocol tests; memcached passes
    all). .ci/run installs it from apt."""
    tool = shutil.which("memccapable")
    assert tool, "memccapable is needed (apt-get install libmemcached-tools)"
    result = subprocess.run([tool, "-h", "127.0.0.1", "-p", str(cache.cache_port), "-a"],
                            capture_output=True, text=True, timeout=120)
    assert "All tests passed" in result.stdout, result.stdout + result.stderr


def test_pymemcache_integration_suite(cache):
    """pymemcache's own integration tests (shipped in its wheel) against Strata: all pass, as
    against memcached (`test_misc` among them, which changes the budget with
    `cache_memlimit`)."""
    import pymemcache

    suite = Path(pymemcache.__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", "/dev/null", "--rootdir", str(suite),
         "-p", "no:cacheprovider", "-W", "ignore", "-m", "integration", "-q",
         "--server", "127.0.0.1", "--port", str(cache.cache_port), "test/test_integration.py",
         "test/test_client_hash.py", "test/test_client.py"],
        cwd=suite, capture_output=True, text=True, timeout=300)
    failed = {line.split(" ")[1].split("[")[0] for line in result.stdout.splitlines()
              if line.startswith("FAILED")}
    assert failed == set(), result.stdout[-3000:]
    assert re.search(r"\b100 passed", result.stdout), result.stdout[-500:]


def test_a_cache_node_has_no_http_listener(cache):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cache.port), timeout=2).close()
    assert cache.status()["tiers"] == ["cache"]


def test_djangos_own_cache_tests_pass_against_strata(cache, django_tests):
    """Django's test suite for its memcached backend (`cache.tests.PyMemcacheCacheTests`, from
    the sdist of the installed Django) with the `pymemcache` cache pointed at Strata."""
    tests = django_tests
    (tests / "strata_settings.py").write_text(
        "from test_sqlite import *  # noqa\n"
        "CACHES = {\n"
        "    'default': {'BACKEND': 'django.core.cache.backends.locmem.LocMemCache'},\n"
        "    'pymemcache': {'BACKEND': 'django.core.cache.backends.memcached.PyMemcacheCache',\n"
        f"                   'LOCATION': '127.0.0.1:{cache.cache_port}'}},\n"
        "}\n")
    result = subprocess.run(
        [sys.executable, "runtests.py", "--settings=strata_settings", "--parallel=1",
         "cache.tests.PyMemcacheCacheTests"],
        cwd=tests, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = re.search(r"Ran (\d+) tests", result.stderr)
    assert ran and int(ran.group(1)) >= 50 and "\nOK" in result.stderr, result.stderr[-1000:]
