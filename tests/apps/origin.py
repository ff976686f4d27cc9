"""An origin for the accelerator's tests: the query string chooses the answer, and every call
is appended to the file named by ORIGIN_LOG so tests can count what reached the app.

Query parameters: `cc` (Cache-Control), `h` (extra `Name: value` headers, repeatable),
`status`, `sleep` (seconds), `size` (body bytes), `validate` (answer 304 when the request's
`If-None-Match` matches the `ETag` given with `h`); `purge` / `purge_tag` (call
`strata.purge_url` / `strata.purge_tags` with the value, repeatable; `soft=1` for soft purges;
the count comes back in `Purged`). Every answer carries `Origin-Time`; every body names its
call (worker pid and count), so no two calls give the same body. While the file named by
ORIGIN_DOWN exists every answer is 503.
"""

import itertools
import os
import time
import urllib.parse

LOG = os.environ.get("ORIGIN_LOG")
DOWN = os.environ.get("ORIGIN_DOWN")
# Two workers woken by one timer can read the same microsecond: each body also names its call.
CALLS = itertools.count(1)


def application(environ, start_response):
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "/")
    query = environ.get("QUERY_STRING", "")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if LOG:
        with open(LOG, "a") as log:
            log.write(f"{method} {path}?{query}\n")
    if DOWN and os.path.exists(DOWN):
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"down\n"]
    sleep = float(params.get("sleep", ["0"])[0])
    if sleep:
        time.sleep(sleep)
    status = params.get("status", ["200"])[0]
    headers = [("Content-Type", "text/plain"), ("Origin-Time", f"{time.time():.6f}")]
    if "cc" in params:
        headers.append(("Cache-Control", params["cc"][0]))
    for extra in params.get("h", []):
        name, _, value = extra.partition(":")
        headers.append((name.strip(), value.strip()))
    soft = params.get("soft", ["0"])[0] == "1"
    if "purge" in params or "purge_tag" in params:
        import strata

        purged = strata.purge_url(*params.get("purge", []), soft=soft)
        purged += strata.purge_tags(*params.get("purge_tag", []), soft=soft)
        headers.append(("Purged", str(purged)))
    if "validate" in params:
        etag = next((v for n, v in headers if n.lower() == "etag"), None)
        if etag is not None and environ.get("HTTP_IF_NONE_MATCH") == etag:
            start_response("304 Not Modified", [h for h in headers if h[0] != "Content-Type"])
            return []
    size = int(params.get("size", ["0"])[0])
    call = f"{os.getpid()}.{next(CALLS)}"
    stamp = f"{method} {path} {time.time():.6f} call={call} cookie={environ.get('HTTP_COOKIE', '')}\n"
    body = stamp.encode() + b"x" * max(0, size - len(stamp))
    start_response(f"{status} X", headers)
    if method == "HEAD":
        return []
    return [body]
