#!/usr/bin/env bash
# App server benchmark: Strata against Gunicorn (sync) and Granian, 2 workers each, same
# machine, same run, same load generator. Installs the comparison tools here, never as test
# dependencies: wrk from apt, gunicorn and granian from PyPI into .bench-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/tools.sh
need wrk
if [ ! -x .bench-venv/bin/python ]; then
  python3 -m venv .bench-venv
fi
.bench-venv/bin/pip install --quiet --disable-pip-version-check \
  "Django>=5.2,<5.3" "gunicorn>=23" "granian>=2.5,<3" \
  -e crates/appserver/python  # the example site imports `strata` (its purge calls)
[ -x target/release/strata ] || cargo build --release --locked
exec .bench-venv/bin/python benches/appserver.py "$@"
