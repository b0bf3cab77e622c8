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
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable

import torch

from .analysis import Chain
from .bands import node_times, run_band
from .cost import LinkEstimator, Power, Profile, StepCost, simulate
from . import baselines
from .bands import constants
from .loss import Choice
from .loss import plan as loss_plan
from .plan import BandPlan

PROBE_BYTES = 256 << 10
MEASURED_RUNS = 5  # the server's step times are asked for after it ran the program this often
SERVER_TIMES_WAIT_S = 10.0  # how long planning waits for them (the app may stop calling)
MAX_CUTS = 8  # cuts profiled (evenly over the chain) and offered to the planner
UNREACHABLE_S = 1e3  # the tail after the chain: the band executor never runs it on the robot


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
        self.last = None  # the last Choice, for stats and tests
        self.server_measured = False  # the last plan's server times were measured on the server
        self._pid, self._uploads, self._measured = None, 0, None
        self._measured_ready = threading.Event()

    def prepare(self, program=None) -> None:
        """Probe the link (on the app's thread: it uses the session's socket)."""
        for n in (0, PROBE_BYTES, 0, PROBE_BYTES, 0, PROBE_BYTES):
            self.link.add(n + 200, self.probe(n))
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
        t0 = time.perf_counter()
        prof, cuts = self.profile(chain)
        if not cuts:
            return None
        t1 = time.perf_counter()
        link = self.link.link()
        if self.layers_only:
            p, e = baselines.neurosurgeon(prof, link, self.power)
            choice = Choice(p, e.latency, e.energy, link.bandwidth, True)
        else:
            choice = loss_plan(prof, link, self.power, self.objective, maxiter=20)
        self.last = choice
        p = choice.plan
        if self.stats is not None:  # the modelled schedule of one inference, for the benchmark's timeline plot
            events: list = []
            simulate(prof, p, link, self.power, trace=events)
            self.stats.timeline = [[lane, round(a, 6), round(b, 6), f"{label} (model)"] for lane, a, b, label in events]
        if self.verbose:
            server = sum(st.server_s for st in prof.steps) * 1e3
            print(f"rrto: lop: profiled in {(t1 - t0) * 1e3:.0f} ms (server steps "
                  f"{'measured there' if self.server_measured else f'the robot/{self.speedup:g}'}: "
                  f"{server:.1f} ms in all), "
                  f"{'layer cut' if self.layers_only else 'LOSS'} "
                  f"planned in {(time.perf_counter() - t1) * 1e3:.0f} ms for "
                  f"{link.bandwidth * 8 / 1e6:.0f} Mbit/s, rtt {link.rtt * 1e3:.1f} ms: depth {p.depth}, "
                  f"{p.n_bands} band(s), {sum(p.robot)} on the robot, modelled {choice.latency * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
        if p.depth not in cuts or not any(p.robot):
            return None  # full offload: plain replay does that with less machinery
        return p
