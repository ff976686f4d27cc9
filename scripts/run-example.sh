#!/usr/bin/env bash
# `make run`: the example site on the whole stack. When the machine has PostgreSQL server
# binaries (/usr/lib/postgresql/*/bin) and no database is configured (EXAMPLE_PG_PORT), a
# private PostgreSQL lives in var/postgres and the site reaches it through Strata's pooler
# (the dbpool tier); without them the site uses SQLite, and says so. Arguments go to
# `strata run`.
#
# Environment: EXAMPLE_STRATA_BIN (default target/release/strata), EXAMPLE_VAR (default var/), EXAMPLE_PG_SERVER_PORT (the private PostgreSQL's
# port, default 5433), EXAMPLE_POOLER_PORT (the pooler's, default 6432).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=$root/.venv/bin/python
var=${EXAMPLE_VAR:-$root/var}
tiers="lb,accelerator,app,cache"

stop_postgres() {
  "${as[@]}" "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
}

start_postgres() {
  bin=$1 data=$var/postgres
  local port=${EXAMPLE_PG_SERVER_PORT:-5433} pooler=${EXAMPLE_POOLER_PORT:-6432}
  as=()
  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root: it runs as the postgres user.
    chmod 755 "$var"
    chown postgres: "$data"
    as=(runuser -u postgres --)
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    "${as[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if ! "${as[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    "${as[@]}" "$bin/pg_ctl" -D "$data" -l "$data/log" -w start \
      -o "-p $port -k $data -c listen_addresses=127.0.0.1" >/dev/null
    trap stop_postgres EXIT
  fi
  if ! "${as[@]}" "$bin/psql" -h "$data" -p "$port" -U postgres -XtAc \
      "select 1 from pg_database where datname = 'example'" | grep -q 1; then
    "${as[@]}" "$bin/createdb" -h "$data" -p "$port" -U postgres example
  fi
  (cd example && EXAMPLE_PG_PORT=$port "$py" manage.py migrate -v0)
  export EXAMPLE_PG_PORT=$pooler
  export STRATA_DBPOOL__SERVER=127.0.0.1:$port STRATA_DBPOOL__BIND=127.0.0.1:$pooler
  export STRATA_DBPOOL__AUTH=trust STRATA_DBPOOL__DATABASES='["example"]' STRATA_DBPOOL__MIN_IDLE=2
  tiers="$tiers,dbpool"
  echo "strata: PostgreSQL ($bin) in $data on port $port; the example site reaches it" \
       "through Strata's pooler on 127.0.0.1:$pooler"
}

if [ -n "${EXAMPLE_PG_PORT:-}" ]; then
  echo "strata: the example site uses the PostgreSQL at port $EXAMPLE_PG_PORT (EXAMPLE_PG_PORT)"
else
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$initdb" ]; then
    start_postgres "$(dirname "$initdb")"
  else
    echo "strata: no PostgreSQL server binaries (/usr/lib/postgresql/*/bin), so the example" \
         "site uses SQLite (example/db.sqlite3); install postgresql to run it on PostgreSQL"
    (cd example && "$py" manage.py migrate -v0)
  fi
fi
# Static files: collected with content-hashed names and gzip siblings, served by the load
# balancer (lb.routes in config/strata.toml) without reaching Python.
export EXAMPLE_MANIFEST_STATIC=1
(cd example && "$py" manage.py collectstatic --noinput -v0)
"$py" scripts/precompress.py example/staticfiles
"${EXAMPLE_STRATA_BIN:-target/release/strata}" run --config config/strata.toml --tiers "$tiers" "$@" &
strata=$!
# Ctrl-C or a TERM stops Strata gracefully; then the private PostgreSQL stops too (EXIT).
trap 'kill -TERM "$strata" 2>/dev/null || true' INT TERM
wait "$strata" || wait "$strata"
