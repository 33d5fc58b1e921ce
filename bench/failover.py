"""Scenario 3: data-center failover at 1,000 calls/s.

Two regions of four node-sims each. Clients in region `a` call their local entry point at a
steady 1,000 calls/s; a few seconds in, region `a` is lost: its four nodes and (for Fulcrum) its
control-plane replica. Two ways of losing it:

- `crash`: the processes are killed (SIGKILL): connections are reset, new ones refused;
- `hang`: the processes are frozen (SIGSTOP): connections stay open and nothing answers, as in
  a network partition or a hung machine; only timeouts reveal it.

Measured, per contender and variant: failed calls (target 0), and the **time to full failover**:
from the loss to the due time of the last call that did not succeed at its first attempt on a
region-`b` node (a call that failed, or needed a retry). After it, every call is served by `b`
at the first attempt. Also the latency of the calls due in the second after the loss.

Contenders, each set up as an operator would for this job, with the same per-attempt timeout
(200 ms: a hundred times the nodes' service time) and two retries:

- `fulcrum`: etcd, two control-plane replicas (`a`, `b`), a router for region `a` following
  replica `a` then `b`; nodes registered with their region; the model's policy sets the
  per-attempt timeout;
- `envoy`: one cluster, region `a` at priority 0 and `b` at priority 1 (Envoy's failover
  between localities), LEAST_REQUEST, active gRPC health checks (1 s interval, unhealthy after
  2, as Fulcrum's probes), outlier detection (5 consecutive failures, up to 100 % ejected),
  retries on unavailable/reset/connect-failure/resource-exhausted to other hosts;
- `nginx`: `least_conn` over region `a`'s nodes with region `b`'s as `backup`,
  `grpc_next_upstream error timeout` (3 tries), 200 ms connect/read timeouts.

Started by suite.py (`--scenarios 3`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from quality import commands_block, machine_load, target_lines
from suite import Procs, envoy_config, free_port, log, nginx_config, run_until_ok

SERVICE = "lognormal:2ms,0.3"
SLOTS = 32
QUEUE = 256
NODES_PER_REGION = 4
RATE = 1000
PER_TRY_MS = 200
CALL_TIMEOUT = "5s"
BUCKET_MS = 10  # timeline resolution: the failover time is known to within this

CONTENDERS = ["fulcrum", "envoy", "nginx"]
VARIANTS = ["crash", "hang"]

MODES = {
    "quick": {"repeats": 1, "run_s": 12, "kill_at_s": 5},
    "full": {"repeats": 3, "run_s": 20, "kill_at_s": 8},
}


def etcd_binary() -> str:
    for p in (os.environ.get("FULCRUM_ETCD"), "/usr/bin/etcd", "/usr/local/bin/etcd",
              shutil.which("etcd")):
        if p and os.access(p, os.X_OK):
            return p
    raise RuntimeError("etcd not found: bench/run.sh installs Debian's etcd-server")


def envoy_failover_config(port: int, admin: int, a: list[int], b: list[int]) -> dict:
    cfg = copy.deepcopy(envoy_config(port, admin, a))
    cluster = cfg["static_resources"]["clusters"][0]
    cluster["lb_policy"] = "LEAST_REQUEST"
    cluster["load_assignment"]["endpoints"] = [
        {"priority": prio, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": p}}}} for p in ports]}
        for prio, ports in ((0, a), (1, b))]
    cluster["health_checks"] = [{
        "timeout": "1s", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 2,
        "grpc_health_check": {},
    }]
    cluster["outlier_detection"] = {
        "consecutive_5xx": 5, "consecutive_gateway_failure": 5, "interval": "1s",
        "base_ejection_time": "5s", "max_ejection_percent": 100,
    }
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    vhost["include_attempt_count_in_response"] = True
    vhost["routes"][0]["route"]["retry_policy"] = {
        "retry_on": "unavailable,reset,connect-failure,resource-exhausted",
        "num_retries": 2,
        "per_try_timeout": f"{PER_TRY_MS / 1000:g}s",
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {
                                      "@type": "type.googleapis.com/envoy.extensions.retry.host."
                                               "previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3,
        # Retries move to the next priority (region b) once one failed in region a.
        "retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
                           "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.retry.priority."
                                        "previous_priorities.v3.PreviousPrioritiesConfig",
                               "update_frequency": 1}},
    }
    return cfg


def nginx_failover_config(tmp: Path, port: int, a: list[int], b: list[int]) -> str:
    return nginx_config(tmp, port, a, "auto", backup=b, location_extra=[
        "grpc_next_upstream error timeout;",
        "grpc_next_upstream_tries 3;",
        f"grpc_connect_timeout {PER_TRY_MS}ms;",
        f"grpc_read_timeout {PER_TRY_MS}ms;",
        f"grpc_send_timeout {PER_TRY_MS}ms;",
    ])


class Scenario:
    def __init__(self, fulcrum: str, envoy: str, nginx: str, mode_name: str, tmp: Path):
        self.f = fulcrum
        self.envoy = envoy
        self.nginx = nginx
        self.mode_name = mode_name
        self.mode = MODES[mode_name]
        self.root = tmp / "failover"
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.root)  # replaced per trial; the suite stops the current one
        self.commands: dict[str, list[str]] = {}
        self.configs: dict[str, str] = {}

    def load_cmd(self, target: str, seconds: float) -> list[str]:
        return [self.f, "load", "--target", target, "--rps", str(RATE), "--duration",
                f"{seconds:g}s", "--connections", "4", "--timeout", CALL_TIMEOUT,
                "--timeline", f"{BUCKET_MS}ms", "--json"]

    def load(self, target: str, seconds: float) -> dict:
        p = subprocess.run(self.load_cmd(target, seconds), capture_output=True, text=True,
                           timeout=seconds + 40)
        if p.returncode != 0:
            return {"failed": (p.stderr.strip() or p.stdout.strip())[-500:]}
        return json.loads(p.stdout)

    # -- one trial: a fresh stack, load, loss of region a ------------------------------------

    def trial(self, contender: str, variant: str, rep: int) -> dict:
        tmp = self.root / f"{contender}-{variant}-{rep}"
        tmp.mkdir()
        self.procs = procs = Procs(tmp)
        f = self.f
        ports = {"a": [], "b": []}
        victims: list[subprocess.Popen] = []
        for region in ("a", "b"):
            for i in range(1, NODES_PER_REGION + 1):
                port = free_port()
                ports[region].append(port)
                p = procs.start(f"node-{region}-{i}", [
                    f, "node-sim", "--listen", f"127.0.0.1:{port}", "--name", f"{region}-{i}",
                    "--service-time", SERVICE, "--slots", str(SLOTS), "--queue", str(QUEUE)])
                if region == "a":
                    victims.append(p)
        if contender == "fulcrum":
            target = self.start_fulcrum(procs, tmp, ports, victims)
        elif contender == "envoy":
            port, admin = free_port(), free_port()
            conf = tmp / "envoy.json"
            text = json.dumps(envoy_failover_config(port, admin, ports["a"], ports["b"]),
                              indent=2)
            conf.write_text(text)
            self.configs.setdefault("envoy", text)
            procs.start("envoy", [self.envoy, "-c", str(conf), "--log-level", "warn",
                                  "--disable-hot-restart"])
            target = f"127.0.0.1:{port}"
        else:
            port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_failover_config(tmp, port, ports["a"], ports["b"]))
            self.configs.setdefault("nginx", conf.read_text())
            procs.start("nginx", [self.nginx, "-p", str(tmp), "-c", str(conf), "-e",
                                  str(tmp / "error.log"), "-g", "daemon off;"])
            target = f"127.0.0.1:{port}"
        self.wait_ready(target, contender)
        # Warm: every node of region a has served before the measured run.
        self.load(target, 2)

        m = self.mode
        self.commands.setdefault(contender, self.load_cmd(target, m["run_s"]))
        killed_at: list[float] = []
        sig = signal.SIGKILL if variant == "crash" else signal.SIGSTOP

        def lose_region_a() -> None:
            killed_at.append(time.time())
            for p in victims:
                try:
                    os.kill(p.pid, sig)
                except OSError:
                    pass

        leader = None
        if contender == "fulcrum":
            p = subprocess.run([self.f, "ctl", "--control", self.cps["b"], "status"],
                               capture_output=True, text=True, timeout=10)
            for line in p.stdout.splitlines():
                if line.startswith("leader"):
                    leader = line.split()[1]
        timer = threading.Timer(m["kill_at_s"], lose_region_a)
        t0 = time.time()
        timer.start()
        rep_ = self.load(target, m["run_s"])
        timer.join()
        if variant == "hang":
            for p in victims:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except OSError:
                    pass
        procs.stop_all()
        if "failed" in rep_:
            return {"failed": rep_["failed"], "contender": contender, "variant": variant}
        kill_offset_ms = (killed_at[0] - rep_["started_unix_us"] / 1e6) * 1e3 if killed_at \
            else (m["kill_at_s"] - (rep_["started_unix_us"] / 1e6 - t0)) * 1e3
        out = analyse(rep_, kill_offset_ms, contender, variant)
        out["leader_before"] = leader
        return out

    def start_fulcrum(self, procs: Procs, tmp: Path, ports: dict,
                      victims: list[subprocess.Popen]) -> str:
        f = self.f
        client, peer = free_port(), free_port()
        procs.start("etcd", [
            etcd_binary(), "--name=bench", f"--data-dir={tmp}/etcd",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bench=http://127.0.0.1:{peer}", "--log-level=warn"])
        store = f"etcd://127.0.0.1:{client}"
        cps = {}
        for region in ("a", "b"):
            addr = f"127.0.0.1:{free_port()}"
            cps[region] = addr
            p = procs.start(f"control-{region}", [
                f, "control", "--store", store, "--listen", addr, "--id", f"control-{region}",
                "--admin-trust-loopback"])
            if region == "a":
                victims.append(p)
                # Replica a campaigns first, so it is usually the leader when region a is lost:
                # the harder case (leadership must move too). Which one leads is recorded.
                run_until_ok([f, "ctl", "--control", addr, "status"], "replica a's status", 30)
        self.cps = cps
        for region in ("a", "b"):
            for i, port in enumerate(ports[region], 1):
                run_until_ok([f, "ctl", "--control", cps["b"], "register", "--id",
                              f"{region}-{i}", "--address", f"127.0.0.1:{port}", "--region",
                              region, "--models", "echo", "--capacity", str(SLOTS)],
                             f"registering {region}-{i}", 30)
        run_until_ok([f, "ctl", "--control", cps["b"], "policy", "set", "echo",
                      "--per-try-timeout", f"{PER_TRY_MS}ms"], "setting the echo policy", 30)
        port = free_port()
        procs.start("router-a", [f, "router", "--region", "a", "--control",
                                 f"{cps['a']},{cps['b']}", "--listen", f"127.0.0.1:{port}",
                                 "--id", "router-a"])
        self.fulcrum_procs = [(n, c) for n, c in procs.commands]
        return f"127.0.0.1:{port}"

    def wait_ready(self, target: str, name: str, within_s: float = 40) -> None:
        deadline = time.time() + within_s
        last = None
        while time.time() < deadline:
            self.procs.check_alive()
            p = subprocess.run([self.f, "load", "--target", target, "--rps", "100",
                                "--duration", "0.5s", "--timeout", "1s", "--json"],
                               capture_output=True, text=True, timeout=30)
            if p.returncode == 0:
                r = json.loads(p.stdout)
                # Ready when every call succeeds and region a serves them (for Fulcrum: the
                # router has its table and prefers its own region).
                if r["ok"] == r["sent"] > 0 and all(n.startswith("a-") for n in r["nodes"]):
                    return
                last = r["errors"] or r["nodes"]
            else:
                last = p.stderr.strip()[-200:]
            time.sleep(0.3)
        raise RuntimeError(f"scenario 3: {name} at {target} not ready within {within_s:g}s "
                           f"({last})")

    def run(self) -> dict:
        m = self.mode
        log(f"scenario 3: {m['repeats']} repeat(s) of {len(CONTENDERS)} contenders × "
            f"{len(VARIANTS)} ways of losing region a; {RATE} calls/s for {m['run_s']} s, "
            f"region a lost {m['kill_at_s']} s in")
        trials = []
        for r in range(m["repeats"]):
            for v in VARIANTS:
                k = r % len(CONTENDERS)
                for c in CONTENDERS[k:] + CONTENDERS[:k]:
                    t = self.trial(c, v, r)
                    t["repeat"] = r
                    trials.append(t)
                    log(f"  {v} {c} #{r}: " + brief(t))
        return {"mode": self.mode_name, "params": m, "trials": trials,
                "summary": summarize(trials), "configs": self.configs,
                "commands": {"fulcrum": getattr(self, "fulcrum_procs", []),
                             "load": self.commands}}


def analyse(rep: dict, kill_ms: float, contender: str, variant: str) -> dict:
    """Failed calls and the time to full failover from a run's timeline."""
    timeline = rep["timeline"]
    last_bad = None  # start of the last bucket after the loss with a call not served cleanly
    after = [b for b in timeline if b["t_ms"] + BUCKET_MS > kill_ms]
    for b in after:
        on_a = sum(n for node, n in b["ok"].items() if node.startswith("a-"))
        if b["failed"] or b["retried"] or on_a:
            last_bad = b["t_ms"]
    failover_ms = None if last_bad is None else max(0.0, last_bad + BUCKET_MS - kill_ms)
    second = [b for b in after if b["t_ms"] < kill_ms + 1000]
    # Failed, retried and region-a calls per 100 ms from the loss on, to see how it unfolds.
    series: dict[int, list[int]] = {}
    for b in after:
        k = int((b["t_ms"] - kill_ms) // 100) * 100
        row = series.setdefault(k, [0, 0, 0, 0])
        row[0] += b["failed"]
        row[1] += b["retried"]
        row[2] += sum(n for node, n in b["ok"].items() if node.startswith("a-"))
        row[3] += sum(b["ok"].values()) + b["failed"]
    return {
        "contender": contender, "variant": variant,
        "sent": rep["sent"], "ok": rep["ok"], "errors": rep["errors"],
        "failed": sum(rep["errors"].values()) + rep["dropped"],
        "retried": rep.get("retried", 0),
        "failover_ms": failover_ms,
        "first_second_max_us": max((b["max_us"] for b in second), default=0),
        "first_second_p99_us": max((b["p99_us"] for b in second), default=0),
        "latency": rep["latency"], "kill_ms": kill_ms,
        "series_100ms": [[k] + v for k, v in sorted(series.items())],
        "served_after": sum(n for b in after for node, n in b["ok"].items()
                            if node.startswith("b-")),
    }


def brief(t: dict) -> str:
    if "latency" not in t:
        return "FAILED " + str(t.get("failed"))[:120]
    fo = "none needed" if t["failover_ms"] is None else f"{t['failover_ms']:.0f} ms"
    return (f"failed {t['failed']}/{t['sent']}, retried {t['retried']}, full failover {fo}, "
            f"worst latency in the first second {t['first_second_max_us'] / 1e3:.0f} ms")


def summarize(trials: list[dict]) -> dict:
    out = {}
    for v in VARIANTS:
        for c in CONTENDERS:
            ts = [t for t in trials if t["contender"] == c and t["variant"] == v
                  and "latency" in t]
            if not ts:
                out[f"{v}/{c}"] = {"failed_runs": True}
                continue
            fos = [t["failover_ms"] or 0.0 for t in ts]
            out[f"{v}/{c}"] = {
                "trials": len(ts), "failed": sum(t["failed"] for t in ts),
                "sent": sum(t["sent"] for t in ts), "retried": sum(t["retried"] for t in ts),
                "failover_ms_max": max(fos), "failover_ms_all": fos,
                "first_second_max_us": max(t["first_second_max_us"] for t in ts),
            }
    return out


def leaders(res: dict) -> str:
    ts = [t for t in res["trials"] if t.get("contender") == "fulcrum" and "latency" in t]
    led = sum(1 for t in ts if t.get("leader_before") == "control-a")
    known = sum(1 for t in ts if t.get("leader_before"))
    if not known:
        return "started first, so usually the leader"
    return f"the leader in {led} of {len(ts)} trials, so that leadership had to move too"


def tables(res: dict) -> list[str]:
    lines = ["| loss | contender | trials | failed calls | retried calls | time to full "
             "failover (each trial) | worst latency, first second |",
             "|---|---|---|---|---|---|---|"]
    for key, s in res["summary"].items():
        v, c = key.split("/")
        if s.get("failed_runs"):
            lines.append(f"| {v} | {c} | runs failed |||||")
            continue
        each = ", ".join(f"{x:.0f} ms" for x in s["failover_ms_all"])
        lines.append(f"| {v} | {c} | {s['trials']} | {s['failed']} / {s['sent']} | "
                     f"{s['retried']} | {each} | {s['first_second_max_us'] / 1e3:.0f} ms |")
    return lines + [""]


def targets_check(res: dict) -> list[tuple[bool, str]]:
    checks = []
    for v in VARIANTS:
        s = res["summary"].get(f"{v}/fulcrum", {})
        if s.get("failed_runs") or not s:
            checks.append((False, f"{v}: the fulcrum runs failed"))
            continue
        checks.append((s["failed"] == 0, f"{v}: fulcrum failed calls {s['failed']} of "
                                         f"{s['sent']} (target 0)"))
        checks.append((s["failover_ms_max"] <= 1000,
                       f"{v}: fulcrum time to full failover, worst of {s['trials']}: "
                       f"{s['failover_ms_max']:.0f} ms (target ≤ 1,000 ms)"))
    return checks


def markdown(res: dict, show) -> list[str]:
    p = res["params"]
    lines = [
        "## Scenario 3: data-center failover",
        "",
        f"*Run: {res['environment']['date']}, {res['mode']} mode, commit "
        f"`{res['environment']['commit'][:12]}`. {machine_load(res['environment'])}*",
        "",
        f"Four node-sims per region (`{SERVICE}`, {SLOTS} slots). Clients of region `a` send "
        f"{RATE} calls/s (evenly spaced) to their entry point for {p['run_s']} s; "
        f"{p['kill_at_s']} s in, region `a` is lost: its four nodes and, for Fulcrum, its "
        "control-plane replica (" + leaders(res) + "), either **crash** (SIGKILL: "
        "connections reset, new ones refused) or **hang** (SIGSTOP: connections stay open, "
        "nothing answers; only timeouts tell). Every contender is configured as an operator "
        f"would for this job, with the same per-attempt timeout ({PER_TRY_MS} ms) and two "
        "retries: Fulcrum (etcd, two control-plane replicas, a router for region `a` following "
        "replica `a` then `b`, nodes registered with their regions, `per_try_timeout` in the "
        "model's policy); Envoy (region `a` at priority 0 and `b` at priority 1, LEAST_REQUEST, "
        "gRPC health checks every 1 s, outlier detection after 5 failures with up to 100 % "
        "ejected, retries to other hosts); nginx (`least_conn`, region `b` as `backup`, "
        "`grpc_next_upstream error timeout`, 3 tries). A fresh stack per trial; "
        f"{p['repeats']} trial(s) per contender and loss, interleaved.",
        "",
        f"**Time to full failover**: from the loss to the end of the last {BUCKET_MS} ms bucket "
        "(by due time) holding a call that did not succeed at its first attempt on a `b` node "
        "(failed, or retried, or still served by `a`). Calls that started before the loss and "
        "were retried after it are not counted against it.",
        "",
    ]
    lines += tables(res)
    checks = targets_check(res)
    lines += ["Targets (data-plane issue): zero failed calls, full failover within 1 s. "
              f"{sum(ok for ok, _ in checks)} of {len(checks)} met:", ""]
    lines += target_lines(checks, markdown=True)
    return lines + commands_block("Commands of scenario 3 (one trial)",
                                  res["commands"]["fulcrum"], [], res["commands"]["load"], show)


def terminal(res: dict) -> list[str]:
    lines = [f"Scenario 3, data-center failover ({res['mode']} mode)", ""] + tables(res)
    return lines + target_lines(targets_check(res), markdown=False)
