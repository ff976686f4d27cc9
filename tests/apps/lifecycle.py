"""An application that misbehaves on request: crashes, hangs, leaks."""

import ctypes
import os
import time
from urllib.parse import parse_qs

HELD = []
MARKS = []


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    if path == "/exit":
        os._exit(3)
    if path == "/segfault":
        ctypes.string_at(0)
    if path == "/sleep":
        stuck_in_sleep(float(query.get("s", "1")))
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return slow_lines(int(query.get("count", "10")), float(query.get("delay", "0.1")))
    if path == "/mark":
        MARKS.append(query.get("tag", ""))
    if path == "/marks":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [",".join(MARKS).encode()]
    if path == "/grow":
        HELD.append(bytearray(int(query.get("mb", "10")) * 1024 * 1024))
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))])
    return [str(os.getpid()).encode()]


def slow_lines(count, delay):
    for i in range(count):
        yield b"line %d\n" % i
        time.sleep(delay)


def stuck_in_sleep(seconds):
    time.sleep(seconds)


def _die_after_fork_when_flagged():
    flag = os.environ.get("LIFECYCLE_DIE_FLAG")
    if flag and os.path.exists(flag):
        os._exit(7)


os.register_at_fork(after_in_child=_die_after_fork_when_flagged)
