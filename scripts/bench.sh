#!/usr/bin/env bash
# Gateway overhead benchmark (release build): Concord vs direct upstream, same run.
# Writes bench-results/gateway.md; BENCH_SECONDS sets the time per point (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d tests/peers/node_modules/@modelcontextprotocol/server-everything ] || \
    (cd tests/peers && npm ci --no-audit --no-fund --loglevel=error)
cargo build --release --workspace --bins --locked
cargo bench -p concord-cli --bench gateway --locked
