"""A plain HTTP/1.1 origin (no WSGI server in between, so it can send fields a WSGI
application may not, such as `Connection`): `?h=Name:value` adds a response field
(repeatable). Usage: python raw_origin.py PORT"""

import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        query = urllib.parse.urlsplit(self.path).query
        body = f"made at {time.time()}\n".encode()
        self.send_response(200)
        for extra in urllib.parse.parse_qs(query).get("h", []):
            name, _, value = extra.partition(":")
            self.send_header(name.strip(), value.strip())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
