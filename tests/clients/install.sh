#!/usr/bin/env bash
# Install the real Consul client libraries used by tests/clients/*.
#
#   python-consul -> tests/clients/.deps/python-consul   (module `consul`)
#   py-consul     -> tests/clients/.deps/py-consul       (module `consul`, too)
#   python-consul2 -> tests/clients/.deps/python-consul2 (module `consul`, too)
#   consulate-fork -> tests/clients/.deps/consulate-fork (module `consulate`)
#   py-eureka-client -> tests/clients/.deps/py-eureka-client (module `py_eureka_client`)
#   npm consul, @creditkarma/consul-client, eureka-js-client -> tests/clients/node_modules
#     (package-lock.json)
#   selenium      -> tests/clients/.deps/selenium        (module `selenium`: ui_check.py drives
#                    headless Chromium through it; Chromium itself is Debian's chromium and
#                    chromium-driver)
#
# Three of the Python libraries provide the module `consul`, so each goes into its own
# directory and a test picks one with PYTHONPATH. Idempotent: a directory whose
# stamp matches the pinned specs is left alone. Needs no stdin; safe for CI.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPS="$HERE/.deps"
PYTHON="${PYTHON:-python3}"

# Exact pins, transitive dependencies included, so CI resolves the same tree.
COMMON=(requests==2.34.2 urllib3==2.8.0 idna==3.20 charset-normalizer==3.5.2 certifi==2026.10.18)
PY_PYTHON_CONSUL=(python-consul==1.1.0 six==1.17.0 "${COMMON[@]}")
PY_PY_CONSUL=(py-consul==1.8.0 "${COMMON[@]}")
PY_PYTHON_CONSUL2=(python-consul2==0.1.5 six==1.17.0 "${COMMON[@]}")
PY_CONSULATE=(consulate-fork==0.7.1 "${COMMON[@]}")
PY_EUREKA=(py-eureka-client==0.13.3 ifaddr==0.2.0 dnspython==2.9.2 httpx==0.29.0 httpcore==1.0.9
    h11==0.16.0 anyio==4.16.0 typing_extensions==4.16.0 idna==3.20 certifi==2026.10.18)
PY_SELENIUM=(selenium==4.51.0 urllib3==2.8.0 PySocks==1.7.1 trio==0.35.0 trio-websocket==0.12.2
    attrs==26.1.0 outcome==1.3.0.post0 sniffio==1.3.1 sortedcontainers==2.4.0 idna==3.20
    wsproto==1.3.2 h11==0.16.0 certifi==2026.10.19.post1 typing_extensions==4.16.0
    websocket-client==1.9.2)

log() { echo "[clients/install] $*"; }

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "[clients/install] error: '$1' not found on PATH" >&2; exit 1; }
}

install_py() { # name module specs...
    local name="$1" module="$2"; shift 2
    local dir="$DEPS/$name" stamp want
    stamp="$dir/.waymark-stamp"
    want="$("$PYTHON" --version 2>&1) | $*"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "$name: up to date ($dir)"
        return
    fi
    log "$name: installing $* into $dir"
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$DEPS"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install --no-input --quiet \
        --no-warn-script-location --root-user-action=ignore \
        --target "$dir.tmp" "$@"
    mv "$dir.tmp" "$dir"
    printf '%s' "$want" > "$stamp"
    # Check that the module imports from exactly this directory.
    # (found, not imported: consulate-fork needs a shim on Python 3.10+, see catalog_py.py)
    PYTHONPATH="$dir" "$PYTHON" -c "import importlib.util as u; f = u.find_spec('$module').origin; assert f.startswith('$dir'), f; print('[clients/install] $name: $module module at', f)"
}

install_node() {
    need node
    need npm
    local stamp="$HERE/node_modules/.waymark-stamp" want
    want="$(cat "$HERE/package.json" "$HERE/package-lock.json" 2>/dev/null | cksum)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$HERE/node_modules/consul/package.json" \
        && -f "$HERE/node_modules/@creditkarma/consul-client/package.json" \
        && -f "$HERE/node_modules/eureka-js-client/package.json" ]]; then
        log "npm consul: up to date ($HERE/node_modules)"
        return
    fi
    log "npm consul: installing into $HERE/node_modules"
    if [[ -f "$HERE/package-lock.json" ]]; then
        (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error)
    else
        (cd "$HERE" && npm install --no-audit --no-fund --loglevel=error)
    fi
    printf '%s' "$want" > "$stamp"
    (cd "$HERE" && node -e "const c=require('consul'); console.log('[clients/install] npm consul', require('consul/package.json').version, typeof c === 'function' ? 'ok' : 'unexpected export')")
}

need "$PYTHON"
install_py python-consul consul "${PY_PYTHON_CONSUL[@]}"
install_py py-consul consul "${PY_PY_CONSUL[@]}"
install_py python-consul2 consul "${PY_PYTHON_CONSUL2[@]}"
install_py consulate-fork consulate "${PY_CONSULATE[@]}"
install_py py-eureka-client py_eureka_client "${PY_EUREKA[@]}"
install_py selenium selenium "${PY_SELENIUM[@]}"
install_node
log "done"
