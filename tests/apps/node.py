"""A cluster node's application: answers with the node's name (`NODE_NAME`), after sleeping
`?sleep=` seconds, so a test knows which host served each request and can keep requests in
flight. `/page` is cacheable and says which version of the site (the text of the file
`VERSION_FILE`) it was rendered from; `/purge?url=U` purges U through `strata.purge_url`,
as a Django signal handler would."""

import os
import time
from urllib.parse import parse_qs

import strata

NODE = os.environ.get("NODE_NAME", "?")


def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    path = environ.get("PATH_INFO", "/")
    if path == "/page":
        with open(os.environ["VERSION_FILE"]) as version:
            body = f"{NODE} {version.read().strip()}"
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Cache-Control", "public, max-age=600")])
        return [body.encode()]
    if path == "/purge":
        purged = strata.purge_url(*query.get("url", []))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
        return [str(purged).encode()]
    delay = float(query.get("sleep", ["0"])[0])
    if delay:
        time.sleep(delay)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
    return [NODE.encode()]
