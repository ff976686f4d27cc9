#!/usr/bin/env bash
# Load balancer benchmark: proxying to a fast backend over HTTP/1.1 keep-alive, in the clear
# and with TLS termination, Strata against HAProxy and nginx, same machine, same run, same
# load generator; the ceiling is the backend hit directly. Installs what it compares against
# here (haproxy, nginx and wrk from apt), never as test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in wrk haproxy nginx; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
[ -x target/release/strata ] || cargo build --release --locked
cargo build --release --locked --example fixed_body -p strata-lb
exec python3 benches/lb.py "$@"
