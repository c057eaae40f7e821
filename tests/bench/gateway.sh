#!/usr/bin/env bash
# Gateway benchmark: one backend directly, through waymark-gateway, and through nginx and
# HAProxy configured as equivalent reverse proxies (one worker each, keep-alive to the
# backend, no logging, the same forwarding headers added), all on loopback. Reports requests
# per second, latency and the proxy's CPU time per request, as Markdown on stdout and in
# tests/bench/results/gateway.md.
#
#   bash tests/bench/gateway.sh                         # 10 s per run, 32 connections
#   DURATION=30s CONNECTIONS=64 bash tests/bench/gateway.sh
#   RATE=10000 bash tests/bench/gateway.sh              # fixed-rate phase at 10,000 req/s
#   SPIN_US=100 bash tests/bench/gateway.sh             # httpload spins 100 µs before sends
#   ROUNDS=5 bash tests/bench/gateway.sh                # saturation rounds (median reported)
#   BASELINE_GATEWAY=/tmp/old/waymark-gateway bash tests/bench/gateway.sh
#                                                       # another gateway build beside this one
#   PINNED=1 bash tests/bench/gateway.sh                # pinned layout (below), 64 connections
#   ACCESS_LOG=1 bash tests/bench/gateway.sh            # every proxy writes an access log line
#   TARGETS="lean hyperfloor" ROUNDS=5 bash tests/bench/gateway.sh
#                                                       # only those (and direct and nginx)
#
# Targets: the backend directly, waymark-gateway ("gateway": data_path = "pingora"; "lean":
# data_path = "lean", HTTP/1.1 from clients on hyper, to instances on its own codec; the default), "pingora floor" (the pingora_floor example:
# pingora forwarding to one fixed address with the gateway's runtime settings and nothing
# else, the floor under the gateway's cost), "hyper floor" (the hyper_floor example: the same
# on hyper, the forwarder's stack), nginx and HAProxy.
# Two phases per target:
# - saturation: wrk, CONNECTIONS connections, as fast as the target answers; ROUNDS rounds
#   that visit every target in turn (so drift on a shared machine hits all alike), and the
#   round with the median req/s is reported per target.
# - fixed rate: httpload (tests/src/bin/httpload.rs), an open-loop generator like wrk2, at
#   RATE req/s (default: half the lean path's saturation rate), the same for every target,
#   32 connections, DURATION after a 1 s warm-up. Latency is measured from each request's
#   intended send time (coordinated-omission corrected), so it is the latency a client
#   arriving at that rate sees; "added p99" is the difference from the backend alone.
# With BASELINE_GATEWAY, a second gateway binary (an older build, say) runs with the same
# config as target "baseline", so that two builds are compared in one run (it is given fixed
# free ports, which any build accepts).
# The load generator is pinned to core 1 (taskset); the proxies and the backend are not.
# With PINNED=1 (the layout that shows what a request costs the proxy): every proxy alone on
# core 0 (all its threads), the backend, the registry and the load generator on core 1;
# 64 connections unless CONNECTIONS says otherwise; results in gateway-pinned.md.
# With ACCESS_LOG=1 each proxy logs every request to a file: the gateway its text access log
# (its log, stderr, to a file), nginx the combined format with a 64 KiB buffer, HAProxy
# httplog to a file; the floor has no access log. Results get the suffix -log.
# The peers add what the gateway adds to each request: X-Forwarded-For, X-Forwarded-Proto,
# Forwarded, X-Request-Id (generated unless the client sent one) and traceparent.
# A benchmark, not a test: it exits non-zero only when it could not measure; results depend
# on the machine being otherwise idle.
# Needs wrk, nginx, haproxy and jq (Debian packages; installed when run as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10s}
PINNED=${PINNED:-0}
ACCESS_LOG=${ACCESS_LOG:-0}
if [[ $PINNED == 1 ]]; then CONNECTIONS=${CONNECTIONS:-64}; else CONNECTIONS=${CONNECTIONS:-32}; fi
RATE=${RATE:-}
SPIN_US=${SPIN_US:-0}
ROUNDS=${ROUNDS:-3}
FIXED_CONNECTIONS=32
WARMUP=1
target="${CARGO_TARGET_DIR:-target}"

missing=()
for tool in wrk nginx haproxy jq; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends wrk nginx haproxy jq >/dev/null
    else
        echo "missing: ${missing[*]} (Debian: apt-get install wrk nginx haproxy jq)" >&2
        exit 1
    fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins
cargo build --release -q -p waymark-gateway --example pingora_floor --example hyper_floor

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

# The backend (one gw_backend process, one thread) and the registry, with the backend
# registered as a public service.
start_backend_and_registry

# waymark-gateway: one worker thread, no access log (ACCESS_LOG=1: text).
gw_log=off
gw_rust_log=warn
if [[ $ACCESS_LOG == 1 ]]; then
    gw_log=text
fi
# start_gateway NAME DATA_PATH → sets NAME_pid and NAME_port (the gateway on that HTTP/1.1
# data path, one worker thread).
start_gateway() {
    local name=$1 port
    printf 'threads = 1\naccess_log = "%s"\ndata_path = "%s"\n' "$gw_log" "$2" >"$work/$name.toml"
    RUST_LOG=$gw_rust_log "$target/release/waymark-gateway" ingress --config "$work/$name.toml" \
        --listen 127.0.0.1:0 --admin-addr 127.0.0.1:0 --registry "http://$api" \
        >"$work/$name.out" 2>"$work/$name.log" &
    pids+=($!)
    printf -v "${name}_pid" '%s' "$!"
    # Port 0: the bound port, read back from the gateway's listening line.
    for _ in $(seq 1 200); do grep -q listening "$work/$name.out" && break; sleep 0.05; done
    port=$(sed -n 's/.* http=[^ ]*:\([0-9]*\) .*/\1/p' "$work/$name.out")
    [[ -n $port ]] || { echo "the gateway ($name) did not start:"; cat "$work/$name.log"; exit 1; }
    printf -v "${name}_port" '%s' "$port"
    for _ in $(seq 1 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "http://127.0.0.1:$port/") == 200 ]] && break
        sleep 0.05
    done
}
# "gateway": pingora's data path; "lean": the lean HTTP/1.1 path (the default).
start_gateway gw pingora
start_gateway lean lean

# The pingora floor: pingora with the gateway's runtime settings, forwarding to the backend.
floor_port=$(free_port)
"$target/release/examples/pingora_floor" "127.0.0.1:$floor_port" "127.0.0.1:$backend_port" \
    >/dev/null 2>"$work/floor.log" &
pids+=($!)
floor_pid=$!
wait_port "$floor_port"

# The hyper floor: hyper's HTTP/1.1 server and pooled client, forwarding to the backend.
"$target/release/examples/hyper_floor" 127.0.0.1:0 "127.0.0.1:$backend_port" \
    >"$work/hyper.out" 2>"$work/hyper.log" &
pids+=($!)
hyper_pid=$!
for _ in $(seq 1 100); do grep -q listening "$work/hyper.out" && break; sleep 0.05; done
hyper_port=$(sed -n 's/^hyper_floor listening .*:\([0-9]*\)$/\1/p' "$work/hyper.out")
[[ -n $hyper_port ]] || { echo "hyper_floor did not start:"; cat "$work/hyper.log"; exit 1; }

# nginx: one worker, upstream keep-alive, no logs (ACCESS_LOG=1: buffered to a file).
nginx_port=$(free_port)
nginx_access_log=off
if [[ $ACCESS_LOG == 1 ]]; then nginx_access_log="$work/nginx/access.log combined buffer=64k flush=1s"; fi
NGINX_ACCESS_LOG=$nginx_access_log write_nginx_conf "$nginx_port"
"$NGINX" -t -q -c "$work/nginx/nginx.conf" -p "$work/nginx"
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
wait_port "$nginx_port"
sleep 0.2
nginx_pid=$(pgrep -P "$(cat "$work/nginx/nginx.pid")" | head -1)

# HAProxy: one thread, HTTP mode, connection reuse, no logs (ACCESS_LOG=1: httplog).
haproxy_port=$(free_port)
HAPROXY_LOG=$ACCESS_LOG write_haproxy_conf "$work/haproxy.cfg" "$haproxy_port"
"$HAPROXY" -c -q -f "$work/haproxy.cfg"
"$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.access.log" 2>&1 &
pids+=($!)
haproxy_pid=$!
wait_port "$haproxy_port"

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
to_us() { # wrk latency like 1.23ms / 456.00us / 1.20s → microseconds
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000; else m = 1; printf "%.0f", n * m }'
}
to_s() { # wrk duration like 10s / 2m / 1h / 10 → seconds
    local d=$1
    case $d in
        *h) echo $((${d%h} * 3600)) ;;
        *m) echo $((${d%m} * 60)) ;;
        *s) echo "${d%s}" ;;
        *) echo "$d" ;;
    esac
}
seconds=$(to_s "$DURATION")

# The load generator (wrk, httpload) runs on core 1 only; the proxies and the backend are
# left to the scheduler (either core).
pin=()
pinned="not pinned (fewer than 2 cores, or no taskset)"
if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
    pin=(taskset -c 1)
    pinned="pinned to core 1 (taskset -c 1); proxies and backend not pinned"
fi
# (PINNED=1 pins the rest below, once every target is up.)

# saturate NAME PORT PID → sets rps p50 p99 cpu_us
saturate() {
    local port=$2 pid=$3 before after out reqs
    before=$(cpu "$pid")
    out=$("${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H 'Host: bench.test' "http://127.0.0.1:$port/")
    after=$(cpu "$pid")
    rps=$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    cpu_us=$(awk -v d="$((after - before))" -v t="$ticks" -v r="$reqs" 'BEGIN { printf "%.1f", d / t * 1e6 / r }')
    if grep -q 'Non-2xx' <<<"$out"; then
        echo "warning: $1 answered non-2xx: $(grep Non-2xx <<<"$out")" >&2
    fi
}

# fixed NAME PORT PID → sets rps p50 p99 p999 cpu_us errors lag99 (latency from intended send)
fixed() {
    local port=$2 pid=$3 before after out all unsent
    before=$(cpu "$pid")
    out=$("${pin[@]}" "$target/release/httpload" --url "http://127.0.0.1:$port/" \
        --header 'Host: bench.test' --rate "$rate" --connections "$FIXED_CONNECTIONS" \
        --duration "$seconds" --warmup "$WARMUP" --spin-us "$SPIN_US" --json)
    after=$(cpu "$pid")
    read -r rps p50 p99 p999 errors lag99 all unsent <<<"$(jq -r \
        '[(.rate | floor), .p50_us, .p99_us, .p999_us, .errors, .lag_p99_us, .requests_all, .unsent] | map(tostring) | join(" ")' <<<"$out")"
    # CPU over the whole run (warm-up included) per request answered in it.
    cpu_us=$(awk -v d="$((after - before))" -v t="$ticks" -v r="$all" 'BEGIN { if (r > 0) printf "%.1f", d / t * 1e6 / r; else print "-" }')
    if [[ $errors != 0 || $unsent != 0 ]]; then
        echo "warning: $1 at $rate req/s: $errors errors, $unsent unsent at the end$(jq -r '.first_error // empty | " (first error: \(.))"' <<<"$out")" >&2
    fi
}

targets=(direct:$backend_port:$backend_pid gateway:$gw_port:$gw_pid lean:$lean_port:$lean_pid floor:$floor_port:$floor_pid hyperfloor:$hyper_port:$hyper_pid nginx:$nginx_port:$nginx_pid haproxy:$haproxy_port:$haproxy_pid)
names=(direct gateway lean floor hyperfloor nginx haproxy)
# TARGETS="lean nginx" measures only those (direct and nginx always run: the report is
# relative to them).
if [[ -n ${TARGETS:-} ]]; then
    keep=" direct nginx $TARGETS "
    kept=()
    for t in "${targets[@]}"; do [[ $keep == *" ${t%%:*} "* ]] && kept+=("$t"); done
    targets=("${kept[@]}")
    kept=()
    for n in "${names[@]}"; do [[ $keep == *" $n "* ]] && kept+=("$n"); done
    names=("${kept[@]}")
fi
if [[ -n ${BASELINE_GATEWAY:-} ]]; then
    base_port=$(free_port)
    base_admin=$(free_port)
    # No data_path: a build from before it had none.
    printf 'threads = 1\naccess_log = "%s"\n' "$gw_log" >"$work/baseline.toml"
    RUST_LOG=$gw_rust_log "$BASELINE_GATEWAY" ingress --config "$work/baseline.toml" \
        --listen "127.0.0.1:$base_port" --admin-addr "127.0.0.1:$base_admin" --registry "http://$api" \
        >/dev/null 2>"$work/baseline.log" &
    pids+=($!)
    base_pid=$!
    wait_port "$base_port"
    for _ in $(seq 1 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "http://127.0.0.1:$base_port/") == 200 ]] && break
        sleep 0.05
    done
    targets+=(baseline:$base_port:$base_pid)
    names+=(baseline)
fi
if [[ $PINNED == 1 ]]; then
    if [[ $(nproc) -lt 2 ]] || ! command -v taskset >/dev/null; then
        echo "PINNED=1 needs 2 cores and taskset" >&2
        exit 1
    fi
    for p in $gw_pid $lean_pid $floor_pid $hyper_pid $nginx_pid $haproxy_pid ${base_pid:-}; do
        taskset -a -pc 0 "$p" >/dev/null
    done
    for p in $backend_pid $resolver_pid; do
        taskset -a -pc 1 "$p" >/dev/null
    done
    pinned="pinned layout: each proxy alone on core 0 (taskset -a -c 0, every thread); the load generator, the backend and the registry on core 1"
fi
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# Rounds are kept one line each, the sort key first: the median line, and the keys in order.
median_round() { printf '%s' "$1" | sort -n -k1,1 | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)'; }
round_keys() { printf '%s' "$1" | awk '{ printf "%s%s", sep, $1; sep = " / " }'; }
declare -A R ROUND
for round in $(seq 1 "$ROUNDS"); do
    for t in "${targets[@]}"; do
        IFS=: read -r name port pid <<<"$t"
        saturate "$name" "$port" "$pid"
        ROUND[$name]+="$rps $p50 $p99 $cpu_us"$'\n'
        echo "saturation round $round $name: $rps req/s, p50 ${p50}us, p99 ${p99}us, ${cpu_us}us CPU/req" >&2
    done
done
for name in "${names[@]}"; do
    # The median round by req/s.
    R[saturation,$name]=$(median_round "${ROUND[$name]}")
    R[rounds,$name]=$(round_keys "${ROUND[$name]}")
done

# The fixed rate: half the gateway's (the default data path's) saturation rate.
rate_from=lean
[[ -n ${R[saturation,lean]:-} ]] || rate_from=${names[1]}
read -r gw_rps _ <<<"${R[saturation,$rate_from]}"
rate_source="set by RATE"
if [[ -z $RATE ]]; then
    rate=$((gw_rps / 2))
    rate_source="half the saturation rate of $rate_from"
else
    rate=$RATE
fi
if ! [[ $rate =~ ^[0-9]+([.][0-9]+)?$ ]] || [[ $rate == 0 ]]; then
    echo "no usable fixed rate: $rate" >&2
    exit 1
fi
# The fixed rate, in rounds like saturation; the round with the median p99 is reported.
declare -A FROUND
for round in $(seq 1 "$ROUNDS"); do
    for t in "${targets[@]}"; do
        IFS=: read -r name port pid <<<"$t"
        fixed "$name" "$port" "$pid"
        FROUND[$name]+="$p99 $rps $p50 $p999 $cpu_us $errors $lag99"$'\n'
        echo "fixed round $round $rate/s $name: $rps req/s, p50 ${p50}us, p99 ${p99}us, p99.9 ${p999}us, ${cpu_us}us CPU/req, $errors errors" >&2
    done
done
for name in "${names[@]}"; do
    read -r p99 rps p50 p999 cpu_us errors lag99 <<<"$(median_round "${FROUND[$name]}")"
    R[fixed,$name]="$rps $p50 $p99 $p999 $cpu_us $errors $lag99"
    R[frounds,$name]=$(round_keys "${FROUND[$name]}")
done

report() {
    echo "# Gateway benchmark"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- command: \`PINNED=$PINNED ACCESS_LOG=$ACCESS_LOG ROUNDS=$ROUNDS DURATION=$DURATION CONNECTIONS=$CONNECTIONS${TARGETS:+ TARGETS=\"$TARGETS\"} bash tests/bench/gateway.sh\`"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2/1048576 }' /proc/meminfo), $(uname -r)"
    echo "- load average before: $load_before"
    echo "- load generator: $pinned"
    echo "- fixed rate: $rate req/s ($rate_source), the same for every target; latency measured from each request's intended send time (coordinated-omission corrected)"
    echo "- access log: $(if [[ $ACCESS_LOG == 1 ]]; then echo "on: the gateway's text log (stderr to a file), nginx combined with a 64 KiB buffer flushed every second (as the gateway), HAProxy httplog to stdout into a file; the floors have none"; else echo off; fi)"
    echo "- every proxy: one worker (gateway and lean threads = 1, nginx worker_processes 1, HAProxy nbthread 1), keep-alive to one gw_backend instance; nginx and HAProxy add the gateway's request headers (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto, Forwarded, X-Request-Id, traceparent) and answer with the request ID, as the gateway does"
    echo "- gateway: data_path = \"pingora\" (pingora's proxy); lean: data_path = \"lean\" (HTTP/1.1 from clients on hyper, to instances on the gateway's own codec; the default); both with every feature on: routing, balancing, forwarding headers, trace context, limits, metrics"
    echo "- floor: the pingora_floor example, pingora forwarding to the backend with the gateway's runtime settings (one thread, no work stealing, mimalloc, per-try timeouts, header deadline) and no routing, balancing, headers, limits or metrics; hyperfloor: the hyper_floor example, the same on hyper (one current-thread runtime, http1 server with keep-alive, hyper-util's pooled client)"
    echo "- CPU/req: the proxy process's user+system CPU time divided by requests (for direct: the backend's)"
    echo
    echo "## saturation"
    echo
    echo "wrk, 1 thread, $CONNECTIONS connections, $DURATION per target and round; $ROUNDS rounds, the median round shown (every round's req/s in the last column)."
    echo
    echo "| target | req/s | p50 µs | p99 µs | CPU µs/req | req/s vs nginx | added p99 µs vs direct | rounds req/s |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    local nrps dp99 rps p50 p99 p999 cpu_us errors lag99 ratio added
    read -r nrps _ _ _ <<<"${R[saturation,nginx]}"
    read -r _ _ dp99 _ <<<"${R[saturation,direct]}"
    for name in "${names[@]}"; do
        read -r rps p50 p99 cpu_us <<<"${R[saturation,$name]}"
        ratio=$(awk -v a="$rps" -v b="$nrps" 'BEGIN { printf "%.2f", a / b }')
        added=$([[ $name == direct ]] && echo "-" || echo $((p99 - dp99)))
        echo "| $name | $rps | $p50 | $p99 | $cpu_us | $ratio | $added | ${R[rounds,$name]} |"
    done
    echo
    echo "## fixed rate: $rate req/s"
    echo
    echo "httpload at $rate req/s ($rate_source) for every target, $FIXED_CONNECTIONS connections, $seconds s measured after a ${WARMUP} s warm-up. Latency is measured from each request's intended send time (coordinated-omission corrected, as wrk2), so queueing behind a slow answer counts. CPU/req covers the warm-up too. Generator lag: how late httpload sent once a request was due and its connection free (p99; it waits on a timerfd, spinning the last $SPIN_US µs), a check on the generator itself; a wait for the previous answer is not lag but counts in the latency."
    echo
    echo "$ROUNDS rounds, the round with the median p99 shown (every round's p99 in the last column)."
    echo
    echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | added p99 µs vs direct | errors | generator lag p99 µs | rounds p99 µs |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    read -r _ _ dp99 _ <<<"${R[fixed,direct]}"
    for name in "${names[@]}"; do
        read -r rps p50 p99 p999 cpu_us errors lag99 <<<"${R[fixed,$name]}"
        added="-"
        if [[ $name != direct && $p99 =~ ^[0-9]+$ && $dp99 =~ ^[0-9]+$ ]]; then
            added=$((p99 - dp99))
        fi
        echo "| $name | $rps | $p50 | $p99 | $p999 | $cpu_us | $added | $errors | $lag99 | ${R[frounds,$name]} |"
    done
    echo
}

mkdir -p tests/bench/results
# A comparison of two builds does not replace the reference results.
suffix=${BASELINE_GATEWAY:+-baseline}
if [[ $ACCESS_LOG == 1 ]]; then suffix="-log$suffix"; fi
if [[ $PINNED == 1 ]]; then suffix="-pinned$suffix"; fi
report | tee "tests/bench/results/gateway$suffix.md"
