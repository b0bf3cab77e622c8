"""LOSS for ``--mode lop``: profile the adopted program's local chain on this robot, measure
the link with the robot's own transfers, and let ``loss.plan`` choose the BandPlan.

What is measured, when a program is adopted (once; a few tens of ms):
  robot time    one whole-height run of the chain up to its deepest cut on the robot's
                parameter copies, timed op by op, in a background thread;
  link          three small and three 256 KiB probe round trips through the session's
                own socket, fitted by ``LinkEstimator`` (rtt + bytes / bandwidth).
Server step times are the robot's divided by ``server_speedup`` (RRTO_LOP_SERVER_SPEEDUP;
by default 20 for a CUDA server, 2 for a CPU one): the one figure not yet measured online.
"""
from __future__ import annotations

import os
import sys
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
MAX_CUTS = 8  # cuts profiled (evenly over the chain) and offered to the planner
UNREACHABLE_S = 1e3  # the tail after the chain: the band executor never runs it on the robot


def default_speedup(server_device: str) -> float:
    env = os.environ.get("RRTO_LOP_SERVER_SPEEDUP")
    if env:
        return float(env)
    return 20.0 if str(server_device).startswith("cuda") else 2.0


class LossPlanner:
    """A LopRobot planner: ``planner(chain) -> BandPlan | None`` (None: plain replay)."""

    def __init__(self, copies: dict, probe: Callable[[int], float], server_speedup: float, stats=None,
                 objective: str = "latency", layers_only: bool = False, power: Power = Power(),
                 verbose: bool = False):
        """``probe(n)``: seconds for a round trip carrying ``n`` bytes up. ``layers_only``: the
        Neurosurgeon-style baseline (``--mode partition``): the best single layer cut, no bands."""
        self.copies, self.probe, self.layers_only, self.stats = copies, probe, layers_only, stats
        self.speedup, self.objective, self.power, self.verbose = server_speedup, objective, power, verbose
        self.link = LinkEstimator()
        self.last = None  # the last Choice, for stats and tests

    def prepare(self) -> None:
        """Probe the link (on the app's thread: it uses the session's socket)."""
        for n in (0, PROBE_BYTES, 0, PROBE_BYTES, 0, PROBE_BYTES):
            self.link.add(n + 200, self.probe(n))

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
        server = [r / self.speedup for r in robot]
        server[0] = 0.0  # the upload: the server computes nothing for it
        out = infos[-1]
        tail = [StepCost("rest of the program", False, 1, out.bytes, UNREACHABLE_S, 0.0)]
        prof = Profile.from_chain(infos, tail, int(x.numel() * x.element_size()), out.bytes,
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
            print(f"rrto: lop: profiled in {(t1 - t0) * 1e3:.0f} ms, {'layer cut' if self.layers_only else 'LOSS'} "
                  f"planned in {(time.perf_counter() - t1) * 1e3:.0f} ms for "
                  f"{link.bandwidth * 8 / 1e6:.0f} Mbit/s, rtt {link.rtt * 1e3:.1f} ms: depth {p.depth}, "
                  f"{p.n_bands} band(s), {sum(p.robot)} on the robot, modelled {choice.latency * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
        if p.depth not in cuts or not any(p.robot):
            return None  # full offload: plain replay does that with less machinery
        return p
