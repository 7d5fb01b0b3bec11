#!/usr/bin/env bash
# The official MCP conformance suite (server mode) against a Concord node fronting the
# testkit's conformance fixture (prefix mode `never`, so the fixture's names are the names the
# suite calls), once per spec version the suite lists. Expected failures, if any, are listed
# with a reason in tests/conformance/baseline.yml. Needs the workspace binaries built.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin="$root/target/debug"
suite_dir="$root/tests/conformance"

stamp="$suite_dir/node_modules/.lock-sha"
lock_sha=$(sha256sum "$suite_dir/package-lock.json" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_sha" ]; then
    echo "== installing the conformance suite and Node 22 (npm ci)"
    (cd "$suite_dir" && npm ci --no-audit --no-fund --loglevel=error 2>&1 | grep -v 'Unknown user config' || true)
    [ -x "$suite_dir/node_modules/.bin/conformance" ] || { echo "npm ci failed" >&2; exit 1; }
    echo "$lock_sha" > "$stamp"
fi
export PATH="$suite_dir/node_modules/node/bin:$PATH"

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/concord.toml" <<TOML
[servers.conformance]
command = "$bin/concord-conformance-fixture"
prefix = "never"
timeout = "30s"
TOML
"$bin/concord" up --config "$work/concord.toml" --listen "127.0.0.1:$port" --data-dir "$work/data" \
    > "$work/node.out" 2> "$work/node.log" &
node_pid=$!
cleanup() {
    kill "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.05
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/node.log" >&2; exit 1; }

status=0
for version in 2025-06-18 2025-11-25; do
    echo "== conformance suite, server mode, spec $version, through Concord"
    args=(server --url "http://127.0.0.1:$port/mcp" --suite active --spec-version "$version" -o "$work/out-$version")
    if [ -s "$suite_dir/baseline.yml" ]; then
        args+=(--expected-failures "$suite_dir/baseline.yml")
    fi
    if ! "$suite_dir/node_modules/.bin/conformance" "${args[@]}" 2>&1 | tee "$work/result-$version.txt" | grep -E '✓|✗|Total'; then
        :
    fi
    # The suite's last line, e.g. "Total: 40 passed, 0 failed", says whether this version passed.
    total=$(grep -E '^Total:' "$work/result-$version.txt" | tail -1)
    echo "spec $version: ${total:-no total printed}"
    if ! echo "$total" | grep -qE 'passed, 0 failed'; then
        status=1
        grep -vE '✓' "$work/result-$version.txt" | tail -40
        tail -40 "$work/node.log"
    fi
done
# Client mode: Concord's upstream client is the client under test (see
# crates/concord-mcp/src/conformance.rs): the suite's test server becomes the upstream of an
# in-process gateway and each scenario's calls go through it.
for scenario in initialize tools_call sse-retry elicitation-sep1034-client-defaults; do
    line=$("$suite_dir/node_modules/.bin/conformance" client \
        --command "$bin/concord conformance-client" --scenario "$scenario" \
        -o "$work/client-$scenario" 2>&1 | tee "$work/client-$scenario.txt" | grep -E '^Passed:' | tail -1 || true)
    echo "client $scenario: ${line:-no result printed}"
    if ! echo "$line" | grep -qE ', 0 failed, 0 warnings'; then
        status=1
        tail -40 "$work/client-$scenario.txt"
    fi
done
exit $status
