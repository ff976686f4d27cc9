#!/usr/bin/env bash
# Load balancer benchmark: proxying to a fast backend over HTTP/1.1 keep-alive, in the clear
# and with TLS termination, Strata against HAProxy and nginx, same machine, same run, same
# load generator; the ceiling is the backend hit directly. Installs what it compares against
# here (haproxy, nginx and wrk from apt), never as test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/tools.sh
need wrk haproxy nginx h2load:nghttp2-client
cargo build --release --locked -p strata
cargo build --release --locked --example fixed_body --example relay -p strata-lb
exec python3 benches/lb.py "$@"
