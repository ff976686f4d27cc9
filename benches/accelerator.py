"""Accelerator benchmark driver (run through benches/accelerator.sh).

Cache hits on a 1 KB and a 100 KB page: Strata (`--tiers lb,accelerator`), Varnish and nginx
proxy_cache, each pinned to core 0 in front of the same origin (a small Python server that
marks both pages cacheable for a day), wrk on core 1; the method of benchlib.measure. Every
request after the first is a hit, so the origin is out of the picture. The ceiling is a bare
hyper server answering the same body from memory (crates/lb/examples/fixed_body.rs).
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, STRATA, free_port, measure, table, save, wait_port

SIZES = {"hit-1k": 1024, "hit-100k": 100 * 1024}

ORIGIN = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODIES = {"/1k": b"a" * 1024, "/100k": b"b" * 102400}
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = BODIES.get(self.path.split("?")[0], b"not found\n")
        self.send_response(200 if self.path.split("?")[0] in BODIES else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Cache-Control", "public, max-age=86400")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

NGINX = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush off;
    keepalive_requests 1000000;
    proxy_cache_path {tmp}/nginx-cache levels=1:2 keys_zone=hits:16m max_size=1g inactive=1d use_temp_path=off;
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache hits;
            proxy_cache_lock on;
        }}
    }}
}}
"""


def servers(size, origin, tmp):
    pin = ["taskset", "-c", "0"]
    out = {}
    port = free_port()
    out["strata"] = (port, pin + [str(STRATA), "run", "--tiers", "lb,accelerator",
                                  "--bind", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}",
                                  "--upstream", f"http://127.0.0.1:{origin}"])
    port = free_port()
    out["varnish"] = (port, pin + ["varnishd", "-F", "-a", f"127.0.0.1:{port}",
                                   "-b", f"127.0.0.1:{origin}", "-s", "malloc,256m",
                                   "-n", str(tmp / f"varnish-{port}")])
    port = free_port()
    config = tmp / f"nginx-{port}.conf"
    config.write_text(NGINX.format(tmp=tmp, origin=origin, port=port))
    out["nginx"] = (port, pin + ["nginx", "-c", str(config)])
    port = free_port()
    out["ceiling (hyper, fixed body)"] = (port, pin + [
        str(ROOT / "target" / "release" / "examples" / "fixed_body"), f"127.0.0.1:{port}", str(size)])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workloads", default=",".join(SIZES))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="strata-bench-acc-"))
    os.chmod(tmp, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    origin_port = free_port()
    origin = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", ORIGIN, str(origin_port)])
    lines = [f"# Accelerator benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"Cache hits; each server on core 0, wrk -t1 -c32 -d{args.seconds}s on core 1, "
             f"median of {args.rounds} rounds; ratios are Strata / other.", ""]
    report = {}
    try:
        wait_port(origin_port)
        for workload in args.workloads.split(","):
            size = SIZES[workload]
            path = "/1k" if size == 1024 else "/100k"
            summary = measure(servers(size, origin_port, tmp), path, args.rounds, args.seconds, env)
            report[workload] = summary
            ceiling = summary["ceiling (hyper, fixed body)"]["rps"]
            lines += [f"## {workload}", "", *table(summary), "",
                      f"Strata serves {summary['strata']['rps'] / ceiling:.0%} of the ceiling.", ""]
    finally:
        origin.terminate()
        origin.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    save("accelerator", lines, report)


if __name__ == "__main__":
    main()
