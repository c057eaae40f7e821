#!/usr/bin/env bash
# Gateway benchmark with HTTP/2 from the client: waymark-gateway (h2c on its plain listener),
# nginx (`listen ... http2`, cleartext by prior knowledge) and HAProxy (`bind ... proto h2`),
# each in front of the same gw_backend over HTTP/1.1 keep-alive, in the pinned layout of
# gateway.sh (each proxy alone on core 0, every thread; h2load, the backend and the registry
# on core 1). Reports requests per second and the proxy's CPU time per request, as Markdown
# on stdout and in tests/bench/results/gateway-h2.md.
#
#   bash tests/bench/gateway_h2.sh                     # 10 s per run, 16 connections × 8 streams
#   DURATION=30 CONNECTIONS=32 STREAMS=16 bash tests/bench/gateway_h2.sh
#
# The gateway runs twice, once per data path (`lean`, hyper's HTTP/2 server, the default; and
# `pingora`, pingora's proxy), with every feature on, as in gateway.sh: routing, balancing,
# forwarding headers, trace context, limits, metrics; nginx and HAProxy add the same request
# headers. No access logs.
# A benchmark, not a test. Needs h2load (Debian: nghttp2-client), nginx, haproxy, taskset.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
STREAMS=${STREAMS:-8}
ROUNDS=${ROUNDS:-3}
target="${CARGO_TARGET_DIR:-target}"

missing=()
for tool in h2load nginx haproxy taskset; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends nghttp2-client nginx haproxy util-linux >/dev/null
    else
        echo "missing: ${missing[*]} (Debian: apt-get install nghttp2-client nginx haproxy util-linux)" >&2
        exit 1
    fi
fi
[[ $(nproc) -ge 2 ]] || { echo "needs 2 cores (the pinned layout)" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins

# shellcheck source=tests/bench/lib.sh
source tests/bench/lib.sh
wait_port() {
    for _ in $(seq 1 200); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}
start_backend_and_registry taskset -c 1

# waymark-gateway, once per data path: one worker thread, h2c, no access log.
# start_gateway DATA_PATH → sets gw_port gw_pid
start_gateway() {
    printf 'threads = 1\naccess_log = "off"\nh2c = true\ndata_path = "%s"\n' "$1" >"$work/gateway-$1.toml"
    RUST_LOG=warn "$target/release/waymark-gateway" ingress --config "$work/gateway-$1.toml" \
        --listen 127.0.0.1:0 --admin-addr 127.0.0.1:0 --registry "http://$api" \
        >"$work/gateway-$1.out" 2>"$work/gateway-$1.log" &
    pids+=($!)
    gw_pid=$!
    for _ in $(seq 1 200); do grep -q listening "$work/gateway-$1.out" && break; sleep 0.05; done
    gw_port=$(sed -n 's/.* http=[^ ]*:\([0-9]*\) .*/\1/p' "$work/gateway-$1.out")
    [[ -n $gw_port ]] || { echo "the gateway did not start:"; cat "$work/gateway-$1.log"; exit 1; }
}
start_gateway lean
lean_port=$gw_port lean_pid=$gw_pid
start_gateway pingora
pingora_port=$gw_port pingora_pid=$gw_pid

nginx_port=$(free_port)
write_nginx_conf "$nginx_port" " http2"
"$NGINX" -t -q -c "$work/nginx/nginx.conf" -p "$work/nginx"
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
wait_port "$nginx_port"
for _ in $(seq 1 100); do [[ -s $work/nginx/nginx.pid ]] && pgrep -P "$(cat "$work/nginx/nginx.pid")" >/dev/null && break; sleep 0.05; done
nginx_master=$(cat "$work/nginx/nginx.pid")
nginx_pid=$(pgrep -P "$nginx_master" | head -1)

haproxy_port=$(free_port)
write_haproxy_conf "$work/haproxy.cfg" "$haproxy_port" " proto h2"
"$HAPROXY" -c -q -f "$work/haproxy.cfg"
"$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)
haproxy_pid=$!
wait_port "$haproxy_port"

for p in $lean_pid $pingora_pid $nginx_pid $haproxy_pid; do taskset -a -pc 0 "$p" >/dev/null; done

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# load NAME PORT PID → sets rps cpu_us ok (h2load, pinned to core 1)
load() {
    local port=$2 pid=$3 before after out reqs
    # Each target answers over HTTP/2 before it is measured.
    out=$(taskset -c 1 h2load -n 20 -c 1 -H ':authority: bench.test' "http://127.0.0.1:$port/" 2>&1)
    grep -q '20 succeeded' <<<"$out" || { echo "$1 does not answer HTTP/2: $out" >&2; exit 1; }
    before=$(cpu "$pid")
    out=$(taskset -c 1 h2load -t 1 -c "$CONNECTIONS" -m "$STREAMS" -D "$DURATION" \
        -H ':authority: bench.test' "http://127.0.0.1:$port/" 2>&1)
    after=$(cpu "$pid")
    rps=$(awk '/^finished in/ { gsub(",", ""); printf "%.0f", $4 }' <<<"$out")
    reqs=$(awk '/^requests:/ { print $8 }' <<<"$out")
    ok=$(awk '/^status codes:/ { gsub(",", ""); print $3 }' <<<"$out")
    cpu_us=$(awk -v d="$((after - before))" -v t="$ticks" -v r="$reqs" 'BEGIN { printf "%.1f", d / t * 1e6 / r }')
    [[ $ok == "$reqs" ]] || echo "warning: $1: $reqs requests succeeded, $ok answered 2xx" >&2
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
targets=(lean:$lean_port:$lean_pid pingora-path:$pingora_port:$pingora_pid nginx:$nginx_port:$nginx_pid haproxy:$haproxy_port:$haproxy_pid)
names=(lean pingora-path nginx haproxy)
declare -A ROUND
for round in $(seq 1 "$ROUNDS"); do
    for t in "${targets[@]}"; do
        IFS=: read -r name port pid <<<"$t"
        load "$name" "$port" "$pid"
        ROUND[$name]+="$rps $cpu_us"$'\n'
        echo "round $round $name: $rps req/s, ${cpu_us}us CPU/req" >&2
    done
done

report() {
    echo "# Gateway benchmark, HTTP/2 from the client"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2/1048576 }' /proc/meminfo), $(uname -r)"
    echo "- load average before: $load_before"
    echo "- command: \`ROUNDS=$ROUNDS DURATION=$DURATION CONNECTIONS=$CONNECTIONS STREAMS=$STREAMS bash tests/bench/gateway_h2.sh\`"
    echo "- layout: each proxy alone on core 0 (taskset -a -c 0, every thread); h2load (one thread), the backend and the registry on core 1"
    echo "- clients: h2load, $CONNECTIONS connections × $STREAMS concurrent streams, cleartext HTTP/2 by prior knowledge, $DURATION s per target and round; $ROUNDS rounds, the median round by req/s shown"
    echo "- every proxy: one worker, HTTP/1.1 keep-alive to one gw_backend instance, the gateway's request headers added; no access log. The gateway: h2c on its plain listener, every feature on; \`lean\` is the lean data path (hyper's HTTP/2 server), \`pingora-path\` pingora's proxy"
    echo "- CPU/req: the proxy process's user+system CPU time divided by requests"
    echo
    echo "| target | req/s | CPU µs/req | req/s vs nginx | rounds req/s |"
    echo "|---|---:|---:|---:|---|"
    local nrps rps cpu_us line
    nrps=$(printf '%s' "${ROUND[nginx]}" | sort -n | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2) { print $1 }')
    for name in "${names[@]}"; do
        line=$(printf '%s' "${ROUND[$name]}" | sort -n | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)')
        read -r rps cpu_us <<<"$line"
        echo "| $name | $rps | $cpu_us | $(awk -v a="$rps" -v b="$nrps" 'BEGIN { printf "%.2f", a / b }') | $(printf '%s' "${ROUND[$name]}" | awk '{ printf "%s%s", s, $1; s = " / " }') |"
    done
}
mkdir -p tests/bench/results
report | tee tests/bench/results/gateway-h2.md
