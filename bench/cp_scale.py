#!/usr/bin/env python3
"""Scenario 4: control-plane scale.

One control-plane replica (`target/release/fulcrum control`) on a real etcd (Debian's
etcd-server, a temporary data directory, free loopback ports), 10,000 registered nodes and
1,000 subscribed routers simulated by the driver `target/release/fulcrum-bench-cp` (one process:
every router a real gRPC Subscribe stream on its own connection, ACKing every version). It
measures the time from a weight change (the admin RPC behind `fulcrum ctl weight`) to the ACK at
every router, the control plane's CPU and RSS (from /proc), and etcd's writes per second at
steady state (revision growth).

Run by suite.py (`./bench/run.sh --scenarios 4`, which saves
`bench/.peers/results-<mode>-cp_scale.json` and rewrites this scenario's section of
docs/benchmarks.md), or alone:

    python3 bench/cp_scale.py                  # the full scenario (about 2 minutes on an idle machine)
    python3 bench/cp_scale.py --quick          # 2,000 nodes, 200 routers, 20 changes
    python3 bench/cp_scale.py --render FILE    # print the markdown of a saved result

Alone, it builds the two binaries in release mode unless --no-build. Python 3 standard library
only. Stops every process it started on exit, on Ctrl-C and on SIGTERM (children also get
SIGTERM from the kernel if this script dies).
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import Procs, _die_with_parent, free_port, log  # noqa: E402

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

MODES = {
    "quick": {"nodes": 2_000, "routers": 200, "changes": 20, "steady_s": 30},
    # 200 changes: a p99 of 50 is their maximum (the 50th of 50); of 200 it is the second
    # largest. The maximum is reported beside it.
    "full": {"nodes": 10_000, "routers": 1_000, "changes": 200, "steady_s": 30},
}


def wait_port(port: int, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def etcd_binary() -> str:
    for p in (os.environ.get("FULCRUM_ETCD"), "/usr/bin/etcd", "/usr/local/bin/etcd",
              shutil.which("etcd")):
        if p and os.access(p, os.X_OK):
            return p
    raise RuntimeError("etcd not found: apt-get install etcd-server (or set FULCRUM_ETCD)")


def mib(b: float) -> str:
    return f"{b / (1 << 20):,.0f} MiB"


def run_scale(procs: Procs, fulcrum: str, driver: str, params: dict, tmp: Path,
              out: Path) -> dict:
    """Starts etcd, a control plane and the driver; returns the driver's result."""
    client, peer, control = free_port(), free_port(), free_port()
    # etcd's data on tmpfs when there is one: on this shared machine the disk is busy with other
    # sessions' builds and etcd's fsyncs stall for seconds (requests time out, the loop's
    # batches fail); production etcd has a disk of its own (fsync about a millisecond). This
    # measures the control plane, not the shared disk; it understates etcd's write latency by
    # about that millisecond per write.
    shm = Path("/dev/shm")
    data = Path(tempfile.mkdtemp(prefix="fulcrum-cp-scale-etcd-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp))
    try:
        etcd = procs.start("etcd", [
            etcd_binary(),
            "--name=cp-scale",
            f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=cp-scale=http://127.0.0.1:{peer}",
            "--log-level=warn",
        ])
        wait_port(client, "etcd", etcd)
        cp = procs.start("control", [
            fulcrum,
            "control",
            f"--listen=127.0.0.1:{control}",
            f"--store=etcd://127.0.0.1:{client}",
            f"--probe-interval={params['probe_interval']}",
            "--admin-trust-loopback",
        ])
        wait_port(control, "the control plane", cp)
        cmd = [
            driver,
            f"--control=127.0.0.1:{control}",
            f"--etcd=127.0.0.1:{client}",
            f"--control-pid={cp.pid}",
            f"--etcd-pid={etcd.pid}",
            f"--nodes={params['nodes']}",
            f"--routers={params['routers']}",
            f"--changes={params['changes']}",
            f"--steady-secs={params['steady_s']}",
            f"--out={out}",
        ]
        log("scenario 4: " + " ".join(cmd))
        started = time.time()
        loadavg_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        with open(tmp / "driver.log", "wb") as err:
            # Bounded: the driver's own deadlines end it well within an hour.
            p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=3600,
                               check=False, preexec_fn=_die_with_parent)
        if p.returncode != 0:
            tail = (tmp / "driver.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError("scenario 4: the driver failed:\n" + "\n".join(tail))
        if cp.poll() is not None:
            raise RuntimeError(f"scenario 4: the control plane exited with {cp.returncode}")
        r = json.loads(out.read_text())
        r["etcd_data"] = "tmpfs" if str(data).startswith(str(shm)) else "disk"
        r["driver_log"] = (tmp / "driver.log").read_text(errors="replace").splitlines()[-60:]
        r["loadavg_during"] = {"before": loadavg_before,
                               "after": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
                               "seconds": time.time() - started}
        r["commands"] = {"processes": list(procs.commands), "driver": cmd}
        return r
    finally:
        procs.stop_all()
        shutil.rmtree(data, ignore_errors=True)


class Scenario:
    """Scenario 4 as suite.py runs it."""

    def __init__(self, fulcrum: str, _envoy: str, _nginx: str, mode_name: str, tmp: Path):
        self.fulcrum = fulcrum
        self.driver = str(Path(fulcrum).resolve().parent / "fulcrum-bench-cp")
        self.mode_name = mode_name
        self.tmp = tmp / "cp-scale"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.tmp)

    def run(self) -> dict:
        if not os.access(self.driver, os.X_OK):
            raise RuntimeError(f"{self.driver} not found: bench/run.sh builds it")
        params = dict(MODES[self.mode_name], probe_interval=PROBE_INTERVAL)
        log(f"scenario 4: {params['nodes']:,} nodes, {params['routers']:,} routers, "
            f"{params['changes']} weight changes")
        r = run_scale(self.procs, self.fulcrum, self.driver, params, self.tmp,
                      self.tmp / "driver.json")
        self.procs.stop_all()
        r["mode"] = self.mode_name
        r["params"] = params
        return r


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    ch = r["changes"]["change_to_ack_at_every_router"]
    per = r["changes"]["change_to_ack_per_router"]
    st = r["steady"]
    cp = r["control_plane"]
    measured = ch["count"] > 0
    p99_ok = measured and ch["p99_ms"] <= TARGET_P99_MS and r["changes"]["incomplete"] == 0
    ms = (lambda v: f"{v:.1f} ms") if measured else (lambda _v: "not measured")
    out = [
        ("weight change → ACK at every router, p50", ms(ch["p50_ms"]), "", ""),
        (f"weight change → ACK at every router, p99 (of {ch['count']} changes)", ms(ch["p99_ms"]),
         f"≤ {TARGET_P99_MS:.0f} ms", verdict(p99_ok)),
        ("weight change → ACK at every router, p90 / max",
         f"{ch['p90_ms']:.1f} / {ch['max_ms']:.1f} ms" if measured else "not measured", "", ""),
        ("weight change → ACK per router, p50 / p99",
         f"{per['p50_ms']:.1f} / {per['p99_ms']:.1f} ms" if per["count"] else "not measured",
         "", ""),
    ]
    first = r["changes"].get("change_to_ack_at_first_router")
    spread = r["changes"].get("first_to_last_router")
    if first and first["count"]:
        out += [
            ("of which: change → ACK at the first router, p50 / p99 (admin call, etcd, control "
             "loop, etcd, publisher, one stream)",
             f"{first['p50_ms']:.1f} / {first['p99_ms']:.1f} ms", "", ""),
            ("of which: first → last router's ACK, p50 / p99 (fan-out to every stream, and "
             "the driver reading them all)",
             f"{spread['p50_ms']:.1f} / {spread['p99_ms']:.1f} ms", "", ""),
        ]
    out += [
        ("control-plane CPU, steady state", f"{st['cpu_cores']:.2f} cores",
         f"≤ {TARGET_CORES:.0f} core", verdict(st["cpu_cores"] <= TARGET_CORES)),
        ("control-plane CPU, during the changes",
         f"{r['changes']['window']['cpu_cores']:.2f} cores", "", ""),
    ]
    w = r["changes"]["window"]
    if "driver_cpu_cores" in w:
        etcd = w.get("etcd_cpu_cores")
        out.append((
            "during the changes, CPU of the driver / etcd / everything else on the machine",
            f"{w['driver_cpu_cores']:.2f} / "
            + (f"{etcd:.2f}" if etcd is not None else "?")
            + f" / {w['others_cpu_cores']:.2f} cores", "", ""))
    out += [
        ("control-plane RSS, steady state (peak)",
         f"{mib(st['rss_bytes'])} ({mib(cp['peak_rss_bytes'])})", "≤ 1 GiB",
         verdict(cp["peak_rss_bytes"] <= TARGET_RSS_BYTES)),
    ]
    if "rss_before_routers_bytes" in cp:
        out.append(("control-plane RSS before any router (registry, table, prober)",
                    mib(cp["rss_before_routers_bytes"]), "", ""))
    out += [
        ("etcd writes/s, steady state", f"{st['etcd_writes_per_sec']:.1f}",
         f"≤ {TARGET_WRITES_PER_SEC:.0f}", verdict(st["etcd_writes_per_sec"] <= TARGET_WRITES_PER_SEC)),
        ("etcd writes/s, during the changes",
         f"{r['changes']['window']['etcd_writes_per_sec']:.1f}", "", ""),
    ]
    return out


ETCD_NOTE = {
    "tmpfs": "etcd's data directory is on tmpfs: this machine's disk is shared with other "
             "sessions' builds, and etcd's fsyncs there stalled for seconds (requests timed out, "
             "the control loop's batches failed); production etcd has a disk of its own "
             "(fsync about 1 ms), so etcd's write latency is understated by about that much "
             "per write. ",
}


def load_note(r: dict) -> str:
    env = r.get("environment")
    during = r.get("loadavg_during")
    parts = []
    if during:
        parts.append(f"load average {during['before']} when the driver started, "
                     f"{during['after']} when it ended")
    if env:
        parts.append(f"other processes used {env['others_cores']:.2f} of the machine's "
                     f"{env['nproc']} cores on average during the run")
    return ("Machine: " + "; ".join(parts) + f". The control plane, etcd and the driver "
            f"({r['routers']:,} router streams and the {r.get('sims', 16)} servers answering the "
            "probes) share the same cores.") if parts else ""


def markdown(r: dict, show=None) -> list[str]:
    env = r.get("environment", {})
    head = (f"*Run: {env['date']}, {r.get('mode', '?')} mode, commit `{env['commit'][:12]}`.*"
            if env else f"*Run: {r.get('date', '?')}.*")
    p = r.get("params", {})
    lines = [
        "## Scenario 4: control-plane scale",
        "",
        head,
        "",
        f"One control-plane replica on etcd, {r['nodes']:,} registered nodes, {r['routers']:,} "
        "subscribed routers (simulated streams in one driver process, each one task on its "
        "own HTTP/2 connection, ACKing every version and reporting load on 10 nodes every "
        "500 ms). Probe "
        f"interval {p.get('probe_interval', r.get('probe_interval', '?'))}; the nodes' probes "
        f"are answered by {r.get('sims', 16)} minimal gRPC servers in the driver (health, "
        "`ServerReady`, `ModelReady`; `bench/cp-scale/src/probe_target.rs`)"
        + ". A change is one weight "
        "override through the admin API (`fulcrum ctl weight`), timed from the call to the "
        "ACK, by every router, of the first version carrying it; the steady-state window is "
        "30 s after 10 s of settling. " + ETCD_NOTE.get(r.get("etcd_data", ""), "")
        + load_note(r),
        "",
        "| what | measured | target | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(r)]
    s = r["setup"]
    lines += [
        "",
        f"{r['changes']['count']} changes ({r['changes']['incomplete']} not ACKed by every "
        f"router within 10 s); setup: all nodes routed {s['routed_after_s']:.0f} s after the "
        f"first registration, routers subscribed in {s['routers_connected_in_s']:.0f} s "
        f"(waves of {s['wave']}); {r.get('routers_updates', 0):,} updates received by the "
        f"routers, {r.get('routers_snapshots', 0):,} of them snapshots.",
    ]
    if r.get("note"):
        lines += ["", r["note"]]
    if show and "commands" in r:
        lines += ["", "<details><summary>Commands of scenario 4</summary>", "", "```sh"]
        lines += [f"{show(cmd)} &   # {name}" for name, cmd in r["commands"]["processes"]]
        lines += [show(r["commands"]["driver"]), "```", "", "</details>", ""]
    return lines


def terminal(r: dict) -> list[str]:
    lines = [f"Scenario 4, control-plane scale ({r.get('mode', '?')} mode): {r['nodes']:,} "
             f"nodes, {r['routers']:,} routers", ""]
    return lines + [f"  {a}: {b}" + (f"  (target {c}: {d})" if c else "")
                    for a, b, c, d in rows(r)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 nodes, 200 routers, 20 changes")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--routers", type=int)
    ap.add_argument("--changes", type=int)
    ap.add_argument("--steady-secs", type=int)
    ap.add_argument("--probe-interval", default=PROBE_INTERVAL)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", type=Path,
                    help="result file (default bench/.peers/cp-scale[-quick].json)")
    ap.add_argument("--render", type=Path, help="print the markdown of a saved result and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    a = ap.parse_args()

    if a.render:
        print("\n".join(markdown(json.loads(a.render.read_text()))))
        return

    params = dict(MODES["quick" if a.quick else "full"], probe_interval=a.probe_interval)
    for k, v in (("nodes", a.nodes), ("routers", a.routers), ("changes", a.changes),
                 ("steady_s", a.steady_secs)):
        if v:
            params[k] = v
    out = a.out or RESULTS / ("cp-scale-quick.json" if a.quick else "cp-scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "fulcrum", "-p", "fulcrum-bench-cp"],
                       cwd=ROOT, check=True)
    fulcrum = str(ROOT / "target" / "release" / "fulcrum")
    driver = str(ROOT / "target" / "release" / "fulcrum-bench-cp")

    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-cp-scale-"))
    procs = Procs(tmp)

    def on_signal(signum, _frame):
        procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        r = run_scale(procs, fulcrum, driver, params, tmp, out)
        r["params"] = params
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.write_text(json.dumps(r, indent=2))
        print("\n".join(markdown(r)))
        print(f"\n(result: {out})", file=sys.stderr)
    finally:
        procs.stop_all()
        if a.keep:
            print(f"(logs kept in {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
