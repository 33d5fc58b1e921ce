#!/usr/bin/env bash
# Runs Fulcrum's whole test suite: unit, property and end-to-end tests (real etcd, real gRPC on
# loopback, node-sims, and a stock tritonclient against a router).
#
# Installs what is missing first: protoc (protobuf-compiler) for the build, etcd (etcd-server)
# for the end-to-end tests, and a project-local Python venv (.venv) with tritonclient.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_protoc
need_etcd
need_venv
export FULCRUM_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace --locked "$@"
