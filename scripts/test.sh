#!/usr/bin/env bash
# Runs Fulcrum's whole test suite: unit, property and end-to-end tests (real etcd, real gRPC on
# loopback, node-sims, the real binary, a stock tritonclient against the routers, and real
# MLServer, and PyJWT (to sign caller tokens as the seed article does). behind them).
#
# Installs what is missing first: protoc (protobuf-compiler) for the build, etcd (etcd-server)
# and Redis (redis-server, the response cache's shared level) for the end-to-end tests, and a
# project-local Python venv (.venv) with tritonclient,
# MLServer, and PyJWT (to sign caller tokens as the seed article does).
# Ends with one summary line over every test binary: "total: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_protoc
need_etcd
need_redis
need_venv
export FULCRUM_PYTHON="$PWD/.venv/bin/python"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
