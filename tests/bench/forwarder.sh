#!/usr/bin/env bash
# Forwarder benchmark: the latency and CPU that two forwarders add to a call between hosts
# (caller → its host's forwarder → mutual-TLS tunnel → the server host's forwarder →
# instance), against the same call made directly and through an equivalent pair of HAProxy
# proxies with mutual TLS between them, in one run. HTTP requests and TCP request/response
# both. Markdown on stdout and in tests/bench/results/forwarder.md.
#
#   sudo bash tests/bench/forwarder.sh                  # 10 s per run, 3 rounds
#   DURATION=3 ROUNDS=1 bash tests/bench/forwarder.sh   # a quick look
#   RATE=5000 CONN_RATE=1000 CONNECTIONS=16 bash tests/bench/forwarder.sh
#   SATURATE=0 bash tests/bench/forwarder.sh            # no wrk saturation phase
#   THREADS=1 bash tests/bench/forwarder.sh             # threads per proxy (default: nproc)
#   PERF_DIR=/tmp/fp bash tests/bench/forwarder.sh      # perf record -g both forwarders
#                          during round 1's waymark runs (then: perf report -i FILE);
#                          those runs are perturbed: not for reference results
#
# Needs root: two "hosts" are network namespaces, A (caller) at 10.78.0.1 and B (server) at
# 10.78.0.2, joined through a bridge that lives in a namespace of its own (as
# tests/src/hosts.rs does); nothing is added to the machine's own network. Each namespace is
# held by a `sleep` this script starts; everything it started is stopped by PID on exit.
#
# On B: the registry (waymark-resolver, its CA, VIP answers for every host), a gw_backend
# (HTTP, registered with Meta waymark-protocol=http) and a line_echo (TCP), a forwarder and
# an HAProxy. On A: a forwarder, an HAProxy, and the load generators. Targets:
# - direct: the caller calls B's address.
# - waymark: the caller calls the service's VIP (resolved from the registry's DNS); forwarder
#   A carries it over its pooled mTLS tunnel (HTTP/2 CONNECT) to forwarder B, which connects
#   to the instance. HTTP: forwarder A proxies per request (HTTP/1.1, pooled), forwarder B
#   copies the stream's bytes. TCP: one tunnel stream per client connection.
# - haproxy: the caller calls HAProxy A on 127.0.0.1; A sends over TLS 1.3 with a client
#   certificate (ECDSA P-256, as the mesh's) to HAProxy B, which requires and verifies it
#   and connects to the instance. HTTP: A in http mode (per request, server connections
#   reused, traceparent set as the forwarder does), B in tcp mode (copies bytes, as
#   forwarder B does). TCP: both in tcp mode, one TLS connection per client connection.
# Both proxies run THREADS threads (default: as many as cores, the forwarder's tokio default;
# TOKIO_WORKER_THREADS for the forwarders, nbthread for HAProxy), logging off.
#
# Phases, each in ROUNDS rounds that visit every target in turn (drift on a shared machine
# hits all alike); per target the round with the median p50 is shown, "added" is the
# median over rounds of (target − direct in the same round):
# - http: httpload (open loop, latency from each request's intended send time, so
#   coordinated omission is corrected) at RATE req/s over CONNECTIONS keep-alive connections.
# - tcp: tcpload (tests/src/bin/tcpload.rs, the same schedule and measure): one line out,
#   one line back (line_echo), at RATE req/s over CONNECTIONS persistent connections.
# - tcp-connect: tcpload --new-connection at CONN_RATE: every request a new connection (and,
#   through the proxies, a new tunnel stream or a new TLS connection from HAProxy A to B).
# - http saturation (SATURATE=1): wrk, 1 thread, CONNECTIONS connections, DURATION.
# CPU/req: user+system time of both proxy processes (/proc/PID/stat) over the run, warm-up
# included, divided by the requests completed in it. The load generator is pinned to core 1
# (taskset); proxies and servers are not.
# A benchmark, not a test: it exits non-zero only when it could not measure. Needs wrk,
# haproxy, jq, dig (dnsutils), openssl, iproute2 (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10} # seconds per run
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-2000}
CONN_RATE=${CONN_RATE:-500}
CONNECTIONS=${CONNECTIONS:-32}
SATURATE=${SATURATE:-1}
THREADS=${THREADS:-$(nproc)}
WARMUP=1
target="${CARGO_TARGET_DIR:-target}"
NET=10.78.0
A=$NET.1
B=$NET.2

if [[ $(id -u) -ne 0 ]]; then
    echo "needs root (network namespaces, veth pairs)" >&2
    exit 1
fi
missing=()
for tool in wrk haproxy jq dig openssl; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk haproxy jq dnsutils openssl >/dev/null
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release -q -p waymark-resolver -p waymark-gateway -p waymark-e2e --bins
bin="$target/release"

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    # Servers and proxies first, then the namespaces' holders.
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# hold NAME: a process holding a new network namespace (lo up); its PID in $held.
hold() {
    unshare --net -- sh -c "ip link set lo up && touch '$work/$1.ready' && exec sleep 3600" &
    held=$!
    pids+=("$held")
    for _ in $(seq 1 200); do [[ -e $work/$1.ready ]] && return 0; sleep 0.05; done
    echo "namespace $1 not ready" >&2
    return 1
}
hold bridge
br=$held
hold A
nsA=$held
hold B
nsB=$held
nsenter -t "$br" -n -- sh -c "ip link add br0 type bridge && ip link set br0 up"
n=0
for ns in $nsA $nsB; do
    n=$((n + 1))
    nsenter -t "$br" -n -- sh -c "ip link add v$n type veth peer name eth0 netns $ns && ip link set v$n master br0 && ip link set v$n up"
    nsenter -t "$ns" -n -- sh -c "ip addr add $NET.$n/24 dev eth0 && ip link set eth0 up"
    # New connections per request: reuse TIME_WAIT ports.
    nsenter -t "$ns" -n -- sh -c "sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='10000 65000'"
done
inA() { nsenter -t "$nsA" -n -- "$@"; }
inB() { nsenter -t "$nsB" -n -- "$@"; }
# start NS LOG CMD...: in the background in a host (nsenter execs it: $! is the program).
start() {
    local ns=$1 log=$2
    shift 2
    nsenter -t "$ns" -n -- "$@" >"$log" 2>&1 &
    started=$!
    pids+=("$started")
}
wait_line() { # file, pattern
    for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    echo "no '$2' in $1:" >&2
    cat "$1" >&2
    return 1
}
wait_tcp() { # ns pid, ip, port
    for _ in $(seq 1 200); do
        nsenter -t "$1" -n -- bash -c "echo >/dev/tcp/$2/$3" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $2:$3" >&2
    return 1
}

# Host B: the registry, the instances.
printf '[dns]\nlocal_clients = ["%s.0/24", "127.0.0.0/8"]\n' "$NET" >"$work/resolver.toml"
start "$nsB" "$work/resolver.log" env RUST_LOG=warn "$bin/waymark-resolver" serve \
    --config "$work/resolver.toml" --dns-addr "$B:53" --http-addr "$B:8500" \
    --data-dir "$work/data" --upstream 127.0.0.1:9 --vip-answers all
wait_line "$work/resolver.log" "waymark-resolver listening"
token=$("$bin/waymark-resolver" ca join-token --data-dir "$work/data")
start "$nsB" "$work/backend.log" "$bin/gw_backend" --addr "$B:9000" --id b
backend_pid=$started
start "$nsB" "$work/echo.log" "$bin/line_echo" --addr "$B:7000" --id e
echo_pid=$started
wait_line "$work/backend.log" "gw_backend listening"
wait_line "$work/echo.log" "line_echo listening"
register() { # id, name, port, meta
    inB curl -sf --max-time 5 -X PUT "http://$B:8500/v1/agent/service/register" \
        -d "{\"ID\":\"$1\",\"Name\":\"$2\",\"Address\":\"$B\",\"Port\":$3,\"Meta\":$4}" >/dev/null
}
register bhttp-1 bhttp 9000 '{"waymark-protocol":"http"}'
register becho-1 becho 7000 '{}'

# A forwarder on each host, in the mesh.
printf '[shutdown]\ndrain_timeout = "1s"\n' >"$work/forwarder.toml"
forwarder() { # ns pid, host name, address
    start "$1" "$work/$2-forwarder.log" env RUST_LOG=warn TOKIO_WORKER_THREADS="$THREADS" \
        "$bin/waymark-gateway" forwarder \
        --config "$work/forwarder.toml" --registry "http://$B:8500" --admin-addr "$3:9902" \
        --host-name "$2" --advertise-address "$3" --inbound-addr "$3:15008" \
        --join-token "$token" --state-dir "$work/$2-state"
}
forwarder "$nsA" ha "$A"
fwdA=$started
forwarder "$nsB" hb "$B"
fwdB=$started
for h in "$nsA:$A" "$nsB:$B"; do
    ok=""
    for _ in $(seq 1 300); do
        nsenter -t "${h%%:*}" -n -- curl -sf --max-time 2 "http://${h#*:}:9902/healthz/ready" >/dev/null && ok=1 && break
        sleep 0.1
    done
    [[ -n $ok ]] || { echo "forwarder at ${h#*:} not ready:" >&2; cat "$work"/h?-forwarder.log >&2; exit 1; }
done
vip() { inA dig +short +time=2 +tries=3 "@$B" "$1.mesh.internal" A | head -1; }
vip_http=$(vip bhttp)
vip_tcp=$(vip becho)
[[ $vip_http == 127.77.* && $vip_tcp == 127.77.* ]] || { echo "no VIPs: '$vip_http' '$vip_tcp'" >&2; exit 1; }

# The HAProxy pair, with its own CA and host certificates (ECDSA P-256).
tls=$work/tls
mkdir -p "$tls"
(
    cd "$tls"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.crt 2>/dev/null
    for h in ha hb; do
        openssl ecparam -name prime256v1 -genkey -noout -out $h.key 2>/dev/null
        openssl req -new -key $h.key -subj "/CN=$h" -out $h.csr 2>/dev/null
        printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth,clientAuth\n' $h >$h.ext
        openssl x509 -req -in $h.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile $h.ext -out $h.crt 2>/dev/null
        cat $h.crt $h.key >$h.pem
    done
)
cores=$(nproc)
cat >"$work/haproxy-b.cfg" <<EOF
global
    nbthread $THREADS
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend http_in
    bind $B:15009 ssl crt $tls/hb.pem ca-file $tls/ca.crt verify required ssl-min-ver TLSv1.3
    default_backend http_instance
backend http_instance
    server b $B:9000
frontend tcp_in
    bind $B:15010 ssl crt $tls/hb.pem ca-file $tls/ca.crt verify required ssl-min-ver TLSv1.3
    default_backend tcp_instance
backend tcp_instance
    server e $B:7000
EOF
cat >"$work/haproxy-a.cfg" <<EOF
global
    nbthread $THREADS
defaults
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend http_out
    mode http
    bind 127.0.0.1:19000
    http-request set-header traceparent "00-%[uuid,regsub(-,,g)]-%[rand(4294967295),hex,lower,bytes(8)]%[rand(4294967295),hex,lower,bytes(8)]-00"
    default_backend http_peer
backend http_peer
    mode http
    http-reuse always
    server hb $B:15009 ssl crt $tls/ha.pem ca-file $tls/ca.crt verify required verifyhost hb sni str(hb) ssl-min-ver TLSv1.3
frontend tcp_out
    mode tcp
    bind 127.0.0.1:17000
    default_backend tcp_peer
backend tcp_peer
    mode tcp
    server hb $B:15010 ssl crt $tls/ha.pem ca-file $tls/ca.crt verify required verifyhost hb sni str(hb) ssl-min-ver TLSv1.3
EOF
for h in a b; do "$HAPROXY" -c -q -f "$work/haproxy-$h.cfg"; done
start "$nsB" "$work/haproxy-b.log" "$HAPROXY" -f "$work/haproxy-b.cfg" -db
hapB=$started
start "$nsA" "$work/haproxy-a.log" "$HAPROXY" -f "$work/haproxy-a.cfg" -db
hapA=$started
wait_tcp "$nsB" "$B" 15010
wait_tcp "$nsA" 127.0.0.1 17000

# Every way answers before anything is measured.
for url in "http://$B:9000/" "http://$vip_http:9000/" "http://127.0.0.1:19000/"; do
    out=$(inA curl -sf --max-time 5 "$url") || { echo "$url does not answer" >&2; exit 1; }
    grep -q '"id":"b"' <<<"$out" || { echo "$url: $out" >&2; exit 1; }
done
for addr in "$B 7000" "$vip_tcp 7000" "127.0.0.1 17000"; do
    out=$(inA timeout 5 bash -c "exec 3<>/dev/tcp/${addr% *}/${addr#* }; echo hi >&3; head -1 <&3")
    [[ $out == "e hi" ]] || { echo "$addr: '$out'" >&2; exit 1; }
done

ticks=$(getconf CLK_TCK)
cpu() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$s"; }
pin=()
pinned="not pinned (fewer than 2 cores, or no taskset)"
if ((cores >= 2)) && command -v taskset >/dev/null; then
    pin=(taskset -c 1)
    pinned="pinned to core 1 (taskset -c 1); proxies and servers not pinned"
fi
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }'; }

# Targets per phase: name, address, the processes whose CPU counts.
http_targets=("direct $B:9000" "waymark $vip_http:9000" "haproxy 127.0.0.1:19000")
tcp_targets=("direct $B:7000" "waymark $vip_tcp:7000" "haproxy 127.0.0.1:17000")
names=(direct waymark haproxy)
declare -A PROCS=([direct]="$backend_pid" [waymark]="$fwdA $fwdB" [haproxy]="$hapA $hapB")
declare -A ECHO_PROCS=([direct]="$echo_pid" [waymark]="$fwdA $fwdB" [haproxy]="$hapA $hapB")

# measure PHASE NAME ADDR → one line "p50 p99 p999 rps cpu_us errors lag99 p90"
measure() {
    local phase=$1 name=$2 addr=$3 procs before after out all
    if [[ $phase == http ]]; then procs=${PROCS[$name]}; else procs=${ECHO_PROCS[$name]}; fi
    local perf=()
    if [[ -n ${PERF_DIR:-} && $name == waymark && $round == 1 ]]; then
        mkdir -p "$PERF_DIR"
        for p in $procs; do
            perf record -q -F 999 --call-graph dwarf,16384 -o "$PERF_DIR/$phase-$p.perf.data" \
                -p "$p" -- sleep "$((DURATION + WARMUP))" >/dev/null 2>&1 &
            perf+=($!)
        done
    fi
    # shellcheck disable=SC2086
    before=$(cpu $procs)
    case $phase in
        http) out=$(inA "${pin[@]}" "$bin/httpload" --url "http://$addr/" --rate "$RATE" \
            --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" --json) ;;
        tcp) out=$(inA "${pin[@]}" "$bin/tcpload" --addr "$addr" --rate "$RATE" \
            --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" --json) ;;
        tcp-connect) out=$(inA "${pin[@]}" "$bin/tcpload" --addr "$addr" --rate "$CONN_RATE" \
            --connections 8 --new-connection --duration "$DURATION" --warmup "$WARMUP" --json) ;;
    esac
    # shellcheck disable=SC2086
    after=$(cpu $procs)
    for p in "${perf[@]}"; do wait "$p" || true; done
    all=$(jq -r .requests_all <<<"$out")
    jq -r --arg cpu "$(awk -v d="$((after - before))" -v t="$ticks" -v r="$all" 'BEGIN { if (r > 0) printf "%.1f", d / t * 1e6 / r; else print "-" }')" \
        '[.p50_us, .p99_us, .p999_us, (.rate | floor), $cpu, .errors, .lag_p99_us, .p90_us] | map(tostring) | join(" ")' <<<"$out"
    if [[ $(jq -r '.errors + .unsent' <<<"$out") != 0 ]]; then
        echo "warning: $phase $name: $(jq -c '{errors, unsent, first_error}' <<<"$out")" >&2
    fi
}

# saturate NAME ADDR → "rps p50 p99 cpu_us"
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000; else m = 1; printf "%.0f", n * m }'; }
saturate() {
    local name=$1 addr=$2 before after out reqs
    # shellcheck disable=SC2086
    before=$(cpu ${PROCS[$name]})
    out=$(inA "${pin[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://$addr/")
    # shellcheck disable=SC2086
    after=$(cpu ${PROCS[$name]})
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    echo "$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")" \
        "$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")" \
        "$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")" \
        "$(awk -v d="$((after - before))" -v t="$ticks" -v r="$reqs" 'BEGIN { printf "%.1f", d / t * 1e6 / r }')"
    grep -q 'Non-2xx\|Socket errors' <<<"$out" && echo "warning: saturation $name: $(grep 'Non-2xx\|Socket errors' <<<"$out")" >&2
    return 0
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
phases=(http tcp tcp-connect)
declare -A ROUND ADDED
for round in $(seq 1 "$ROUNDS"); do
    for phase in "${phases[@]}"; do
        if [[ $phase == http ]]; then list=("${http_targets[@]}"); else list=("${tcp_targets[@]}"); fi
        for t in "${list[@]}"; do
            read -r name addr <<<"$t"
            line=$(measure "$phase" "$name" "$addr")
            ROUND[$phase,$name]+="$line"$'\n'
            read -r p50 p99 _ _ _ _ _ p90 <<<"$line"
            if [[ $name == direct ]]; then
                d50=$p50 d90=$p90 d99=$p99
            elif [[ "$p50 $p90 $p99 $d50 $d90 $d99" =~ ^[0-9\ ]+$ ]]; then
                ADDED[$phase,$name,50]+="$((p50 - d50)) "
                ADDED[$phase,$name,90]+="$((p90 - d90)) "
                ADDED[$phase,$name,99]+="$((p99 - d99)) "
            fi
            echo "round $round $phase $name: p50 p99 p99.9 req/s CPU/req errors lag99 p90 = $line" >&2
        done
    done
    if [[ $SATURATE == 1 ]]; then
        for t in "${http_targets[@]}"; do
            read -r name addr <<<"$t"
            line=$(saturate "$name" "$addr")
            ROUND[saturation,$name]+="$line"$'\n'
            echo "round $round saturation $name: req/s p50 p99 CPU/req = $line" >&2
        done
    fi
done

# Sanity: the waymark calls went through the tunnel.
streams=$(inA curl -sf "http://$A:9902/metrics" | awk '/^waymark_forwarder_peer_streams_total/ { s += $2 } END { print s + 0 }')

# The round with the median of its first field.
median_round() { printf '%s' "$1" | sort -n -k1,1 | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)'; }
firsts() { printf '%s' "$1" | awk '{ printf "%s%s", sep, $1; sep = " / " }'; }

report() {
    echo "# Forwarder benchmark"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- machine: $cores cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.0f GiB", $2/1048576 }' /proc/meminfo), $(uname -r); $($HAPROXY -v | head -1 | cut -d' ' -f1-3)"
    echo "- command: \`DURATION=$DURATION ROUNDS=$ROUNDS RATE=$RATE CONN_RATE=$CONN_RATE CONNECTIONS=$CONNECTIONS SATURATE=$SATURATE THREADS=$THREADS bash tests/bench/forwarder.sh\`"
    echo "- load average before: $load_before"
    echo "- layout: two hosts (network namespaces A and B, veth pairs on a bridge in a third); the registry, the instances (gw_backend for HTTP, line_echo for TCP), forwarder B and HAProxy B on B; forwarder A, HAProxy A and the load generator on A"
    echo "- waymark: caller → VIP → forwarder A → mTLS tunnel (HTTP/2 CONNECT, one pooled connection) → forwarder B → instance; haproxy: caller → HAProxy A (127.0.0.1) → TLS 1.3 with client certificates (ECDSA P-256) → HAProxy B → instance (HTTP: A in http mode with server connection reuse, B in tcp mode; TCP: both tcp mode); both proxies $THREADS threads, no logging"
    echo "- load generator: $pinned; latency from each request's intended send time (coordinated-omission corrected); $DURATION s measured after a $WARMUP s warm-up, $ROUNDS rounds visiting every target in turn; the round with the median p50 shown (every round's p50 in the last column); added = median over rounds of (target − direct in that round)"
    echo "- CPU/req: user+system time of both proxies together (for direct: the instance's own), warm-up included, per request completed; errors: failed or unanswered requests (requests still unsent when the window closed, after a stall, are warned about on stderr)"
    echo "- tunnel streams opened by forwarder A over the run: $streams"
    echo
    local phase title name p50 p99 p999 rps cpu errors lag99 a50 a99
    for phase in "${phases[@]}"; do
        case $phase in
            http) title="HTTP: httpload, $RATE req/s, $CONNECTIONS keep-alive connections" ;;
            tcp) title="TCP request/response: tcpload, $RATE req/s, $CONNECTIONS persistent connections, one line each way" ;;
            tcp-connect) title="TCP, a new connection per request: tcpload --new-connection, $CONN_RATE req/s" ;;
        esac
        echo "## $title"
        echo
        echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | CPU µs/req | errors | generator lag p99 µs | rounds p50 µs |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        for name in "${names[@]}"; do
            read -r p50 p99 p999 rps cpu errors lag99 _ <<<"$(median_round "${ROUND[$phase,$name]}")"
            a50=- a99=-
            if [[ $name != direct ]]; then
                a50=$(median <<<"${ADDED[$phase,$name,50]}")
                a99=$(median <<<"${ADDED[$phase,$name,99]}")
            fi
            echo "| $name | $rps | $p50 | $p99 | $p999 | $a50 | $a99 | $cpu | $errors | $lag99 | $(firsts "${ROUND[$phase,$name]}") |"
        done
        echo
    done
    if [[ $SATURATE == 1 ]]; then
        echo "## HTTP saturation: wrk, 1 thread, $CONNECTIONS connections"
        echo
        echo "| target | req/s | p50 µs | p99 µs | CPU µs/req | rounds req/s |"
        echo "|---|---:|---:|---:|---:|---|"
        for name in "${names[@]}"; do
            read -r rps p50 p99 cpu <<<"$(median_round "${ROUND[saturation,$name]}")"
            echo "| $name | $rps | $p50 | $p99 | $cpu | $(firsts "${ROUND[saturation,$name]}") |"
        done
        echo
    fi
    echo "## Reach (issue 13): under 100 µs added at p50 for the two hops; no more CPU per request than the HAProxy pair"
    echo
    local wc hc a90
    for phase in "${phases[@]}"; do
        a50=$(median <<<"${ADDED[$phase,waymark,50]}")
        a90=$(median <<<"${ADDED[$phase,waymark,90]}")
        read -r _ _ _ _ wc _ <<<"$(median_round "${ROUND[$phase,waymark]}")"
        read -r _ _ _ _ hc _ <<<"$(median_round "${ROUND[$phase,haproxy]}")"
        echo "- $phase: added p50 $a50 µs ($(awk -v a="$a50" 'BEGIN { print (a < 100 ? "met" : "not met") }'); added p90 $a90 µs); CPU/req $wc µs vs HAProxy pair $hc µs ($(awk -v w="$wc" -v h="$hc" 'BEGIN { printf "%.2f×, %s", w / h, (w <= h ? "met" : "not met") }'))"
    done
}

# A profiled run does not replace the reference results.
results=tests/bench/results/forwarder.md
[[ -z ${PERF_DIR:-} ]] || results=$PERF_DIR/forwarder.md
mkdir -p "$(dirname "$results")"
report | tee "$results"
