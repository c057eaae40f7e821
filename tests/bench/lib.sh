# Shared by the gateway benchmark scripts (sourced, after `cd` to the repository root and
# with $target set): a scratch directory whose processes are stopped on exit, the backend
# and registry every gateway benchmark runs in front of, and nginx's config as the gateway's
# peer.

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

# write_nginx_conf PORT [LISTEN_OPTIONS] → $work/nginx/nginx.conf (after
# start_backend_and_registry): nginx as the gateway's peer in front of $backend, one worker,
# keep-alive both ways with no cap on requests per connection (the gateway has none; nginx
# closes after 1,000 by default, and h2load does not reconnect), adding the gateway's request
# headers (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto, Forwarded, X-Request-Id, traceparent)
# and the request ID on the answer. LISTEN_OPTIONS: say " http2". NGINX_ACCESS_LOG (default off) is the access_log
# directive's value; NGINX_MASTER=off runs the worker alone (under valgrind).
write_nginx_conf() {
    local port=$1 listen=${2:-}
    mkdir -p "$work/nginx"
    cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
master_process ${NGINX_MASTER:-on};
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log ${NGINX_ACCESS_LOG:-off};
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx;
    scgi_temp_path $work/nginx;
    upstream backend { server $backend; keepalive 64; keepalive_requests 100000000; }
    # The gateway's headers: the client's X-Request-Id or a new one; a new trace (nginx has
    # one random value per request, so the span ID is the first half of the trace ID).
    map \$http_x_request_id \$req_id { "" \$request_id; default \$http_x_request_id; }
    map \$request_id \$span_id { "~^(?<first>[0-9a-f]{16})" \$first; }
    server {
        listen 127.0.0.1:$port$listen;
        http2_max_concurrent_streams 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header Forwarded "for=\$remote_addr;proto=\$scheme;host=\$host";
            proxy_set_header X-Request-Id \$req_id;
            proxy_set_header traceparent "00-\$request_id-\$span_id-00";
            # The gateway answers with the request's ID when the instance did not.
            add_header X-Request-Id \$req_id always;
        }
    }
}
EOF
}

# write_haproxy_conf FILE PORT [BIND_OPTIONS] (after start_backend_and_registry): HAProxy as
# the gateway's peer in front of $backend, one thread, HTTP mode, connection reuse, adding the
# gateway's request headers and the request ID on the answer, as write_nginx_conf does.
# BIND_OPTIONS: say " proto h2". HAPROXY_LOG=1 logs every request (httplog) to stdout.
# HAProxy 2.6 (Debian 12) has no "option forwarded", so Forwarded is set by hand; the span ID
# is two 32-bit random numbers.
write_haproxy_conf() {
    local file=$1 port=$2 bind=${3:-} log_global="" log_defaults=""
    if [[ ${HAPROXY_LOG:-0} == 1 ]]; then
        log_global="    log stdout format raw local0"
        log_defaults=$'    log global\n    option httplog'
    fi
    cat >"$file" <<CFG
global
    nbthread 1
$log_global
defaults
    mode http
$log_defaults
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    http-reuse always
    option forwardfor
frontend fe
    bind 127.0.0.1:$port$bind
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto http
    http-request set-header Forwarded "for=%[src];proto=http;host=%[req.hdr(host)]"
    http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id) -m found }
    http-request set-var(txn.request_id) req.hdr(x-request-id)
    http-request set-header traceparent "00-%[uuid,regsub(-,,g)]-%[rand(4294967295),hex,lower,bytes(8)]%[rand(4294967295),hex,lower,bytes(8)]-00"
    http-response set-header X-Request-Id %[var(txn.request_id)] unless { res.hdr(x-request-id) -m found }
    default_backend be
backend be
    server b1 $backend
CFG
}
