#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each, starting from the committed
# seed corpus (fuzz/corpus/<target>/seed-*), and fails if any target finds a crash (a panic,
# a broken invariant, an input that runs over 10 s or over the memory limit). Usage:
#
#   bash tests/fuzz.sh [SECONDS_PER_TARGET]     # default 20
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). Inputs
# found on the way go to a temporary directory (the seeds stay as committed); a crashing
# input is kept in fuzz/artifacts/<target>/ and printed, to reproduce with
# `cargo +nightly fuzz run -a <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-20}
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [seconds per target]" >&2; exit 2; }

step() { echo "[fuzz] $* ($(date +%H:%M:%S))"; }
step "building the targets (-a: with debug assertions, overflow checks included)"
cargo +nightly fuzz build -a
targets=$(cargo +nightly fuzz list)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in $targets; do
    step "$t for ${secs}s"
    mkdir -p "$scratch/$t"
    if ! cargo +nightly fuzz run -a "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 2>"$scratch/$t.log"; then
        failed+=("$t")
        tail -n 60 "$scratch/$t.log"
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^Done ' "$scratch/$t.log" |
        sed "s/^/[fuzz] $t: /" || true
done
if ((${#failed[@]})); then
    echo "[fuzz] FAILED: ${failed[*]} (crashing inputs in fuzz/artifacts/)" >&2
    exit 1
fi
step "no crash in: $(echo $targets)"
