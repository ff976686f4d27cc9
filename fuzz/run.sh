#!/usr/bin/env bash
# Runs every fuzz target (or those named) for FUZZ_SECONDS each (30 by default), on the
# committed corpus in fuzz/corpus/<target>; inputs it finds go to target/fuzz/corpus/<target>
# (merge them in with `cargo fuzz cmin` before committing), so a run leaves the tree clean. Needs the nightly toolchain (cargo-fuzz's
# sanitizer flags); installs cargo-fuzz when it is missing. `make fuzz` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
cargo +nightly fuzz build --fuzz-dir fuzz --target-dir target/fuzz -O
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" "target/fuzz/corpus/$target"
    echo "== $target: ${seconds}s"
    cargo +nightly fuzz run --fuzz-dir fuzz --target-dir target/fuzz -O "$target" \
        "target/fuzz/corpus/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 \
        -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 2>&1 \
        | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)|ERROR|panicked|SUMMARY" || true
    if compgen -G "fuzz/artifacts/$target/crash-*" >/dev/null; then
        echo "== $target: FOUND A CRASH (fuzz/artifacts/$target)"; exit 1
    fi
done
