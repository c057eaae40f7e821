#!/usr/bin/env bash
# DNS conformance against Knot DNS: the same data served by Waymark's resolver (through its
# registration API) and by Knot DNS (as a zone file), asked the same matrix of names, types,
# EDNS options and transports with dig, and the answers compared after leaving out what may
# differ (TTLs, the SOA serial, record order, RA, EDNS cookies).
#
# Compared per query: the RCODE, AA and TC, the counts and record types of each section
# (unless TC), the EDNS version and the DO bit. A few differences are Waymark's documented
# choices and are listed as such (see KNOWN below); anything else is a finding.
#
#   bash tests/bench/conformance.sh          # prints each difference, exits 1 if any is new
#
# Not run in CI. Installs knot and dnsutils when run as root on Debian. All traffic is on
# 127.0.0.1; it stops only the processes it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
PORT_WAYMARK=${PORT_WAYMARK:-5490} PORT_KNOT=${PORT_KNOT:-5491} PORT_API=${PORT_API:-8690}

need=()
for tool in knotd dig curl python3; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[conformance] installing Debian packages for: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends knot dnsutils curl >/dev/null
    else
        echo "[conformance] missing: ${need[*]} (Debian: knot dnsutils curl)" >&2
        exit 1
    fi
fi

cargo build -q -p waymark-resolver --bin waymark-resolver
target="${CARGO_TARGET_DIR:-target}"
[[ $target == /* ]] || target="$root/$target"
resolver="$target/debug/waymark-resolver"

work=$(mktemp -d /tmp/waymark-conformance.XXXXXX)
started=()
cleanup() {
    for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The data: (service, id, address, port, tags). Host-name addresses are CNAMEs.
cat >"$work/data.tsv" <<'EOF'
payment	pay-1	10.1.0.1	9000	v1
payment	pay-2	10.1.0.2	9000	v1
payment	pay-3	10.1.0.3	9000	v2
payment	pay-6	fd00::6	9000	
ext	db-1	db.example.com	5432	
EOF
for n in $(seq 1 40); do
    printf 'big\ta-rather-long-instance-identifier-%02d\t10.9.0.%d\t80\t\n' "$n" "$n" >>"$work/data.tsv"
done

# The same data as a zone file, written the way Waymark answers it.
/usr/bin/python3 - "$work/data.tsv" >"$work/mesh.internal.zone" <<'EOF'
import ipaddress, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("$ORIGIN mesh.internal.\n$TTL 5\n@ SOA ns hostmaster 1 3600 600 86400 5\n@ NS ns\nns A 127.0.0.1")
def addr(a):
    try:
        ip = ipaddress.ip_address(a)
        return ("A" if ip.version == 4 else "AAAA"), a
    except ValueError:
        return "CNAME", a + "."
services = {}
for svc, iid, a, port, tags in rows:
    services.setdefault(svc, []).append((iid, a, port, [t for t in tags.split(",") if t]))
for svc, insts in services.items():
    hosts_only = all(addr(a)[0] == "CNAME" for _, a, _, _ in insts)
    owners = {svc: insts}
    for iid, a, port, tags in insts:
        for t in tags:
            owners.setdefault(f"{t}.{svc}", []).append((iid, a, port, tags))
    for owner, members in owners.items():
        for iid, a, port, _ in members:
            kind, value = addr(a)
            if kind != "CNAME":
                print(f"{owner} {kind} {value}")
                print(f"{owner} SRV 1 1 {port} {iid}.instance.{svc}")
        if hosts_only:
            print(f"{owner} CNAME {addr(members[0][1])[1]}")
    for iid, a, port, _ in insts:
        kind, value = addr(a)
        print(f"{iid}.instance.{svc} {kind} {value}")
        target = value if kind == "CNAME" else f"{iid}.instance.{svc}"
        print(f"_{svc}._tcp SRV 1 1 {port} {target}")
EOF

mkdir -p "$work/knot"
cat >"$work/knot/knot.conf" <<EOF
server:
    listen: 127.0.0.1@$PORT_KNOT
    rundir: $work/knot
database:
    storage: $work/knot
template:
  - id: default
    storage: $work
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
knotd -c "$work/knot/knot.conf" >"$work/knot/log" 2>&1 &
started+=($!)

"$resolver" serve --dns-addr "127.0.0.1:$PORT_WAYMARK" --http-addr "127.0.0.1:$PORT_API" \
    --data-dir "$work/waymark" --upstream 127.0.0.1:9 >"$work/waymark.out" 2>"$work/waymark.log" &
started+=($!)
api="http://127.0.0.1:$PORT_API"
for _ in $(seq 100); do curl -sf "$api/healthz/live" >/dev/null && break; sleep 0.1; done
while IFS=$'\t' read -r svc iid a port tags; do
    tag_json=$(printf '%s' "$tags" | /usr/bin/python3 -c 'import json,sys; print(json.dumps([t for t in sys.stdin.read().split(",") if t]))')
    curl -sS --fail-with-body -X PUT "$api/v1/agent/service/register" \
        -d "{\"Name\":\"$svc\",\"ID\":\"$iid\",\"Address\":\"$a\",\"Port\":$port,\"Tags\":$tag_json}" >/dev/null
done <"$work/data.tsv"
for port in "$PORT_KNOT" "$PORT_WAYMARK"; do
    for _ in $(seq 100); do
        [[ -n $(dig +short +tries=1 +time=1 @127.0.0.1 -p "$port" payment.mesh.internal 2>/dev/null) ]] && break
        sleep 0.1
    done
done

/usr/bin/python3 - "$PORT_WAYMARK" "$PORT_KNOT" <<'EOF'
import itertools, re, subprocess, sys
waymark, knot = sys.argv[1:]
Z = "mesh.internal"
names = [Z, f"ns.{Z}", f"payment.{Z}", f"PayMent.{Z}", f"v1.payment.{Z}", f"v9.payment.{Z}",
         f"_payment._tcp.{Z}", f"_tcp.{Z}", f"instance.payment.{Z}",
         f"pay-1.instance.payment.{Z}", f"pay-6.instance.payment.{Z}",
         f"nosuch.instance.payment.{Z}", f"ext.{Z}", f"db-1.instance.ext.{Z}", f"big.{Z}",
         f"_big._tcp.{Z}", f"nosuch.{Z}", f"*.{Z}", f"*.payment.{Z}", f"a.b.nosuch.{Z}"]
types = ["A", "AAAA", "SRV", "NS", "SOA", "TXT", "CNAME", "ANY"]
ednss = {"noedns": ["+noedns"], "edns512": ["+bufsize=512"], "edns1232": ["+bufsize=1232"],
         "edns4096+do": ["+bufsize=4096", "+dnssec"], "ednsv1": ["+edns=1", "+noednsneg"]}
transports = {"udp": ["+ignore"], "tcp": ["+tcp"]}
# Waymark's documented choices where Knot answers otherwise: (predicate, why).
KNOWN = [
    (lambda n, t, e, p: t == "ANY" and n.lower() in (Z, f"payment.{Z}", f"big.{Z}", f"v1.payment.{Z}"),
     "ANY answers the apex's SOA and NS, a service's A and AAAA; Knot one RRset (RFC 8482)"),
    (lambda n, t, e, p: t == "SRV" and n == f"ext.{Z}",
     "a host-name service is a CNAME for A/AAAA but has SRV records too (as Consul)"),
]

def ask(port, name, qtype, extra):
    out = subprocess.run(["dig", "@127.0.0.1", "-p", port, "+norec", "+nocookie", "+tries=1",
                          "+time=2", name, qtype, *extra], capture_output=True, text=True).stdout
    r = {}
    m = re.search(r"status: (\w+)", out); r["rcode"] = m.group(1) if m else "NO-REPLY"
    m = re.search(r"flags: ([a-z ]*);", out); flags = set(m.group(1).split()) if m else set()
    r["aa"], r["tc"] = "aa" in flags, "tc" in flags
    m = re.search(r"EDNS: version: (\d+), flags: ?([a-z ]*);", out)
    r["edns"] = (m.group(1), "do" in m.group(2).split()) if m else None
    section, types = None, {"ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
    for line in out.splitlines():
        h = re.match(r";; (\w+) SECTION:", line)
        if h:
            section = h.group(1)
            continue
        if section in types and line and not line.startswith(";"):
            types[section].append(line.split()[3])
    for k, v in types.items():
        r[k.lower()] = None if r["tc"] else sorted(v)
    return r

diffs = known = total = 0
for name, qtype, (ek, ev), (tk, tv) in itertools.product(names, types, ednss.items(), transports.items()):
    total += 1
    a, b = ask(waymark, name, qtype, ev + tv), ask(knot, name, qtype, ev + tv)
    fields = [k for k in a if a[k] != b[k]]
    if not fields:
        continue
    why = next((w for p, w in KNOWN if p(name, qtype, ek, tk)), None)
    line = f"{name} {qtype} {ek} {tk}: " + "; ".join(f"{k}: waymark {a[k]} knot {b[k]}" for k in fields)
    if why:
        known += 1
        print(f"known  {line}  ({why})")
    else:
        diffs += 1
        print(f"DIFF   {line}")
def refused(port, qtype, extra):
    out = subprocess.run(["dig", "@127.0.0.1", "-p", port, "+tries=1", "+time=2", Z, qtype,
                          *extra], capture_output=True, text=True).stdout
    m = re.search(r"status: (\w+)", out)
    return "Transfer failed" in out or (m is not None and m.group(1) in ("REFUSED", "NOTAUTH", "NOTIMP"))
for qtype in ["AXFR", "IXFR=1"]:
    for tk, tv in transports.items():
        total += 1
        a, b = refused(waymark, qtype, tv), refused(knot, qtype, tv)
        print(f"xfr    {Z} {qtype} {tk}: refused by waymark {a}, by knot {b}")
        if not a:
            diffs += 1
            print(f"DIFF   {Z} {qtype} {tk}: waymark did not refuse")
print(f"{total} queries: {total - diffs - known} alike, {known} known differences, {diffs} new")
sys.exit(1 if diffs else 0)
EOF
