"""A robot's recorded program, resolved once so that replaying it is a tight loop.

Registration decodes every op step against the allowlist, looks up the persistent
tensors (parameters) it names, and notes where each run fills in a tensor: ``{"s": off}``
is the output of an earlier step of this iteration (handle ``base + off``), ``{"x": n}``
a tensor the robot names in slot n of the run. Other steps (uploads, downloads,
syncs, data-dependent ops) arrive as their own messages: here they are holes.

The robot only ever asks ``run`` for steps it has confirmed the app reached, so a
confirmed run never executes an op the app did not call. ``ahead`` is the exception
that makes replay one round trip: right after an upload the server runs the rest of
the iteration before the robot confirms it, answering each wait (download, sync,
data-dependent op) with a message of its own, so that the robot's own walk through
the app overlaps the server's work and every wait finds its answer already there.
It stays safe because nothing it does outlives a divergence (``AheadRun.settle``):
an in-place write is only made to a tensor born in this iteration, after a copy of
its old value is kept (undone if the app turns away before that op); a write to a
tensor that outlives the iteration (a parameter, a running statistic, recurrent
state) stops the run there until the robot confirms it.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from rrto import codec

from . import capture
from .ops import OpError, OpInfo, short_error, written_args

MAX_STEPS = 100_000
MAX_PROGRAMS = 16
ITERATION_HANDLES = MAX_STEPS * 64  # offsets one iteration may use: its handles are base + offset
clock = time.perf_counter


class _Fill:
    """A hole in a step's arguments, filled at each run."""
    __slots__ = ("kind", "n")

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n


class ProgramStep:
    """An op step (``kind`` "op"), a data-dependent op ("shaped": outputs named ``base + ob + i``)
    or a download ("get": its tensor is ``args[0]``)."""
    __slots__ = ("kind", "info", "args", "kwargs", "fills", "outs", "last_of", "writes", "ob", "inputs",
                 "layouts", "metas", "generation", "from_steps", "from_slots", "writes_fixed", "static", "epoch")

    def __init__(self, kind: str, info: OpInfo | None, args: list, kwargs: dict, outs: list,
                 writes: tuple = (), ob: int = 0):
        self.kind, self.info, self.args, self.kwargs, self.outs = kind, info, args, kwargs, outs
        self.writes, self.ob = writes, ob  # writes: (args or kwargs, position) of arguments written in place
        self.last_of: list[int] = []  # offsets whose last reader in the program is this step
        places: list = []  # (box, position, value) of every tensor argument, filled at each run or fixed
        _tensor_places(args, places)
        _tensor_places(kwargs, places)
        self.fills = [p for p in places if type(p[2]) is _Fill]
        # the same holes split by kind, for the replay loop: (box, position, offset or slot)
        self.from_steps = [(box, where, f.n) for box, where, f in self.fills if f.kind == "s"]
        self.from_slots = [(box, where, f.n) for box, where, f in self.fills if f.kind != "s"]
        self.inputs = [(box, where) for box, where, _ in self.fills]  # the arguments that change per run
        self.layouts = None  # their layouts when ``metas`` was checked, and the session's generation then
        self.generation = -1
        self.metas = None
        self.static = False  # its inputs' layouts follow from the iteration's slots (Program.decode)
        self.epoch = -1  # the Program.epoch its metas were asked in
        # writes a tensor that outlives the iteration (its layout too, if an out= argument)
        self.writes_fixed = any(isinstance(v, torch.Tensor) for v in written_args(args, kwargs, writes))

    def fill(self, handles: dict, base: int, slots: dict) -> bool:
        """Put the iteration's tensors into the step's holes. False, holes emptied again, when a
        tensor is missing: the caller asks the session (whose error names it) or stops."""
        try:
            for box, where, n in self.from_steps:
                box[where] = handles[base + n]
            for box, where, n in self.from_slots:
                box[where] = handles[slots[n]]
        except (KeyError, TypeError):
            self.unfill()
            return False
        return True

    def unfill(self) -> None:
        for box, where, f in self.fills:  # hold no tensor between runs: the robot may free it
            box[where] = f

    def sized(self, session) -> list | None:
        """The step's output metadata from the session's SizeCheck, asked again only when a filled
        argument's layout differs from the last run's, or when an op may have changed a fixed
        one's (a parameter's) since: everything else about the step is fixed at registration."""
        layouts = tuple([_layout(box[where]) for box, where in self.inputs])
        if layouts != self.layouts or session.layout_generation != self.generation:
            self.metas = session.sizes.outputs(self.info, self.args, self.kwargs)
            self.layouts, self.generation = layouts, session.layout_generation
        return self.metas


class Program:
    def __init__(self, pid: int, steps: list, kinds: list, persistent: set, puts: tuple = ()):
        self.pid, self.steps, self.kinds, self.persistent = pid, steps, kinds, persistent
        self.puts = puts  # (step, offset) of each upload the robot declared, in step order
        self.answered = codec.answered(kinds)  # per step: a run ahead replies to it
        # per step, the fastest it ran here (lop's planner asks: its server step times are measured)
        self.seconds = [0.0] * len(steps)
        self.timed_runs = 0  # runs that reached its last op step
        self.last_op = max((i for i, st in enumerate(steps) if st is not None and st.kind == "op"), default=-1)
        # A static step's inputs are tensors from outside the iteration, fixed tensors and outputs of
        # static steps. Outputs are made to the layouts their meta kernels promise, so while the slots'
        # layouts and the fixed tensors' are those of the last run (one epoch), a static step's metas
        # are still those of the last run: asking again was ~3% of a keypoint run ahead on a CPU.
        # An output of a data-dependent op ("shaped") is not static, nor anything computed from it.
        made: set = {o for _, o in puts}
        for st in steps:
            if st is not None and st.kind == "op":
                st.static = all(f.n in made for _, _, f in st.fills if f.kind == "s")
                if st.static:
                    made.update(o for o in st.outs if o is not None)
        self.epoch = 0
        self.epoch_key: tuple | None = None
        # Layouts a program goes back to get their epoch back, and with it their traced segments:
        # lop's plan trial alternates bands (no whole input bound) and whole uploads, and a
        # re-plan does it again; each switch used to start an epoch and trace it anew, and after
        # MAX_EPOCHS the program was never traced again.
        self.epochs: dict[tuple, int] = {}  # layout key -> its epoch
        self.seen_epoch = -1  # the epoch of the last run ahead: segments are planned on its second
        self.segments: dict[int, dict] = {}  # epoch -> first step -> capture.Segment
        self.graph_bytes = 0  # memory the segments' CUDA graphs keep, counted to the session
        # Outputs the robot expects to drop within each iteration (it says so with a run ahead):
        # kept alive to be bound, ~300 of them made a CPU server's MobileNetV2 run 15 % slower
        # (its memory could not be reused) and the next upload freed them on the critical path.
        self.dropped: frozenset = frozenset()
        self.dropped_changes = 0
        self.outputs = frozenset(o for st in steps if st is not None and st.kind == "op" for o in st.outs
                                 if o is not None)

    @classmethod
    def decode(cls, header: dict, frames: list, session) -> "Program":
        pid, specs, descs = header.get("p"), header.get("steps"), header.get("in") or []
        if type(pid) is not int or not isinstance(specs, list) or not isinstance(descs, list):
            raise OpError("a program needs an integer id 'p' and a list of 'steps'")
        if not 0 < len(specs) <= MAX_STEPS:
            raise OpError(f"a program has 1 to {MAX_STEPS} steps, not {len(specs)}")
        if len(descs) != len(frames):
            raise OpError("program constants do not match the frames sent")
        consts = [session.to_device(codec.frame_tensor(d, f, 1 << 16)) for d, f in zip(descs, frames)]
        persistent: set = set()
        steps: list = []
        kinds: list = []
        puts: list = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise OpError(f"program step {i} is not an object")
            kind = spec.get("t")
            if kind not in ("op", "put", "get", "sync", "seed", "rng", "shaped"):
                raise OpError(f"program step {i} has unknown kind {str(kind)[:20]!r}")
            kinds.append(kind)
            if kind == "op" or (kind == "shaped" and "op" in spec):
                steps.append(_decode_step(i, spec, session, consts, persistent))
            elif kind == "get" and "a" in spec:
                steps.append(_decode_get(i, spec, session, persistent))
            else:
                if kind == "put":
                    offsets = spec.get("o", [])
                    if type(offsets) is not list or len(offsets) > 64 or \
                            not all(type(o) is int and 0 <= o < ITERATION_HANDLES for o in offsets):
                        raise OpError(f"program step {i}: bad upload offsets")
                    puts.extend((i, o) for o in offsets)
                steps.append(None)  # a hole: it arrives as a message of its own (and stops a run ahead)
        last: dict[int, int] = {}
        for i, st in enumerate(steps):
            if st is not None and st.kind == "op":
                for _, _, f in st.fills:
                    if f.kind == "s":
                        last[f.n] = i
        for off, i in last.items():
            steps[i].last_of.append(off)
        return cls(pid, steps, kinds, persistent, tuple(puts))

    def _epoch(self, session, base: int, b: int, slots: dict) -> int:
        """A new epoch when the layout of a tensor from outside the iteration (a slot, an upload
        before step ``b``) or of a fixed tensor (the session's generation) changed."""
        handles = session.handles
        key = (session.layout_generation,
               *[(n, _layout(handles[h]) if h in handles else None) for n, h in sorted(slots.items())],
               *[_layout(handles[base + o]) if base + o in handles else None for i, o in self.puts if i < b])
        if key != self.epoch_key:
            self.epoch_key = key
            epoch = self.epochs.get(key)
            if epoch is None:
                if len(self.epochs) >= 4 * capture.MAX_EPOCHS:  # layouts that never come back: bounded
                    self.epochs.clear()
                epoch = self.epochs[key] = max(self.epochs.values(), default=self.epoch) + 1
            self.epoch = epoch
        return self.epoch

    def _segments(self, session, epoch: int) -> dict:
        """Captured segments for a run ahead, planned on the second run of an epoch (the first
        sized the steps)."""
        segments = self.segments.get(epoch)
        if segments is not None:
            return segments
        if epoch != self.seen_epoch:
            self.seen_epoch = epoch
            return {}
        if session.device.type not in ("cpu", "cuda") or not capture.ENABLED or \
                len(self.segments) >= capture.MAX_EPOCHS:
            return {}
        segments = self.segments[epoch] = capture.plan(self.steps, epoch, self.dropped)
        return segments

    def release(self, session) -> None:
        """Let the segments go, and with them the memory their CUDA graphs kept."""
        self.segments.clear()
        session.hold(-self.graph_bytes)
        self.graph_bytes = 0

    def expect_dropped(self, session, offsets: frozenset) -> None:
        """The robot expects to drop the outputs at ``offsets`` before each iteration ends: its
        segments need not return them (``capture.Segment.elided``); it names those it still holds
        when it settles (``AheadRun.settle``). A change plans the segments again; after
        ``capture.MAX_EPOCHS`` changes nothing is left out any more, which is always safe."""
        if offsets == self.dropped or self.dropped_changes > capture.MAX_EPOCHS:
            return
        self.dropped_changes += 1
        self.dropped = offsets if self.dropped_changes <= capture.MAX_EPOCHS else frozenset()
        self.release(session)

    def _run_segment(self, seg, session, base: int, slots: dict, run: "AheadRun") -> bool:
        """Run a captured segment in place of its steps; False: they run op by op (nothing was bound)."""
        values = seg.inputs(session.handles, base, slots)
        if values is None:
            return False
        if seg.graph is None and any(self.steps[j].epoch != self.epoch for j in range(seg.start, seg.end)):
            return False  # (back in its epoch, steps sized since in another: op by op once re-sizes them)
        session.reserve(seg.new_bytes)  # (tracing runs the steps too)
        if seg.graph is None:
            if not seg.trace(values, session.device):
                return False
            if session.device.type == "cuda":  # a CUDA graph keeps the memory its steps made
                session.hold(seg.new_bytes)  # (fits: reserved just above)
                self.graph_bytes += seg.new_bytes
        run.made.extend(seg.made)  # (before binding: an error half-way leaves its handles to settle)
        outs = seg.run(session, values, base)
        if outs is None:
            del run.made[-len(seg.made):]
            return False
        run.segments.append((seg.start, seg.end, seg.elided))
        run.unbound.append((seg, outs))
        if seg.start <= self.last_op < seg.end:
            self.timed_runs += 1
        return True

    def _metas(self, st: ProgramStep, session, epoch: int) -> list | None:
        if st.epoch == epoch:
            return st.metas
        metas = st.sized(session)
        if st.static:
            st.epoch = epoch
        return metas

    def run(self, session, base: int, a: int, b: int, slots: dict, dead: frozenset = frozenset()) -> None:
        """Run steps ``a`` to ``b - 1`` of the iteration whose handles start at ``base``.

        ``dead``: handles the robot has already dropped (the frees riding on this message).
        Their tensors are never bound to a handle: they live in ``local`` only until their
        last reader in this run, so a replayed inference holds no more than eager would.
        """
        tensor, steps = session.tensor, self.steps
        local: dict[int, Any] = {}
        epoch = self._epoch(session, base, b, slots)
        try:
            for i in range(a, b):
                st = steps[i]
                if st is None or st.kind != "op":
                    continue
                fills = st.fills
                try:
                    for box, where, f in fills:
                        if f.kind == "s":
                            t = local.get(f.n)
                            box[where] = t if t is not None else tensor(base + f.n)
                        else:
                            h = slots.get(f.n)
                            if h is None:
                                raise OpError(f"program {self.pid} step {i}: tensor slot {f.n} was not given")
                            box[where] = tensor(h)
                    outs = [None if o is None or base + o in dead else base + o for o in st.outs]
                    t0 = clock()
                    _, made, _ = session.execute_sized(st.info, st.args, st.kwargs, outs, self._metas(st, session, epoch))
                    self._timed(i, clock() - t0)
                    if st.writes_fixed:
                        session.layout_generation += 1
                        epoch = self._epoch(session, base, b, slots)
                    for o, h, t in zip(st.outs, outs, made):
                        if o is not None and h is None and not isinstance(t, str):
                            local[o] = t
                finally:
                    st.unfill()
                for off in st.last_of:
                    local.pop(off, None)
        finally:
            local.clear()

    def ahead(self, session, base: int, a: int, b: int, slots: dict, seqs: list, send) -> "AheadRun":
        """Run steps ``a`` to ``b - 1`` before the robot confirms them (see the module's docstring).

        Each wait step is answered with ``send(reply, frames)``, its reply carrying the next of
        ``seqs``, but for a sync right after a download (``codec.answered``). The run stops
        before a step it may not run yet (a hole, a tensor slot not given, a write to a tensor
        older than this iteration, the session's memory limit):
        the waits left are answered ``{"stop": i}``, the robot confirms up to each and asks
        again. An op that fails answers the waits left with the error.
        """
        run = AheadRun(self, base, a)
        waits = iter(seqs)
        reply = None
        steps, kinds, handles = self.steps, self.kinds, session.handles
        epoch = self._epoch(session, base, b, slots)  # (no write to a fixed tensor runs ahead: it stays)
        segments = self._segments(session, epoch)
        i = a
        try:
            while i < b:
                run.end = i
                st = steps[i]
                kind = kinds[i]
                i += 1
                if kind == "op":  # the common case first, kept lean: it is most of a replay's server time
                    seg = segments.get(i - 1) if segments else None
                    if seg is not None and seg.end <= b and not seg.broken and \
                            self._run_segment(seg, session, base, slots, run):
                        i = seg.end
                        continue
                    if not (st.fill(handles, base, slots) or self._fill(st, session, base, slots)):
                        break
                    try:
                        if st.writes and not run.keep_old_values(st, session):
                            break
                        outs = [None if o is None else base + o for o in st.outs]
                        run.made.append((i - 1, st.outs))
                        t0 = clock()
                        session.execute_sized(st.info, st.args, st.kwargs, outs,
                                              st.metas if st.epoch == epoch else self._metas(st, session, epoch))
                        self._timed(i - 1, clock() - t0)
                    finally:
                        st.unfill()
                    continue
                if kind == "sync":
                    if not self.answered[i - 1]:
                        continue  # right after a download: its reply said it all
                    if session.device.type == "cuda":
                        torch.cuda.synchronize(session.device)
                    send({"q": next(waits)}, [])
                    continue
                if st is None:
                    break
                if not (st.fill(handles, base, slots) or self._fill(st, session, base, slots)):
                    break
                try:
                    if kind == "get":
                        reply, frames = session.download(st.args[0], private=True)
                        reply["q"] = next(waits)
                        send(reply, frames)
                        continue
                    if not run.keep_old_values(st, session):
                        break
                    # a data-dependent op: the robot learns its outputs' shapes from the reply
                    result, made, inputs = session.execute(st.info, st.args, st.kwargs, None, base + st.ob)
                    if self._epoch(session, base, b, slots) != epoch:  # (were it an op that writes a fixed tensor)
                        epoch, segments = self.epoch, {}
                    run.made.append((i - 1, [st.ob + j for j in range(len(made))]))
                    reply = session.named_outputs_reply(result, made, inputs)
                    reply["q"] = next(waits)
                    send(reply, [])
                finally:
                    st.unfill()
            else:
                run.end = b
        except OpError as e:
            if e.kind != "quota":  # out of memory ahead is no error: confirmed steps free as they go
                reply = {"t": "err", "kind": e.kind, "msg": str(e)}
        except Exception as e:  # noqa: BLE001 - reported at the wait the robot reaches next
            reply = {"t": "err", "kind": "op_failed",
                     "msg": f"{self.kinds[run.end]} step {run.end} failed on the server: {short_error(e)}"}
        stop = reply if reply is not None and reply.get("t") == "err" else {"stop": run.end}
        try:
            for q in waits:
                send({**stop, "q": q}, [])
        finally:
            run.bind_later(session)
        return run

    def _timed(self, i: int, seconds: float) -> None:
        best = self.seconds[i]
        if best == 0.0 or seconds < best:
            self.seconds[i] = seconds
        if i == self.last_op:
            self.timed_runs += 1

    def _fill(self, st: ProgramStep, session, base: int, slots: dict) -> bool:
        """``st.fill`` when a tensor was missing: False when a slot was not given (the run stops
        there), the session's error when a handle is not its own."""
        tensor = session.tensor
        try:
            for box, where, f in st.fills:
                if f.kind == "s":
                    box[where] = tensor(base + f.n)
                else:
                    h = slots.get(f.n)
                    if h is None:
                        st.unfill()
                        return False
                    box[where] = tensor(h)
        except OpError:
            st.unfill()
            raise
        return True


class AheadRun:
    """What a run ahead did, so that the robot's confirmation can settle it.

    ``made``: (step, output offsets from ``base``) in order; ``undo``: (step, tensor, its old
    value, its old layout) for every in-place write; ``end``: the first step not run;
    ``unbound``: (segment, its outputs) whose outputs no later step reads, bound once the
    replies are sent.
    """

    def __init__(self, program: Program, base: int, start: int):
        self.program, self.base, self.start, self.end = program, base, start, start
        self.made: list = []
        self.undo: list = []
        self.segments: list = []  # (first step, end, outputs left out) of each captured segment it ran
        self.unbound: list = []
        self.held = 0  # bytes of the old values kept

    def keep_old_values(self, st: ProgramStep, session) -> bool:
        """Before ``st`` writes in place: keep the old values; False if a target outlives the iteration."""
        for t in written_args(st.args, st.kwargs, st.writes):
            if not isinstance(t, torch.Tensor):
                continue
            if not session.born_in_iteration(t, self.base):
                return False
            n = t.numel() * t.element_size()
            session.hold(n)
            self.held += n
            self.undo.append((self.end, t, t.clone(), (t.shape, t.stride(), t.storage_offset())))
        return True

    def settle(self, session, reached: int, slots: dict, held: frozenset = frozenset()) -> None:
        """The robot confirmed the app reached steps before ``reached`` (and no further, if it
        is before the end): undo what ran past it; run what was stopped short of it; make again
        the outputs a segment left out that the robot still ``held`` (it expected to drop them)."""
        for i, t, old, (shape, stride, offset) in reversed(self.undo):  # (one that failed half-way too)
            if i >= reached:
                if t.shape != shape or t.stride() != stride or t.storage_offset() != offset:
                    t.set_(t.untyped_storage(), offset, shape, stride)  # an out= step grew it (arange's empty)
                t.copy_(old)
        # A segment keeps no old values: one the app turned away inside is made again up to the
        # turn, op by op from its inputs, which it never writes.
        redo = next((first for first, end, _ in self.segments if first < reached < end), None)
        cut = reached if redo is None else redo
        base = self.base
        session.free_handles([base + o for i, offsets in self.made if i >= cut for o in offsets if o is not None])
        if redo is not None:
            self.program.run(session, self.base, redo, reached, slots)
        if reached > self.end:
            self.program.run(session, self.base, self.end, reached, slots)
        if held:
            self._make_again(session, held, reached, slots)
        self.release(session)

    def _make_again(self, session, held: frozenset, reached: int, slots: dict) -> None:
        """Run again, op by op, each segment the app went through that left out an output the
        robot still holds, up to the last such output, binding those alone. The segment never
        writes its inputs, and they are still bound: the robot's frees ride on the message that
        settles the run and are done after it."""
        steps, base = self.program.steps, self.base
        for first, end, elided in self.segments:
            want = {o for o in held if o in elided and base + o not in session.handles}
            last = max((i for i in range(first, min(end, reached)) if want and not want.isdisjoint(steps[i].outs)),
                       default=None)
            if last is None:
                continue
            others = frozenset(base + o for i in range(first, last + 1) for o in steps[i].outs
                               if o is not None and o not in want)
            self.program.run(session, base, first, last + 1, slots, others)

    def bind_later(self, session) -> None:
        """Bind the segments' outputs left unbound. A handle that cannot be bound (one the robot
        reused, the session's handle quota) is reported at the robot's next request."""
        unbound, self.unbound = self.unbound, []
        for seg, outs in unbound:
            try:
                seg.bind(session, outs, self.base, later=True)
            except OpError as e:
                session.fail_later(e.kind, str(e))
            except Exception as e:  # noqa: BLE001 - after the replies: the session must serve on
                session.fail_later("op_failed", f"binding the outputs of steps {seg.start}..{seg.end - 1} "
                                                f"failed on the server: {short_error(e)}")

    def release(self, session) -> None:
        self.undo.clear()
        session.hold(-self.held)
        self.held = 0


def _written(info: OpInfo) -> tuple:
    """Where an op's schema says it writes in place: ("a", index) or ("k", name) for each."""
    out = []
    for j, arg in enumerate(info.op._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append(("k", arg.name) if arg.kwarg_only else ("a", j))
            if not arg.kwarg_only:
                out.append(("k", arg.name))  # a positional argument may also be given by name
    return tuple(out)


def _decode_get(i: int, spec: dict, session, persistent: set) -> ProgramStep:
    a = spec.get("a")
    if not isinstance(a, list) or len(a) != 1:
        raise OpError(f"program step {i}: a download names one tensor")

    def handle(h):
        persistent.add(h)
        return session.tensor(h)

    def ref(kind, n):
        if not 0 <= n < ITERATION_HANDLES:
            raise OpError(f"program step {i}: bad tensor reference")
        return _Fill(kind, n)

    args = codec.decode_value(a, handle, _no_inline, session.device, ref)
    return ProgramStep("get", None, args, {}, [])


def _no_inline(n):
    raise OpError("a download names a tensor of the session")


def _decode_step(i: int, spec: dict, session, consts: list, persistent: set) -> ProgramStep:
    info = session.ops.resolve(spec.get("op"))
    a, k, outs = spec.get("a", []), spec.get("k", {}), spec.get("o", [])
    ob = spec.get("ob", 0)
    if type(ob) is not int or not 0 <= ob < ITERATION_HANDLES:
        raise OpError(f"program step {i}: bad output offset 'ob'")
    if not isinstance(a, list) or not isinstance(k, dict) or not isinstance(outs, list):
        raise OpError(f"program step {i}: arguments must be a list 'a', an object 'k' and outputs 'o'")
    if not all(o is None or (type(o) is int and 0 <= o < ITERATION_HANDLES) for o in outs):
        raise OpError(f"program step {i}: bad output offsets")

    def handle(h):
        persistent.add(h)
        return session.tensor(h)

    def const(n):
        if not 0 <= n < len(consts):
            raise OpError(f"program step {i}: constant {n} was not sent")
        return consts[n]

    def ref(kind, n):
        if not 0 <= n < ITERATION_HANDLES:
            raise OpError(f"program step {i}: bad tensor reference")
        return _Fill(kind, n)

    args = codec.decode_value(a, handle, const, session.device, ref, session.generator_of)
    kwargs = {key: codec.decode_value(v, handle, const, session.device, ref, session.generator_of) for key, v in k.items()}
    return ProgramStep(spec["t"], info, args, kwargs, outs, _written(info), ob)


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset(), t.dtype, t.untyped_storage().nbytes()


def _tensor_places(box: Any, places: list) -> None:
    items = box.items() if isinstance(box, dict) else enumerate(box)
    for where, v in items:
        if type(v) is _Fill or isinstance(v, torch.Tensor):
            places.append((box, where, v))
        elif type(v) is list:
            _tensor_places(v, places)
