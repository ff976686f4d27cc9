#!/usr/bin/env bash
# Deploy benchmark: Strata's reload against Gunicorn's HUP, same load, same code changes, one
# run. Installs gunicorn, Django, requests and matplotlib into .bench-venv (never test deps).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .bench-venv/bin/python ]; then
  python3 -m venv .bench-venv
fi
.bench-venv/bin/pip install --quiet --disable-pip-version-check \
  "Django>=5.2,<5.3" "gunicorn>=23" "requests>=2.32" "matplotlib>=3.8" \
  -e crates/appserver/python  # the example site imports `strata` (its purge calls)
[ -x target/release/strata ] || cargo build --release --locked
exec .bench-venv/bin/python benches/deploy.py "$@"
