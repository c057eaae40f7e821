#!/usr/bin/env bash
# Runs Waymark's whole test suite: unit tests, end-to-end tests against the real binaries on
# loopback, the real Consul client libraries, dig, and the system-resolver test in a network
# namespace. Installs what the tests need when it is missing: Debian packages when run as
# root, and the client libraries (PyPI, npm) into tests/clients/ (no root needed).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in dig curl unshare ip python3 node npm cmake; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "[tests] installing Debian packages for: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends \
            dnsutils curl util-linux iproute2 python3 python3-pip nodejs npm cmake >/dev/null
    else
        echo "[tests] missing tools: ${missing[*]} (Debian: apt-get install dnsutils curl util-linux iproute2 cmake)" >&2
        exit 1
    fi
fi

bash tests/clients/install.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
