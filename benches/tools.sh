# Sourced by the benchmark scripts: `need COMMAND[:PACKAGE]...` installs, from apt, the
# packages of the commands the machine lacks (the tools Strata is compared against are never
# test dependencies, so each benchmark installs its own).
need() {
  local missing=() item command package
  for item in "$@"; do
    command=${item%%:*}
    package=${item#*:}
    command -v "$command" >/dev/null || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
}

# `instructions_per_request PORT COMMAND...`: runs COMMAND under callgrind twice, loaded by wrk
# (32 connections) for 2 s and then for 10 s once PORT answers, and prints the user-space
# instructions it spent per request: the difference of the two totals over the difference of
# the requests served, so start-up and shutdown cancel. Children the command starts run
# natively and are not counted.
instructions_per_request() {
  local short long
  short=$(callgrind_run 2 "$@")
  long=$(callgrind_run 10 "$@")
  python3 -c "import sys; r1, i1, r2, i2 = map(int, sys.argv[1:]); print(round((i2 - i1) / (r2 - r1)))" \
    $short $long
}

# One run under callgrind: prints "<requests> <instructions>".
callgrind_run() {
  local seconds=$1 listen=$2 out
  out=$(mktemp)
  shift 2
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 240); do
    (exec 3<>"/dev/tcp/127.0.0.1/$listen") 2>/dev/null && break
    sleep 0.5
  done
  sleep 1
  local requests
  requests=$(wrk -t1 -c32 -d"${seconds}s" "http://127.0.0.1:$listen/" | awk '/requests in/ {print $1}')
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$requests $(awk '/^(summary|totals):/ {print $2; exit}' "$out")"
  rm -f "$out"
}
