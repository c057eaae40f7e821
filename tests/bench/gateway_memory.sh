#!/usr/bin/env bash
# Memory per client connection, beside nginx: each proxy's resident memory (VmRSS of the
# process that holds the connections: the gateway, nginx's one worker) at rest, then while
#   - IDLE keep-alive connections are open, each after one answered request;
#   - IN_FLIGHT requests more wait on a backend that answers after 4 s (one connection each,
#     and one upstream connection each), the idle connections still open.
# The difference divided by the count is reported per connection and per request in flight.
# Targets: the gateway on its lean HTTP/1.1 path (the default), on pingora's, and nginx (one
# worker, keep-alive upstream, as in gateway.sh). Results go to
# tests/bench/results/gateway-memory.md.
#
#   bash tests/bench/gateway_memory.sh
#   IDLE=5000 IN_FLIGHT=1000 bash tests/bench/gateway_memory.sh
#
# A benchmark, not a test. Needs nginx and python3; raises its own open-files limit.
set -euo pipefail
cd "$(dirname "$0")/../.."

IDLE=${IDLE:-2000}
IN_FLIGHT=${IN_FLIGHT:-500}
target="${CARGO_TARGET_DIR:-target}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || { echo "missing: nginx (Debian: apt-get install nginx)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"
need=$((IDLE + 2 * IN_FLIGHT + 256))
if (($(ulimit -n) < need)); then
    echo "the open-files limit ($(ulimit -n)) is below the $need this run needs" >&2
    exit 1
fi

cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins
# shellcheck source=tests/bench/lib.sh
source tests/bench/lib.sh
wait_200() {
    for _ in $(seq 1 200); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "http://127.0.0.1:$1/") == 200 ]] && return 0
        sleep 0.05
    done
    echo "nothing answers on $1" >&2
    return 1
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

start_backend_and_registry

declare -A PORT PID
for path in lean pingora; do
    printf 'threads = 1\naccess_log = "off"\ndata_path = "%s"\n[limits]\nmax_connections = %d\n' \
        "$path" "$need" >"$work/$path.toml"
    RUST_LOG=warn "$target/release/waymark-gateway" ingress --config "$work/$path.toml" \
        --listen 127.0.0.1:0 --admin-addr 127.0.0.1:0 --registry "http://$api" \
        >"$work/$path.out" 2>"$work/$path.log" &
    pids+=($!)
    PID[$path]=$!
    for _ in $(seq 1 200); do grep -q listening "$work/$path.out" && break; sleep 0.05; done
    PORT[$path]=$(sed -n 's/.* http=[^ ]*:\([0-9]*\) .*/\1/p' "$work/$path.out")
    wait_200 "${PORT[$path]}"
done

nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $((need * 2));
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections $need; }
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx;
    scgi_temp_path $work/nginx;
    upstream backend { server $backend; keepalive 64; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
}
EOF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
wait_200 "$nginx_port"
nginx_worker=$(pgrep -P "$(cat "$work/nginx/nginx.pid")" | head -1)
PORT[nginx]=$nginx_port
PID[nginx]=$nginx_worker

# The client: opens IDLE connections with one answered request each, says "idle", waits for
# a line on stdin; then sends IN_FLIGHT slow requests on new connections, says "flight", and
# holds everything until stdin closes. The idle connections stay open while the requests in
# flight are measured, so that nothing freed in between hides what they take.
cat >"$work/client.py" <<'PYEOF'
import asyncio, sys
port, idle, flight = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
async def one(conns, path, answered):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: bench.test\r\n\r\n".encode())
    await w.drain()
    if answered:
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
    conns.append(w)
async def batch(conns, n, path, answered):
    for i in range(0, n, 100):
        await asyncio.gather(*(one(conns, path, answered) for _ in range(min(100, n - i))))
async def main():
    loop = asyncio.get_running_loop()
    conns = []
    await batch(conns, idle, "/", True)
    print("idle", len(conns), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await batch(conns, flight, "/?sleep_ms=4000", False)
    print("flight", len(conns), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PYEOF

# measure TARGET → sets idle_kib flight_kib (per idle connection, per request in flight)
measure() {
    local port=${PORT[$1]} pid=${PID[$1]} base with_idle with_flight line
    base=$(rss_kib "$pid")
    coproc CLIENT { python3 "$work/client.py" "$port" "$IDLE" "$IN_FLIGHT"; }
    read -r line <&"${CLIENT[0]}"
    [[ $line == idle* ]] || { echo "client: $line" >&2; return 1; }
    sleep 1
    with_idle=$(rss_kib "$pid")
    echo >&"${CLIENT[1]}"
    read -r line <&"${CLIENT[0]}"
    [[ $line == flight* ]] || { echo "client: $line" >&2; return 1; }
    # The requests reach the backend, which holds them 4 s.
    sleep 1
    with_flight=$(rss_kib "$pid")
    eval "exec ${CLIENT[1]}>&-"
    wait "$CLIENT_PID" 2>/dev/null || true
    idle_kib=$(awk -v a="$base" -v b="$with_idle" -v n="$IDLE" 'BEGIN { printf "%.1f", (b - a) / n }')
    flight_kib=$(awk -v a="$with_idle" -v b="$with_flight" -v n="$IN_FLIGHT" 'BEGIN { printf "%.1f", (b - a) / n }')
}

declare -A R
for t in lean pingora nginx; do
    # Warm up: every per-process structure allocated once.
    curl -s -o /dev/null -H 'Host: bench.test' "http://127.0.0.1:${PORT[$t]}/"
    R[base,$t]=$(rss_kib "${PID[$t]}")
    measure "$t"
    R[idle,$t]=$idle_kib
    R[flight,$t]=$flight_kib
    echo "$t: idle $idle_kib KiB/connection, in flight $flight_kib KiB/request" >&2
done

mkdir -p tests/bench/results
{
    echo "# Gateway memory per connection"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2/1048576 }' /proc/meminfo), $(uname -r)"
    echo "- command: IDLE=$IDLE IN_FLIGHT=$IN_FLIGHT bash tests/bench/gateway_memory.sh"
    echo "- resident memory (VmRSS) of the process holding the connections (the gateway; nginx's one worker): at rest, 1 s after $IDLE idle keep-alive connections are open (each after one answered request), and 1 s after $IN_FLIGHT requests more are in flight (each on a new connection, waiting 4 s on the backend, with an upstream connection each), the idle ones still open; each difference divided by its count"
    echo
    echo "| target | RSS at rest, KiB | KiB per idle connection | KiB per request in flight |"
    echo "|---|---:|---:|---:|"
    for t in lean pingora nginx; do
        echo "| $t | ${R[base,$t]} | ${R[idle,$t]} | ${R[flight,$t]} |"
    done
} | tee tests/bench/results/gateway-memory.md
