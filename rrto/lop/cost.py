"""Cost model of a band plan: what one inference costs in time and robot energy.

The planner (loss.py) and the layer-partition baselines (baselines.py) only see a
``Profile``: per step of the recorded program, whether it is local (bandable), its
output rows and bytes, its robot and server time for the whole step, and for local
steps ``need(a, b)``: the chain-input rows that output rows [a, b) depend on (the
LOP analysis supplies it; tests use synthetic conv chains). No torch, no server.

Measurements come in online: ``LinkEstimator`` fits the robot's own transfers
(bytes, seconds) to ``seconds = rtt + bytes / bandwidth``; ``StepTimes`` keeps
per-step, per-band-height time tables by exponential averaging.

Latency model of a BandPlan (``simulate``): the robot first puts the server bands'
input slices (chain-input rows with halo) on the wire, then computes its own bands one
by one, shipping each result as soon as it is computed; the link is one FIFO. The
server computes a band as soon as its input has arrived (one band at a time), stitches
the chain output at ``depth`` once every band is there, runs the remaining steps and the
result is downloaded. Full offload, layer partition and local are special cases. Once its
bands are done the robot walks through the app's calls (``Profile.robot_walk_s``): the
result is read no earlier than that walk's end, whatever the link and server do (local,
the app running without rrto, has no walk).

Energy model of the robot: power states computing / transmitting / both / idle-waiting,
integrated over the timeline.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

Need = Callable[[int, int], "tuple[int, int]"]


def mbit(x: float) -> float:
    """Megabit/s to bytes/s."""
    return x * 1e6 / 8


@dataclass
class StepCost:
    """One step of the program, as the cost model sees it.

    ``robot_s`` / ``server_s`` are the times of the whole step (all ``rows``). A band of
    h rows costs ``time * h / rows`` plus the profile's per-band overhead, unless a
    measured table (band height -> seconds) exists for that side; then the table is
    interpolated (per-row rate, linear in h) and wins.
    """
    name: str
    local: bool
    rows: int  # output rows along the banded axis (1 for a global step)
    out_bytes: int  # bytes of the whole output
    robot_s: float
    server_s: float
    need: Optional[Need] = None  # local steps: output rows [a, b) -> chain-input rows [lo, hi)
    inputs: tuple[int, ...] = ()  # steps whose outputs this step reads; -1 is the program input; () = previous step
    robot_table: dict[int, float] = field(default_factory=dict)
    server_table: dict[int, float] = field(default_factory=dict)
    cut_bytes: Optional[int] = None  # bytes live right after this step, when the analysis knows (overrides inputs)
    row_needs: Optional[Callable] = None  # () -> need(r, r + 1) of every row as arrays (lo, hi): faster


@dataclass
class Profile:
    """The planner's view of one recorded program.

    ``steps[i]`` is program step i, so a BandPlan's ``depth`` indexes it directly. The
    local chain is the leading run of local steps. ``depths`` optionally restricts the
    cut points the executor supports (e.g. only where a single tensor is live); default
    every depth 0..len(steps).
    """
    steps: list[StepCost]
    in_bytes: int  # the program input (the chain input)
    in_rows: int
    result_bytes: int  # what the robot downloads at the end
    robot_band_overhead_s: float = 30e-6  # per step per band when a step is banded
    server_band_overhead_s: float = 10e-6
    depths: Optional[Sequence[int]] = None
    version: int = 0  # bumped whenever times change: plans cached by the planner go stale
    # The robot's own walk through the app's calls in a replayed inference (matching each op
    # against the program): it starts once the input (or the robot's bands) went up, and the
    # app reads its result only after it. At half a Jetson core it is tens of ms for a
    # 300-op detector, so it bounds every plan from below; 0 for synthetic profiles.
    robot_walk_s: float = 0.0
    # Sustained / profiled robot speed: the chain is profiled in one burst, while a quota-
    # or heat-limited CPU runs the bands of every frame slower (lop measures it online).
    robot_scale: float = 1.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict = {}
        self._reindex()

    def _reindex(self) -> None:
        n = len(self.steps)
        self.chain = next((i for i, s in enumerate(self.steps) if not s.local or s.need is None), n)
        producers: list[tuple[int, ...]] = []
        for i, s in enumerate(self.steps):
            producers.append(tuple(s.inputs) if s.inputs else (i - 1,))
        last_use = {-1: -1}
        for i, ins in enumerate(producers):
            for p in ins:
                last_use[p] = max(last_use.get(p, -1), i)
        self.producers = producers
        self._last_use = last_use
        self._live = [self._live_bytes(d) for d in range(n + 1)]

    @staticmethod
    def from_chain(infos: Sequence, tail: Sequence[StepCost], in_bytes: int, result_bytes: int,
                   depths: Optional[Sequence[int]] = None, robot_s: Optional[Sequence[float]] = None,
                   server_s: Optional[Sequence[float]] = None, in_rows: Optional[int] = None) -> "Profile":
        """A profile from the LOP analysis' per-step records of the local chain (objects with
        ``name, rows, bytes, need(a, b)``; ``bytes`` = everything live at the cut after the
        step) followed by ``tail``, the program's remaining steps. ``in_rows`` defaults to
        the first record's rows (the analysis' step 0 is the input upload). Times default
        to 0 until ``StepTimes`` has measured them."""
        steps = [StepCost(i.name, True, i.rows, i.bytes, robot_s[k] if robot_s else 0.0,
                          server_s[k] if server_s else 0.0, need=i.need, cut_bytes=i.bytes,
                          row_needs=getattr(i, "row_needs", None))
                 for k, i in enumerate(infos)]
        rows = in_rows if in_rows is not None else (infos[0].rows if infos else 1)
        return Profile(steps + list(tail), in_bytes, rows, result_bytes, depths=depths)

    def touch(self) -> None:
        """Call after changing step times or tables: drops cached band costs."""
        with self._lock:
            self.version += 1
            self._cache = {k: v for k, v in self._cache.items() if k == "need"}  # geometry stays

    # -- cut points ----------------------------------------------------------------
    def cut_depths(self) -> list[int]:
        n = len(self.steps)
        ds = range(n + 1) if self.depths is None else self.depths
        return sorted({d for d in ds if 0 <= d <= n} | {0, n})

    def live_bytes(self, d: int) -> int:
        """Bytes of every tensor made before step d and read at or after it (what a layer cut at d ships)."""
        return self._live[d]

    def _live_bytes(self, d: int) -> int:
        if d == 0:
            return self.in_bytes
        if self.steps[d - 1].cut_bytes is not None:
            return self.steps[d - 1].cut_bytes
        total = 0
        for p in range(-1, d):
            if self._last_use.get(p, -1) >= d:
                total += self.in_bytes if p < 0 else self.steps[p].out_bytes
        if total == 0:  # nothing downstream reads it (d == n): the output itself
            total = self.steps[d - 1].out_bytes
        return total

    # -- band costs ------------------------------------------------------------------
    def band_rows(self, d: int, a: int, b: int) -> list[tuple[int, int]]:
        """Rows of each step j < d that output rows [a, b) of step d-1 need.

        Step j row r is needed when its whole receptive field lies inside the chain-input
        rows step d-1 needs: exact for chains of convs/pools (the halo shrinks by each
        layer's reach), a close estimate for branchy chains.
        """
        x, y = self._band_rows(d, a, b)
        return list(zip(x.tolist(), y.tolist()))

    def need(self, d: int, a: int, b: int) -> tuple[int, int]:
        """Chain-input rows that rows [a, b) of step d-1 need: the first row's start to the last
        row's end (receptive fields move monotonically with the row), from the precomputed table."""
        los, his, _ = self._row_needs()
        return int(los[d - 1, a]), int(his[d - 1, b - 1])

    def _band_rows(self, d: int, a: int, b: int) -> "tuple[np.ndarray, np.ndarray]":
        los, his, rows = self._row_needs()
        lo, hi = int(los[d - 1, a]), int(his[d - 1, b - 1])
        if lo <= 0 and hi >= self.in_rows:
            x, y = np.zeros(d, dtype=np.int64), rows[:d].copy()
        else:
            x = (los[:d] < lo).sum(axis=1)  # first row whose field starts inside [lo, hi)
            y = np.maximum(x, (his[:d] <= hi).sum(axis=1))  # first row whose field ends past hi
        x[d - 1], y[d - 1] = a, b
        return x, y

    def _row_needs(self) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
        """Chain-input rows [lo, hi) of every single output row of each chain step (padded
        with int64 max, which neither count in ``_band_rows`` sees), and the steps' rows."""
        hit = self._cache.get("need")
        if hit is None:
            chain = self.steps[:self.chain]
            width = max((s.rows for s in chain), default=1)
            los = np.full((len(chain), width), np.iinfo(np.int64).max, dtype=np.int64)
            his = np.full((len(chain), width), np.iinfo(np.int64).max, dtype=np.int64)
            for j, s in enumerate(chain):
                if s.row_needs is not None:
                    los[j, :s.rows], his[j, :s.rows] = s.row_needs()
                else:
                    pairs = np.array([s.need(r, r + 1) for r in range(s.rows)], dtype=np.int64).reshape(-1, 2)
                    los[j, :s.rows], his[j, :s.rows] = pairs[:, 0], pairs[:, 1]
            hit = (los, his, np.array([s.rows for s in chain], dtype=np.int64))
            self._cache["need"] = hit
        return hit

    def step_time(self, j: int, h: int, robot: bool) -> float:
        s = self.steps[j]
        if h <= 0:
            return 0.0
        table = sorted((s.robot_table if robot else s.server_table).items())
        if table:
            hs = [k for k, _ in table]
            rates = [v / k for k, v in table]
            return float(np.interp(h, hs, rates)) * h * (self.robot_scale if robot else 1.0)
        full = s.robot_s if robot else s.server_s
        t = full * h / max(s.rows, 1)
        if h < s.rows:
            t += self.robot_band_overhead_s if robot else self.server_band_overhead_s
        return t * self.robot_scale if robot else t

    def band_time(self, d: int, a: int, b: int, robot: bool) -> float:
        """Time to compute steps [0, d) for output rows [a, b) of step d-1 (with halo)."""
        key = ("t", d, a, b, robot)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if a == 0 and b >= self.steps[d - 1].rows:
            t = self.prefix_time(d, robot)
        else:
            x, y = self._band_rows(d, a, b)
            t = float(self._heights(robot)[np.arange(d), y - x].sum())
        self._cache[key] = t
        return t

    def _heights(self, robot: bool) -> np.ndarray:
        """times[j, h]: step j of the chain computed for a band of h rows."""
        key = ("h", robot)
        hit = self._cache.get(key)
        if hit is None:
            chain = self.steps[:self.chain]
            hit = np.zeros((len(chain), max((s.rows for s in chain), default=0) + 1))
            for j, s in enumerate(chain):
                table = sorted((s.robot_table if robot else s.server_table).items())
                h = np.arange(1, s.rows + 1)
                if table:
                    rate = np.interp(h, [k for k, _ in table], [v / k for k, v in table])
                    hit[j, 1:s.rows + 1] = rate * h
                else:
                    over = self.robot_band_overhead_s if robot else self.server_band_overhead_s
                    hit[j, 1:s.rows + 1] = (s.robot_s if robot else s.server_s) * h / max(s.rows, 1) + over
                    hit[j, s.rows] -= over
            if robot:
                hit *= self.robot_scale
            self._cache[key] = hit
        return hit

    def prefix_time(self, d: int, robot: bool) -> float:
        return float(self._cumulative(robot)[d])

    def suffix_time(self, d: int, robot: bool) -> float:
        c = self._cumulative(robot)
        return float(c[-1] - c[d])

    def _cumulative(self, robot: bool) -> np.ndarray:
        key = ("cum", robot)
        hit = self._cache.get(key)
        if hit is None:
            hit = np.concatenate([[0.0], np.cumsum([self.step_time(j, s.rows, robot) for j, s in enumerate(self.steps)])])
            self._cache[key] = hit
        return hit

    def band_in_bytes(self, d: int, a: int, b: int) -> int:
        lo, hi = self.need(d, a, b)
        return int(math.ceil(self.in_bytes * (hi - lo) / self.in_rows))

    def band_out_bytes(self, d: int, a: int, b: int) -> int:
        return int(math.ceil(self.live_bytes(d) * (b - a) / max(self.steps[d - 1].rows, 1)))


# -- link -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, each direction
    rtt: float = 2e-3  # seconds; a message arrives rtt/2 after its last byte left


class LinkEstimator:
    """Bandwidth and round-trip time from the robot's own transfers.

    ``add(bytes, seconds)``: one request of that many bytes (up + down) took that long,
    end to end. A robust line ``seconds = rtt + bytes / bandwidth`` (Theil–Sen: the
    median of pairwise slopes, then the median intercept) over a sliding window; a
    window whose sizes barely differ cannot separate the two, so then the rtt is kept
    (from small messages or the prior) and only the bandwidth is re-fitted.
    """

    def __init__(self, window: int = 32, rtt_prior: float = 2e-3, bandwidth_prior: Optional[float] = None) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.rtt = rtt_prior
        self.bandwidth = bandwidth_prior
        self._lock = threading.Lock()

    def add(self, nbytes: float, seconds: float) -> None:
        if seconds <= 0 or nbytes < 0:
            return
        with self._lock:
            self.samples.append((float(nbytes), float(seconds)))
            self._fit()

    @property
    def ready(self) -> bool:
        return self.bandwidth is not None

    def link(self) -> Optional[Link]:
        return None if self.bandwidth is None else Link(self.bandwidth, self.rtt)

    def _fit(self) -> None:
        x = np.array([s[0] for s in self.samples])
        y = np.array([s[1] for s in self.samples])
        if len(x) >= 3 and x.max() > 1.5 * max(x.min(), 1.0):
            i, j = np.triu_indices(len(x), 1)
            dx = x[j] - x[i]
            ok = dx > 0.05 * x.max()
            if ok.sum() >= 2:
                slope = float(np.median((y[j] - y[i])[ok] / dx[ok]))
                if slope > 0:
                    self.rtt = max(0.0, float(np.median(y - slope * x)))
                    self.bandwidth = 1.0 / slope
                    return
        # sizes too alike: keep the rtt, fit the bandwidth
        small = x < 4096
        if small.any():
            self.rtt = float(np.median(y[small]))
        big = (x >= 4096) & (y > self.rtt)
        if big.any():
            self.bandwidth = float(np.median(x[big] / (y[big] - self.rtt)))


class StepTimes:
    """Online per-step time tables (robot and server, per band height), exponentially averaged.

    The tables live in the profile's StepCost objects, which the cost model reads:
      ``observe(j, rows, seconds)``       one step timed on its own
      ``observe_band(d, a, b, seconds)``  a robot band (steps [0, d) for rows [a, b)) timed whole
      ``observe_steps([(j, rows), ...], seconds, robot=False)``  e.g. the server's time for
                                          the steps after the cut, as it reports it
    A time for several steps is shared out in proportion to their modelled times.
    """

    def __init__(self, profile: Profile, alpha: float = 0.3) -> None:
        self.profile = profile
        self.alpha = alpha

    def observe(self, j: int, rows: int, seconds: float, robot: bool = True) -> None:
        self._update(j, rows, seconds, robot)
        self.profile.touch()

    def observe_band(self, d: int, a: int, b: int, seconds: float, robot: bool = True) -> None:
        p = self.profile
        rows = p.band_rows(d, a, b) if d <= p.chain else [(0, s.rows) for s in p.steps[:d]]
        self.observe_steps([(j, y - x) for j, (x, y) in enumerate(rows)], seconds, robot)

    def observe_steps(self, spans: Sequence[tuple[int, int]], seconds: float, robot: bool = True) -> None:
        spans = [(j, h) for j, h in spans if h > 0]
        model = [self.profile.step_time(j, h, robot) for j, h in spans]
        total = sum(model)
        for (j, h), m in zip(spans, model):
            self._update(j, h, seconds * (m / total if total > 0 else 1 / len(spans)), robot)
        self.profile.touch()

    def _update(self, j: int, rows: int, seconds: float, robot: bool) -> None:
        s = self.profile.steps[j]
        table = s.robot_table if robot else s.server_table
        old = table.get(rows)
        table[rows] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        if rows >= s.rows:  # a whole-step measurement also updates the linear model
            if robot:
                s.robot_s = table[rows]
            else:
                s.server_s = table[rows]


# -- energy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Power:
    """Robot power (watts) per state. Defaults: the Intra-DP testbed's Jetson Xavier NX.

    The three measured figures are whole-board powers, each including the standby floor.
    Computing while transmitting is not reported; we take the compute power plus the
    radio's increment over standby: 13.35 + (4.25 - 4.04) = 13.56 W.
    """
    compute: float = 13.35
    transmit: float = 4.25
    idle: float = 4.04
    both: Optional[float] = None

    @property
    def compute_and_transmit(self) -> float:
        return self.both if self.both is not None else self.compute + (self.transmit - self.idle)


def _measure(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(u: list[tuple[float, float]], v: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(u) and j < len(v):
        a, b = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        if b > a:
            total += b - a
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


def energy(latency: float, compute: list[tuple[float, float]], transmit: list[tuple[float, float]],
           power: Power = Power()) -> float:
    """Joules the robot spends over [0, latency] given its busy intervals."""
    c, t = _measure(compute), _measure(transmit)
    tc, tt = sum(b - a for a, b in c), sum(b - a for a, b in t)
    both = _overlap(c, t)
    idle = max(0.0, latency - tc - tt + both)
    return ((tc - both) * power.compute + (tt - both) * power.transmit
            + both * power.compute_and_transmit + idle * power.idle)


# -- the timeline of one inference ----------------------------------------------------

@dataclass
class Estimate:
    latency: float
    energy: float
    robot_busy: float  # seconds the robot computes
    link_busy: float  # seconds the robot's radio carries data


def simulate(profile: Profile, plan, link: Link, power: Power = Power(), trace: Optional[list] = None) -> Estimate:
    """Model one inference under ``plan`` (a BandPlan) on ``link``.

    ``trace``: a list that gets the modelled schedule, ``(lane, start_s, end_s, label)``
    per interval (lanes: robot compute, uplink, server compute, downlink)."""
    ev = trace.append if trace is not None else (lambda e: None)
    n = len(profile.steps)
    bw, half = max(link.bandwidth, 1e-9), link.rtt / 2
    d = plan.depth
    bands = plan.bands()
    if not 0 <= d <= n:
        raise ValueError(f"band plan depth {d} is outside the program's {n} steps")
    if 0 < d <= profile.chain and plan.cuts[-1] != profile.steps[d - 1].rows and bands:
        raise ValueError(f"band plan cuts {plan.cuts} do not cover the {profile.steps[d - 1].rows} rows "
                         f"of step {d - 1} ({profile.steps[d - 1].name})")
    compute: list[tuple[float, float]] = []
    tx: list[tuple[float, float]] = []

    walk = profile.robot_walk_s
    if d == 0 or not bands:  # full offload
        up = profile.in_bytes / bw
        tx.append((0.0, up))
        t = up + half + profile.prefix_time(n, robot=False)
        end = t + half + profile.result_bytes / bw
        tx.append((t + half, end))
        ev(("uplink", 0.0, up, "input"))
        ev(("server compute", up + half, t, "program"))
        ev(("downlink", t + half, end, "result"))
        if walk:
            ev(("robot compute", 0.0, walk, "walk"))
        end = max(end, walk)
        return Estimate(end, energy(end, [(0.0, walk)], tx, power), walk, up + profile.result_bytes / bw)

    if d == n and all(r for _, _, r in bands):  # local
        t = profile.prefix_time(n, robot=True)
        if len(bands) > 1 or bands[0][1] - bands[0][0] < profile.steps[n - 1].rows:
            t = sum(profile.band_time(d, a, b, True) for a, b, _ in bands)
        return Estimate(t, energy(t, [(0.0, t)], [], power), t, 0.0)

    banded = d <= profile.chain
    if not banded:  # a layer partition past the chain: the robot runs steps [0, d) whole, ships the live tensors
        bands = [(0, profile.steps[d - 1].rows, True)]

    link_free = 0.0
    arrivals: list[tuple[float, float]] = []  # (arrival at the server, server work then)
    for a, b, r in bands:
        if not r:
            nb = profile.band_in_bytes(d, a, b)
            start, link_free = link_free, link_free + nb / bw
            tx.append((start, link_free))
            arrivals.append((link_free + half, profile.band_time(d, a, b, robot=False)))
            ev(("uplink", start, link_free, f"rows {a}-{b} in"))
    robot_free = 0.0
    for a, b, r in bands:
        if r:
            ct = profile.band_time(d, a, b, robot=True) if banded else profile.prefix_time(d, robot=True)
            compute.append((robot_free, robot_free + ct))
            ev(("robot compute", robot_free, robot_free + ct, f"rows {a}-{b}"))
            robot_free += ct
            nb = profile.band_out_bytes(d, a, b) if banded else profile.live_bytes(d)
            start = max(robot_free, link_free)
            link_free = start + nb / bw
            tx.append((start, link_free))
            arrivals.append((link_free + half, 0.0))
            ev(("uplink", start, link_free, f"rows {a}-{b} out"))
    server_free = 0.0
    for arr, work in sorted(arrivals):
        if work:
            ev(("server compute", max(server_free, arr), max(server_free, arr) + work, "band"))
        server_free = max(server_free, arr) + work
    t = server_free + profile.suffix_time(d, robot=False)
    ev(("server compute", server_free, t, "rest"))
    down_start = max(t + half, link_free)
    end = down_start + profile.result_bytes / bw
    tx.append((down_start, end))
    ev(("downlink", down_start, end, "result"))
    if walk:  # the app's calls are walked once the robot's bands are done (they run in its upload)
        compute.append((robot_free, robot_free + walk))
        ev(("robot compute", robot_free, robot_free + walk, "walk"))
        end = max(end, robot_free + walk)
    busy_c = sum(b - a for a, b in compute)
    busy_t = sum(b - a for a, b in tx)
    return Estimate(end, energy(end, compute, tx, power), busy_c, busy_t)
