#!/usr/bin/env bash
# User-space instructions the master spends per WSGI request (tests/apps/hello.py, 2 workers,
# `--tiers lb,app`), counted by callgrind: the HTTP side of the app server (parsing, the CGI
# variables, the queue, the worker frames, the response) as a figure that does not move with
# the machine's load, so a change to that path can be judged before a timed run
# (`benches/appserver.sh`). The zygote and the workers run natively and are not counted.
#
# Usage: bash benches/app-instructions.sh
#        STRATA=/path/to/strata bash benches/app-instructions.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
strata_bin=${STRATA:-target/release/strata}

. benches/tools.sh
need wrk valgrind
[ -x "$strata_bin" ] || cargo build --release --locked
venv=.bench-venv
[ -x $venv/bin/python ] || python3 -m venv $venv

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
listen=$(port) admin=$(port)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
strata=$(instructions_per_request "$listen" "$strata_bin" run --tiers lb,app \
  --app hello:application --chdir tests/apps --virtualenv "$venv" --workers 2 \
  --bind "127.0.0.1:$listen" --admin "127.0.0.1:$admin")
echo "user-space instructions per WSGI request in the master (callgrind): $strata"
