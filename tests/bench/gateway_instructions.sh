#!/usr/bin/env bash
# Instructions per request of one or more gateway builds, counted by callgrind: unlike time,
# the count barely moves with the load on a shared machine, so two builds can be compared
# exactly (a regression check for a change on the request path). Each build runs alone under
# valgrind with the bench's gateway config (one thread, no access log) in front of one
# gw_backend; after a warm-up the counters are zeroed, wrk sends keep-alive requests for
# DURATION, and the instructions counted are divided by the requests answered.
#
#   bash tests/bench/gateway_instructions.sh                       # this build
#   GATEWAYS="target/release/waymark-gateway /tmp/old/waymark-gateway" \
#       bash tests/bench/gateway_instructions.sh                  # several builds
#   DATA_PATHS="pingora lean" bash tests/bench/gateway_instructions.sh  # each data path
#   CALLGRIND_DIR=/tmp/cg bash tests/bench/gateway_instructions.sh  # keep the profiles
#                                                    (then: callgrind_annotate --inclusive=yes FILE)
#   NGINX=1 bash tests/bench/gateway_instructions.sh     # nginx too, as the reference
#
# Instructions count user space only: a proxy's system calls are counted apart (strace -c,
# see tests/bench/results/gateway-profile.md). With NGINX=1, nginx (one worker, no master,
# the config of gateway.sh) is counted the same way.
#
# A benchmark, not a test. Needs valgrind and wrk (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
DURATION=${DURATION:-15s}
GATEWAYS=${GATEWAYS:-$target/release/waymark-gateway}
# The HTTP/1.1 data paths to count (the gateway's --data-path); "default" passes none.
DATA_PATHS=${DATA_PATHS:-default}
for tool in valgrind callgrind_control wrk curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (Debian: apt-get install valgrind wrk curl)" >&2; exit 1; }
done
cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins

# shellcheck source=tests/bench/lib.sh
source tests/bench/lib.sh
until_200() { # url, tries (0.1 s apart)
    for _ in $(seq 1 "$2"); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "$1") == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

start_backend_and_registry
printf 'threads = 1\naccess_log = "off"\n' >"$work/gateway.toml"

echo "| build | requests | instructions | instructions/request |"
echo "|---|---:|---:|---:|"
# count NAME PID PORT: zero the counters after a warm-up, load, dump, print the row.
count() {
    local name=$1 pid=$2 port=$3 requests part ir
    wrk -t1 -c8 -d3s -H 'Host: bench.test' "http://127.0.0.1:$port/" >/dev/null
    callgrind_control --zero "$pid" >/dev/null 2>&1
    requests=$(wrk -t1 -c8 -d"$DURATION" -H 'Host: bench.test' "http://127.0.0.1:$port/" |
        awk '/requests in/ { print $1 }')
    callgrind_control --dump "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    # The dump made after zeroing is the highest-numbered part file.
    part=$(ls "$work"/cg."$n".* 2>/dev/null | sort -t. -k3 -n | tail -1)
    ir=$(awk '/^totals:/ { print $2 }' "$part")
    if [[ -n ${CALLGRIND_DIR:-} ]]; then
        mkdir -p "$CALLGRIND_DIR"
        cp "$part" "$CALLGRIND_DIR/$n.$(tr '/ ()' '____' <<<"$name").callgrind"
    fi
    printf '| %s | %s | %s | %s |\n' "$name" "$requests" "$ir" \
        "$(awk -v i="$ir" -v r="$requests" 'BEGIN { printf "%.0f", i / r }')"
}

n=0
for gw in $GATEWAYS; do
for data_path in $DATA_PATHS; do
    n=$((n + 1))
    path_args=()
    [[ $data_path == default ]] || path_args=(--data-path "$data_path")
    port=$(free_port)
    admin=$(free_port)
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.$n" \
        "$gw" ingress --config "$work/gateway.toml" --listen "127.0.0.1:$port" \
        --admin-addr "127.0.0.1:$admin" --registry "http://$api" "${path_args[@]}" \
        >/dev/null 2>"$work/gw.$n.log" &
    pid=$!
    pids+=("$pid")
    until_200 "http://127.0.0.1:$port/" 600 || { echo "$gw did not start under valgrind" >&2; tail "$work/gw.$n.log" >&2; exit 1; }
    count "$gw ($data_path)" "$pid" "$port"
done
done

if [[ ${NGINX:-0} == 1 ]]; then
    NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
    n=$((n + 1))
    port=$(free_port)
    NGINX_MASTER=off write_nginx_conf "$port"
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$n" \
        "$NGINX_BIN" -c "$work/nginx/nginx.conf" -p "$work/nginx" 2>"$work/nginx.$n.log" &
    pid=$!
    pids+=("$pid")
    until_200 "http://127.0.0.1:$port/" 600 || { echo "nginx did not start under valgrind" >&2; tail "$work/nginx.$n.log" >&2; exit 1; }
    count "nginx ($("$NGINX_BIN" -v 2>&1 | sed 's/.*\///'))" "$pid" "$port"
fi
