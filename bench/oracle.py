"""The reference of scenario 2: a discrete-event simulation of the same node-sims and arrival
process, dispatched by join-the-shortest-queue (JSQ) with perfect, instant knowledge.

Each simulated node behaves as `fulcrum node-sim` does (sim/src/node/): `slots` calls in service
at once, at most `queue` more waiting in FIFO order, anything beyond rejected (the node-sim's
RESOURCE_EXHAUSTED); a call's service time is drawn from the node's distribution; during a stall
the node completes nothing, so a call whose service would end inside the stall ends at the
stall's end. Arrivals are a Poisson process at the offered rate, as `fulcrum load --arrivals
poisson` sends them.

JSQ sends each call to the node with the fewest calls (in service plus waiting), ties broken at
random: the classic near-optimal dispatcher a real router can only approximate (it needs the
exact queue of every node at every instant, at no cost). Round robin is simulated too, as a
check of the model against the measured round-robin contenders.

Python standard library only; deterministic for a seed. Runs as a script for a quick look:
`python3 bench/oracle.py`.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    name: str
    median_s: float  # median service time (log-normal)
    sigma: float  # sigma of the log-normal's underlying normal (0: constant)
    slots: int
    queue: int
    stalls: tuple[tuple[float, float], ...] = ()  # (start, length) in seconds from the start

    @property
    def mean_s(self) -> float:
        return self.median_s * math.exp(self.sigma ** 2 / 2)

    def capacity(self, duration_s: float) -> float:
        """Calls per second it can serve on average over `duration_s`, stalls included."""
        stalled = sum(min(length, max(0.0, duration_s - start)) for start, length in self.stalls)
        return self.slots / self.mean_s * max(0.0, 1 - stalled / duration_s)

    def sample(self, rng: random.Random) -> float:
        if self.sigma == 0:
            return self.median_s
        return rng.lognormvariate(math.log(self.median_s), self.sigma)

    def completes(self, start: float, service: float) -> float:
        """When a call entering service at `start` completes, stalls considered."""
        end = start + service
        for s, length in self.stalls:
            if s <= end < s + length:
                end = s + length
        return end


def parse_service(spec: str) -> tuple[float, float]:
    """(median seconds, sigma) of a node-sim service time: `lognormal:20ms,0.3`, `const:5ms`."""
    kind, _, params = spec.partition(":")

    def secs(text: str) -> float:
        text = text.strip()
        for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1.0)):
            if text.endswith(unit):
                return float(text[:-len(unit)]) * scale
        raise ValueError(f"no unit in {text!r}")

    if kind == "lognormal":
        median, sigma = params.split(",")
        return secs(median), float(sigma)
    if kind in ("const", "constant"):
        return secs(params), 0.0
    raise ValueError(f"the oracle models lognormal and const service times, not {spec!r}")


def simulate(nodes: list[Node], rate: float, duration_s: float, seed: int,
             policy: str = "jsq") -> dict:
    """Latencies (seconds, successful calls) and rejected calls of one simulated run."""
    rng = random.Random(seed)
    arrivals = []
    t = rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    n = len(nodes)
    busy = [0] * n  # calls in service
    waiting: list[list[float]] = [[] for _ in range(n)]  # arrival times, FIFO (list as queue)
    heads = [0] * n  # index of the first waiting call (avoids O(n) pops)
    done: list[tuple[float, int, float]] = []  # heap of (completion, node, arrival)
    latencies: list[float] = []
    rejected = 0
    rr = 0
    served = [0] * n

    def start(i: int, arrival: float, now: float) -> None:
        busy[i] += 1
        heapq.heappush(done, (nodes[i].completes(now, nodes[i].sample(rng)), i, arrival))

    def finish_until(now: float) -> None:
        while done and done[0][0] <= now:
            at, i, arrival = heapq.heappop(done)
            latencies.append(at - arrival)
            served[i] += 1
            busy[i] -= 1
            if heads[i] < len(waiting[i]):
                nxt = waiting[i][heads[i]]
                heads[i] += 1
                start(i, nxt, at)

    for arrival in arrivals:
        finish_until(arrival)
        if policy == "jsq":
            load = [busy[i] + len(waiting[i]) - heads[i] for i in range(n)]
            least = min(load)
            i = rng.choice([k for k in range(n) if load[k] == least])
        elif policy == "rr":
            i = rr % n
            rr += 1
        else:
            raise ValueError(policy)
        queued = len(waiting[i]) - heads[i]
        if busy[i] < nodes[i].slots:
            start(i, arrival, arrival)
        elif queued < nodes[i].queue:
            waiting[i].append(arrival)
        else:
            rejected += 1
    finish_until(math.inf)
    return {"latencies": latencies, "rejected": rejected, "sent": len(arrivals),
            "served": {nodes[i].name: served[i] for i in range(n)}}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def reference(nodes: list[Node], rate: float, duration_s: float, seeds: list[int],
              policy: str = "jsq") -> dict:
    """Percentiles (µs) over several simulated runs pooled, and the error ratio."""
    lat: list[float] = []
    rejected = sent = 0
    served: dict[str, int] = {}
    for seed in seeds:
        r = simulate(nodes, rate, duration_s, seed, policy)
        lat += r["latencies"]
        rejected += r["rejected"]
        sent += r["sent"]
        for k, v in r["served"].items():
            served[k] = served.get(k, 0) + v
    lat.sort()
    us = lambda q: round(percentile(lat, q) * 1e6)  # noqa: E731
    return {"p50_us": us(0.5), "p99_us": us(0.99), "p999_us": us(0.999),
            "max_us": round(lat[-1] * 1e6) if lat else 0, "sent": sent, "errors": rejected,
            "served": served, "runs": len(seeds)}


if __name__ == "__main__":
    plan = [Node(f"n{i}", 0.020, 0.3, 4, 64) for i in range(1, 6)]
    plan += [Node(f"slow{i}", 0.060, 0.3, 4, 64) for i in (1, 2)]
    plan += [Node("stall", 0.020, 0.3, 4, 64, ((10.0, 2.0),))]
    cap = sum(nd.capacity(30.0) for nd in plan)
    for level in (0.70, 0.85, 0.95):
        for pol in ("jsq", "rr"):
            r = reference(plan, level * cap, 30.0, [1, 2, 3], pol)
            print(f"{level:.0%} of {cap:.0f}/s {pol}: p50 {r['p50_us'] / 1e3:.1f} ms "
                  f"p99 {r['p99_us'] / 1e3:.1f} ms p99.9 {r['p999_us'] / 1e3:.1f} ms "
                  f"errors {r['errors']}/{r['sent']}")
