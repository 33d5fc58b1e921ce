"""Scenario 2: routing quality under uneven nodes.

Eight node-sims behind each contender, deliberately uneven (the data-plane issue's setup): five
ordinary nodes, two three times slower, and one that stalls for 2 s every 30 s (a long
garbage-collection pause, a GPU reset: it completes nothing meanwhile). Poisson arrivals (the
same seed for every contender at a level) at 70 %, 85 % and 95 % of the fleet's total capacity;
p50, p99, p99.9 and errors per contender, the contenders interleaved in rounds on the same
node-sims. The reference is a join-the-shortest-queue oracle, a discrete-event simulation of the
same nodes and arrivals (bench/oracle.py).

Contenders:
- `fulcrum`: a Fulcrum router, default policy (p2c-ewma: control-plane weights × local
  power-of-two-choices on peak-EWMA latency × in-flight; per-node limit = capacity = slots);
- `fulcrum-rr`: the same router, model policy `round-robin` (smooth weighted round robin over
  the control plane's weights);
- `envoy-lr`: Envoy, `LEAST_REQUEST` (power of two choices on active requests);
- `envoy-rr`: Envoy, `ROUND_ROBIN` (plain round robin: the baseline "round robin" of the
  targets);
- `nginx`: nginx `grpc_pass`, `least_conn`;
- `jsq` (simulated): the oracle; `rr-sim` (simulated round robin) checks the model against the
  measured round-robin contenders.

Both Envoys retry a call on `resource-exhausted`, `unavailable`, `reset` and `connect-failure`
(two retries, as Fulcrum's default of three attempts), so that neither side is judged on a
retry setting. Started by suite.py (`--scenarios 2`).
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

import oracle
from suite import Procs, envoy_config, free_port, log, nginx_config, run_until_ok

# The fleet. Service times are tens of milliseconds so that routing, not the proxies' own
# microseconds, decides the latencies, and so that 95 % of the fleet's capacity (about 1,200
# calls/s) leaves this two-core machine room for the load generator, a proxy and eight
# node-sims.
NORMAL = "lognormal:20ms,0.3"
SLOW = "lognormal:60ms,0.3"  # three times slower
SLOTS = 4
QUEUE = 64
STALL_LEN_S = 2.0
FLEET = [(f"n{i}", NORMAL) for i in range(1, 6)] + [("slow1", SLOW), ("slow2", SLOW),
                                                     ("stall", NORMAL)]
STALLING = "stall"
LOADGEN_CONNECTIONS = 4
CALL_TIMEOUT = "5s"  # the seed article's per-call deadline: a call stuck longer fails

CONTENDERS = ["fulcrum", "fulcrum-rr", "envoy-lr", "envoy-rr", "nginx"]
MODEL = {"fulcrum": "echo", "fulcrum-rr": "echo-rr"}

MODES = {
    # Quick: one level, one round, a stall in each 12 s run.
    "quick": {"levels": [0.85], "rounds": 1, "run_s": 12, "stall_at_s": 4, "warm_s": 4,
              "oracle_runs": 3},
    # Full: each 30 s run holds one stall (every 30 s), 10 s in.
    "full": {"levels": [0.70, 0.85, 0.95], "rounds": 2, "run_s": 30, "stall_at_s": 10,
             "warm_s": 8, "oracle_runs": 5},
}


def fleet_nodes(run_s: float, stall_at_s: float) -> list[oracle.Node]:
    out = []
    for name, spec in FLEET:
        median, sigma = oracle.parse_service(spec)
        stalls = ((stall_at_s, STALL_LEN_S),) if name == STALLING else ()
        out.append(oracle.Node(name, median, sigma, SLOTS, QUEUE, stalls))
    return out


def envoy_quality_config(port: int, admin: int, nodes: list[int], lb_policy: str) -> dict:
    cfg = copy.deepcopy(envoy_config(port, admin, nodes))
    cluster = cfg["static_resources"]["clusters"][0]
    cluster["lb_policy"] = lb_policy
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    vhost["include_attempt_count_in_response"] = True
    vhost["routes"][0]["route"]["retry_policy"] = {
        "retry_on": "resource-exhausted,unavailable,reset,connect-failure",
        "num_retries": 2,
    }
    # Calls may last seconds behind a stalled node; Envoy's default route timeout (15 s) is
    # above the load generator's deadline, so the generator's deadline decides, as for the
    # others.
    return cfg


class Scenario:
    def __init__(self, fulcrum: str, envoy: str, nginx: str, mode_name: str, tmp: Path):
        self.f = fulcrum
        self.envoy = envoy
        self.nginx = nginx
        self.mode_name = mode_name
        self.mode = MODES[mode_name]
        self.tmp = tmp / "quality"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.tmp)
        self.commands: dict[str, list[str]] = {}

    # -- processes ----------------------------------------------------------------------------

    def start(self) -> None:
        f = self.f
        self.ports = {}
        for i, (name, spec) in enumerate(FLEET, 1):
            port = free_port()
            self.ports[name] = port
            self.procs.start(f"node-{name}", [
                f, "node-sim", "--listen", f"127.0.0.1:{port}", "--name", name,
                "--models", "echo,echo-rr", "--service-time", spec, "--slots", str(SLOTS),
                "--queue", str(QUEUE), "--seed", str(100 + i)])
        self.control = f"127.0.0.1:{free_port()}"
        self.procs.start("control", [
            f, "control", "--store", f"embedded:{self.tmp}/store.json", "--listen",
            self.control, "--probe-interval", "500ms", "--admin-trust-loopback"])
        self.register = []
        for name, _ in FLEET:
            cmd = [f, "ctl", "--control", self.control, "register", "--id", name, "--address",
                   f"127.0.0.1:{self.ports[name]}", "--region", "a", "--models", "echo,echo-rr",
                   "--capacity", str(SLOTS)]
            self.register.append(cmd)
            run_until_ok(cmd, f"registering {name}")
        policy = [f, "ctl", "--control", self.control, "policy", "set", "echo-rr",
                  "--balancer", "round-robin"]
        self.register.append(policy)
        run_until_ok(policy, "setting the echo-rr policy")

        self.targets = {}
        port = free_port()
        self.procs.start("fulcrum", [f, "router", "--region", "a", "--control", self.control,
                                     "--listen", f"127.0.0.1:{port}", "--id", "quality-router"])
        self.targets["fulcrum"] = self.targets["fulcrum-rr"] = f"127.0.0.1:{port}"
        ports = [self.ports[n] for n, _ in FLEET]
        self.configs = {}
        for name, policy_name in (("envoy-lr", "LEAST_REQUEST"), ("envoy-rr", "ROUND_ROBIN")):
            port, admin = free_port(), free_port()
            conf = self.tmp / f"{name}.json"
            text = json.dumps(envoy_quality_config(port, admin, ports, policy_name), indent=2)
            conf.write_text(text)
            self.configs[name] = text
            self.procs.start(name, [self.envoy, "-c", str(conf), "--log-level", "warn",
                                    "--disable-hot-restart"])
            self.targets[name] = f"127.0.0.1:{port}"
        port = free_port()
        ndir = self.tmp / "nginx"
        ndir.mkdir(exist_ok=True)
        conf = ndir / "nginx.conf"
        conf.write_text(nginx_config(ndir, port, ports, "auto"))
        self.configs["nginx"] = conf.read_text()
        self.procs.start("nginx", [self.nginx, "-p", str(ndir), "-c", str(conf), "-e",
                                   str(ndir / "error.log"), "-g", "daemon off;"])
        self.targets["nginx"] = f"127.0.0.1:{port}"
        for c in CONTENDERS:
            self.wait_ready(c)

    def wait_ready(self, c: str, within_s: float = 40) -> None:
        deadline = time.time() + within_s
        last = None
        while time.time() < deadline:
            self.procs.check_alive()
            r = self.load(c, 50, 0.5, seed=1)
            if "failed" not in r and r["sent"] > 0 and r["ok"] == r["sent"]:
                log(f"scenario 2: {c} ready at {self.targets[c]}")
                return
            last = r.get("failed") or r.get("errors")
            time.sleep(0.3)
        raise RuntimeError(f"scenario 2: {c} not ready within {within_s:g}s ({last})")

    # -- load ---------------------------------------------------------------------------------

    def load_cmd(self, c: str, rps: float, seconds: float, seed: int) -> list[str]:
        return [self.f, "load", "--target", self.targets[c], "--model", MODEL.get(c, "echo"),
                "--rps", f"{rps:.0f}", "--duration", f"{seconds:g}s", "--arrivals", "poisson",
                "--seed", str(seed), "--connections", str(LOADGEN_CONNECTIONS),
                "--timeout", CALL_TIMEOUT, "--json"]

    def load(self, c: str, rps: float, seconds: float, seed: int,
             stall_at: float | None = None) -> dict:
        cmd = self.load_cmd(c, rps, seconds, seed)
        self.commands.setdefault(c, cmd)
        stall_cmd = [self.f, "ctl", "sim", f"127.0.0.1:{self.ports[STALLING]}", "--stall",
                     f"{STALL_LEN_S:g}s"]
        self.commands.setdefault("stall", stall_cmd)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timer = None
        if stall_at is not None:
            timer = threading.Timer(stall_at, lambda: subprocess.run(
                stall_cmd, capture_output=True, timeout=10, check=False))
            timer.start()
        try:
            out, err = p.communicate(timeout=seconds + 40)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return {"failed": "load generator did not finish in time"}
        finally:
            if timer is not None:
                timer.join()
        if p.returncode != 0:
            return {"failed": (err.strip() or out.strip())[-500:]}
        return json.loads(out)

    # -- the scenario -------------------------------------------------------------------------

    def run(self) -> dict:
        self.start()
        m = self.mode
        nodes = fleet_nodes(m["run_s"], m["stall_at_s"])
        capacity = sum(n.capacity(m["run_s"]) for n in nodes)
        log(f"scenario 2: fleet capacity {capacity:.0f} calls/s; levels "
            f"{', '.join(f'{x:.0%}' for x in m['levels'])}; {m['rounds']} rounds of "
            f"{len(CONTENDERS)} runs of {m['run_s']} s")
        for c in CONTENDERS:  # learn the fleet (weights, latency estimates) before measuring
            self.load(c, m["levels"][0] * capacity, m["warm_s"], seed=999)
        levels = {}
        for li, level in enumerate(m["levels"]):
            rate = level * capacity
            runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
            for r in range(m["rounds"]):
                k = (r + li) % len(CONTENDERS)
                order = CONTENDERS[k:] + CONTENDERS[:k]
                seed = 1000 * (li + 1) + r  # the same arrivals for every contender
                for c in order:
                    self.procs.check_alive()
                    rep = self.load(c, rate, m["run_s"], seed, stall_at=m["stall_at_s"])
                    rep["round"] = r
                    runs[c].append(rep)
                    log(f"  {level:.0%} round {r} {c}: " + brief(rep))
                    time.sleep(STALL_LEN_S / 2)  # let every queue drain between runs
            sim = {pol: oracle.reference(nodes, rate, m["run_s"],
                                         list(range(1, m["oracle_runs"] + 1)), pol)
                   for pol in ("jsq", "rr")}
            levels[f"{level:.0%}"] = {"level": level, "rate": rate, "runs": runs,
                                      "summary": summarize(runs, sim), "oracle": sim}
        return {"mode": self.mode_name, "params": m, "capacity": capacity,
                "fleet": [{"name": n, "service": s, "slots": SLOTS, "queue": QUEUE,
                           "stalls": f"{STALL_LEN_S:g} s, {m['stall_at_s']} s into every run"
                           if n == STALLING else ""} for n, s in FLEET],
                "levels": levels, "configs": self.configs,
                "commands": {"processes": self.procs.commands, "register": self.register,
                             "load": self.commands}}


def brief(rep: dict) -> str:
    if "failed" in rep:
        return "FAILED " + rep["failed"][:100]
    lat = rep["latency"]
    errs = sum(rep["errors"].values()) + rep["dropped"]
    return (f"p50 {lat['p50_us'] / 1e3:.1f} ms, p99 {lat['p99_us'] / 1e3:.1f} ms, "
            f"p99.9 {lat['p999_us'] / 1e3:.1f} ms, errors {errs}/{rep['sent']}, "
            f"retried {rep.get('retried', 0)}")


def summarize(runs: dict[str, list[dict]], sim: dict) -> dict:
    """Per contender: the median over rounds of each percentile; errors summed; shares."""
    out = {}
    for c, reps in runs.items():
        good = [r for r in reps if "failed" not in r]
        if not good:
            out[c] = {"failed": True}
            continue
        med = lambda k: statistics.median(r["latency"][k] for r in good)  # noqa: E731
        ok = sum(r["ok"] for r in good)
        slow = sum(r["nodes"].get(n, 0) for r in good for n in ("slow1", "slow2"))
        stalled = sum(r["nodes"].get(STALLING, 0) for r in good)
        out[c] = {"p50_us": med("p50_us"), "p99_us": med("p99_us"), "p999_us": med("p999_us"),
                  "max_us": max(r["latency"]["max_us"] for r in good),
                  "sent": sum(r["sent"] for r in good),
                  "errors": sum(sum(r["errors"].values()) + r["dropped"] for r in good),
                  "error_codes": merge_counts([r["errors"] for r in good]),
                  "retried": sum(r.get("retried", 0) for r in good),
                  "slow_share": slow / max(1, ok), "stall_share": stalled / max(1, ok),
                  "rounds": len(good)}
    for pol, name in (("jsq", "jsq"), ("rr", "rr-sim")):
        s = sim[pol]
        total = max(1, s["sent"] - s["errors"])
        out[name] = {"p50_us": s["p50_us"], "p99_us": s["p99_us"], "p999_us": s["p999_us"],
                     "max_us": s["max_us"], "sent": s["sent"], "errors": s["errors"],
                     "slow_share": (s["served"]["slow1"] + s["served"]["slow2"]) / total,
                     "stall_share": s["served"][STALLING] / total, "simulated": True,
                     "rounds": s["runs"]}
    return out


def merge_counts(maps: list[dict]) -> dict:
    out: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return out


# -- reporting ---------------------------------------------------------------------------------

ROWS = CONTENDERS + ["jsq", "rr-sim"]


def ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1e3:.1f} ms"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}×"


def tables(res: dict) -> list[str]:
    lines = []
    for label, lv in res["levels"].items():
        s = lv["summary"]
        lines += [f"**{label} of capacity** ({lv['rate']:.0f} calls/s, Poisson):", "",
                  "| contender | p50 | p99 | p99.9 | max | errors | retried | to slow nodes | "
                  "to the stalling node | p99 vs envoy-rr | p99 vs envoy-lr | p99 vs jsq |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in ROWS:
            v = s.get(c)
            if v is None or v.get("failed"):
                lines.append(f"| {c} | failed |||||||||||")
                continue
            name = f"{c} (simulated)" if v.get("simulated") else c
            err = f"{v['errors']} / {v['sent']}"
            if v.get("error_codes"):
                err += " (" + ", ".join(f"{k} {n}" for k, n in sorted(v["error_codes"].items())) \
                    + ")"
            lines.append(
                f"| {name} | {ms(v['p50_us'])} | {ms(v['p99_us'])} | {ms(v['p999_us'])} | "
                f"{ms(v['max_us'])} | {err} | {v.get('retried', '–')} | "
                f"{100 * v['slow_share']:.1f} % | {100 * v['stall_share']:.1f} % | "
                f"{ratio(v['p99_us'], s.get('envoy-rr', {}).get('p99_us'))} | "
                f"{ratio(v['p99_us'], s.get('envoy-lr', {}).get('p99_us'))} | "
                f"{ratio(v['p99_us'], s['jsq']['p99_us'])} |")
        lines.append("")
    return lines


def targets_check(res: dict) -> list[tuple[bool, str]]:
    checks = []
    for label, lv in res["levels"].items():
        s = lv["summary"]
        f = s.get("fulcrum", {})
        if f.get("failed") or not f:
            checks.append((False, f"{label}: the fulcrum runs failed"))
            continue
        # Round robin is the naive algorithm (Envoy's): Fulcrum's own round-robin policy also
        # skips nodes at their concurrency limit, so it is reported beside (see `notes`).
        o = s.get("envoy-rr", {})
        if o and not o.get("failed"):
            ok = f["p99_us"] <= 0.5 * o["p99_us"] and f["errors"] <= o["errors"]
            checks.append((ok, f"{label}: fulcrum p99 {ms(f['p99_us'])} vs envoy-rr "
                               f"{ms(o['p99_us'])} ({ratio(f['p99_us'], o['p99_us'])}, "
                               f"target ≤ 0.50×); errors {f['errors']} vs {o['errors']}"))
        o = s.get("envoy-lr", {})
        if o and not o.get("failed"):
            ok = f["p99_us"] <= o["p99_us"] and f["errors"] <= o["errors"]
            checks.append((ok, f"{label}: fulcrum p99 {ms(f['p99_us'])} vs envoy-lr "
                               f"{ms(o['p99_us'])} ({ratio(f['p99_us'], o['p99_us'])}, target "
                               f"≤ 1×); errors {f['errors']} vs {o['errors']}"))
    return checks


def notes(res: dict) -> list[str]:
    """Comparisons reported beside the targets: p2c-ewma against Fulcrum's own round robin."""
    out = []
    for label, lv in res["levels"].items():
        s = lv["summary"]
        f, o = s.get("fulcrum", {}), s.get("fulcrum-rr", {})
        if f and o and not f.get("failed") and not o.get("failed"):
            out.append(f"{label}: fulcrum p99 {ms(f['p99_us'])} vs fulcrum-rr "
                       f"{ms(o['p99_us'])} ({ratio(f['p99_us'], o['p99_us'])}); errors "
                       f"{f['errors']} vs {o['errors']}")
    return out


def overload_notes(res: dict) -> list[str]:
    """Levels at which every measured contender's median latency is far above the simulated
    join-the-shortest-queue's: the fleet did not hold its nominal capacity there, so that level
    compares how contenders queue and shed under overload rather than how they balance."""
    out = []
    for label, lv in res["levels"].items():
        s = lv["summary"]
        jsq = s["jsq"]["p50_us"]
        measured = [v["p50_us"] for c, v in s.items()
                    if c in CONTENDERS and not v.get("failed")]
        if jsq and measured and min(measured) > 3 * jsq:
            out.append(
                f"At {label}, every contender's p50 is {min(measured) / jsq:.0f}× to "
                f"{max(measured) / jsq:.0f}× the simulated join-the-shortest-queue's "
                f"({ms(jsq)}): a queue persisted through the runs, so the node-sims on this "
                "machine did not hold their nominal capacity at that rate (why is not "
                "established; likely each call's timer and scheduling delays on two shared "
                "cores, which lengthen calls by a few per cent, the whole margin at 95 %; one "
                "node-sim alone on a quiet machine serves within 1 % of its nominal rate). "
                "That level compares how the contenders "
                "queue and shed under overload more than how they balance load: Envoy and nginx "
                f"let calls queue at the nodes (up to {QUEUE} each) and retry, Fulcrum queues "
                "at the router for at most 0.5 s and sheds the rest at once.")
    return out + [""] if out else []


def target_lines(checks: list[tuple[bool, str]], markdown: bool) -> list[str]:
    """The verdict on each target, as markdown bullets or terminal lines."""
    if markdown:
        return [f"- {'**win**' if ok else '**LOSS**'}: {t}" for ok, t in checks]
    return ([f"Targets: {sum(ok for ok, _ in checks)} of {len(checks)} met"]
            + [f"  {'win ' if ok else 'LOSS'}  {t}" for ok, t in checks])


def commands_block(title: str, processes, others, load: dict, show) -> list[str]:
    """A collapsed block of the commands of a scenario: long-running processes, one-off
    commands, load runs."""
    lines = ["", f"<details><summary>{title}</summary>", "", "```sh"]
    lines += [f"{show(cmd)} &   # {name}" for name, cmd in processes]
    lines += [show(cmd) for cmd in others]
    lines += [f"{show(cmd)}   # {kind}" for kind, cmd in load.items()]
    return lines + ["```", "", "</details>", ""]


def machine_load(env: dict) -> str:
    text = (f"Load average {env['loadavg_before']} before the run, {env['loadavg_after']} after; "
            f"other processes on the machine used {env['others_cores']:.2f} of its "
            f"{env['nproc']} cores on average while it ran")
    if env["others_cores"] > 0.3:
        text += (" (a busy shared machine: absolute figures are inflated, and a contender "
                 "unlucky with a burst of others' work in one round can look worse than it is; "
                 "the per-round figures are in the JSON results)")
    return text + "."


def markdown(res: dict, show) -> list[str]:
    p = res["params"]
    lines = [
        "## Scenario 2: routing quality under uneven nodes",
        "",
        f"*Run: {res['environment']['date']}, {res['mode']} mode, commit "
        f"`{res['environment']['commit'][:12]}`. {machine_load(res['environment'])}*",
        "",
        "Eight node-sims, " + ", ".join(
            f"`{n['name']}` ({n['service']}{'; stalls ' + n['stalls'] if n['stalls'] else ''})"
            for n in res["fleet"]) + f", each {SLOTS} slots and a queue of {QUEUE} "
        f"(beyond it the node answers RESOURCE_EXHAUSTED). Total capacity "
        f"{res['capacity']:.0f} calls/s (slots ÷ mean service time, the stall counted). "
        f"Poisson arrivals from `fulcrum load --arrivals poisson`, the same seed for every "
        f"contender at a level; {p['run_s']} s per run, {p['rounds']} round(s), contenders "
        "interleaved in an order rotated per round; latency from each call's scheduled time, "
        f"deadline {CALL_TIMEOUT}. Figures are medians over rounds (max: the largest); errors "
        "are summed. `fulcrum` is the default policy (p2c-ewma); `fulcrum-rr` the same router "
        "with the model's policy set to round robin; Fulcrum registers every node with capacity "
        f"{SLOTS} (its slots); the router's per-node concurrency limit is 1.5 × that (a call "
        "beyond it waits in the router's queue, at most 0.5 s, then is shed with "
        "RESOURCE_EXHAUSTED), so Fulcrum's round robin is not the naive one: it skips nodes "
        "at their limit and queues when every node is, which gives it most of the limits' load "
        "awareness (naive round robin is `envoy-rr`, and `rr-sim`). Latency percentiles are "
        "over answered calls; a failed or shed call is counted in the errors only, so read the "
        "two together. Both "
        "Envoys retry on resource-exhausted, unavailable, reset and connect-failure (2 retries). "
        "`jsq` and `rr-sim` are not measured: they are the discrete-event simulation of the "
        f"same fleet and arrival process (`bench/oracle.py`, {p['oracle_runs']} simulated runs "
        "pooled), dispatching by join-the-shortest-queue with perfect knowledge, and by round "
        "robin as a check of the model against the measured round-robin contenders.",
        "",
    ]
    lines += tables(res)
    lines += overload_notes(res)
    checks = targets_check(res)
    lines += ["Targets (data-plane issue): p99 ≤ 0.5 × round robin's (the naive algorithm: "
              "`envoy-rr`), and no worse than Envoy's least_request (with no more errors). "
              f"{sum(ok for ok, _ in checks)} of {len(checks)} met:", ""]
    lines += target_lines(checks, markdown=True)
    lines += ["", "Beside the targets, p2c-ewma against Fulcrum's own round-robin policy. That "
              "policy is not the naive one: it skips nodes at their concurrency limit and queues "
              "when all are, so the limits give it much of p2c's load awareness:", ""]
    lines += [f"- {n}" for n in notes(res)]
    c = res["commands"]
    return lines + commands_block("Commands of scenario 2", c["processes"], c["register"],
                                  c["load"], show)


def terminal(res: dict) -> list[str]:
    lines = [f"Scenario 2, routing quality ({res['mode']} mode)", ""] + tables(res)
    lines += target_lines(targets_check(res), markdown=False)
    return lines + ["Beside the targets (Fulcrum's round robin skips full nodes):"] + [
        f"  {n}" for n in notes(res)]
