#!/usr/bin/env bash
# Benchmarks (release build), each against its baseline measured in the same run:
#   ./scripts/bench.sh gateway   - tools/call through a node vs direct upstream (bench-results/gateway.md)
#   ./scripts/bench.sh routing   - only the mesh-routing part: three registered replicas vs direct
#                                  (bench-results/gateway-routing.md)
#   ./scripts/bench.sh state     - state commits vs Redis WATCH/MULTI/EXEC and bare SQL CAS (bench-results/state.md)
#   ./scripts/bench.sh abuse     - abuse run (issue 13): 10,000 unauthenticated requests, 1,000
#                                  registrations, a stderr flood vs. a legitimate client (scripts/abuse.py)
#   ./scripts/bench.sh           - both
# BENCH_SECONDS sets the time per point. The state benchmark needs PostgreSQL
# (CONCORD_TEST_POSTGRES) and Redis (CONCORD_BENCH_REDIS, default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
[ -d tests/peers/node_modules/@modelcontextprotocol/server-everything ] || \
    (cd tests/peers && npm ci --no-audit --no-fund --loglevel=error)
cargo build --release --workspace --bins --locked
if [ "$which" = gateway ] || [ "$which" = all ]; then
    cargo bench -p concord-cli --bench gateway --locked
fi
if [ "$which" = routing ]; then
    BENCH_ONLY=routing cargo bench -p concord-cli --bench gateway --locked
fi
if [ "$which" = state ] || [ "$which" = all ]; then
    cargo bench -p concord-state --bench state --locked
fi
if [ "$which" = abuse ]; then
    [ -x .venv/bin/python ] || { echo "no .venv: run ./scripts/test.sh once to create it" >&2; exit 1; }
    .venv/bin/python scripts/abuse.py
fi
