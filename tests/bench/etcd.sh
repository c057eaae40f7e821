#!/usr/bin/env bash
# Many hosts through etcd, measured: a three-member etcd cluster (Debian's etcd-server,
# members joined over unix sockets, clients on loopback) and Waymark resolvers as hosts
# (release build, each with its own data dir and node name), all on this machine.
#
#   1. Propagation: a registration on host A until host B's DNS answers it, and a failed
#      check on A until B stops answering it (p50/p90/p99/max over SAMPLES samples; the goal
#      is a p99 under 50 ms with a healthy cluster).
#   2. Loading: PRELOAD instances written straight into etcd, then a new host started: the
#      time until it is ready (its first listing installed) and its memory (PSS), against
#      the same resolver with etcd empty.
#   3. DNS under changes: dnsperf against host B (pinned to one core, dnsperf to the other)
#      with SERVICES services registered through host A, quiet and while `dnsbench churn`
#      makes CHURN changes a second on A (which reach B through etcd); side by side in the
#      same run with the embedded registry (one resolver, changes through its own API).
#
#   bash tests/bench/etcd.sh                                 # the full run (a few minutes)
#   SAMPLES=50 PRELOAD=10000 SERVICES=1000 DURATION=5 bash tests/bench/etcd.sh   # quick
#
# Writes a Markdown table to stdout and to tests/bench/results/etcd.md. A benchmark, not a
# test: it exits non-zero only when it could not measure. All traffic is on loopback; it
# stops only the processes it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

SAMPLES=${SAMPLES:-200}
PRELOAD=${PRELOAD:-100000}
SERVICES=${SERVICES:-10000}
CHURN=${CHURN:-1000}
DURATION=${DURATION:-10}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
OUT=${OUT:-tests/bench/results}

need=()
for tool in etcd dnsperf dig taskset; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[bench] installing Debian packages for: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends etcd-server dnsperf dnsutils util-linux >/dev/null
    else
        echo "[bench] missing: ${need[*]} (Debian: etcd-server dnsperf dnsutils)" >&2
        exit 1
    fi
fi

cargo build --release -q -p waymark-resolver -p waymark-e2e \
    --bin waymark-resolver --bin dnsbench --bin etcdbench
target="${CARGO_TARGET_DIR:-target}"
resolver="$root/$target/release/waymark-resolver"
dnsbench="$root/$target/release/dnsbench"
etcdbench="$root/$target/release/etcdbench"

work=$(mktemp -d /tmp/waymark-etcdbench.XXXXXX)
started=()
cleanup() {
    for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${started[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
step() { echo "[bench] $* ($(date +%H:%M:%S))" >&2; }

pss_kib() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# etcd: three members, peers on unix sockets in $work/etcd, clients on 127.0.0.1 port 0.
mkdir -p "$work/etcd"
initial="n1=unix://n1:1,n2=unix://n2:1,n3=unix://n3:1"
for m in n1 n2 n3; do
    (cd "$work/etcd" && exec etcd --name "$m" --data-dir "$m.data" \
        --listen-peer-urls "unix://$m:1" --initial-advertise-peer-urls "unix://$m:1" \
        --initial-cluster "$initial" --initial-cluster-token bench \
        --listen-client-urls http://127.0.0.1:0 --advertise-client-urls http://127.0.0.1:0 \
        --quota-backend-bytes 4294967296 >"$m.log" 2>&1) &
    started+=($!)
done
endpoints=()
for m in n1 n2 n3; do
    for _ in $(seq 1 300); do
        addr=$(sed -n 's/.*serving insecure client requests on \([0-9.:]*\).*/\1/p' "$work/etcd/$m.log" | head -1)
        [[ -n $addr ]] && break
        sleep 0.1
    done
    [[ -n $addr ]] || { echo "[bench] etcd member $m did not start:"; tail "$work/etcd/$m.log"; exit 1; }
    endpoints+=("http://$addr")
done
etcd_urls=$(IFS=,; echo "${endpoints[*]}")
step "etcd: $etcd_urls"

# start_host NAME [ARGS...]: a resolver on port 0; sets $pid, $dns, $http.
start_host() {
    local name=$1
    shift
    mkdir -p "$work/$name"
    "$resolver" serve --dns-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
        --data-dir "$work/$name/data" --upstream 127.0.0.1:9 "$@" \
        >"$work/$name/out" 2>"$work/$name/log" &
    pid=$!
    started+=("$pid")
    local line=""
    for _ in $(seq 1 600); do
        line=$(grep -m1 '^waymark-resolver listening' "$work/$name/out" || true)
        [[ -n $line ]] && break
        sleep 0.05
    done
    [[ -n $line ]] || { echo "[bench] $name did not start:"; tail "$work/$name/log"; exit 1; }
    dns=$(sed 's/.*dns=\([^ ]*\).*/\1/' <<<"$line")
    http=$(sed 's/.*http=\([^ ]*\).*/\1/' <<<"$line")
}
wait_ready() { # http: until /healthz/ready answers 200 (at most 300 s)
    local deadline=$((SECONDS + 300))
    until curl -sf "http://$1/healthz/ready" >/dev/null; do
        ((SECONDS < deadline)) || { echo "[bench] not ready: $1" >&2; return 1; }
        sleep 0.01
    done
}

start_host a --etcd "$etcd_urls" --node-name host-a
a_pid=$pid a_http=$http
start_host b --etcd "$etcd_urls" --node-name host-b
b_pid=$pid b_dns=$dns
wait_ready "$a_http"
wait_ready "$http"

step "1/3 propagation, $SAMPLES samples"
prop=$("$etcdbench" propagation --api "http://$a_http" --dns "$b_dns" --samples "$SAMPLES")
echo "$prop" >&2

step "2/3 loading $PRELOAD instances"
start_host empty --etcd "$etcd_urls" --node-name host-empty
wait_ready "$http"
sleep 1
empty_pss=$(pss_kib "$pid")
preload=$("$etcdbench" preload --etcd "$etcd_urls" --instances "$PRELOAD")
echo "$preload" >&2
t0=$(date +%s.%N)
start_host c --etcd "$etcd_urls" --node-name host-c
c_pid=$pid
wait_ready "$http"
t1=$(date +%s.%N)
load_s=$(awk "BEGIN { print $t1 - $t0 }")
sleep 1
loaded_pss=$(pss_kib "$c_pid")
b_loaded_pss=$(pss_kib "$b_pid")

step "3/3 DNS under $CHURN changes a second, $SERVICES services"
"$dnsbench" zone --services "$SERVICES" --dir "$work/zone" --queries 1000000
start_host embedded
e_pid=$pid e_dns=$dns e_http=$http
wait_ready "$e_http"
"$dnsbench" load --api "http://$e_http" --services "$SERVICES"
"$dnsbench" load --api "http://$a_http" --services "$SERVICES"
# Until host B answers the last service registered on A.
last="svc$((SERVICES - 1)).mesh.internal"
for _ in $(seq 1 600); do
    [[ -n $(dig +short +tries=1 +time=1 "@${b_dns%:*}" -p "${b_dns##*:}" "$last") ]] && break
    sleep 0.1
done
results="$work/dns.jsonl"
: >"$results"
dnsperf_run() { # label pid dns churn_api
    local label=$1 p=$2 addr=$3 api=$4 out="$work/dnsperf.out" churn=""
    taskset -a -p -c "$SERVER_CPU" "$p" >/dev/null
    if [[ -n $api ]]; then
        "$dnsbench" churn --api "http://$api" --services "$SERVICES" --rate "$CHURN" \
            --seconds "$((DURATION + 2))" >"$work/churn.out" 2>&1 &
        churn=$!
        sleep 1
    fi
    local before after
    before=$(cpu_ticks "$p")
    taskset -c "$CLIENT_CPU" dnsperf -s "${addr%:*}" -p "${addr##*:}" -d "$work/zone/queries.txt" \
        -l "$DURATION" -c 16 -q 1000 >"$out" 2>&1
    after=$(cpu_ticks "$p")
    [[ -z $churn ]] || wait "$churn" || true
    local qps
    qps=$(sed -n 's/.*Queries per second:[[:space:]]*\([0-9.]*\).*/\1/p' "$out")
    echo "{\"label\": \"$label\", \"qps\": ${qps:-0}, \"cpu_ticks\": $((after - before)), \"churn\": \"$(tail -1 "$work/churn.out" 2>/dev/null | tr -d '"' || true)\"}" >>"$results"
    tail -1 "$results" >&2
}
: >"$work/churn.out"
dnsperf_run "embedded, quiet" "$e_pid" "$e_dns" ""
dnsperf_run "etcd host B, quiet" "$b_pid" "$b_dns" ""
: >"$work/churn.out"
dnsperf_run "embedded, churn" "$e_pid" "$e_dns" "$e_http"
: >"$work/churn.out"
dnsperf_run "etcd host B, churn via A" "$b_pid" "$b_dns" "$a_http"

mkdir -p "$OUT"
/usr/bin/python3 - "$prop" "$preload" "$load_s" "$empty_pss" "$loaded_pss" "$b_loaded_pss" "$results" \
    "$SAMPLES" "$PRELOAD" "$SERVICES" "$CHURN" "$DURATION" >"$OUT/etcd.md" <<'EOF'
import json, os, subprocess, sys, datetime
prop, preload, load_s, empty, loaded, b_loaded, results, samples, n_pre, services, churn, duration = sys.argv[1:]
prop = json.loads(prop); preload = json.loads(preload)
rows = [json.loads(l) for l in open(results)]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print(f"# Many hosts through etcd\n")
print(f"{datetime.date.today()}, {os.cpu_count()} cores ({cpu}); a three-member etcd "
      f"{subprocess.run(['etcd','--version'],capture_output=True,text=True).stdout.split()[2]} and the resolvers on one machine, "
      f"release build. `bash tests/bench/etcd.sh` (SAMPLES={samples} PRELOAD={n_pre} SERVICES={services} CHURN={churn} DURATION={duration}).\n")
print("## A change on host A, in host B's DNS answers\n")
print("| change | p50 | p90 | p99 | max |\n|---|---|---|---|---|")
for k, label in [("registered", "registered on A → answered on B"), ("failed", "check failed on A → not answered on B")]:
    s = prop[k]
    print(f"| {label} | {s['p50_ms']:.1f} ms | {s['p90_ms']:.1f} ms | {s['p99_ms']:.1f} ms | {s['max_ms']:.1f} ms |")
print(f"\n{prop['samples']} samples each; from just before A's API call (which returns once the change is durable on A).\n")
print("## A new host loads the mesh\n")
print(f"{preload['instances']:,} instances in etcd (written in {preload['seconds']:.1f} s). A new resolver is ready "
      f"(first listing installed) **{float(load_s):.2f} s** after it starts. Memory (PSS): "
      f"{int(empty)/1024:.0f} MiB with etcd empty, {int(loaded)/1024:.0f} MiB with the {preload['instances']:,} instances "
      f"(host B, which received them as watch events: {int(b_loaded)/1024:.0f} MiB), "
      f"{(int(loaded)-int(empty))*1024/preload['instances']:.0f} bytes per instance.\n")
print(f"## DNS while {churn} changes a second flow\n")
print("dnsperf at saturation against one resolver pinned to one core (dnsperf on the other), "
      f"{services} services × 3 instances, the query mix of `tests/bench/dns.sh`.\n")
print("Host B alone is pinned: etcd's three members, host A and the churn generator run unpinned on "
      "the same two cores, so in the churn rows they take CPU from host B that a real mesh (etcd on "
      "its own machines) would not; CPU per 1,000 queries shows what answering costs host B.\n")
print("| resolver | queries/s | CPU ms per 1,000 queries | vs embedded, same load |\n|---|---|---|---|")
by = {r["label"]: r for r in rows}
hz = os.sysconf("SC_CLK_TCK")
for r in rows:
    base = by["embedded, churn" if "churn" in r["label"] else "embedded, quiet"]
    ms = r["cpu_ticks"] / hz * 1e6 / max(r["qps"] * int(duration), 1)
    print(f"| {r['label']} | {r['qps']:,.0f} | {ms:.1f} | {r['qps']/base['qps']:.2f}× |")
EOF
cat "$OUT/etcd.md"
