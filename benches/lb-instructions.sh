#!/usr/bin/env bash
# User-space instructions per proxied request, Strata against HAProxy, counted by callgrind:
# a figure that does not move with the machine's load or CPU steal, so a change to the
# request path can be judged by it before a timed run (`benches/lb.sh`) confirms it.
#
# Each proxy runs twice under valgrind in front of the same fast backend
# (crates/lb/examples/fixed_body.rs), loaded by wrk for 2 s and then for 10 s; the difference of
# the two totals over the difference of the requests served cancels start-up and shutdown.
# Kernel work (the sends and receives, about equal for both) is not counted.
#
# Usage: bash benches/lb-instructions.sh
#        STRATA=/path/to/strata bash benches/lb-instructions.sh   # another build, e.g. an
#        earlier commit's (`git worktree add /tmp/old <commit> && cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
strata_bin=${STRATA:-target/release/strata}

. benches/tools.sh
need wrk haproxy valgrind
[ -x "$strata_bin" ] || cargo build --release --locked
cargo build --release --locked --example fixed_body -p strata-lb

tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
origin=$(port) strata_port=$(port) admin=$(port) haproxy_port=$(port)
target/release/examples/fixed_body "127.0.0.1:$origin" 13 >/dev/null 2>&1 &

cat >"$tmp/strata.toml" <<EOF
tiers = ["lb"]
[lb]
bind = "127.0.0.1:$strata_port"
default_backend = "origin"
[[lb.backends]]
name = "origin"
health_interval = "1h"
[[lb.backends.servers]]
name = "o"
url = "http://127.0.0.1:$origin"
[admin]
bind = "127.0.0.1:$admin"
EOF
cat >"$tmp/haproxy.cfg" <<EOF
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend plain
    bind 127.0.0.1:$haproxy_port
    default_backend origin
backend origin
    http-reuse always
    server o 127.0.0.1:$origin
EOF

strata=$(instructions_per_request "$strata_port" "$strata_bin" run --config "$tmp/strata.toml")
haproxy=$(instructions_per_request "$haproxy_port" haproxy -db -f "$tmp/haproxy.cfg")
echo "user-space instructions per proxied request (callgrind): Strata $strata, HAProxy $haproxy," \
  "Strata ÷ HAProxy $(python3 -c "print(round($strata / $haproxy, 2))")"
