//! The system resolver: glibc's stub resolver (`getent hosts`) and `curl` find mesh names
//! through Waymark, as they would on a host whose resolv.conf points at it.
//!
//! resolv.conf cannot name a port, so the resolver must listen on port 53, and the test must
//! not touch the host's resolv.conf. Both are done inside a network and mount namespace
//! (`unshare --net --mount`): the namespace has its own loopback, on which the resolver takes
//! 127.0.0.1:53, and its own mounts, in which a resolv.conf naming 127.0.0.1 is bind-mounted
//! over /etc/resolv.conf. The namespace has no network other than its loopback, so no query
//! can leave it: names outside the mesh zone go to a second waymark-resolver, authoritative
//! for `upstream.test`, inside the namespace.
//!
//! The steps run as a shell script inside the namespace (below); it stops every process it
//! started, by PID, and exits non-zero with a message naming the failed step. Where network
//! namespaces are not permitted (not root and no user namespaces, or a sandbox that forbids
//! them), the test says so and skips; set `WAYMARK_E2E_REQUIRE_NETNS=1` to make that a failure.

use std::process::Command;
use std::time::{Duration, Instant};

use waymark_e2e::netns::{namespace_command, run_bounded};
use waymark_e2e::{have, resolver_bin};

/// Runs inside the namespace. Environment: `RESOLVER_BIN` (the waymark-resolver binary) and
/// `WORK` (a private temp dir).
const SCRIPT: &str = r#####"
set -euo pipefail

bin=${RESOLVER_BIN:?RESOLVER_BIN is not set}
work=${WORK:?WORK is not set}
marker="waymark-system-resolver-marker-$$"
http_port=18080
mesh_api=127.0.0.1:8500
upstream_api=127.0.0.1:18501
# Nothing here may go through a proxy: every name must be resolved by glibc, here.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

pids=()

step() { echo "== $*"; }

dump_logs() {
    local f
    for f in "$work"/*.out "$work"/*.log; do
        [[ -f $f ]] || continue
        echo "---- $(basename "$f")"
        tail -n 40 "$f"
    done
}

fail() {
    echo "FAIL: $*"
    dump_logs
    echo "FAIL: $*"
    exit 1
}

# Stops what this script started, by PID: SIGTERM, up to 10 s, then SIGKILL.
cleanup() {
    local rc=$? i pid
    trap - EXIT
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "pid $pid did not stop on SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 143' TERM INT HUP

# start NAME CMD...: runs CMD in the background, output in $work/NAME.out and NAME.log.
start() {
    local name=$1
    shift
    "$@" >"$work/$name.out" 2>"$work/$name.log" </dev/null &
    pids+=("$!")
    echo "$!" >>"$work/pids"
    echo "started $name (pid $!)"
}

# wait_ready NAME PID SECONDS CMD...: polls CMD until it succeeds, while PID lives.
wait_ready() {
    local name=$1 pid=$2 secs=$3 i
    shift 3
    for ((i = 0; i < secs * 10; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || fail "$name exited before it was ready"
        sleep 0.1
    done
    fail "$name not ready after ${secs}s"
}

# api_put URL JSON: a registration; fails the test unless the answer is 200.
api_put() {
    local code
    code=$(curl -sS --noproxy '*' --max-time 10 -o "$work/api-reply.txt" -w '%{http_code}' \
        -X PUT -H 'Content-Type: application/json' --data "$2" "$1") ||
        fail "PUT $1 did not complete"
    [[ $code == 200 ]] || fail "PUT $1 answered $code: $(cat "$work/api-reply.txt")"
}

step "namespace: loopback up, resolv.conf -> 127.0.0.1 (port 53)"
ip link set lo up || fail "cannot bring up lo"
[[ -e /etc/resolv.conf ]] || fail "/etc/resolv.conf does not exist (or is a dangling symlink); cannot mount over it"
printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:2\n' >"$work/resolv.conf"
mount --bind "$work/resolv.conf" /etc/resolv.conf || fail "cannot bind-mount resolv.conf"
# hosts from files, then DNS: no nss module that reaches a daemon outside the namespace
# (systemd-resolved, nscd and mDNS talk over Unix sockets that a network namespace does not
# cut), and a minimal hosts file, so that every answer below comes from DNS.
if [[ -e /etc/nsswitch.conf ]]; then
    sed -e 's/^hosts:.*/hosts: files dns/' /etc/nsswitch.conf >"$work/nsswitch.conf"
    grep -q '^hosts:' "$work/nsswitch.conf" || echo 'hosts: files dns' >>"$work/nsswitch.conf"
    mount --bind "$work/nsswitch.conf" /etc/nsswitch.conf || fail "cannot bind-mount nsswitch.conf"
fi
printf '127.0.0.1 localhost\n::1 localhost\n' >"$work/hosts"
mount --bind "$work/hosts" /etc/hosts || fail "cannot bind-mount /etc/hosts"
for d in /run/nscd /var/run/nscd; do
    if [[ -d $d ]]; then mount -t tmpfs tmpfs "$d" || fail "cannot hide $d"; fi
done
cat /etc/resolv.conf

step "upstream: a second waymark-resolver for upstream.test on 127.0.0.1:5354"
# Its own upstream is a closed loopback port: it must not forward to the resolver below.
start upstream env RUST_LOG=info NO_COLOR=1 "$bin" serve --dns-addr 127.0.0.1:5354 --http-addr "$upstream_api" \
    --data-dir "$work/upstream-data" --zone upstream.test --upstream 127.0.0.1:9
upstream_pid=$!
wait_ready upstream "$upstream_pid" 30 grep -q '^waymark-resolver listening' "$work/upstream.out"
api_put "http://$upstream_api/v1/agent/service/register" \
    '{"Name": "www", "ID": "www-1", "Address": "192.0.2.10", "Port": 80}'

step "resolver: mesh.internal on 127.0.0.1:53, forwarding to 127.0.0.1:5354"
start resolver env RUST_LOG=info NO_COLOR=1 "$bin" serve --dns-addr 127.0.0.1:53 --http-addr "$mesh_api" \
    --data-dir "$work/resolver-data" --zone mesh.internal --upstream 127.0.0.1:5354
resolver_pid=$!
wait_ready resolver "$resolver_pid" 30 grep -q '^waymark-resolver listening' "$work/resolver.out"
cat "$work/resolver.out"

step "payment: an HTTP server on 127.0.0.1:$http_port, registered as payment"
mkdir -p "$work/www"
echo "$marker" >"$work/www/index.html"
start http python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$http_port"
http_pid=$!
wait_ready http "$http_pid" 20 curl -sf --noproxy '*' --max-time 2 "http://127.0.0.1:$http_port/"
api_put "http://$mesh_api/v1/agent/service/register" \
    "{\"Name\": \"payment\", \"ID\": \"payment-1\", \"Address\": \"127.0.0.1\", \"Port\": $http_port}"

step "getent hosts payment.mesh.internal"
out=$(timeout 20 getent hosts payment.mesh.internal) || fail "getent hosts payment.mesh.internal failed (exit $?)"
echo "$out"
[[ $(awk '{print $1}' <<<"$out") == 127.0.0.1 ]] || fail "payment.mesh.internal: expected 127.0.0.1, got: $out"

step "curl http://payment.mesh.internal:$http_port/"
body=$(curl -sS -f --noproxy '*' --max-time 20 "http://payment.mesh.internal:$http_port/") ||
    fail "curl http://payment.mesh.internal:$http_port/ failed (exit $?)"
echo "$body"
[[ $body == *"$marker"* ]] || fail "curl: expected the marker $marker, got: $body"

step "getent hosts www.upstream.test (forwarded to the upstream)"
out=$(timeout 20 getent hosts www.upstream.test) || fail "getent hosts www.upstream.test failed (exit $?)"
echo "$out"
[[ $(awk '{print $1}' <<<"$out") == 192.0.2.10 ]] || fail "www.upstream.test: expected 192.0.2.10, got: $out"
metrics=$(curl -sS -f --noproxy '*' --max-time 10 "http://$mesh_api/metrics") || fail "GET /metrics failed"
grep '^waymark_dns_upstream_queries_total' <<<"$metrics" | grep 'upstream="127.0.0.1:5354"' |
    grep -q 'result="ok"' || fail "no successful forward to 127.0.0.1:5354 in the metrics: $metrics"

step "getent hosts nope.mesh.internal (must fail)"
set +e
out=$(timeout 20 getent hosts nope.mesh.internal)
rc=$?
set -e
[[ $rc -ne 0 ]] || fail "getent hosts nope.mesh.internal succeeded: $out"
[[ $rc -ne 124 ]] || fail "getent hosts nope.mesh.internal timed out instead of failing"
echo "exit $rc, as expected"

step "all passed"
"#####;

/// The whole script's time limit; every wait inside it is shorter.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn getent_and_curl_find_mesh_names_through_the_system_resolver() {
    for tool in [
        "unshare", "ip", "mount", "getent", "curl", "python3", "timeout",
    ] {
        assert!(
            have(tool),
            "{tool} is required (Debian: util-linux, iproute2, mount, libc-bin, curl, python3, \
             coreutils; tests/run.sh installs them)"
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(unshare) = namespace_command(dir.path()) else {
        return;
    };
    let bin = resolver_bin();
    let script = dir.path().join("system_resolver.sh");
    std::fs::write(&script, SCRIPT).expect("write script");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("work dir");
    let log = dir.path().join("script.log");

    let mut cmd = Command::new("unshare");
    cmd.args(&unshare)
        .arg("--")
        .arg("bash")
        .arg(&script)
        .env("RESOLVER_BIN", &bin)
        .env("WORK", &work);
    let started = Instant::now();
    let (status, output) = run_bounded(cmd, &log, SCRIPT_LIMIT, Some(&work.join("pids")));
    println!(
        "unshare {} -- bash {} ({:.1?}):\n{output}",
        unshare.join(" "),
        script.display(),
        started.elapsed()
    );
    match status {
        Some(s) => assert!(
            s.success(),
            "the system-resolver script failed ({s}); its output:\n{output}"
        ),
        None => {
            panic!("the system-resolver script took over {SCRIPT_LIMIT:?}; its output:\n{output}")
        }
    }
}
