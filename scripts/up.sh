#!/usr/bin/env bash
# Runs the whole two-region Fulcrum stack on this machine (`fulcrum up`): a control plane on an
# embedded store, routers for regions a and b, three simulated nodes per region. No etcd needed.
#
# Installs what the build needs when it is missing (protoc, for etcd-client's build script),
# builds in release mode, and runs. Extra arguments go to `fulcrum up` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_protoc
cargo build --release --locked -p fulcrum
exec ./target/release/fulcrum up "$@"
