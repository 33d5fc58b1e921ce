# Shared install steps of scripts/*.sh. Debian packages are installed with apt-get when missing
# (as root, or through sudo when it is there).

apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install $*" >&2; exit 1; }
    sudo="sudo"
  fi
  if [ -z "${FULCRUM_APT_UPDATED:-}" ]; then
    $sudo apt-get update -qq
    export FULCRUM_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

need_protoc() {
  command -v protoc >/dev/null || apt_install protobuf-compiler
}

need_etcd() {
  command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || apt_install etcd-server
}

# Redis, for the response cache's shared level (tests/tests/shared_cache.rs starts its own on a
# free port; Debian's package may also start one on 6379 where a service manager runs, which
# the tests do not use).
need_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
}

# The project-local venv (.venv) with the Python test peers: tritonclient (a stock OIP client)
# and MLServer (a real OIP server, for tests/tests/mlserver.rs). Quick when they are there: the
# check imports tritonclient but only looks MLServer up (importing it takes seconds).
need_venv() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || { apt_install python3-venv; python3 -m venv .venv; }
  fi
  if ! .venv/bin/python -c 'import importlib.util as u, tritonclient.grpc, numpy, jwt
assert u.find_spec("mlserver")' 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check 'tritonclient[grpc]==2.*' numpy 'mlserver>=1.7,<2' 'PyJWT==2.*'
  fi
}
