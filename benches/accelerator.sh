#!/usr/bin/env bash
# Accelerator benchmark: cache hits served by Strata, Varnish and nginx proxy_cache in front of
# the same origin, same machine, same run, same load generator; plus the ceiling of a bare
# hyper server answering a fixed body. Installs what it compares against here (varnish,
# nginx and wrk from apt), never as test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/tools.sh
need wrk varnishd:varnish nginx
[ -x target/release/strata ] || cargo build --release --locked
cargo build --release --locked --example fixed_body -p strata-lb
exec python3 benches/accelerator.py "$@"
