"""A cluster node's application: answers with the node's name (`NODE_NAME`), after sleeping
`?sleep=` seconds, so a test knows which host served each request and can keep requests in
flight."""

import os
import time
from urllib.parse import parse_qs

NODE = os.environ.get("NODE_NAME", "?").encode()


def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    delay = float(query.get("sleep", ["0"])[0])
    if delay:
        time.sleep(delay)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
    return [NODE]
