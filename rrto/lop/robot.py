"""The robot's side of ``--mode lop``: banded uploads of a replayed program's input.

When the replayer adopts a program, ``adopt`` analyses its local chain, asks the
planner for a BandPlan and registers the server's part of it (``bands.prefix``) as a
program of its own. Then each replayed upload of the input becomes:

1. the input slices of the server's bands go up first, each followed by a no-reply
   message that starts the server on that band while the next slice travels;
2. the robot computes its own bands on its CPU copies of the parameters, uploading
   each result as soon as it is done (the link carries band i while the robot computes
   band i+1);
3. the stitch (``aten::cat`` on the rows) and then the program from the cut on run on
   the server with the next message, as replay runs always do.

The replayer skips steps [1, depth) (the bands computed them). If the app diverges
inside them, ``diverged`` puts the full input up and runs the recorded steps the app
had reached, so eager execution continues on exactly the tensors replay would have made.
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Callable

import torch

from rrto import codec
from rrto.record.program import Program

from .analysis import Chain, analyse
from .bands import Prefix, constants, input_rows, prefix, run_ops
from .plan import BandPlan
from .planning import yield_to_the_app

Planner = Callable[[Chain], "BandPlan | None"]


class PlanTrial:
    """A band plan timed against whole uploads before it is kept.

    The cost model chooses what to try; the robot's clock chooses what to keep. The model
    does not see everything a banded inference costs (its extra messages, band ops run one
    by one on the server where whole runs are captured, robot bands and the walk sharing a
    CPU quota), and on a slow robot a plan modelled faster can run slower. So the plan's
    inferences and then as many whole uploads are timed (upload to the app's last reply,
    the first ``SKIP`` of each block left out: the server traces a new run's segments
    there), and bands are kept only if their median is ``MARGIN`` faster: on a tie the
    robot saves the CPU (and energy) of its bands.
    """
    SKIP, FRAMES, MARGIN = 3, 6, 0.02

    def __init__(self) -> None:
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self.bands = True  # what the next inferences do
        self.kept: bool | None = None  # once decided: True, the bands stay
        self._skip = self.SKIP

    def ended(self, bands: bool, seconds: float) -> bool:
        """One inference ran (``bands``: it went up in bands); True when this decides the trial."""
        if self.kept is not None or bands != self.bands:
            return False
        if self._skip:
            self._skip -= 1
            return False
        mine = self.times[bands]
        mine.append(seconds)
        if len(mine) < self.FRAMES:
            return False
        if len(self.times[not bands]) < self.FRAMES:
            self.bands, self._skip = not bands, self.SKIP
            return False
        self.kept = self.bands = self.median(True) < self.median(False) * (1 - self.MARGIN)
        return True

    def median(self, bands: bool) -> float:
        return statistics.median(self.times[bands])


def default_plan(chain: Chain, bands: int = 4, max_halo: float = 1.5) -> BandPlan | None:
    """Until LOSS plans: ``bands`` even bands, the robot computes the top one, cut at the deepest
    clean cut where the bands together read at most ``max_halo`` times the input's rows (deep
    cuts make every band read nearly the whole input: halos grow with each layer's window)."""
    cuts = [d for d in chain.cuts() if d > 1]
    for n in range(bands, 1, -1):  # a small input: fewer, taller bands
        for depth in reversed(cuts):
            rows = chain.rows(chain.value_at(depth))
            if rows < n:
                continue
            plan = BandPlan.even(depth, rows, (True,) + (False,) * (n - 1))
            read = 0
            for a, b, _ in plan.bands():
                lo, hi = chain.need(depth, a, b)
                read += hi - lo
            if read <= max_halo * chain.input_rows:
                return plan
    return None


class _Active:
    __slots__ = ("pid", "chain", "plan", "prefix", "consts", "n_handles")

    def __init__(self, pid: int, chain: Chain, plan: BandPlan, pre: Prefix, consts: list, n_handles: int):
        self.pid, self.chain, self.plan, self.prefix, self.consts, self.n_handles = \
            pid, chain, plan, pre, consts, n_handles


class LopRobot:
    def __init__(self, copies: dict, stats, planner: Planner | None = None, verbose: bool = False,
                 trial: bool = False):
        """``copies``: handle -> the robot's CPU copy of every tensor it uploaded (kept by the runtime).
        ``trial``: time each band plan against whole uploads and keep the faster (``PlanTrial``)."""
        self.copies, self.stats, self.verbose = copies, stats, verbose
        self.planner = planner or default_plan
        self.active: _Active | None = None
        self._inflight: tuple | None = None  # (input, base, stitch run) of the iteration under way
        # The stitched value is made by the band program's run and read by the main program's:
        # a free from the app riding on the same message would leave it unbound between the two
        # runs, so the robot holds that free back until the next iteration.
        self._keep: int | None = None
        self._held: list[int] = []
        self._job: tuple | None = None  # (program, chain, register) being planned
        self._ready: tuple | None = None  # (job, plan) from the planning thread
        self._drop: int | None = None  # the previous band program, dropped when the next registers
        self._planned_job: tuple | None = None  # the job whose plan is in force: re-plans install for it
        self._bands_ran: tuple | None = None  # (plan, seconds) of the robot's bands in the last inference
        self.trial_plans = trial
        self.trial: PlanTrial | None = None  # the band plan in force, while it is timed
        self.kept_bands = False  # the band plan in force is used (untimed, or timed faster)
        self._went: bool | None = None  # how the last inference's input went up: in bands (True) or whole

    # -- adoption ----------------------------------------------------------------------

    def adopt(self, program: Program, register: Callable[[dict, list], bool]) -> int:
        """Start planning ``program`` in the background; replay runs it whole meanwhile.

        Planning profiles the chain and searches plans (tens to hundreds of ms): never on
        the inference's path. The plan is registered at the first upload after it is ready,
        and used from the iteration after that (whose handles it reserves).
        """
        if self.active is not None:
            self._drop = self.active.pid
        self.active, self._ready = None, None
        self.stats.lop_planned_at_sync = -1
        chain = analyse(program)
        if len(chain) <= 1:
            self._say(f"no banded plan ({chain.ends}); replaying with a whole upload")
            self._job = None
            self._planned()
            return program.n_handles
        prepare = getattr(self.planner, "prepare", None)
        if prepare is not None:
            try:  # what must use the session's socket (link probes) runs here, on the app's thread
                prepare(program)
            except Exception as e:  # noqa: BLE001 - a lost link shows at the app's next request
                self._job = None
                self._say(f"could not measure the link ({type(e).__name__}: {e}); replaying with a whole upload")
                self._planned()
                return program.n_handles
        self._job = job = (program, chain, register)
        threading.Thread(target=self._plan, args=(job,), name="rrto-lop-plan", daemon=True).start()
        return program.n_handles

    def _plan(self, job: tuple) -> None:
        yield_to_the_app()
        try:
            plan = self.planner(job[1])
        except Exception as e:  # noqa: BLE001 - a planner bug must cost only the speed-up
            self._say(f"planning failed ({type(e).__name__}: {e}); replaying with a whole upload")
            plan = None
        self._ready = (job, plan)

    def _install(self, job: tuple, plan: BandPlan | None, replayer) -> None:
        program, chain, register = job
        self._planned_job = job
        self.trial = None
        if self.active is not None:  # a re-plan: the band program in force goes with the next one
            self._drop, self.active = self.active.pid, None
        why = chain.ends
        if plan is not None and plan.depth > 1:
            pre = prefix(chain, plan, program.n_handles)
            missing = {h for _, bd in pre.results for st in bd.ops for h in _handles(st)} - self.copies.keys()
            header = {"p": -program.pid, "steps": pre.steps, "in": list(program.descs)}
            if self._drop is not None:
                header["drop"], self._drop = self._drop, None
            if missing:
                why = f"the robot has no copy of {len(missing)} parameter(s) its bands need"
            elif register(header, list(program.frames)):
                self._drop = None
                self.active = _Active(-program.pid, chain, plan, pre, constants(program), program.n_handles)
                replayer.reserve = pre.end
                s = self.stats
                s.lop_depth, s.lop_bands = plan.depth, plan.n_bands
                s.lop_robot_bands = sum(plan.robot)
                s.lop_kept_bands = self.kept_bands = True
                self._say(f"{len(chain)}-step local chain, cut at step {plan.depth} "
                          f"({chain.rows(chain.value_at(plan.depth))} rows), {plan.n_bands} bands, "
                          f"{sum(plan.robot)} on the robot"
                          + ("; timing it against whole uploads" if self.trial_plans else ""))
                if self.trial_plans:
                    self.trial = PlanTrial()  # planning ends when the trial does
                else:
                    self._planned()
                return
            else:
                why = "the server refused the band program"
        elif plan is not None or getattr(self.planner, "current", None) is not None:
            why = "the planner chose full offload"
        s = self.stats
        s.lop_depth = s.lop_bands = s.lop_robot_bands = 0
        s.lop_kept_bands = self.kept_bands = False
        self._planned()
        self._say(f"no banded plan ({why}); replaying with a whole upload")

    def _planned(self) -> None:
        """Planning has ended: a benchmark measures lop from the next inference on."""
        self.stats.lop_planned_at_sync = self.stats.syncs

    def close(self) -> None:
        """The session ends: the planner's background work stops."""
        close = getattr(self.planner, "close", None)
        if close is not None:
            close()

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"rrto: lop: {msg}", file=sys.stderr, flush=True)

    # -- one inference -------------------------------------------------------------------

    def observe(self, transfers, walk: float | None, took: float | None = None) -> None:
        """The last inference as it ran (at the next one's upload): the link samples the
        transport took (drained here), the robot's walk through the app's calls, its bands,
        and ``took``: seconds from its upload to the app's last reply (the plan's trial)."""
        samples = list(transfers)
        transfers.clear()
        bands, self._bands_ran = self._bands_ran, None
        went, self._went = self._went, None
        trial = self.trial
        if trial is not None and went is not None and took is not None and trial.ended(went, took):
            self.trial = None
            s = self.stats
            s.lop_kept_bands = self.kept_bands = trial.kept
            s.lop_trial_bands_ms = round(trial.median(True) * 1e3, 2)
            s.lop_trial_whole_ms = round(trial.median(False) * 1e3, 2)
            self._planned()
            self._say(f"bands measured {s.lop_trial_bands_ms} ms against {s.lop_trial_whole_ms} ms whole (medians): "
                      + ("keeping the bands" if trial.kept else "uploading whole"))
        observe = getattr(self.planner, "observe", None)
        if observe is not None:
            observe(samples, walk, bands)

    def upload(self, x: torch.Tensor, base: int, streamer, replayer) -> bool:
        """Send the input of a replayed iteration as bands; False: upload it whole as usual."""
        tick = getattr(self.planner, "tick", None)
        if tick is not None and self._job is not None:
            tick()  # (the planner's requests to the server go from this, the app's, thread)
        ready = self._ready
        if ready is not None and ready[0] is self._job:
            self._ready = self._job = None
            self._install(*ready, replayer)
            return False  # this iteration's handles were counted without the bands: next one
        replanned = getattr(self.planner, "replanned", None)
        again = replanned() if replanned is not None and self._job is None else None
        if again is not None and self._planned_job is not None and self._planned_job[0] is replayer.program:
            self._install(self._planned_job, again[0], replayer)
            return False
        act = self.active
        if act is None or -act.pid != replayer.program.pid or tuple(x.shape) != act.chain.shapes[0] \
                or x.dtype != act.chain.dtypes[0]:
            return False
        for h in self._held:
            streamer.free(h)
        self._held.clear()
        self._went = bands = self.trial.bands if self.trial is not None else self.kept_bands
        if not bands:
            return False  # the whole upload measured faster (or is being timed)
        replayer.cancel_ask()  # the bands are several messages; the run ahead starts after them
        pre = act.prefix
        x = x.detach().clone()  # ours now: sent without waiting, and kept in case the app diverges
        for (off, lo, hi), (a, b) in zip(pre.slices, pre.runs):
            _put(streamer, base + off, input_rows(act.chain, x, lo, hi).contiguous())
            replayer.add_run(act.pid, base, a, b)
            streamer.notify("free")  # carries the band's run: the server computes it while the next slice travels
        computing = 0.0
        with torch.no_grad():
            for off, bd in pre.results:
                t0 = time.perf_counter()
                t = run_ops(bd.ops, {0: input_rows(act.chain, x, bd.lo, bd.hi)}, self.copies, act.consts)[bd.out]
                computing += time.perf_counter() - t0
                _put(streamer, base + off, t)
        self._bands_ran = (act.plan, computing)
        stitch = replayer.add_run(act.pid, base, pre.server_end, len(pre.steps))
        replayer.skip_to = act.plan.depth
        for o in range(act.n_handles, pre.end):  # band temporaries go with the next message, after the stitch
            streamer.free(base + o)
        self._keep = base + act.chain.offset_at(act.plan.depth)
        # Replay runs ahead: the stitch and the rest of the program leave now, so the server works
        # while the robot walks through the app's calls. Else they ride on the first wait.
        sent = replayer.ahead_from(act.plan.depth)
        if sent:
            streamer.notify("free")
        self._inflight = (x, base, stitch, sent, self._keep)
        self.stats.lop_inferences += 1
        return True

    def hold(self, handle: int) -> bool:
        """True: the runtime must not free ``handle`` now (the robot frees it later)."""
        if handle == self._keep:
            self._held.append(handle)
            self._keep = None
            return True
        return False

    def diverged(self, pos: int, replayer, streamer) -> None:
        """The app left the program at step ``pos`` <= depth: make steps [0, pos) real on the server."""
        x, base, stitch, sent, stitched = self._inflight
        self._inflight = None
        if sent:  # the stitched value exists: steps [1, pos) make it again (or never, if pos < depth)
            streamer.free(stitched)
        else:
            replayer.drop_run(stitch)
        _put(streamer, base + replayer.program.steps[0].out_offsets[0], x)
        replayer.add_run(replayer.program.pid, base, 1, pos)


def _put(streamer, handle: int, t: torch.Tensor) -> None:
    """Upload a tensor only this module holds: zmq may read it after we move on."""
    desc, buf, _ = codec.tensor_frame(t)
    streamer.put(handle, desc, buf, wait_sent=False)


def _handles(x) -> list:
    if type(x) is list:
        return [h for y in x for h in _handles(y)]
    if type(x) is dict:
        if len(x) == 1 and "h" in x:
            return [x["h"]]
        return [h for y in x.values() for h in _handles(y)]
    return []
