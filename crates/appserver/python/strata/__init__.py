"""Helpers for applications served by Strata, compiled into the ``strata`` binary.

This module is registered before the application is imported, so ``import strata`` works in
any application Strata serves.  It holds the parts of the WSGI glue that are clearest in
Python (the ``wsgi.file_wrapper`` class, the warm-up run inside the zygote before workers are
forked) and the application's way to the accelerator: ``purge_url`` and ``purge_tags``.
"""

import io
import sys
import threading
import warnings

__all__ = ["FileWrapper", "purge_tags", "purge_url", "warm_up"]

# Set by Strata in each worker: the worker's connection to the master.
_channel = None
_SOFT, _TAGS = 1, 2

# Inside Strata the package is compiled into the binary: its submodules' sources are handed
# over here and imported on demand (outside, they are files next to this one).
_embedded_sources = globals().get("_embedded_sources", {})


class _EmbeddedFinder:
    """Imports `strata.<name>` from the sources compiled into the binary."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _embedded_sources:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, _EmbeddedFinder)

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module):
        source = _embedded_sources[module.__name__]
        exec(compile(source, module.__name__.replace(".", "/") + ".py", "exec"), module.__dict__)


if _embedded_sources:
    __path__ = []  # a package, so that `import strata.django` works
    sys.meta_path.insert(0, _EmbeddedFinder)


def purge_url(*urls, soft=False):
    """Removes every cached variant of each URL from the accelerator of this node, and in a
    cluster (``[cluster] peers``) from every node's, returning once they applied it or
    ``cluster.purge_timeout`` passed (nodes it missed catch up when they can); returns how
    many cached responses were affected on this node.  A URL is a path (``"/blog/"``, the host of the
    request being served) or absolute (``"https://example.com/blog/?page=2"``).  With
    ``soft=True`` the responses are marked stale instead: visitors keep getting them while one
    background refresh replaces each.

    Works while a request is being served (views, signal handlers, ``transaction.on_commit``
    callbacks run by the request); elsewhere it warns and purges nothing."""
    return _purge(0, urls, soft)


def purge_tags(*tags, soft=False):
    """Like :func:`purge_url`, for every cached response whose ``Surrogate-Key`` (or
    ``Cache-Tag``) header carried one of ``tags``."""
    return _purge(_TAGS, tags, soft)


def _purge(flags, items, soft):
    items = [str(item) for item in items]
    if not items:
        return 0
    channel = _channel
    answer = None
    if channel is not None and threading.current_thread() is threading.main_thread():
        answer = channel.purge(flags | (_SOFT if soft else 0), items)
    if answer is None:
        warnings.warn(
            "strata: not serving a request in a Strata worker; purge of %r skipped" % (items,),
            RuntimeWarning,
            stacklevel=3,
        )
        return 0
    return answer


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file-like object in blocks and closes it."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


def _django_ready():
    if "django" not in sys.modules:
        return False
    from django.apps import apps
    from django.conf import settings

    return settings.configured and apps.ready


def _warm_django(log):
    """Loads what Django defers to the first request: the URLconf (and with it every view
    module), the reverse map for each language, and the template loaders."""
    from django.conf import settings
    from django.template import engines
    from django.urls import get_resolver
    from django.utils import translation

    # A project configured in code (settings.configure) may have no URLconf at all.
    has_urls = bool(getattr(settings, "ROOT_URLCONF", None))
    languages = [settings.LANGUAGE_CODE]
    if has_urls:
        resolver = get_resolver()
        resolver.url_patterns
        # The reverse map is built per active language; only LocaleMiddleware switches them.
        locale = "django.middleware.locale.LocaleMiddleware" in settings.MIDDLEWARE
        if settings.USE_I18N and locale:
            languages = [code for code, _ in settings.LANGUAGES]
        for code in languages:
            with translation.override(code):
                resolver.reverse_dict
        resolver.reverse_dict
    for engine in engines.all():
        inner = getattr(engine, "engine", None)
        if inner is not None:
            inner.template_loaders
    log("django warmed: url resolver, %d language(s), %d template engine(s)"
        % (len(languages), len(engines.all())))


def _request(app, path, host, script_name):
    path, _, query = path.partition("?")
    status = []

    def start_response(line, headers, exc_info=None):
        status[:] = [line]
        return lambda data: None

    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path[len(script_name):] if script_name and path.startswith(script_name) else path,
        "QUERY_STRING": query,
        "SERVER_NAME": host,
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": host,
        "HTTP_USER_AGENT": "strata-warmup",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
        "strata.warmup": True,
    }
    result = app(environ, start_response)
    try:
        for _ in result:
            pass
    finally:
        if hasattr(result, "close"):
            result.close()
    return status[0] if status else "no response"


def warm_up(app, paths, host, script_name, log, in_worker=False):
    """Runs inside the zygote before any worker is forked (`in_worker` false), and in each new
    worker before it takes traffic, for what is per process (connections, per-process caches)."""
    django = _django_ready()
    if django and not in_worker:
        _warm_django(log)
    for path in paths:
        log("warm-up GET %s -> %s" % (path, _request(app, path, host, script_name)))
    if django and not in_worker:
        # No socket may be shared across fork.
        from django.db import connections

        connections.close_all()
