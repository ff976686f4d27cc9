#!/usr/bin/env bash
# Accelerator benchmark: cache hits served by Strata, Varnish and nginx proxy_cache in front of
# the same origin, same machine, same run, same load generator; plus the ceiling of a bare
# hyper server answering a fixed body. Installs what it compares against here (varnish,
# nginx and wrk from apt), never as test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in wrk varnishd nginx; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  packages=("${missing[@]/varnishd/varnish}")
  apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
fi
[ -x target/release/strata ] || cargo build --release --locked
cargo build --release --locked --example fixed_body -p strata-lb
exec python3 benches/accelerator.py "$@"
