#!/usr/bin/env bash
# Runs Waymark's whole test suite: unit tests, end-to-end tests against the real binaries on
# loopback, the real Consul client libraries, dig, and the system-resolver test in a network
# namespace. Installs what the tests need when it is missing: Debian packages when run as
# root, and the client libraries (PyPI, npm) into tests/clients/ (no root needed).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# chromium and chromedriver: the web views' browser tests (tests/tests/ui.rs).
for tool in dig curl unshare ip python3 node npm cmake javac protoc etcd chromium chromedriver; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# etcd-client's build compiles etcd's .proto files, which import protobuf's own.
[[ -e /usr/include/google/protobuf/descriptor.proto ]] || missing+=("protobuf's .proto files")
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[tests] installing Debian packages for: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends \
            dnsutils curl util-linux iproute2 python3 python3-pip nodejs npm cmake \
            default-jdk-headless protobuf-compiler libprotobuf-dev etcd-server \
            chromium chromium-driver >/dev/null
    else
        echo "[tests] missing tools: ${missing[*]} (Debian: apt-get install dnsutils curl util-linux iproute2 cmake default-jdk-headless protobuf-compiler libprotobuf-dev etcd-server chromium chromium-driver)" >&2
        exit 1
    fi
fi

bash tests/clients/install.sh

# Build everything once, up front, with cargo's own progress: the binaries the end-to-end
# tests start, then the test programs. The tests then use these binaries as they are
# (WAYMARK_*_BIN) and never run cargo themselves.
step() { echo "[tests] $* ($(date +%H:%M:%S))"; }
step "1/4 building the binaries (a fresh clone takes several minutes)"
cargo build --workspace --bins
step "2/4 building the test programs"
cargo test --workspace --no-run "$@"
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export WAYMARK_RESOLVER_BIN="$target/debug/waymark-resolver"
export WAYMARK_GATEWAY_BIN="$target/debug/waymark-gateway"

step "3/4 running the tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The gateway carries HTTP/1.1 on either of two data paths (config data_path); its whole
# suite runs on the one that is not the default too, so that both behave alike.
step "4/4 the gateway's tests again, on data_path = pingora"
gateway_tests=()
for f in tests/tests/gateway_*.rs; do gateway_tests+=(--test "$(basename "$f" .rs)"); done
WAYMARK_GATEWAY_DATA_PATH=pingora cargo test -p waymark-e2e --no-fail-fast "${gateway_tests[@]}" 2>&1 | tee -a "$log"
second=${PIPESTATUS[0]}
[[ $status -ne 0 ]] || status=$second
set -e
# One closing line for the whole run, over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
