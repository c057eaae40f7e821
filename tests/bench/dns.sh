#!/usr/bin/env bash
# DNS performance, side by side in one run: Waymark's resolver (release build, data through
# its registration API) against Knot DNS and NSD (Debian packages, the same data as a zone
# file), each on loopback and pinned to one core, with dnsperf pinned to the other.
#
# For each service count (10,000 and 100,000 services, 3 instances each):
#   - saturation (dnsperf as fast as it goes) and a fixed 50,000 queries per second;
#   - the same query mix everywhere: 80% A of existing services, 10% SRV, 10% names that do
#     not exist;
#   - Waymark once more while `dnsbench churn` changes the registry 1,000 times a second and
#     `dnsbench verify` checks a sample of answers against the registry.
# Reports queries per second, average and p99 latency, lost queries, server CPU time per
# 1,000 queries (from /proc), resident memory (PSS), and the ratios to Knot and NSD, as a
# Markdown table and a plot: tests/bench/results/dns.md and dns.png.
#
#   bash tests/bench/dns.sh                       # the full run (about 15 minutes)
#   SERVICES=10000 DURATION=5 bash tests/bench/dns.sh   # a quick one
#
# A benchmark, not a test: it exits non-zero only when it could not measure. All traffic is
# on 127.0.0.1; it stops only the processes it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

SERVICES=${SERVICES:-"10000 100000"}
DURATION=${DURATION:-15}
RATE=${RATE:-50000}
CHURN=${CHURN:-1000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT=${OUT:-tests/bench/results}
PORT_WAYMARK=5390 PORT_KNOT=5391 PORT_NSD=5392 PORT_API=8590

need=()
for tool in knotd nsd dnsperf dig taskset; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
if ((${#need[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[bench] installing Debian packages for: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends \
            knot nsd dnsperf dnsutils util-linux python3-matplotlib >/dev/null
    else
        echo "[bench] missing: ${need[*]} (Debian: knot nsd dnsperf dnsutils python3-matplotlib)" >&2
        exit 1
    fi
fi

cargo build --release -q -p waymark-resolver -p waymark-e2e --bin waymark-resolver --bin dnsbench
target="${CARGO_TARGET_DIR:-target}"
resolver="$root/$target/release/waymark-resolver"
dnsbench="$root/$target/release/dnsbench"

work=$(mktemp -d /tmp/waymark-dnsbench.XXXXXX)
started=()
stop() { # a started server and every process it forked
    local pids
    pids=$(tree "$1")
    kill $pids 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    for pid in "${started[@]}"; do stop "$pid"; done
    sleep 0.5
    rm -rf "$work"
}
trap cleanup EXIT
results="$work/results.jsonl"
: >"$results"

# The PIDs of a process and all its descendants.
tree() {
    local pids=("$1") child
    for child in $(pgrep -P "$1" || true); do pids+=($(tree "$child")); done
    echo "${pids[@]}"
}
cpu_ticks() { # utime + stime of a process tree, in clock ticks
    local total=0 pid
    for pid in $(tree "$1"); do
        # After the ")" that ends the command name (which may hold spaces), utime and stime
        # are the 12th and 13th fields.
        total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0)))
    done
    echo "$total"
}
pss_kib() { # proportional resident memory of a process tree
    local total=0 pid
    for pid in $(tree "$1"); do
        total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
pin() { # every thread of every process of the tree onto the server core
    local pid
    for pid in $(tree "$1"); do taskset -a -p -c "$SERVER_CPU" "$pid" >/dev/null; done
}
wait_answer() { # port name: until the server answers the name (at most 120 s)
    local deadline=$((SECONDS + 120))
    until [[ -n $(dig +short +tries=1 +time=1 @127.0.0.1 -p "$1" "$2" 2>/dev/null) ]]; do
        ((SECONDS < deadline)) || { echo "[bench] no answer on port $1" >&2; return 1; }
        sleep 0.2
    done
}

# run SERVER SERVICES MODE PORT PID: one dnsperf run, appended to the results as JSON.
run() {
    local server=$1 n=$2 mode=$3 port=$4 pid=$5 qfile="$work/$2/queries.txt"
    local args=(-s 127.0.0.1 -p "$port" -d "$qfile" -l "$DURATION" -c 16 -q 1000)
    [[ $mode == saturation* ]] || args+=(-Q "$RATE" -v)
    local before after out="$work/dnsperf.out"
    before=$(cpu_ticks "$pid")
    taskset -c "$CLIENT_CPU" dnsperf "${args[@]}" >"$out" 2>&1
    after=$(cpu_ticks "$pid")
    local pss
    pss=$(pss_kib "$pid")
    /usr/bin/python3 - "$server" "$n" "$mode" "$((after - before))" "$(getconf CLK_TCK)" "$pss" "$out" >>"$results" <<'EOF'
import json, re, sys
server, n, mode, ticks, hz, pss, path = sys.argv[1:]
text = open(path).read()
def num(pattern, cast=float):
    m = re.search(pattern, text)
    if not m:
        sys.exit(f"dnsperf output lacks {pattern!r}:\n{text[-2000:]}")
    return cast(m.group(1))
completed = num(r"Queries completed:\s+(\d+)", int)
lats = sorted(float(x) for x in re.findall(r"^> \S+ .* (\d+\.\d+)$", text, re.M))
p99 = lats[int(0.99 * (len(lats) - 1))] * 1e3 if lats else None
cpu_s = int(ticks) / int(hz)
print(json.dumps({
    "server": server, "services": int(n), "mode": mode,
    "qps": num(r"Queries per second:\s+([\d.]+)"),
    "sent": num(r"Queries sent:\s+(\d+)", int),
    "completed": completed,
    "lost": num(r"Queries lost:\s+(\d+)", int),
    "avg_ms": num(r"Average Latency \(s\):\s+([\d.]+)") * 1e3,
    "p99_ms": p99,
    "cpu_s": cpu_s,
    "cpu_ms_per_1k": cpu_s * 1e6 / max(completed, 1),
    "pss_mib": int(pss) / 1024,
}))
EOF
    tail -n 1 "$results"
}

for n in $SERVICES; do
    echo "== $n services"
    "$dnsbench" zone --services "$n" --dir "$work/$n" --queries 1000000

    # Knot DNS: one UDP worker; its threads pinned after start (it sets its own affinity).
    mkdir -p "$work/knot"
    cat >"$work/knot/knot.conf" <<EOF
server:
    listen: 127.0.0.1@$PORT_KNOT
    rundir: $work/knot
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: $work/knot
template:
  - id: default
    storage: $work/$n
    semantic-checks: off
    journal-content: none
    zonefile-sync: -1
zone:
  - domain: mesh.internal
    file: mesh.internal.zone
log:
  - target: stderr
    any: warning
EOF
    # Knot leaves its sockets at the kernel's default receive buffer (208 KiB), which loses
    # dnsperf's first burst; like NSD (2 MiB) and Waymark (4 MiB), it gets a larger one: the
    # default is raised while it creates its sockets, then restored.
    rmem_default=$(cat /proc/sys/net/core/rmem_default)
    echo 4194304 >/proc/sys/net/core/rmem_default 2>/dev/null || true
    knotd -c "$work/knot/knot.conf" >"$work/knot/log" 2>&1 &
    knot=$!
    started+=("$knot")
    wait_answer "$PORT_KNOT" svc1.mesh.internal
    echo "$rmem_default" >/proc/sys/net/core/rmem_default 2>/dev/null || true
    pin "$knot"
    run knot "$n" saturation "$PORT_KNOT" "$knot"
    run knot "$n" "rate" "$PORT_KNOT" "$knot"
    stop "$knot"

    # NSD: one server process, response-rate limiting off (Debian enables it).
    mkdir -p "$work/nsd"
    cat >"$work/nsd/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1@$PORT_NSD
    do-ip6: no
    server-count: 1
    username: ""
    chroot: ""
    database: ""
    zonesdir: "$work/$n"
    pidfile: "$work/nsd/nsd.pid"
    xfrdfile: "$work/nsd/xfrd.state"
    xfrdir: "$work/nsd"
    zonelistfile: "$work/nsd/zone.list"
    rrl-ratelimit: 0
    verbosity: 0
remote-control:
    control-enable: no
zone:
    name: mesh.internal
    zonefile: mesh.internal.zone
EOF
    nsd -d -c "$work/nsd/nsd.conf" >"$work/nsd/log" 2>&1 &
    nsd=$!
    started+=("$nsd")
    wait_answer "$PORT_NSD" svc1.mesh.internal
    pin "$nsd"
    run nsd "$n" saturation "$PORT_NSD" "$nsd"
    run nsd "$n" "rate" "$PORT_NSD" "$nsd"
    stop "$nsd"

    # Waymark: started on the server core (so one UDP worker), loaded through its API.
    taskset -c "$SERVER_CPU" "$resolver" serve \
        --dns-addr "127.0.0.1:$PORT_WAYMARK" --http-addr "127.0.0.1:$PORT_API" \
        --data-dir "$work/waymark-$n" --upstream 127.0.0.1:9 >"$work/waymark.log" 2>&1 &
    waymark=$!
    started+=("$waymark")
    api="http://127.0.0.1:$PORT_API"
    for _ in $(seq 100); do curl -sf "$api/healthz/live" >/dev/null && break; sleep 0.1; done
    taskset -c "$CLIENT_CPU" "$dnsbench" load --api "$api" --services "$n"
    wait_answer "$PORT_WAYMARK" svc1.mesh.internal
    pin "$waymark"
    run waymark "$n" saturation "$PORT_WAYMARK" "$waymark"
    run waymark "$n" "rate" "$PORT_WAYMARK" "$waymark"

    # Waymark under churn, with answers checked against the registry meanwhile.
    churn_for=$((2 * DURATION + 10))
    taskset -c "$CLIENT_CPU" "$dnsbench" churn --api "$api" --services "$n" \
        --rate "$CHURN" --seconds "$churn_for" >"$work/churn.out" 2>&1 &
    churn=$!
    taskset -c "$CLIENT_CPU" "$dnsbench" verify --api "$api" --dns "127.0.0.1:$PORT_WAYMARK" \
        --services "$n" --samples 5000 --seconds "$churn_for" >"$work/verify.out" 2>&1 &
    verify=$!
    sleep 3
    run waymark "$n" "saturation, churn" "$PORT_WAYMARK" "$waymark"
    run waymark "$n" "rate, churn" "$PORT_WAYMARK" "$waymark"
    wait "$churn" || { cat "$work/churn.out" >&2; exit 1; }
    wait "$verify" || { cat "$work/verify.out" >&2; exit 1; }
    cat "$work/churn.out" "$work/verify.out"
    /usr/bin/python3 - "$n" "$(cat "$work/churn.out")" "$(cat "$work/verify.out")" >>"$results" <<'EOF'
import json, sys
print(json.dumps({"services": int(sys.argv[1]), "churn": sys.argv[2], "verify": sys.argv[3]}))
EOF
    stop "$waymark"
done

mkdir -p "$OUT"
command_line="SERVICES=\"$SERVICES\" DURATION=$DURATION RATE=$RATE CHURN=$CHURN bash tests/bench/dns.sh"
/usr/bin/python3 tests/bench/dns_report.py "$results" "$OUT/dns.md" "$OUT/dns.png" "$command_line"
cp "$results" "$OUT/dns.jsonl"
echo "[bench] wrote $OUT/dns.md, $OUT/dns.png and $OUT/dns.jsonl"
