#!/usr/bin/env bash
# Freshness benchmark: how soon DNS answers follow registrations, failed HTTP checks and missed
# TTLs, against the release build of waymark-resolver on loopback. Prints a Markdown table and
# writes it, with the machine and the date, to tests/bench/results/freshness.md.
#
#   bash tests/bench/freshness.sh                      # 300 registrations, 20 + 20 checked services
#   REGISTRATIONS=1000 CHECKS=50 bash tests/bench/freshness.sh
#
# A benchmark, not a test: it exits non-zero only when it could not measure. Results depend on
# the machine being otherwise idle; the report says how busy it was.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release -p waymark-resolver -p waymark-e2e --bins

target="${CARGO_TARGET_DIR:-target}"
mkdir -p bench/results
"$target/release/freshness" \
    --resolver-bin "$target/release/waymark-resolver" \
    --registrations "${REGISTRATIONS:-300}" \
    --checks "${CHECKS:-20}" \
    --out tests/bench/results/freshness.md
