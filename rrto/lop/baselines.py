"""The plans LOP is compared with, in the same cost model: local, full offload, and
layer partitioning (one cut, the robot runs everything before it).

* ``neurosurgeon``: the latency-optimal cut (Neurosurgeon for chains, DSCCS's min-cut
  over the op graph for branching models: robot time of robot ops + server time of
  server ops + transfer of every tensor crossing the cut is a cut in an s-t graph).
* ``spso_ga``: the energy-optimal cut under a deadline. SPSO-GA searches partition
  points with a particle swarm and genetic operators because its space spans many
  DNNs and devices; for one program and one cut the space is the n+1 cut points, so
  we search it exhaustively and get the optimum the swarm approximates.

All return BandPlans; ``simulate`` (cost.py) gives their modelled latency and energy.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from .cost import Estimate, Link, Power, Profile, simulate
from .plan import BandPlan


def local(profile: Profile) -> BandPlan:
    n = len(profile.steps)
    return BandPlan.local(n, profile.steps[-1].rows)


def offload() -> BandPlan:
    return BandPlan.offload()


def layer(profile: Profile, depth: int) -> BandPlan:
    """The layer partition at ``depth`` (0: offload, len(steps): local)."""
    if depth == 0:
        return BandPlan.offload()
    return BandPlan.layer(depth, profile.steps[depth - 1].rows)


def layer_plans(profile: Profile) -> list[BandPlan]:
    return [layer(profile, d) for d in profile.cut_depths()]


def best_cut(profile: Profile, link: Link, power: Power = Power(), objective: str = "latency",
             deadline: Optional[float] = None) -> tuple[BandPlan, Estimate]:
    """Exhaustive search over the layer cuts: least latency, or least energy with latency <= deadline
    (the least-latency cut when no cut meets the deadline)."""
    scored = [(p, simulate(profile, p, link, power)) for p in layer_plans(profile)]
    fastest = min(scored, key=lambda pe: pe[1].latency)
    if objective == "latency":
        return fastest
    ok = [pe for pe in scored if deadline is None or pe[1].latency <= deadline]
    return min(ok, key=lambda pe: pe[1].energy) if ok else fastest


def spso_ga(profile: Profile, link: Link, deadline: Optional[float], power: Power = Power()) -> tuple[BandPlan, Estimate]:
    return best_cut(profile, link, power, "energy", deadline)


def neurosurgeon(profile: Profile, link: Link, power: Power = Power()) -> tuple[BandPlan, Estimate]:
    """Latency-optimal layer partition: the best single cut of a chain; for a branching op
    graph the DSCCS min-cut, mapped to the longest program prefix the robot runs whole
    (what a depth cut can express), and never worse than the best prefix cut."""
    best = best_cut(profile, link, power)
    if all(ins == (i - 1,) for i, ins in enumerate(profile.producers)):
        return best
    robot = min_cut(profile, link)
    depth = next((i for i in range(len(profile.steps)) if i not in robot), len(profile.steps))
    depth = max((d for d in profile.cut_depths() if d <= depth), default=0)
    plan = layer(profile, depth)
    est = simulate(profile, plan, link, power)
    return (plan, est) if est.latency < best[1].latency else best


_INF = 2 ** 29


def min_cut(profile: Profile, link: Link) -> set[int]:
    """Steps the robot runs in the latency-optimal partition of the op graph (DSCCS).

    Nodes: source (robot), sink (server), one per step, one per produced tensor. A step
    on the server side cuts source->step (its server time), on the robot side step->sink
    (its robot time); a tensor made on the robot and read on the server cuts its
    step->tensor edge (its transfer time, paid once however many readers). Infinite
    reader->producer edges forbid server-then-robot. Max-flow: scipy.sparse.csgraph.
    """
    n = len(profile.steps)
    bw = max(link.bandwidth, 1e-9)
    # integer capacities: the finite ones scaled so that all of them together stay far
    # below the "infinite" edges (and int32), at 0.1 us resolution or better when possible
    worst = max([profile.in_bytes / bw, profile.result_bytes / bw]
                + [max(s.out_bytes / bw, profile.step_time(j, s.rows, True), profile.step_time(j, s.rows, False))
                   for j, s in enumerate(profile.steps)])
    budget = _INF // (4 * (2 * n + 4))
    scale = min(1e7, budget / max(worst, 1e-12))

    def c(seconds: float) -> int:
        return int(min(budget, round(seconds * scale)))

    src, sink = 0, 1
    step = lambda j: 2 + j  # noqa: E731
    tensor = lambda j: 2 + n + j  # noqa: E731  (j == n: the program input)
    edges: dict[tuple[int, int], int] = {}

    def edge(u: int, v: int, w: int) -> None:
        if w > 0:
            edges[(u, v)] = min(_INF, edges.get((u, v), 0) + w)

    for j, s in enumerate(profile.steps):
        server = profile.step_time(j, s.rows, robot=False)
        if j == n - 1:
            server += profile.result_bytes / bw  # a result made on the server is downloaded
        edge(src, step(j), c(server))
        edge(step(j), sink, c(profile.step_time(j, s.rows, robot=True)))
        edge(step(j), tensor(j), c(s.out_bytes / bw))
    edge(src, tensor(n), c(profile.in_bytes / bw))
    for j, ins in enumerate(profile.producers):
        for p in ins:
            edge(tensor(n if p < 0 else p), step(j), _INF)
            if p >= 0:
                edge(step(j), step(p), _INF)
    m = 2 * n + 3
    rows, cols = zip(*edges)
    graph = csr_matrix((np.array(list(edges.values()), dtype=np.int32), (rows, cols)), shape=(m, m))
    result = maximum_flow(graph, src, sink)
    flow = getattr(result, "flow", None)
    if flow is None:  # scipy < 1.8 calls it residual
        flow = result.residual
    residual = graph.toarray().astype(np.int64) - flow.toarray().astype(np.int64)
    seen, todo = {src}, [src]
    while todo:
        u = todo.pop()
        for v in np.nonzero(residual[u] > 0)[0]:
            if v not in seen:
                seen.add(int(v))
                todo.append(int(v))
    return {j for j in range(n) if step(j) in seen}
