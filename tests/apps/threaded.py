"""An application that hands the server's objects to a thread pool, as Wagtail does when it
renders image renditions: `wsgi.input` is read on a pool thread, `wsgi.errors` written
there, a purge sent from there, and every object the server handed over (with a reference
cycle around them) is freed there, by the last reference going away or by the garbage
collector running on that thread."""

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import strata

pool = ThreadPoolExecutor(2)
served = 0


def drop(objects):
    objects.clear()


def collect():
    gc.collect()
    return threading.get_ident()


def application(environ, start_response):
    global served
    served += 1
    body = pool.submit(environ["wsgi.input"].read).result()
    if environ.get("QUERY_STRING") == "errors":
        pool.submit(environ["wsgi.errors"].write, "from a pool thread\n").result()
    purged = pool.submit(strata.purge_url, "/nothing-cached-here").result()
    writer = start_response("200 OK", [("Content-Type", "text/plain")])
    # A cycle holding everything the server handed over, for the collector to find.
    cycle = [environ, environ["wsgi.input"], environ["wsgi.errors"], start_response, writer,
             environ["wsgi.file_wrapper"](iter([b""])), strata._channel]
    cycle.append(cycle)
    del cycle
    # Plain references whose last holder is a pool thread.
    pool.submit(drop, [environ["wsgi.input"], start_response, writer])
    if served % 50 == 0:
        on = pool.submit(collect).result()
        assert on != threading.get_ident()
    return [b"%d %s" % (len(body), str(purged).encode())]
