#!/usr/bin/env bash
# npm ci in DIR from its package-lock.json, failing loudly: npm's own exit status decides, and its
# output is shown whole on failure (only npm's harmless "Unknown user config" notices are dropped
# on success). Used by test.sh and conformance.sh, which write their install stamp only after this
# succeeds.
set -euo pipefail
dir="$1"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) >"$log" 2>&1; then
    echo "npm ci in $dir failed:" >&2
    cat "$log" >&2
    exit 1
fi
grep -v 'Unknown user config' "$log" || true
