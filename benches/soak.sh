#!/usr/bin/env bash
# Soak: SOAK_MINUTES (30) of mixed load through every tier of one node (the example site on
# a private PostgreSQL through the pooler, the accelerator, the cache tier from the workers),
# with a reload every 5 minutes and a worker killed every minute; the RSS of the master, the
# zygote and the workers sampled every 10 s and plotted (benches/results/soak-*.png).
# Needs PostgreSQL's server binaries (apt: postgresql); installs matplotlib into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/tools.sh
need initdb:postgresql
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
[ -x target/release/strata ] || cargo build --release --locked
make venv >/dev/null
.venv/bin/python -m pip install --quiet --disable-pip-version-check matplotlib
exec .venv/bin/python benches/soak.py "$@"
