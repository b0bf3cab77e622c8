"""LOSS for ``--mode lop``: profile the adopted program's local chain on this robot, measure
the link with the robot's own transfers, and let ``loss.plan`` choose the BandPlan.

What is measured, when a program is adopted (once; a few tens of ms):
  robot time    one whole-height run of the chain up to its deepest cut on the robot's
                parameter copies, timed op by op, in a background thread;
  link          three small and three 256 KiB probe round trips through the session's
                own socket, fitted by ``LinkEstimator`` (rtt + bytes / bandwidth).
  server time   each step's fastest run on the server, asked for (``times``) once the
                server has run the program five times as plain replay (its first runs
                are cold: keypoint net, one thread, 35 ms summed after one run, 20 after
                two, 18 from five on); planning waits for it.
                A CUDA server's host clock sees launches, not kernels: there server steps
                are the robot's divided by ``server_speedup`` (RRTO_LOP_SERVER_SPEEDUP;
                by default 20 for a CUDA server, 2 for a CPU one).

What is measured online, at every replayed inference (``observe``, on the app's thread: it
only queues), and applied by a watcher thread once a second:
  link          the inference's first message and the server's first reply, minus the time
                the server says it held them (``transport.Link.transfers``). These samples
                track how the link changes, not its rate: messages of one size after an idle
                gap meet the same burst allowance of a shaper or radio, so their rate reads
                high (93 Mbit/s tbf, 32 KB burst: 90 KB inferences fit at 120-200 Mbit/s).
                The probes give the rate; the bandwidth planned for is the probed one times
                the inferences' rate now over their rate when the plan in force began.
                A sample whose transfer is under a millisecond beyond the round trip is
                dropped: a band plan's first message is a slice of the input, mostly burst,
                and dividing its bytes by timing noise read a 73 Mbit/s link as 340-690
                Mbit/s. (Slices just over a 32 KB burst still read up to 3x high: known.)
  robot walk    from the input's upload to the first wait: the robot matching the app's
                calls against the program (``Profile.robot_walk_s``), median of the last 8
                (a walk throttled by the robot's CPU quota while planning ran read 160 ms);
  robot speed   the robot's bands as they ran, against their modelled time: a burst-profiled
                chain under a CPU quota runs slower every frame (``Profile.robot_scale``).
Plans are kept per bandwidth bin (``loss.Planner``'s bins). The watcher plans again when the
measured bandwidth enters another bin (a plan kept for that bin is reused) or when the plan
in force is modelled more than ``DRIFT`` off what it was chosen for (every kept plan is then
stale); at most once per ``REPLAN_S`` for drift: each search costs the robot's CPU.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from typing import Callable

import numpy as np
import torch

from .analysis import Chain
from .bands import node_times, run_band
from .cost import Link, LinkEstimator, Power, Profile, StepCost, simulate
from . import baselines
from .bands import constants
from .loss import Choice, Planner
from .loss import plan as loss_plan
from .plan import BandPlan

PROBE_BYTES = 256 << 10
MEASURED_RUNS = 5  # the server's step times are asked for after it ran the program this often
SERVER_TIMES_WAIT_S = 10.0  # how long planning waits for them (the app may stop calling)
MAX_CUTS = 8  # cuts profiled (evenly over the chain) and offered to the planner
UNREACHABLE_S = 1e3  # the tail after the chain: the band executor never runs it on the robot
WATCH_S = 1.0  # the watcher applies what was measured, and checks the plan, this often
REPLAN_S = 5.0  # at most one search for model drift this often (a bin change searches at once)
DRIFT = 0.15  # the plan in force modelled this much off what it was chosen at: search again
EMA = 0.3
TRACK = 8  # inference link samples per median (the reference one and the current one)
MIN_TRANSFER_S = 1e-3  # a link sample whose transfer took less than this beyond the RTT is timing noise
SUBSTANTIAL_S = 2e-3  # robot bands modelled shorter than this say more about fixed costs than speed


def yield_to_the_app() -> None:
    """Lowest CPU priority for the calling (planning) thread: on a robot's few cores the app's
    inference comes first; planning uses what the app leaves idle (Linux: a thread's nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # no per-thread priorities here: plan at the app's
        pass


def default_speedup(server_device: str) -> float:
    env = os.environ.get("RRTO_LOP_SERVER_SPEEDUP")
    if env:
        return float(env)
    return 20.0 if str(server_device).startswith("cuda") else 2.0


def download_bytes(program) -> int:
    """Bytes the robot downloads per inference: its program's downloads at their recorded shapes
    (not the chain's output: a detector reads back a few boxes, not its 470 KB prediction map)."""
    n = 0
    for st in program.steps:
        if st.kind == "get":
            meta = st.key[1]
            n += math.prod(meta.shape) * meta.dtype.itemsize
    return n


class LossPlanner:
    """A LopRobot planner: ``planner(chain) -> BandPlan | None`` (None: plain replay)."""

    def __init__(self, copies: dict, probe: Callable[[int], float], server_speedup: float, stats=None,
                 objective: str = "latency", layers_only: bool = False, power: Power = Power(),
                 verbose: bool = False, step_times: Callable[[int], "list | None"] | None = None):
        """``probe(n)``: seconds for a round trip carrying ``n`` bytes up. ``layers_only``: the
        Neurosurgeon-style baseline (``--mode partition``): the best single layer cut, no bands.
        ``step_times(pid)``: the server's seconds per step of a program it ran (None: it cannot
        tell, e.g. a CUDA server); without them server steps are the robot's / ``server_speedup``."""
        self.copies, self.probe, self.layers_only, self.stats = copies, probe, layers_only, stats
        self.speedup, self.objective, self.power, self.verbose = server_speedup, objective, power, verbose
        self.step_times = step_times
        self.link = LinkEstimator()
        self.server_measured = False  # the last plan's server times were measured on the server
        self._pid, self._uploads, self._measured = None, 0, None
        self._measured_ready = threading.Event()
        self._observed: deque = deque(maxlen=256)  # (link samples, walk s, robot bands) per inference
        self._rates: deque = deque(maxlen=TRACK)  # bytes/s of the last inferences' link samples
        self._walks: deque = deque(maxlen=TRACK)  # seconds of the last inferences' walks
        self._reference: float | None = None  # their median when the plan in force began
        self._bins = Planner.bin_of  # the bandwidth bins plans are kept for
        self._generation = 0  # one per planned program: an older program's watcher stops
        self._replan: tuple | None = None  # (BandPlan | None,) for the robot to install
        self.replans = 0
        self.current: Choice | None = None  # the plan in force (full offload included), as last chosen

    def prepare(self, program=None) -> None:
        """Probe the link (on the app's thread: it uses the session's socket)."""
        for n in (0, PROBE_BYTES, 0, PROBE_BYTES, 0, PROBE_BYTES):
            self.link.add(n + 200, self.probe(n))
        self._rates.clear()
        self._walks.clear()  # (another program's walk)
        self._reference = None
        self._pid, self._uploads, self._measured = getattr(program, "pid", None), 0, None
        self._measured_ready.clear()

    def tick(self) -> None:
        """At each replayed upload, on the app's thread: once the server has run the program
        MEASURED_RUNS times (the first runs are cold), ask it how long each step took, for the planning thread."""
        if self._measured_ready.is_set() or self.step_times is None or self._pid is None:
            return
        self._uploads += 1
        if self._uploads > MEASURED_RUNS:
            try:
                self._measured = self.step_times(self._pid)
            finally:
                self._measured_ready.set()

    def observe(self, transfers: list, walk: float | None, bands: tuple | None) -> None:
        """One replayed inference as it ran (app thread: queued for the watcher). ``transfers``:
        (bytes, seconds) link samples; ``walk``: seconds from its upload to its first wait;
        ``bands``: (plan, seconds the robot's bands took) when it went up in bands."""
        self._observed.append((transfers, walk, bands))

    def replanned(self) -> tuple | None:
        """(BandPlan or None for full offload,) once the watcher chose another plan; else None."""
        r, self._replan = self._replan, None
        return r

    def close(self) -> None:
        self._generation += 1  # the watcher stops at its next tick

    def _apply(self, prof: Profile) -> None:
        """What the app's thread queued, into the link estimate and the profile (watcher/planning thread)."""
        walk, scale = prof.robot_walk_s, prof.robot_scale
        while self._observed:
            transfers, w, bands = self._observed.popleft()
            for nbytes, seconds in transfers:
                if seconds - self.link.rtt < MIN_TRANSFER_S:
                    continue  # (a band plan's first slice, mostly a shaper's burst: timing noise)
                self._rates.append(nbytes / (seconds - self.link.rtt))
                if self._reference is None and len(self._rates) == TRACK:
                    self._reference = float(np.median(self._rates))
            if w is not None:
                self._walks.append(w)
                walk = float(np.median(self._walks))  # (one walk throttled by the CPU quota moves no plan)
            if bands is not None:
                plan, seconds = bands
                try:
                    modelled = sum(prof.band_time(plan.depth, a, b, True) for a, b, r in plan.bands() if r)
                except (IndexError, ValueError):  # a plan of the program before this one
                    modelled = 0.0
                if modelled >= SUBSTANTIAL_S * prof.robot_scale and seconds > 0:
                    ratio = min(5.0, max(0.5, seconds / (modelled / prof.robot_scale)))
                    scale = (1 - EMA) * scale + EMA * ratio
        if (walk, scale) != (prof.robot_walk_s, prof.robot_scale):
            prof.robot_walk_s, prof.robot_scale = walk, scale
            prof.touch()
        if self.stats is not None:
            s = self.stats
            s.lop_walk_ms, s.lop_robot_scale = round(walk * 1e3, 2), round(scale, 3)
            link = self.measured_link()
            if link is not None:
                s.lop_link_mbit, s.lop_link_rtt_ms = round(link.bandwidth * 8e-6, 2), round(link.rtt * 1e3, 2)

    @property
    def reference_rate(self) -> float | None:
        """The inferences' transfer rate (bytes/s) when the plan in force began; None until measured."""
        return self._reference

    def measured_link(self) -> Link | None:
        """The probed link, its bandwidth scaled by how the inferences' own transfers changed since
        the plan in force began (see the module docstring)."""
        link = self.link.link()
        if link is None or self._reference is None or len(self._rates) < TRACK:
            return link
        return Link(link.bandwidth * float(np.median(self._rates)) / self._reference, link.rtt)

    def _choose(self, prof: Profile, link) -> Choice:
        if self.layers_only:
            p, e = baselines.neurosurgeon(prof, link, self.power)
            return Choice(p, e.latency, e.energy, link.bandwidth, True)
        return loss_plan(prof, link, self.power, self.objective, maxiter=20)

    def _usable(self, plan: BandPlan, cuts: list) -> BandPlan | None:
        if plan.depth in cuts and (any(plan.robot) or len(plan.bands()) > 1):
            return plan
        return None  # full offload: plain replay

    def _watch(self, generation: int, prof: Profile, cuts: list, choice: Choice) -> None:
        """Re-plan when the bandwidth moves to another bin or the model drifts (module docstring)."""
        yield_to_the_app()
        kept = {self._bins(choice.bandwidth): choice}
        current, searched_at, seen = choice, time.monotonic(), None
        while True:
            time.sleep(WATCH_S)
            if generation != self._generation:
                return
            self._apply(prof)
            link = self.measured_link()
            if link is None:
                continue
            b = self._bins(link.bandwidth)
            moved = b != self._bins(current.bandwidth) and b == seen  # two ticks in a row: not one noisy fit
            seen = b
            now = simulate(prof, current.plan, link, self.power).latency
            drift = abs(now / current.latency - 1) if current.latency > 0 else 0.0
            if not moved and (drift <= DRIFT or time.monotonic() - searched_at < REPLAN_S):
                continue
            why = f"the link moved to {link.bandwidth * 8e-6:.0f} Mbit/s" if moved else \
                f"the plan in force is now modelled at {now * 1e3:.1f} ms, chosen at {current.latency * 1e3:.1f}"
            if drift > DRIFT:
                kept.clear()
            hit = kept.get(b)
            if hit is None:
                hit = kept[b] = self._choose(prof, link)
                searched_at = time.monotonic()
            if generation != self._generation:
                return
            changed = hit.plan != current.plan
            current = self.current = hit
            self._say_plan(prof, hit, link, f"{'re-planned' if changed else 'plan kept'} ({why})")
            if changed:
                self.replans += 1
                if self.stats is not None:
                    self.stats.lop_replans = self.replans
                self._replan = (self._usable(hit.plan, cuts),)
                # its messages differ in size (bands, or the whole input): a new reference rate;
                # until it is measured, the bandwidth it was planned for stands
                self.link = LinkEstimator(bandwidth_prior=link.bandwidth, rtt_prior=link.rtt)
                self._rates.clear()
                self._reference = None

    def _say_plan(self, prof: Profile, choice: Choice, link, what: str) -> None:
        p = choice.plan
        if self.stats is not None:  # the modelled schedule of one inference, for the benchmark's timeline plot
            events: list = []
            simulate(prof, p, link, self.power, trace=events)
            self.stats.timeline = [[lane, round(a, 6), round(b, 6), f"{label} (model)"] for lane, a, b, label in events]
        if self.verbose:
            print(f"rrto: lop: {what}: {link.bandwidth * 8 / 1e6:.0f} Mbit/s, rtt {link.rtt * 1e3:.1f} ms, "
                  f"walk {prof.robot_walk_s * 1e3:.1f} ms, robot x{prof.robot_scale:.2f}: depth {p.depth}, "
                  f"{p.n_bands} band(s), {sum(p.robot)} on the robot, modelled {choice.latency * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)

    def _server_seconds(self, chain: Chain) -> tuple[list[float], float] | None:
        """(per chain step, the rest of the program) as the server measured them, or None."""
        if self.step_times is None or not self._measured_ready.wait(SERVER_TIMES_WAIT_S):
            return None
        m = self._measured
        if not m or len(m) != len(chain.program.steps) or not any(m):
            return None
        last = chain.nodes[-1].step
        return [0.0] + [m[n.step] for n in chain.nodes[1:]], float(sum(m[last + 1:]))

    def profile(self, chain: Chain) -> tuple[Profile | None, list[int]]:
        cuts = [d for d in chain.cuts() if d > 1]
        if len(cuts) > MAX_CUTS:  # the planner's search space grows with the cuts offered
            cuts = sorted({cuts[round(i * (len(cuts) - 1) / (MAX_CUTS - 1))] for i in range(MAX_CUTS)})
        if not cuts:
            return None, []
        x = torch.zeros(chain.shapes[0], dtype=chain.dtypes[0])
        consts = constants(chain.program)
        infos = chain.steps()
        with torch.no_grad():
            run_band(chain, cuts[0], 0, chain.rows(chain.value_at(cuts[0])), x, self.copies, consts)  # warm-up
            # one whole-height run to the deepest cut, timed op by op: the planner shares the robot's
            # CPU with the app, so it profiles each step once (it used to run the chain up to each cut)
            robot = node_times(chain, cuts[-1], x, self.copies, consts)[:len(infos)]
        measured = self._server_seconds(chain)
        self.server_measured = measured is not None
        if self.stats is not None:
            self.stats.lop_server_measured = self.server_measured
        server, rest = measured if measured is not None else ([r / self.speedup for r in robot], 0.0)
        server[0] = 0.0  # the upload: the server computes nothing for it
        out = infos[-1]
        tail = [StepCost("rest of the program", False, 1, out.bytes, UNREACHABLE_S, rest)]
        prof = Profile.from_chain(infos, tail, int(x.numel() * x.element_size()), download_bytes(chain.program),
                                  depths=[0, *cuts], robot_s=robot, server_s=server)
        return prof, cuts

    def __call__(self, chain: Chain) -> BandPlan | None:
        """Profile the chain and choose its first plan (planning thread); then watch (see above)."""
        self._generation += 1
        generation = self._generation
        t0 = time.perf_counter()
        prof, cuts = self.profile(chain)
        if not cuts:
            return None
        self._apply(prof)  # the inferences replayed while profiling: their walk and link samples
        t1 = time.perf_counter()
        link = self.link.link()
        choice = self.current = self._choose(prof, link)
        self._rates.clear()  # the plan's own messages set the reference rate
        self._reference = None
        server = sum(st.server_s for st in prof.steps) * 1e3
        self._say_plan(prof, choice, link,
                       f"profiled in {(t1 - t0) * 1e3:.0f} ms (server steps "
                       f"{'measured there' if self.server_measured else f'the robot/{self.speedup:g}'}: "
                       f"{server:.1f} ms in all), {'layer cut' if self.layers_only else 'LOSS'} planned in "
                       f"{(time.perf_counter() - t1) * 1e3:.0f} ms")
        if generation == self._generation:
            threading.Thread(target=self._watch, args=(generation, prof, cuts, choice), name="rrto-lop-watch",
                             daemon=True).start()
        return self._usable(choice.plan, cuts)
