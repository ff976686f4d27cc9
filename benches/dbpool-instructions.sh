#!/usr/bin/env bash
# User-space instructions each pooler spends per pgbench transaction, counted by callgrind:
# Strata's dbpool tier against PgBouncer, on one private PostgreSQL. A figure that does not
# move with the machine's load (see benches/dbpool_instructions.py). Installs PgBouncer and
# valgrind here, never as test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/tools.sh
need pgbouncer valgrind
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null || {
  echo "PostgreSQL server binaries are needed (/usr/lib/postgresql/*/bin)" >&2; exit 1; }
cargo build --release --locked
exec python3 benches/dbpool_instructions.py "$@"
