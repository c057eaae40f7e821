#!/usr/bin/env bash
# Where a pinned proxy spends its CPU at saturation: `perf record` of waymark-gateway and of
# the pingora floor (tests/bench/gateway.sh explains both), each alone on core 0, with wrk
# (64 connections) and one gw_backend on core 1, the pinned layout of gateway.sh. Prints,
# per target, the share of samples in the kernel and in user space, and the hottest symbols
# (self time), as Markdown; with PROFILE_DIR the perf.data files are kept.
#
#   bash tests/bench/gateway_profile.sh
#   DURATION=20 PROFILE_DIR=/tmp/prof bash tests/bench/gateway_profile.sh
#
# A benchmark, not a test. Needs perf, wrk and taskset; run as root (or with
# kernel.perf_event_paranoid <= 1) to see kernel symbols.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
DURATION=${DURATION:-10}
TOP=${TOP:-25}
for tool in perf wrk taskset curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (Debian: apt-get install linux-perf wrk util-linux curl)" >&2; exit 1; }
done
[[ $(nproc) -ge 2 ]] || { echo "needs 2 cores" >&2; exit 1; }
cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins --examples

# shellcheck source=tests/bench/lib.sh
source tests/bench/lib.sh
until_200() {
    for _ in $(seq 1 200); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "$1") == 200 ]] && return 0
        sleep 0.05
    done
    return 1
}

start_backend_and_registry taskset -c 1
printf 'threads = 1\naccess_log = "off"\n' >"$work/gateway.toml"

gw_port=$(free_port)
RUST_LOG=warn taskset -c 0 "$target/release/waymark-gateway" ingress --config "$work/gateway.toml" \
    --listen "127.0.0.1:$gw_port" --admin-addr "127.0.0.1:$(free_port)" --registry "http://$api" \
    >/dev/null 2>"$work/gateway.log" &
pids+=($!)
gw_pid=$!
floor_port=$(free_port)
taskset -c 0 "$target/release/examples/pingora_floor" "127.0.0.1:$floor_port" "$backend" \
    >/dev/null 2>"$work/floor.log" &
pids+=($!)
floor_pid=$!
until_200 "http://127.0.0.1:$gw_port/" || { echo "the gateway did not start" >&2; cat "$work/gateway.log" >&2; exit 1; }
until_200 "http://127.0.0.1:$floor_port/" || { echo "the floor did not start" >&2; exit 1; }

echo "# Gateway profile (pinned, saturation)"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores, $(uname -r)"
echo "- each proxy alone on core 0; wrk -t1 -c64 and gw_backend on core 1; perf record -g at 999 Hz for ${DURATION} s of wrk's run (the call graphs slow the proxy: req/s here are not the benchmark's)"
for t in "gateway:$gw_port:$gw_pid" "floor:$floor_port:$floor_pid"; do
    IFS=: read -r name port pid <<<"$t"
    taskset -c 1 wrk -t1 -c64 -d3s -H 'Host: bench.test' "http://127.0.0.1:$port/" >/dev/null
    taskset -c 1 wrk -t1 -c64 -d"$((DURATION + 2))s" -H 'Host: bench.test' "http://127.0.0.1:$port/" >"$work/wrk.$name" &
    wrk_pid=$!
    sleep 1
    perf record -q -F 999 -g -p "$pid" -o "$work/$name.data" -- sleep "$DURATION" 2>/dev/null
    wait "$wrk_pid"
    rps=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' "$work/wrk.$name")
    echo
    echo "## $name: $rps req/s"
    echo
    perf report -i "$work/$name.data" --no-children --sort dso --stdio 2>/dev/null |
        awk '/^ +[0-9.]+%/ && n++ < 8 { printf "- %s %s\n", $1, $2 }'
    echo
    echo "Hottest symbols (self):"
    echo
    echo '```'
    perf report -i "$work/$name.data" --no-children --sort sym --stdio -g none 2>/dev/null |
        awk -v top="$TOP" '/^ +[0-9.]+%/ && n++ < top { print substr($0, 1, 140) }'
    echo '```'
    if [[ -n ${PROFILE_DIR:-} ]]; then
        mkdir -p "$PROFILE_DIR"
        cp "$work/$name.data" "$PROFILE_DIR/$name.perf.data"
    fi
done
