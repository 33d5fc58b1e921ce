#!/usr/bin/env bash
# What checking caller tokens costs a call: one release build, two routers over one node-sim
# (no service time), one without keys and one with --jwt-secret-file; one caller, sequential
# calls on one connection, 5 s per run, the two interleaved over three rounds. Not part of the
# suite: an A/B of one feature, figures in bench/README.md ("Caller tokens"). Run from the
# repository root after `cargo build --release -p fulcrum`; works in a temporary directory.
set -u
F="$PWD/target/release/fulcrum"
cd "$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null' EXIT
echo "a secret for the auth bench, long enough" > secrets
$F control --listen 127.0.0.1:17000 --store memory: --admin-trust-loopback > cp.log 2>&1 &
$F node-sim --listen 127.0.0.1:17101 --name n1 --service-time const:0ms --slots 64 --register 127.0.0.1:17000 --region a > n1.log 2>&1 &
$F router --region a --control 127.0.0.1:17000 --listen 127.0.0.1:17001 > r1.log 2>&1 &
$F router --region a --control 127.0.0.1:17000 --listen 127.0.0.1:17002 --jwt-secret-file secrets > r2.log 2>&1 &
TOKEN=$($F token --secret-file secrets --sub bench --ttl 1h)
# Until both routers answer (at most 30 s).
ready() {
  $F load --target "127.0.0.1:$1" --closed-loop 1 --duration 100ms --connections 1 "${@:2}" --json 2>/dev/null |
    python3 -c "import json,sys; r=json.load(sys.stdin); sys.exit(0 if r['ok'] > 0 and not r['errors'] else 1)"
}
for i in $(seq 60); do
  ready 17001 && ready 17002 --header "authorization=Bearer $TOKEN" && break
  [ "$i" = 60 ] && { echo "routers not ready" >&2; exit 1; }
  sleep 0.5
done
for round in 1 2 3; do
  for which in plain jwt; do
    if [ $which = plain ]; then port=17001; hdr=(); else port=17002; hdr=(--header "authorization=Bearer $TOKEN"); fi
    $F load --target 127.0.0.1:$port --closed-loop 1 --duration 5s --connections 1 "${hdr[@]}" --json > $which-$round.json
    python3 -c "import json; r=json.load(open('$which-$round.json')); print('$which', $round, 'ok', r['ok'], r['latency'])"
  done
done
