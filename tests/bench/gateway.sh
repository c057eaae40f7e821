#!/usr/bin/env bash
# Gateway benchmark: wrk against one backend directly, through waymark-gateway, and through
# nginx and HAProxy configured as equivalent reverse proxies (one worker each, keep-alive to
# the backend, no logging), all on loopback. Reports requests per second, p50/p99 latency and
# the proxy's CPU time per request, with ratios, as Markdown on stdout and in
# tests/bench/results/gateway.md.
#
#   bash tests/bench/gateway.sh                         # 10 s per run, 32 connections
#   DURATION=30s CONNECTIONS=64 bash tests/bench/gateway.sh
#
# Two loads per target: saturation (CONNECTIONS connections) and light (1 connection, where
# the added latency of a proxy shows best). wrk sends as fast as it can, so "light" stands in
# for a fixed rate below saturation. A benchmark, not a test: it exits non-zero only when it
# could not measure; results depend on the machine being otherwise idle.
# Needs wrk, nginx and haproxy (Debian packages; installed when run as root).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
target="${CARGO_TARGET_DIR:-target}"

missing=()
for tool in wrk nginx haproxy; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends wrk nginx haproxy >/dev/null
    else
        echo "missing: ${missing[*]} (Debian: apt-get install wrk nginx haproxy)" >&2
        exit 1
    fi
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

# The backend: one gw_backend process (one thread).
"$target/release/gw_backend" --addr 127.0.0.1:0 --id bench >"$work/backend.out" &
pids+=($!)
backend_pid=$!
for _ in $(seq 1 100); do grep -q listening "$work/backend.out" && break; sleep 0.05; done
backend=$(sed -n 's/^gw_backend listening //p' "$work/backend.out")
backend_port=${backend##*:}

# The registry, with the backend registered as a public service.
"$target/release/waymark-resolver" serve --dns-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --data-dir "$work/data" --upstream 127.0.0.1:9 >"$work/resolver.out" 2>"$work/resolver.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/resolver.out" && break; sleep 0.05; done
api=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$work/resolver.out")
curl -sf -X PUT "http://$api/v1/agent/service/register" -d "{\"ID\":\"bench-1\",\"Name\":\"bench\",\"Address\":\"127.0.0.1\",\"Port\":$backend_port,\"Meta\":{\"waymark-public-host\":\"bench.test\"}}" >/dev/null

# waymark-gateway: one worker thread, no access log.
gw_port=$(free_port)
gw_admin=$(free_port)
cat >"$work/gateway.toml" <<EOF
threads = 1
access_log = "off"
EOF
RUST_LOG=warn "$target/release/waymark-gateway" ingress --config "$work/gateway.toml" \
    --listen "127.0.0.1:$gw_port" --admin-addr "127.0.0.1:$gw_admin" --registry "http://$api" \
    >/dev/null 2>"$work/gateway.log" &
pids+=($!)
gw_pid=$!
wait_port "$gw_port"
for _ in $(seq 1 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "http://127.0.0.1:$gw_port/") == 200 ]] && break
    sleep 0.05
done

# nginx: one worker, upstream keep-alive, no logs.
nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx;
    scgi_temp_path $work/nginx;
    upstream backend { server 127.0.0.1:$backend_port; keepalive 64; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
EOF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
wait_port "$nginx_port"
sleep 0.2
nginx_pid=$(pgrep -P "$(cat "$work/nginx/nginx.pid")" | head -1)

# HAProxy: one thread, HTTP mode, connection reuse, no logs.
haproxy_port=$(free_port)
cat >"$work/haproxy.cfg" <<EOF
global
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    http-reuse always
    option forwardfor
frontend fe
    bind 127.0.0.1:$haproxy_port
    default_backend be
backend be
    server b1 127.0.0.1:$backend_port
EOF
"$HAPROXY" -f "$work/haproxy.cfg" -db >/dev/null 2>&1 &
pids+=($!)
haproxy_pid=$!
wait_port "$haproxy_port"

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
to_us() { # wrk latency like 1.23ms / 456.00us / 1.20s → microseconds
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000; else m = 1; printf "%.0f", n * m }'
}

# run NAME PORT PID CONNECTIONS → sets rps p50 p99 cpu_us
run() {
    local port=$2 pid=$3 conns=$4 before after out
    before=$(cpu "$pid")
    out=$(wrk -t1 -c"$conns" -d"$DURATION" --latency -H 'Host: bench.test' "http://127.0.0.1:$port/")
    after=$(cpu "$pid")
    rps=$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
    local reqs
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    cpu_us=$(awk -v d="$((after - before))" -v t="$ticks" -v r="$reqs" 'BEGIN { printf "%.1f", d / t * 1e6 / r }')
    if grep -q 'Non-2xx' <<<"$out"; then
        echo "warning: $1 answered non-2xx: $(grep Non-2xx <<<"$out")" >&2
    fi
}

declare -A R
for load in saturation light; do
    conns=$CONNECTIONS
    [[ $load == light ]] && conns=1
    for t in direct:$backend_port:$backend_pid gateway:$gw_port:$gw_pid nginx:$nginx_port:$nginx_pid haproxy:$haproxy_port:$haproxy_pid; do
        IFS=: read -r name port pid <<<"$t"
        run "$name" "$port" "$pid" "$conns"
        R[$load,$name]="$rps $p50 $p99 $cpu_us"
        echo "$load $name: $rps req/s, p50 ${p50}us, p99 ${p99}us, ${cpu_us}us CPU/req" >&2
    done
done

report() {
    echo "# Gateway benchmark"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2/1048576 }' /proc/meminfo), $(uname -r)"
    echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- wrk: 1 thread, $DURATION per run; saturation: $CONNECTIONS connections; light: 1 connection"
    echo "- every proxy: one worker (gateway threads = 1, nginx worker_processes 1, HAProxy nbthread 1), keep-alive to one gw_backend instance, no access log"
    echo "- CPU/req: the proxy process's user+system CPU time divided by requests (for direct: the backend's)"
    echo
    for load in saturation light; do
        echo "## $load"
        echo
        echo "| target | req/s | p50 µs | p99 µs | CPU µs/req | req/s vs nginx | added p99 µs vs direct |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        read -r nrps _ _ _ <<<"${R[$load,nginx]}"
        read -r _ _ dp99 _ <<<"${R[$load,direct]}"
        for name in direct gateway nginx haproxy; do
            read -r rps p50 p99 cpu_us <<<"${R[$load,$name]}"
            ratio=$(awk -v a="$rps" -v b="$nrps" 'BEGIN { printf "%.2f", a / b }')
            added=$([[ $name == direct ]] && echo "-" || echo $((p99 - dp99)))
            echo "| $name | $rps | $p50 | $p99 | $cpu_us | $ratio | $added |"
        done
        echo
    done
}

mkdir -p tests/bench/results
report | tee tests/bench/results/gateway.md
