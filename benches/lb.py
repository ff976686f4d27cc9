"""Load balancer benchmark driver (run through benches/lb.sh).

A fast backend (crates/lb/examples/fixed_body.rs, a bare hyper server answering 13 bytes) on
core 1 beside wrk; in front of it, each pinned to core 0: Strata (`--tiers lb`, a pool of one
server), HAProxy (one thread, `http-reuse always`) and nginx (one worker, upstream
keepalive). Three workloads: plain HTTP/1.1 keep-alive, TLS termination (TLS 1.3, ECDSA
P-256, HTTP/1.1 to the backend), and plain HTTP in with TLS to the backend (the same server
over TLS, its certificate verified: Strata and HAProxy only). The method of
benchlib.measure.

The ceiling is `relay` (crates/lb/examples/relay.rs), measured in the same rounds: a byte relay
on the proxies' core that reads nothing of HTTP, one target connection per client connection,
with the TLS the workload asks for. No HTTP/1.1 proxy can do less per request, and with wrk and
the backend sharing the other core it is bounded by that core as much as by its own, so a
proxy's req/s over the relay's is its share of what this machine allows. The backend hit
directly is printed too: it only says what wrk and the backend do without the second core.

p99 at the most each server can do favours the slower one (a proxy that serves more requests
also queues more of them on the core wrk and the backend share), so each workload is measured
a second time at one offered rate for all, 70 % of the slowest one's req/s, where latencies
compare at equal throughput.
"""

import argparse
import datetime
import os
import ssl
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from benchlib import ROOT, STRATA, at_rate, free_port, measure, save, table

BODY = 13

HAPROXY = """
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend plain
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{tls_port} ssl crt {tmp}/haproxy.pem alpn http/1.1
    acl to_tls path_beg /tls/
    use_backend origin_tls if to_tls
    default_backend origin
backend origin
    http-reuse always
    server o 127.0.0.1:{origin}
backend origin_tls
    http-reuse always
    server o 127.0.0.1:{tls_origin} ssl verify required ca-file {tmp}/ca.pem verifyhost localhost sni str(localhost) alpn http/1.1
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
    keepalive_requests 1000000;
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

STRATA_CONFIG = """
tiers = ["lb"]
[lb]
bind = "127.0.0.1:{port}"
tls_bind = "127.0.0.1:{tls_port}"
tls_cert_file = "{tmp}/cert.pem"
tls_key_file = "{tmp}/key.pem"
default_backend = "origin"
[[lb.backends]]
name = "origin"
health_interval = "1h"
[[lb.backends.servers]]
name = "o"
url = "http://127.0.0.1:{origin}"
[[lb.backends]]
name = "origin-tls"
health_interval = "1h"
[lb.backends.tls]
ca_file = "{tmp}/ca.pem"
[[lb.backends.servers]]
name = "o"
url = "https://localhost:{tls_origin}"
resolve = false
[[lb.routes]]
path_prefix = "/tls/"
backend = "origin-tls"
[admin]
bind = "127.0.0.1:{admin}"
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="strata-bench-lb-"))

    def openssl(*more):
        subprocess.run(["openssl", *more], cwd=tmp, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "key.pem", "-out", "cert.pem", "-days", "2",
            "-subj", "/CN=localhost")
    # The TLS backend's certificate, from a CA of its own (a CA cannot be a server's).
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=bench CA")
    openssl("req", *ec, "-keyout", "origin.key", "-out", "origin.csr", "-subj", "/CN=localhost")
    (tmp / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "origin.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "origin.pem", "-days", "2", "-extfile", "ext.cnf")
    (tmp / "haproxy.pem").write_text((tmp / "cert.pem").read_text() + (tmp / "key.pem").read_text())
    origin = free_port()
    fixed_body = ROOT / "target" / "release" / "examples" / "fixed_body"
    relay = ROOT / "target" / "release" / "examples" / "relay"
    backend = subprocess.Popen(["taskset", "-c", "1", str(fixed_body), f"127.0.0.1:{origin}",
                                str(BODY)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tls_origin = free_port()
    tls_backend = subprocess.Popen(["taskset", "-c", "1", str(fixed_body),
                                    f"127.0.0.1:{tls_origin}", str(BODY), str(tmp / "origin.pem"),
                                    str(tmp / "origin.key")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ports = {name: (free_port(), free_port(), free_port())
             for name in ("strata", "haproxy", "nginx", "relay")}
    fill = lambda name, text: text.format(port=ports[name][0], tls_port=ports[name][1],
                                          tmp=tmp, origin=origin, tls_origin=tls_origin,
                                          admin=free_port())
    (tmp / "strata.toml").write_text(fill("strata", STRATA_CONFIG))
    (tmp / "haproxy.cfg").write_text(fill("haproxy", HAPROXY))
    (tmp / "nginx.conf").write_text(fill("nginx", NGINX))
    pin = ["taskset", "-c", "0"]
    commands = {
        "strata": pin + [str(STRATA), "run", "--config", str(tmp / "strata.toml")],
        "haproxy": pin + ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
        "nginx": pin + ["nginx", "-c", str(tmp / "nginx.conf")],
    }
    to = f"127.0.0.1:{origin}"
    relays = [pin + [str(relay), f"127.0.0.1:{ports['relay'][0]}", to],
              pin + [str(relay), f"127.0.0.1:{ports['relay'][1]}", to,
                     "tls-in", str(tmp / "cert.pem"), str(tmp / "key.pem")],
              pin + [str(relay), f"127.0.0.1:{ports['relay'][2]}", f"127.0.0.1:{tls_origin}",
                     "tls-out", str(tmp / "ca.pem"), "localhost"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    lines = [f"# Load balancer benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"Proxying to a backend answering {BODY} bytes; proxies pinned to core 0, wrk "
             f"(`-t1 -c32 -d{args.seconds}s`) and the backend on core 1; median of "
             f"{args.rounds} rounds.", ""]
    report = {}
    try:
        for workload, scheme, index, relay_index, path in (
                ("proxy-http", "http", 0, 0, "/"),
                ("proxy-tls", "https", 1, 1, "/"),
                ("proxy-to-tls-backend", "http", 0, 2, "/tls/")):
            servers = {name: (ports[name][index], command) for name, command in commands.items()
                       if path == "/" or name != "nginx"}
            servers["relay"] = (ports["relay"][relay_index], relays[relay_index])
            # The TLS backend answers `t`s, the other `x`s: each proxy must reach the one meant.
            expected = (b"t" if path == "/tls/" else b"x") * BODY

            def check(name, port, scheme=scheme, path=path, expected=expected):
                context = ssl._create_unverified_context()
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", timeout=10,
                                            context=context) as answer:
                    body = answer.read()
                if body != expected:
                    raise RuntimeError(f"{name} answered {body[:20]!r} on {path}, not from the "
                                       f"backend the workload is for")

            summary = measure(servers, path, args.rounds, args.seconds, env, scheme=scheme,
                              check=check)
            direct = (tls_origin, "https") if path == "/tls/" else (origin, "http")
            ceiling = measure({"backend direct": (direct[0], ["sleep", "infinity"])}, "/",
                              args.rounds, args.seconds, env, scheme=direct[1])
            # Latency at equal throughput: at their most, a proxy that serves more requests
            # also queues more of them on the core wrk and the backend share.
            rate = 0.7 * min(row["rps"] for row in summary.values())
            latency = measure(servers, path, args.rounds, args.seconds, env, scheme=scheme,
                              load=at_rate(rate))
            report[workload] = {"servers": summary, "ceiling": ceiling, "rate": rate,
                                "latency": latency}
            lines += [f"## {workload}", ""] + table(summary) + [
                "", f"Ceiling: the relay (its row: Strata's share of it). The backend hit "
                f"directly: {ceiling['backend direct']['rps']:.0f} req/s, p99 "
                f"{ceiling['backend direct']['p99_ms']:.2f} ms.", "",
                f"Latency at {rate:.0f} req/s offered to each (70 % of the slowest one's "
                f"req/s; h2load `--rps`, 32 connections):", ""] + table(latency) + [""]
    finally:
        for process in (backend, tls_backend):
            process.terminate()
            process.wait()
    lines.append("Ratios are Strata's figure over the other's, the median of the rounds' ratios "
                 "(both measured in the same minute): req/s above 1 and p99 below 1 favour Strata.")
    save("lb", lines, report)


if __name__ == "__main__":
    main()
