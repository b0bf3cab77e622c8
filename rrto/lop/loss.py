"""LOSS: choose the band plan of one inference by minimising the cost model.

Decision vector (11 numbers, ints except the last), searched with
``scipy.optimize.differential_evolution(integrality=...)``:

  x[0]     number of bands, 1..8
  x[1]     index of the depth in the profile's cut points (0: full offload,
           <= chain: banded, deeper: a layer partition, last: local)
  x[2:10]  per band, 1 if the robot computes it (only the first x[0] count); bands
           all on the server still pay when the server computes band i while
           band i+1's rows are on the wire (one such band is full offload)
  x[10]    log2 of the robot bands' height relative to the server bands' (-3..3):
           lets the robot's share move in finer steps than whole bands

The initial population holds the all-local, full-offload and best-layer-partition
plans (and a few server-then-robot splits and random vectors). DE's answer is polished
by a coordinate search and replaces the best seed only when it is better (by more than a
0.2% tie margin), so the chosen plan is never worse than any baseline under the model.

``Planner`` caches one plan per bandwidth bin (log-spaced) and re-plans in a background
thread when the measured bandwidth enters a bin it has no plan for, or when the step
times changed; ``plan()`` never waits for a search: it answers the best plan it
already knows.
"""
from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import differential_evolution

from . import baselines
from .cost import Estimate, Link, LinkEstimator, Power, Profile, mbit, simulate
from .plan import BandPlan

MAX_BANDS = 8


@dataclass(frozen=True)
class Choice:
    plan: BandPlan
    latency: float  # modelled, seconds
    energy: float  # modelled robot energy, joules
    bandwidth: float  # bytes/s it was planned for
    searched: bool  # False: a stand-in (seed or neighbour bin's plan) while LOSS searches


class _Space:
    """Decoding decision vectors into plans, and scoring them (with a cache: DE revisits)."""

    def __init__(self, profile: Profile, link: Link, power: Power, objective: str, deadline: Optional[float]) -> None:
        self.profile, self.link, self.power = profile, link, power
        self.objective, self.deadline = objective, deadline
        self.depths = profile.cut_depths()
        self.scores: dict[BandPlan, Estimate] = {}

    def bounds(self) -> list[tuple[float, float]]:
        return [(1, MAX_BANDS), (0, len(self.depths) - 1)] + [(0, 1)] * MAX_BANDS + [(-3.0, 3.0)]

    def integrality(self) -> list[bool]:
        return [True] * (2 + MAX_BANDS) + [False]

    def decode(self, x: np.ndarray) -> BandPlan:
        nb = int(round(x[0]))
        d = self.depths[int(round(x[1]))]
        if d == 0:
            return BandPlan.offload()
        rows = self.profile.steps[d - 1].rows
        if d > self.profile.chain:  # past the local chain: a layer cut (d == n: local)
            return BandPlan.layer(d, rows)
        robot = tuple(bool(round(v)) for v in x[2:2 + nb])
        if nb == 1 and not robot[0]:  # one band, on the server: that is full offload
            return BandPlan.offload()
        w = np.where(robot, 2.0 ** float(x[10]), 1.0)
        cuts = np.round(rows * np.concatenate([[0.0], np.cumsum(w)]) / w.sum()).astype(int)
        return BandPlan(d, tuple(int(c) for c in cuts), robot)

    def encode(self, plan: BandPlan) -> np.ndarray:
        x = np.zeros(11)
        x[0] = 1
        x[1] = self.depths.index(plan.depth)
        x[2:2 + MAX_BANDS] = 0 if plan.depth == 0 else 1
        return x

    def estimate(self, plan: BandPlan) -> Estimate:
        e = self.scores.get(plan)
        if e is None:
            e = self.scores[plan] = simulate(self.profile, plan, self.link, self.power)
        return e

    def cost(self, plan: BandPlan) -> float:
        e = self.estimate(plan)
        if self.objective == "latency":
            return e.latency
        over = 0.0 if self.deadline is None else max(0.0, e.latency - self.deadline)
        return e.energy + 1e6 * over  # any deadline miss outweighs any energy

    def __call__(self, x: np.ndarray) -> float:
        return self.cost(self.decode(x))


def seeds(profile: Profile, link: Link, power: Power = Power(), objective: str = "latency",
          deadline: Optional[float] = None) -> list[BandPlan]:
    """All-local, full offload and the best layer partition (for the objective)."""
    best = baselines.best_cut(profile, link, power, objective, deadline)[0]
    return [baselines.local(profile), baselines.offload(), best]


def plan(profile: Profile, link: Link, power: Power = Power(), objective: str = "latency",
         deadline: Optional[float] = None, seed: int = 0, maxiter: int = 30, population: int = 24,
         tie: float = 2e-3) -> Choice:
    """One LOSS search: the plan of least modelled latency, or least energy with latency <= deadline.
    A searched plan replaces the best seed (local, offload, best layer cut) only when it is
    better by more than the fraction ``tie``."""
    if objective not in ("latency", "energy"):
        raise ValueError(f"LOSS objective must be 'latency' or 'energy', not {objective!r}")
    space = _Space(profile, link, power, objective, deadline)
    start = seeds(profile, link, power, objective, deadline)
    rng = np.random.default_rng(seed)
    lo, hi = np.array(space.bounds()).T
    pop = [space.encode(p) for p in start]
    # split seeds: the server's band first (its input goes on the wire at once), the
    # robot's after, at depths spread over the chain
    chain_idx = [i for i, d in enumerate(space.depths) if 0 < d <= profile.chain]
    for i in chain_idx[len(chain_idx) // 8::max(1, len(chain_idx) // 4)]:
        pop.append(np.array([2, i, 0, 1] + [0] * (MAX_BANDS - 2) + [0.0]))
        pop.append(np.array([4, i] + [0] * MAX_BANDS + [0.0]))  # server bands only: upload pipelined with compute
    while len(pop) < population:
        pop.append(lo + rng.random(len(lo)) * (hi - lo))
    init = np.clip(np.array(pop), lo, hi)
    result = differential_evolution(space, space.bounds(), integrality=space.integrality(), init=init,
                                    maxiter=maxiter, seed=seed, polish=False, tol=0, atol=0, mutation=(0.5, 1.0),
                                    recombination=0.7)
    x = _refine(space, np.array(result.x, dtype=float))
    best = min(start, key=space.cost)
    found = min((space.decode(result.x), space.decode(x)), key=space.cost)
    # a banded plan must beat the best seed by a margin worth its moving parts; on a near
    # tie (e.g. bands of the raw input: offload by another name) the plain plan is kept
    if space.cost(found) < space.cost(best) * (1 - tie) - 1e-9:
        best = found
    e = space.estimate(best)
    return Choice(best, e.latency, e.energy, link.bandwidth, True)


def _refine(space: _Space, x: np.ndarray, rounds: int = 6) -> np.ndarray:
    """Coordinate search from DE's answer: band count with depth, band count with robot
    share (each pair over its whole range or grid), then each robot bit, until nothing
    improves. It is the polish step (L-BFGS-B cannot move integer variables), and it jumps
    between the local optima along the depth that DE's small population can stop in."""
    lo, hi = np.array(space.bounds()).T
    x = np.clip(np.round(x[:10]).tolist() + [x[10]], lo, hi)
    best = space(x)
    axes = [np.arange(lo[i], hi[i] + 1) for i in range(10)] + [np.linspace(lo[10], hi[10], 25)]
    moves = [(0, 1), (0, 10)] + [(i,) for i in range(2, 2 + MAX_BANDS)]
    for _ in range(rounds):
        improved = False
        for move in moves:
            for values in itertools.product(*(axes[i] for i in move)):
                y = x.copy()
                y[list(move)] = values
                n0, n1 = int(x[0]), int(y[0])
                y[2 + n0:2 + n1] = x[1 + n0]  # added bands go to whoever has the last one
                c = space(y)
                if c < best - 1e-12:
                    best, x, improved = c, y, True
        if not improved:
            break
    return x


class Planner:
    """Plans cached per bandwidth bin, searched in the background.

    ``plan()`` reads the bandwidth from ``estimator`` (or the given link), answers the
    bin's plan when it has one, else the nearest bin's plan (or the better of local and
    full offload), and asks the background thread to search that bin.
    """

    def __init__(self, profile: Profile, estimator: Optional[LinkEstimator] = None, power: Power = Power(),
                 objective: str = "latency", deadline: Optional[float] = None, bins_per_decade: int = 8,
                 replan_s: float = 2.0, background: bool = True, **search) -> None:
        self.profile, self.power = profile, power
        self.estimator = estimator if estimator is not None else LinkEstimator()
        self.objective, self.deadline = objective, deadline
        self.bins_per_decade, self.replan_s = bins_per_decade, replan_s
        self.search = search
        self._plans: dict[int, tuple[Choice, int, float]] = {}  # bin -> (choice, profile version, when)
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._queue: "queue.Queue[Optional[tuple[int, Link]]]" = queue.Queue()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="rrto-loss", daemon=True)
            self._thread.start()

    @staticmethod
    def bin_of(bandwidth: float, bins_per_decade: int = 8) -> int:
        """The bin of a bandwidth (bytes/s): ``bins_per_decade`` log-spaced bins per factor of 10."""
        return math.floor(math.log10(max(bandwidth, 1.0)) * bins_per_decade)

    def bin(self, bandwidth: float) -> int:
        return self.bin_of(bandwidth, self.bins_per_decade)

    def bin_bandwidth(self, b: int) -> float:
        """The bandwidth a bin is planned for: its geometric centre."""
        return 10 ** ((b + 0.5) / self.bins_per_decade)

    def plan(self, link: Optional[Link] = None) -> Choice:
        link = link if link is not None else self.estimator.link()
        if link is None:  # nothing measured yet: what replay does
            return Choice(BandPlan.offload(), math.nan, math.nan, math.nan, False)
        b = self.bin(link.bandwidth)
        with self._lock:
            hit = self._plans.get(b)
            fresh = hit is not None and (hit[1] == self.profile.version or time.monotonic() - hit[2] < self.replan_s)
            if not fresh and b not in self._pending:
                self._pending.add(b)
                self._queue.put((b, Link(self.bin_bandwidth(b), link.rtt)))
            if hit is not None:
                return hit[0]
            near = sorted(self._plans, key=lambda k: abs(k - b))
            if near:
                c = self._plans[near[0]][0]
                return Choice(c.plan, c.latency, c.energy, c.bandwidth, False)
        if self._thread is None:  # no background thread: search now
            self._search(b, Link(self.bin_bandwidth(b), link.rtt))
            return self._plans[b][0]
        quick = [baselines.local(self.profile), baselines.offload()]
        ests = [simulate(self.profile, p, link, self.power) for p in quick]
        i = int(np.argmin([e.latency for e in ests]))
        return Choice(quick[i], ests[i].latency, ests[i].energy, link.bandwidth, False)

    def wait(self, bandwidth: float, timeout: float = 10.0) -> Choice:
        """Block until the bin of ``bandwidth`` has a searched plan (tests, benchmarks)."""
        b = self.bin(bandwidth)
        with self._done:
            if not self._done.wait_for(lambda: b in self._plans and b not in self._pending, timeout):
                raise TimeoutError(f"LOSS found no plan for {bandwidth * 8 / 1e6:.1f} Mbit/s within {timeout} s")
            return self._plans[b][0]

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def _search(self, b: int, link: Link) -> None:
        version, c = self.profile.version, None
        try:
            c = plan(self.profile, link, self.power, self.objective, self.deadline, **self.search)
        finally:
            with self._done:
                self._pending.discard(b)
                if c is not None:
                    self._plans[b] = (c, version, time.monotonic())
                self._done.notify_all()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._search(*job)
            except Exception:  # a bad profile must not kill the planner; plan() keeps answering stand-ins
                import logging
                logging.getLogger("rrto.lop").exception("LOSS search failed")


def compare(profile: Profile, link: Link, power: Power = Power(), deadline: Optional[float] = None,
            seed: int = 0) -> dict[str, tuple[BandPlan, Estimate]]:
    """Every strategy's plan and modelled cost on one link, side by side (the benchmark's rows).
    ``deadline`` (default 1.25 x the best of local / offload / layer) bounds the energy plans."""
    rows = {"local": baselines.local(profile), "offload": baselines.offload(),
            "layer": baselines.neurosurgeon(profile, link, power)[0]}
    if deadline is None:
        deadline = 1.25 * min(simulate(profile, p, link, power).latency for p in rows.values())
    rows["layer-energy"] = baselines.spso_ga(profile, link, deadline, power)[0]
    rows["lop"] = plan(profile, link, power, seed=seed).plan
    rows["lop-energy"] = plan(profile, link, power, "energy", deadline, seed=seed).plan
    return {k: (p, simulate(profile, p, link, power)) for k, p in rows.items()}


def _demo() -> None:
    """Plans and modelled costs for a synthetic ResNet-18-like profile at 73 and 93 Mbit/s."""
    from .synthetic import Speed, resnet18_like

    for name, speed in (("slow robot, 4 GFLOP/s", Speed()), ("Jetson-like robot, 40 GFLOP/s", Speed(robot_flops=40e9))):
        profile = resnet18_like(speed=speed)
        print(f"ResNet-18-like synthetic profile ({len(profile.steps)} steps, chain {profile.chain}), {name}")
        for mb in (73, 93):
            link = Link(mbit(mb), 3e-3)
            t0 = time.perf_counter()
            plan(profile, link)
            dt = time.perf_counter() - t0
            rows = compare(profile, link)
            best = min(rows[k][1].latency for k in ("local", "offload", "layer"))
            print(f"  {mb} Mbit/s, rtt 3 ms: one LOSS search {dt * 1e3:.0f} ms;"
                  f" lop / best other latency = {rows['lop'][1].latency / best:.2f}; energy plans: latency <= {1.25 * best * 1e3:.0f} ms")
            for k, (p, e) in rows.items():
                bands = ", ".join(f"{a}-{b}{'R' if r else 'S'}" for a, b, r in p.bands()) if 0 < p.depth else "-"
                print(f"    {k:13s} {e.latency * 1e3:7.1f} ms {e.energy:7.3f} J   depth {p.depth:2d}  bands {bands}")
        print()


if __name__ == "__main__":
    import sys

    if "--demo" in sys.argv:
        _demo()
    else:
        print("usage: python -m rrto.lop.loss --demo")
