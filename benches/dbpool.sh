#!/usr/bin/env bash
# PostgreSQL pooler benchmark: Strata's dbpool tier against PgBouncer (apt) and direct
# connections, pgbench on one private PostgreSQL, same run. Installs PgBouncer here, never as
# a test dependency; PostgreSQL comes from the machine's server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/tools.sh
need pgbouncer
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null || {
  echo "PostgreSQL server binaries are needed (/usr/lib/postgresql/*/bin)" >&2; exit 1; }
cargo build --release --locked
cargo build --release --locked --example relay -p strata-dbpool
exec python3 benches/dbpool.py "$@"
