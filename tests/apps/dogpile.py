"""A WSGI app using Django's cache API through `strata.django.StrataCache` (configured here,
without a project). `/hot` calls `get_or_set` on one key with an expensive function that
logs each run to DOGPILE_LOG; `/mark-stale` marks the key stale over the raw protocol;
`/ops` exercises the rest of the API and answers "ok"; `/fill?n=N` sets `k0`..`k{N-1}` and
`/count?n=N` answers how many of them are still there."""

import os
import time

import django
from django.conf import settings

settings.configure(CACHES={"default": {
    "BACKEND": "strata.django.StrataCache",
    "OPTIONS": {"lease_timeout": 10},
}})
django.setup()

from django.core.cache import cache  # noqa: E402

import strata  # noqa: E402

LOG = os.environ.get("DOGPILE_LOG")


def expensive():
    with open(LOG, "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    return f"computed by {os.getpid()} at {time.time()}"


def ops():
    cache.clear()
    cache.set("a", {"x": 1}, 60)
    assert cache.get("a") == {"x": 1}
    assert cache.add("a", 2) is False and cache.add("b", 2) is True
    assert cache.incr("b", 3) == 5 and cache.decr("b") == 4
    assert cache.get_many(["a", "b", "c"]) == {"a": {"x": 1}, "b": 4}
    assert cache.set_many({"c": "text", "d": b"raw"}) == []
    assert cache.get("c") == "text" and cache.get("d") == b"raw"
    assert cache.touch("c", 10) and not cache.touch("zz", 10)
    assert cache.delete("c") and not cache.delete("c")
    cache.delete_many(["a", "d"])
    assert cache.get("a") is None and cache.has_key("b")
    cache.set("gone", 1, 0)
    assert cache.get("gone") is None
    try:
        cache.incr("missing")
    except ValueError:
        pass
    else:
        raise AssertionError("incr of a missing key raises ValueError")
    assert cache.get_or_set("fresh", lambda: "made") == "made"
    assert cache.get_or_set("fresh", lambda: "again") == "made"
    # Tags: invalidating one drops every value carrying it, and only those.
    cache.set("p1", "page one", tags=["post:1", "posts"])
    cache.set("p2", "page two", tags=["post:2", "posts"])
    cache.set("other", "kept")
    cache.delete_tags("post:1")
    assert cache.get("p1") is None and cache.get("p2") == "page two"
    assert cache.get_many(["p1", "p2", "other"]) == {"p2": "page two", "other": "kept"}
    assert cache.get_or_set("p3", lambda: "three", tags=["posts"]) == "three"
    cache.delete_tags("posts")
    assert cache.get("p2") is None
    assert cache.get_or_set("p3", lambda: "three again", tags=["posts"]) == "three again"
    # Prefixes.
    cache.set_many({"user:1:a": 1, "user:1:b": 2, "user:2:a": 3})
    assert cache.delete_prefix("user:1:") == 2
    assert cache.get("user:1:a") is None and cache.get("user:2:a") == 3
    return "ok"


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/hot":
        body = cache.get_or_set("hot", expensive, 60)
    elif path == "/mark-stale":
        key = cache.make_key("hot").encode()
        body = strata._channel.cache(b"md %s I\r\n" % key).decode()
    elif path == "/ops":
        body = ops()
    elif path in ("/fill", "/count"):
        n = int(environ["QUERY_STRING"].split("=")[1])
        keys = [f"k{i}" for i in range(n)]
        if path == "/fill":
            body = str(len(keys) - len(cache.set_many({k: k for k in keys}, 600)))
        else:
            body = str(len(cache.get_many(keys)))
    else:
        body = "?"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
