"""Takes a while to import, like a large Django project."""

import time

time.sleep(2)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"warm"]
