"""A small HTTP server standing in for one backend behind Strata's balancer (run as a script):
it answers every request with its name, after an optional delay, and reports itself unhealthy
on `/health` while a flag file exists. It also counts the requests it saw.

Usage: python backend.py PORT NAME [--delay SECONDS] [--sick-flag PATH] [--status CODE]
"""

import argparse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--sick-flag")
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                sick = args.sick_flag and Path(args.sick_flag).exists()
                return self.answer(503 if sick else 200, b"sick" if sick else b"ok")
            if self.path == "/headers":
                text = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
                return self.answer(200, text.encode())
            time.sleep(args.delay)
            self.answer(args.status, args.name.encode())

        do_HEAD = do_GET

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.answer(args.status, args.name.encode())

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
