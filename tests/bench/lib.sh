# Shared by the gateway benchmark scripts (sourced, after `cd` to the repository root and
# with $target set): a scratch directory whose processes are stopped on exit, and the
# backend and registry every gateway benchmark runs in front of.

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_backend_and_registry [COMMAND PREFIX...] → sets backend (IP:PORT), backend_port,
# backend_pid, api (the registry's HTTP address) and resolver_pid: one gw_backend process,
# a resolver, and the backend registered as service "bench" with public host bench.test.
# The prefix (say `taskset -c 1`) runs both processes.
start_backend_and_registry() {
    "$@" "$target/release/gw_backend" --addr 127.0.0.1:0 --id bench >"$work/backend.out" &
    pids+=($!)
    backend_pid=$!
    for _ in $(seq 1 100); do grep -q listening "$work/backend.out" && break; sleep 0.05; done
    backend=$(sed -n 's/^gw_backend listening //p' "$work/backend.out")
    backend_port=${backend##*:}
    "$@" "$target/release/waymark-resolver" serve --dns-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
        --data-dir "$work/data" --upstream 127.0.0.1:9 >"$work/resolver.out" 2>"$work/resolver.log" &
    pids+=($!)
    resolver_pid=$!
    for _ in $(seq 1 100); do grep -q listening "$work/resolver.out" && break; sleep 0.05; done
    api=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$work/resolver.out")
    curl -sf -X PUT "http://$api/v1/agent/service/register" -d "{\"ID\":\"bench-1\",\"Name\":\"bench\",\"Address\":\"127.0.0.1\",\"Port\":$backend_port,\"Meta\":{\"waymark-public-host\":\"bench.test\"}}" >/dev/null
}
