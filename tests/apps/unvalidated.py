"""Applications that break the WSGI rules on purpose, to show what the server does."""

import os


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/bad-header":
        start_response("200 OK", [("Content-Type", "text/plain\r\nX-Injected: 1")])
        return [b"never sent"]
    if path == "/bad-status":
        start_response("OK", [])
        return [b"never sent"]
    if path == "/hop-by-hop":
        start_response("200 OK", [("Connection", "close"), ("Content-Type", "text/plain")])
        return [b"hop"]
    if path == "/str-body":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["not bytes"]
    if path == "/no-start":
        return [b"body without start_response"]
    if path == "/raise":
        raise RuntimeError("raised before start_response")
    if path == "/raise-midway":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"first part\n"
            raise RuntimeError("raised mid-response")

        return body()
    if path == "/errors":
        environ["wsgi.errors"].write("a line for the log from wsgi.errors\n")
        environ["wsgi.errors"].flush()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"logged"]
    if path == "/count":
        with open(os.environ["COUNT_FILE"], "a") as f:
            f.write("x")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"counted"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
