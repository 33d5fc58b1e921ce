#!/usr/bin/env python3
"""Scenario 4: control-plane scale.

One control-plane replica (`target/release/fulcrum control`) on a real etcd (Debian's
etcd-server, a temporary data directory, free loopback ports), 10,000 registered nodes and
1,000 subscribed routers simulated by the driver `target/release/fulcrum-bench-cp` (one process:
every router a real gRPC Subscribe stream on its own connection, ACKing every version). It
measures the time from a weight change (the admin RPC behind `fulcrum ctl weight`) to the ACK at
every router, the control plane's CPU and RSS (from /proc), and etcd's writes per second at
steady state (revision growth). Writes the JSON result and prints a markdown section.

    python3 bench/cp_scale.py                  # the full scenario (about 5 minutes)
    python3 bench/cp_scale.py --quick          # 2,000 nodes, 200 routers, 20 changes
    python3 bench/cp_scale.py --render FILE    # print the markdown of a saved result

Builds the two binaries in release mode unless --no-build. Python 3 standard library only.
Stops every process it started on exit, on Ctrl-C and on SIGTERM (children also get SIGTERM from
the kernel if this script dies).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / ".peers"

# Targets (NORTH-STAR.md, issue 3).
TARGET_P99_MS = 100.0
TARGET_CORES = 1.0
TARGET_RSS_BYTES = 1 << 30
TARGET_WRITES_PER_SEC = 50.0

# Probe interval of the control plane at this scale: 10,000 nodes probed every 10 s are 1,000
# probes (3,000 small calls) a second; every second would be 30,000 calls a second, more than a
# core by itself. Routers' passive signals (errors, latency, ejection) cover the time between
# probes.
PROBE_INTERVAL = "10s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the explicit clean-up remains
        pass


class Procs:
    """Processes started here, stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, **kw) -> subprocess.Popen:
        f = open(log, "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()


def wait_port(port: int, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port} within {timeout} s")


def etcd_binary() -> str:
    found = os.environ.get("FULCRUM_ETCD") or shutil.which("etcd")
    if not found:
        sys.exit("etcd not found: apt-get install etcd-server (or set FULCRUM_ETCD)")
    return found


def mib(b: float) -> str:
    return f"{b / (1 << 20):.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(r: dict) -> str:
    ch = r["changes"]["change_to_ack_at_every_router"]
    per = r["changes"]["change_to_ack_per_router"]
    st = r["steady"]
    cp = r["control_plane"]
    lines = [
        "## Scenario 4: control-plane scale",
        "",
        f"One control-plane replica on etcd, {r['nodes']:,} registered nodes, {r['routers']:,} "
        "subscribed routers (simulated streams in one driver process, each on its own "
        f"connection, ACKing every version). Probe interval {r.get('probe_interval', '?')}. "
        f"Run {r.get('date', '?')} on {r.get('host', '?')}.",
        "",
        "| what | measured | target | |",
        "|---|---|---|---|",
        f"| weight change → ACK at every router, p50 | {ch['p50_ms']:.1f} ms | | |",
        f"| weight change → ACK at every router, p99 | {ch['p99_ms']:.1f} ms | ≤ {TARGET_P99_MS:.0f} ms "
        f"| {verdict(ch['count'] > 0 and ch['p99_ms'] <= TARGET_P99_MS and r['changes']['incomplete'] == 0)} |",
        f"| weight change → ACK per router, p50 / p99 | {per['p50_ms']:.1f} / {per['p99_ms']:.1f} ms | | |",
        f"| control-plane CPU, steady state | {st['cpu_cores']:.2f} cores | ≤ {TARGET_CORES:.0f} core "
        f"| {verdict(st['cpu_cores'] <= TARGET_CORES)} |",
        f"| control-plane CPU, during the changes | {r['changes']['window']['cpu_cores']:.2f} cores | | |",
        f"| control-plane RSS, steady state (peak) | {mib(st['rss_bytes'])} ({mib(cp['peak_rss_bytes'])}) "
        f"| ≤ 1 GiB | {verdict(cp['peak_rss_bytes'] <= TARGET_RSS_BYTES)} |",
        f"| etcd writes/s, steady state | {st['etcd_writes_per_sec']:.1f} | ≤ {TARGET_WRITES_PER_SEC:.0f} "
        f"| {verdict(st['etcd_writes_per_sec'] <= TARGET_WRITES_PER_SEC)} |",
        f"| etcd writes/s, during the changes | {r['changes']['window']['etcd_writes_per_sec']:.1f} | | |",
        "",
        f"{ch['count']} changes measured ({r['changes']['incomplete']} not ACKed by every router "
        f"in time); setup: all nodes routed {r['setup']['routed_after_s']:.0f} s after the first "
        f"registration, routers subscribed in {r['setup']['routers_connected_in_s']:.0f} s "
        f"(waves of {r['setup']['wave']}).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 nodes, 200 routers, 20 changes")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--routers", type=int)
    ap.add_argument("--changes", type=int)
    ap.add_argument("--steady-secs", type=int, default=30)
    ap.add_argument("--probe-interval", default=PROBE_INTERVAL)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", type=Path, help="result file (default bench/.peers/cp-scale[-quick].json)")
    ap.add_argument("--render", type=Path, help="print the markdown of a saved result and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    a = ap.parse_args()

    if a.render:
        print(render(json.loads(a.render.read_text())))
        return

    nodes = a.nodes or (2_000 if a.quick else 10_000)
    routers = a.routers or (200 if a.quick else 1_000)
    changes = a.changes or (20 if a.quick else 50)
    out = a.out or RESULTS / ("cp-scale-quick.json" if a.quick else "cp-scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    if not a.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-p", "fulcrum", "-p", "fulcrum-bench-cp"],
            cwd=ROOT,
            check=True,
        )
    fulcrum = ROOT / "target" / "release" / "fulcrum"
    driver = ROOT / "target" / "release" / "fulcrum-bench-cp"

    procs = Procs()

    def on_signal(signum, _frame):
        procs.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-cp-scale-"))
    try:
        client, peer, control = free_port(), free_port(), free_port()
        etcd = procs.start(
            [
                etcd_binary(),
                "--name=cp-scale",
                f"--data-dir={tmp / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=cp-scale=http://127.0.0.1:{peer}",
                "--log-level=warn",
            ],
            tmp / "etcd.log",
        )
        wait_port(client, "etcd", etcd)
        cp = procs.start(
            [
                str(fulcrum),
                "control",
                f"--listen=127.0.0.1:{control}",
                f"--store=etcd://127.0.0.1:{client}",
                f"--probe-interval={a.probe_interval}",
                "--admin-trust-loopback",
            ],
            tmp / "control.log",
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        wait_port(control, "the control plane", cp)
        cmd = [
            str(driver),
            f"--control=127.0.0.1:{control}",
            f"--etcd=127.0.0.1:{client}",
            f"--control-pid={cp.pid}",
            f"--nodes={nodes}",
            f"--routers={routers}",
            f"--changes={changes}",
            f"--steady-secs={a.steady_secs}",
            f"--out={out}",
        ]
        print("+ " + " ".join(cmd), file=sys.stderr)
        # Bounded: the driver's own deadlines end it well within an hour.
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600, preexec_fn=_die_with_parent)
        if cp.poll() is not None:
            sys.exit(f"the control plane exited with {cp.returncode}; see {tmp / 'control.log'}")
        r = json.loads(out.read_text())
        r["probe_interval"] = a.probe_interval
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        r["host"] = f"{os.cpu_count()} cores"
        out.write_text(json.dumps(r, indent=2))
        print(render(r))
        print(f"\n(result: {out})", file=sys.stderr)
    finally:
        procs.stop()
        if a.keep:
            print(f"(logs kept in {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
