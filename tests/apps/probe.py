"""A WSGI probe wrapped in `wsgiref.validate.validator`, with warnings turned into errors:
any PEP 3333 violation by the server fails the request with a 500 and an AssertionError in
the log. Routes exercise every part of the interface."""

import json
import os
import warnings
from wsgiref.validate import validator

warnings.simplefilter("error")

CLOSE_LOG = os.environ.get("PROBE_CLOSE_LOG")


def environ_view(environ):
    keys = ["REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
            "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR",
            "wsgi.url_scheme", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once"]
    view = {k: environ.get(k) for k in keys}
    view["http"] = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    view["wsgi.version"] = list(environ["wsgi.version"])
    return view


class Closing:
    """An iterable whose close() is recorded, to show the server calls it."""

    def __init__(self, chunks, tag):
        self.chunks = chunks
        self.tag = tag

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        if CLOSE_LOG:
            with open(CLOSE_LOG, "a") as f:
                f.write(self.tag + "\n")


class ClosingList(list):
    """A list body (so its length is known) whose close() is recorded."""

    def __init__(self, chunks, tag):
        super().__init__(chunks)
        self.tag = tag

    close = Closing.close


def raw(environ, start_response):
    path = environ["PATH_INFO"]
    method = environ["REQUEST_METHOD"]
    text = [("Content-Type", "text/plain")]
    if path.startswith("/environ"):
        body = json.dumps(environ_view(environ)).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if path == "/echo":
        data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", text)
        return [data]
    if path == "/echo-size":
        # Reads in small pieces, as a streaming parser would.
        stream = environ["wsgi.input"]
        size = int(environ["QUERY_STRING"] or "1000")
        parts = []
        while True:
            chunk = stream.read(size)
            if not chunk:
                break
            parts.append(chunk)
        start_response("200 OK", text)
        return [b"".join(parts)]
    if path == "/lines":
        stream = environ["wsgi.input"]
        first = stream.readline()
        second = stream.readline(3)
        rest = stream.readlines()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps([first.decode(), second.decode(), [l.decode() for l in rest]]).encode()]
    if path == "/iterate":
        lines = [line.decode() for line in environ["wsgi.input"]]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(lines).encode()]
    if path == "/stream":
        start_response("200 OK", text)
        return Closing([b"one\n", b"", b"two\n", b"three\n"], "stream")
    if path == "/generator":
        start_response("200 OK", text)
        return (f"chunk {i}\n".encode() for i in range(5))
    if path == "/file":
        path_to = os.environ["PROBE_FILE"]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](open(path_to, "rb"), 4096)
    if path == "/write":
        write = start_response("200 OK", text)
        write(b"written ")
        return [b"and returned"]
    if path == "/write-then-read":
        # Pushes part of the response, then reads the body: the server must keep serving
        # body reads after the head is out.
        write = start_response("200 OK", text)
        write(b"head start;")
        data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        return [b"read %d bytes" % len(data)]
    if path == "/exc-info":
        start_response("200 OK", text)
        try:
            raise ValueError("changed my mind")
        except ValueError:
            import sys

            start_response("500 Internal Server Error", text, sys.exc_info())
        return [b"recovered with exc_info"]
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    if path == "/status":
        start_response("418 I'm a teapot", text)
        return [b"teapot"]
    if method == "HEAD" and path == "/head":
        start_response("200 OK", text + [("Content-Length", "14")])
        return ClosingList([b"body of a HEAD"], "head")
    if path == "/head":
        start_response("200 OK", text)
        return [b"body of a GET"]
    if path == "/spaced-headers":
        # What Django's SimpleCookie output gives: a value with a leading space.
        start_response("200 OK", text + [("Set-Cookie", " csrftoken=abc; Path=/"),
                                         ("X-Padded", "  both ends  ")])
        return [b"spaced"]
    start_response("404 Not Found", text)
    return [b"not found"]


application = validator(raw)
