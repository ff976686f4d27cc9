"""A Django cache backend on the node's cache tier: ``strata.django.StrataCache``.

Inside a Strata worker it talks to the master's store over the worker's own connection (no
TCP; the memcached protocol as the framing, values encoded as pymemcache's pickle serde does,
so TCP clients of the same store read them too). ``get_or_set`` is a lease: across every
worker of the node exactly one computes a missing key, or a key marked stale, or (with
``OPTIONS = {"refresh_ahead": seconds}``) a key about to expire; the others get the value
still stored, or wait for the winner up to ``lease_timeout`` seconds.

Extras: ``set(..., tags=[...])`` and ``get_or_set(..., tags=[...])`` tag a value, and
``delete_tags(*tags)`` invalidates every value carrying one of them (on any node sharing the
tags' keys); ``delete_prefix(prefix)`` removes every key that starts with ``prefix``.

Outside Strata (``manage.py``, test runs, task workers) the same settings keep working: the
backend warns once and uses a local in-process store (Django's ``LocMemCache``).
"""

import pickle
import threading
import time
import warnings

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.cache.backends.locmem import LocMemCache

import strata

__all__ = ["StrataCache"]

# Client flags as pymemcache's pickle serde writes them.
_BYTES, _PICKLE, _INT, _TEXT = 0, 1, 2, 16
_THIRTY_DAYS = 60 * 60 * 24 * 30


def _encode(value):
    if isinstance(value, bytes):
        return value, _BYTES
    if isinstance(value, str):
        return value.encode(), _TEXT
    if type(value) is int:
        return str(value).encode(), _INT
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL), _PICKLE


def _decode(data, flags):
    if flags == _BYTES:
        return data
    if flags == _TEXT:
        return data.decode()
    if flags == _INT:
        return int(data)
    return pickle.loads(data)


class _Tagged:
    """A value stored with the versions its tags had; stale once any tag moved on."""

    __slots__ = ("value", "versions")

    def __init__(self, value, versions):
        self.value = value
        self.versions = versions

    def __getstate__(self):
        return (self.value, self.versions)

    def __setstate__(self, state):
        self.value, self.versions = state


_TAG_PREFIX = "strata-tag:"


class _Reader:
    """Walks a memcached answer."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def line(self):
        end = self.data.index(b"\r\n", self.pos)
        line = self.data[self.pos:end]
        self.pos = end + 2
        return line

    def block(self, size):
        data = self.data[self.pos:self.pos + size]
        self.pos += size + 2
        return data


class StrataCache(BaseCache):
    def __init__(self, location, params):
        super().__init__(params)
        options = params.get("OPTIONS") or {}
        self._lease_timeout = float(options.get("lease_timeout", 5.0))
        self._poll = float(options.get("lease_poll", 0.01))
        self._refresh_ahead = int(options.get("refresh_ahead", 0))
        self._local = None
        self._params = params

    # -- plumbing ---------------------------------------------------------------------------

    def _ask(self, commands):
        """The cache tier's answer to `commands`, or None outside a Strata request."""
        channel = strata._channel
        if channel is None or threading.current_thread() is not threading.main_thread():
            return None
        answer = channel.cache(commands)
        if answer is not None and answer.startswith(b"SERVER_ERROR this node runs no cache"):
            return None
        return answer

    def _fallback(self):
        if self._local is None:
            warnings.warn(
                "strata.django.StrataCache: not inside a Strata worker serving a request with "
                "the cache tier; using a local in-process cache",
                RuntimeWarning,
                stacklevel=3,
            )
            self._local = LocMemCache("strata-fallback", self._params)
        return self._local

    def _key(self, key, version):
        return self.make_and_validate_key(key, version=version).encode()

    def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
        """memcached's expiry: None never, 0 at once, long ones as absolute times."""
        if timeout == DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return 0
        timeout = int(timeout)
        if timeout == 0:
            return -1
        if timeout > _THIRTY_DAYS:
            return int(time.time()) + timeout
        return timeout

    @staticmethod
    def _store_command(verb, key, value, exptime):
        data, flags = _encode(value)
        return b"%s %s %d %d %d\r\n%s\r\n" % (verb, key, flags, exptime, len(data), data)

    @staticmethod
    def _values(answer):
        """`VALUE` blocks of a `get` answer, as key -> (data, flags)."""
        found = {}
        reader = _Reader(answer)
        while True:
            line = reader.line()
            if line == b"END":
                return found
            if not line.startswith(b"VALUE "):
                raise ValueError("cache: unexpected answer %r" % line)
            _, key, flags, size = line.split(b" ")[:4]
            found[key] = (reader.block(int(size)), int(flags))

    def _stored(self, answer):
        if answer.startswith(b"SERVER_ERROR") or answer.startswith(b"CLIENT_ERROR"):
            raise ValueError("cache: %s" % answer.decode(errors="replace").strip())
        return answer.startswith(b"STORED")

    # -- Django's cache API -----------------------------------------------------------------

    def get(self, key, default=None, version=None):
        k = self._key(key, version)
        answer = self._ask(b"get %s\r\n" % k)
        if answer is None:
            missing = object()
            found = self._fallback().get(key, missing, version)
            return default if found is missing else self._untag(found, default)
        values = self._values(answer)
        if k not in values:
            return default
        value = self._untag(_decode(*values[k]), default)
        return value

    def get_many(self, keys, version=None):
        originals = {self._key(key, version): key for key in keys}
        if not originals:
            return {}
        answer = self._ask(b"get %s\r\n" % b" ".join(originals))
        if answer is None:
            raw = self._fallback().get_many(keys, version)
        else:
            raw = {originals[k]: _decode(*v) for k, v in self._values(answer).items()}
        missing = object()
        found = {key: self._untag(value, missing) for key, value in raw.items()}
        return {key: value for key, value in found.items() if value is not missing}

    def has_key(self, key, version=None):
        sentinel = object()
        return self.get(key, sentinel, version) is not sentinel

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None, tags=()):
        if tags:
            value = _Tagged(value, self._tag_versions(tags, create=True))
        k = self._key(key, version)
        answer = self._ask(self._store_command(b"set", k, value, self.get_backend_timeout(timeout)))
        if answer is None:
            return self._fallback().set(key, value, timeout, version)
        self._stored(answer)

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        k = self._key(key, version)
        answer = self._ask(self._store_command(b"add", k, value, self.get_backend_timeout(timeout)))
        if answer is None:
            return self._fallback().add(key, value, timeout, version)
        return self._stored(answer)

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        exptime = self.get_backend_timeout(timeout)
        keys = [(self._key(key, version), key) for key in data]
        if not keys:
            return []
        commands = b"".join(self._store_command(b"set", k, data[key], exptime) for k, key in keys)
        answer = self._ask(commands)
        if answer is None:
            return self._fallback().set_many(data, timeout, version)
        lines = answer.split(b"\r\n")
        return [key for (_, key), line in zip(keys, lines) if line != b"STORED"]

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        k = self._key(key, version)
        answer = self._ask(b"touch %s %d\r\n" % (k, self.get_backend_timeout(timeout)))
        if answer is None:
            return self._fallback().touch(key, timeout, version)
        return answer.startswith(b"TOUCHED")

    def delete(self, key, version=None):
        answer = self._ask(b"delete %s\r\n" % self._key(key, version))
        if answer is None:
            return self._fallback().delete(key, version)
        return answer.startswith(b"DELETED")

    def delete_many(self, keys, version=None):
        commands = b"".join(b"delete %s\r\n" % self._key(key, version) for key in keys)
        if commands and self._ask(commands) is None:
            self._fallback().delete_many(keys, version)

    def incr(self, key, delta=1, version=None):
        verb = b"incr" if delta >= 0 else b"decr"
        answer = self._ask(b"%s %s %d\r\n" % (verb, self._key(key, version), abs(delta)))
        if answer is None:
            return self._fallback().incr(key, delta, version)
        if answer.startswith(b"NOT_FOUND"):
            raise ValueError("Key '%s' not found" % key)
        if answer.startswith(b"CLIENT_ERROR"):
            raise ValueError("cache: %s" % answer.decode(errors="replace").strip())
        return int(answer.strip())

    def decr(self, key, delta=1, version=None):
        return self.incr(key, -delta, version)

    def clear(self):
        if self._ask(b"flush_all\r\n") is None:
            self._fallback().clear()

    def get_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None, tags=()):
        """The value under `key`; computed (when `default` is callable) by exactly one caller
        across the node's workers while the others wait for it or get the stale value."""
        k = self._key(key, version)
        lease = max(1, int(self._lease_timeout + 0.999))
        ahead = b" R%d" % self._refresh_ahead if self._refresh_ahead else b""
        deadline = time.monotonic() + self._lease_timeout
        while True:
            answer = self._ask(b"mg %s v f N%d%s\r\n" % (k, lease, ahead))
            if answer is None:
                missing = object()
                value = self.get(key, missing, version)
                if value is missing:
                    value = default() if callable(default) else default
                    if value is not None:
                        self.set(key, value, timeout, version, tags=tags)
                return value
            reader = _Reader(answer)
            head = reader.line().split(b" ")
            if head[0] != b"VA":
                raise ValueError("cache: unexpected answer %r" % answer)
            data = reader.block(int(head[1]))
            flags = {token[:1]: token[1:] for token in head[2:]}
            client_flags = int(flags.get(b"f", b"0") or 0)
            placeholder = not data and client_flags == 0 and (b"W" in flags or b"Z" in flags)
            if b"W" in flags or (placeholder and time.monotonic() >= deadline):
                value = default() if callable(default) else default
                if value is not None:
                    self.set(key, value, timeout, version, tags=tags)
                return value
            if not placeholder:
                missing = object()
                value = self._untag(_decode(data, client_flags), missing)
                if value is not missing:
                    return value
                # Its tags were invalidated: compute it again, once.
                self._ask(b"md %s I\r\n" % k)
                continue
            time.sleep(self._poll)

    # -- extras: tags and prefixes ----------------------------------------------------------

    def _tag_versions(self, tags, create=False):
        keys = [_TAG_PREFIX + tag for tag in tags]
        found = self.get_many(keys, version=0)
        if create:
            for key in keys:
                if key not in found:
                    fresh = "%x" % time.time_ns()
                    if not self.add(key, fresh, timeout=None, version=0):
                        fresh = self.get(key, version=0)
                    found[key] = fresh
        return {key[len(_TAG_PREFIX):]: found.get(key) for key in keys}

    def _untag(self, value, default):
        if not isinstance(value, _Tagged):
            return value
        current = self._tag_versions(list(value.versions))
        return value.value if current == value.versions else default

    def delete_tags(self, *tags):
        """Invalidates every value stored with one of `tags`."""
        stamp = "%x" % time.time_ns()
        self.set_many({_TAG_PREFIX + tag: stamp for tag in tags}, timeout=None, version=0)

    def delete_prefix(self, prefix, version=None):
        """Removes every key starting with `prefix` (after Django's key prefix and version);
        returns how many."""
        made = self.make_key(prefix, version=version)
        answer = self._ask(b"strata_delete_prefix %s\r\n" % made.encode())
        if answer is None:
            local = self._fallback()
            doomed = [k for k in list(local._cache) if k.startswith(made)]
            for k in doomed:
                local._delete(k)
            return len(doomed)
        if not answer.startswith(b"DELETED "):
            raise ValueError("cache: %s" % answer.decode(errors="replace").strip())
        return int(answer.split()[1])
