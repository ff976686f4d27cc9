#!/usr/bin/env bash
# Cache tier benchmark: Strata's memcached port against memcached 1.6 (apt), same machine,
# same run, same load generator (crates/cache/examples/memload.rs). Installs memcached here,
# never as a test dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/tools.sh
need memcached memcslap:libmemcached-tools
[ -x target/release/strata ] || cargo build --release --locked
cargo build --release --locked --example memload -p strata-cache
exec python3 benches/cache.py "$@"
