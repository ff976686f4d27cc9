"""Exercises every operation Django's cache API performs, against the cache configured by
argv: `python django_cache_check.py BACKEND LOCATION`. Exits non-zero with the failing
assertion. Run in its own process so Django's settings stay private to it."""

import sys
import time

import django
from django.conf import settings

settings.configure(CACHES={"default": {"BACKEND": sys.argv[1], "LOCATION": sys.argv[2]}})
django.setup()

from django.core.cache import cache  # noqa: E402

cache.clear()
assert cache.get("missing") is None
assert cache.get("missing", "dflt") == "dflt"
cache.set("str", "text")
cache.set("bytes", b"\x00\xff")
cache.set("int", 41)
cache.set("obj", {"a": [1, 2]})
assert cache.get("str") == "text"
assert cache.get("bytes") == b"\x00\xff"
assert cache.get("obj") == {"a": [1, 2]}
assert cache.has_key("str") and not cache.has_key("nope")
assert cache.incr("int") == 42 and cache.decr("int", 2) == 40
try:
    cache.incr("missing")
except ValueError:
    pass
else:
    raise AssertionError("incr of a missing key must raise ValueError")
assert cache.add("str", "other") is False and cache.get("str") == "text"
assert cache.add("new", "v") is True
assert cache.get_many(["str", "new", "missing"]) == {"str": "text", "new": "v"}
assert cache.set_many({"m1": 1, "m2": "two"}) == []
assert cache.get_many(["m1", "m2"]) == {"m1": 1, "m2": "two"}
cache.delete_many(["m1", "m2"])
assert cache.get("m1") is None
assert cache.delete("str") is True and cache.delete("str") is False
assert cache.get_or_set("computed", lambda: "value") == "value"
assert cache.get("computed") == "value"
cache.set("short", 1, timeout=1)
assert cache.touch("short", 60) is True
assert cache.touch("absent", 60) is False
time.sleep(1.2)
assert cache.get("short") == 1, "touch extended the item"
cache.set("gone", 1, timeout=0)
assert cache.get("gone") is None, "timeout=0 expires at once"
cache.set("forever", 1, timeout=None)
cache.set("far", 1, timeout=60 * 60 * 24 * 40)
assert cache.get("forever") == 1 and cache.get("far") == 1
cache.set("brief", 1, timeout=1)
time.sleep(1.2)
assert cache.get("brief") is None
cache.set("v", "one")
cache.incr_version("v")
assert cache.get("v", version=2) == "one" and cache.get("v") is None
cache.set("big", "x")
try:
    cache.set("big", "y" * (2 * 1024 * 1024))
except Exception:
    pass
assert cache.get("big") is None, "a failed set leaves no stale value"
cache.clear()
assert cache.get("new") is None
print("ok")
