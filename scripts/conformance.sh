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
    rm -f "$stamp"
    ./scripts/npm-ci.sh "$suite_dir"
    [ -x "$suite_dir/node_modules/.bin/conformance" ] || { echo "npm ci left no conformance binary" >&2; exit 1; }
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

# What each run must at least cover: a suite that runs fewer scenarios or checks than this (an
# upgrade that filters them out, a node that answers nothing) fails even when nothing "failed".
# Raise these when the suite grows; lower them only with a reason in the commit.
declare -A min_scenarios=([2025-06-18]=26 [2025-11-25]=30)
declare -A min_checks=([2025-06-18]=26 [2025-11-25]=40)
declare -A min_client_checks=([initialize]=1 [tools_call]=1 [sse-retry]=3 [elicitation-sep1034-client-defaults]=5)

status=0
fail() { echo "FAILED: $*" >&2; status=1; }
suite="$suite_dir/node_modules/.bin/conformance"

for version in 2025-06-18 2025-11-25; do
    echo "== conformance suite, server mode, spec $version, through Concord"
    args=(server --url "http://127.0.0.1:$port/mcp" --suite active --spec-version "$version" -o "$work/out-$version")
    if [ -s "$suite_dir/baseline.yml" ]; then
        args+=(--expected-failures "$suite_dir/baseline.yml")
    fi
    unset scenarios passed failed
    result="$work/result-$version.txt"
    set +e
    "$suite" "${args[@]}" > "$result" 2>&1
    code=$?
    set -e
    grep -E '✓|✗|Total' "$result" || true
    # "Running active suite (40 scenarios) against URL" and "Total: 120 passed, 0 failed".
    scenarios=$(sed -nE 's/^Running [a-z]+ suite \(([0-9]+) scenarios\).*/\1/p' "$result" | tail -1)
    read -r passed failed < <(sed -nE 's/^Total: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/p' "$result" | tail -1) || true
    echo "spec $version: exit $code, ${scenarios:-?} scenarios, ${passed:-?} checks passed, ${failed:-?} failed"
    if [ "$code" -ne 0 ] || [ -z "${scenarios:-}" ] || [ -z "${passed:-}" ] || [ "${failed:-1}" -ne 0 ] \
        || [ "$scenarios" -lt "${min_scenarios[$version]}" ] || [ "$passed" -lt "${min_checks[$version]}" ]; then
        fail "spec $version: want exit 0, 0 failed, >= ${min_scenarios[$version]} scenarios and >= ${min_checks[$version]} passed checks"
        grep -vE '✓' "$result" | tail -40
        tail -40 "$work/node.log"
    fi
done
# Client mode: Concord's upstream client is the client under test (see
# crates/concord-mcp/src/conformance.rs): the suite's test server becomes the upstream of an
# in-process gateway and each scenario's calls go through it.
for scenario in initialize tools_call sse-retry elicitation-sep1034-client-defaults; do
    result="$work/client-$scenario.txt"
    set +e
    "$suite" client --command "$bin/concord conformance-client" --scenario "$scenario" \
        -o "$work/client-$scenario" > "$result" 2>&1
    code=$?
    set -e
    # "Passed: 3/3, 0 failed, 0 warnings"
    read -r passed total failed warnings < <(sed -nE \
        's/^Passed: ([0-9]+)\/([0-9]+), ([0-9]+) failed, ([0-9]+) warnings.*/\1 \2 \3 \4/p' "$result" | tail -1) || true
    echo "client $scenario: exit $code, ${passed:-?}/${total:-?} passed, ${failed:-?} failed, ${warnings:-?} warnings"
    if [ "$code" -ne 0 ] || [ -z "${passed:-}" ] || [ "$passed" -ne "$total" ] || [ "$failed" -ne 0 ] \
        || [ "$warnings" -ne 0 ] || [ "$passed" -lt "${min_client_checks[$scenario]}" ]; then
        fail "client $scenario: want exit 0, every check passed, no warnings and >= ${min_client_checks[$scenario]} checks"
        tail -40 "$result"
    fi
    unset passed total failed warnings
done
exit $status
