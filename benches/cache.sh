#!/usr/bin/env bash
# Cache tier benchmark: Strata's memcached port against memcached 1.6 (apt), same machine,
# same run, same load generator (crates/cache/examples/memload.rs). Installs memcached here,
# never as a test dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v memcached >/dev/null; then
  apt-get install -y -q memcached >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q memcached >/dev/null; }
fi
[ -x target/release/strata ] || cargo build --release --locked
cargo build --release --locked --example memload -p strata-cache
exec python3 benches/cache.py "$@"
