"""Records where things happen: import and warm-up in the zygote, requests in workers."""

import gc
import json
import os

IMPORTED_IN = os.getpid()
WARMED_IN = []


def application(environ, start_response):
    if environ.get("strata.warmup") or environ["PATH_INFO"] == "/warm":
        WARMED_IN.append(os.getpid())
    body = {
        "imported_in": IMPORTED_IN,
        "warmed_in": WARMED_IN,
        "served_by": os.getpid(),
        "frozen": gc.get_freeze_count(),
        "gc_enabled": gc.isenabled(),
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
