"""Captured segments: a stretch of a program's steps traced once into one TorchScript graph.

Run op by op, a replayed step costs ~12 us of Python around its kernel on a CPU server
(filling its arguments, checking its outputs' layouts, binding its handles): a fifth of
the keypoint net's run ahead. A segment runs its steps as one call of a traced graph and
binds their outputs afterwards: those a later step reads at once, the others once the run
ahead has sent its replies (binding ~300 outputs is ~1 ms of Python). The graph calls the
same aten kernels in the same order (the graph executor's optimisations are off: nothing is
fused or folded), so its results are bit-equal to the op list's.

A segment is a stretch of static op steps (their sizes known in this epoch: see
``Program``), none random, none handing out memory with gaps, whose in-place writes (an
``out=`` tensor grown included) hit only tensors made inside it and sharing no storage with
its inputs. So a segment never writes its inputs: where it fails, or where the robot
settles short of its end, its steps are simply run again op by op from the same inputs
(``Program.run``). Each output is checked each run against the layout it had when
traced; a step inside reads an output in the layout the op list would give it
(``Session.bind_outputs``). An uninitialised output (``empty``, then an ``out=`` op grows
and fills it: ``arange``'s way) is zeroed inside the graph where it is made, as the op
list zeroes it at binding, and is bound as grown; a stretch would otherwise end at each
(the keypoint net's grid ``arange``s cut its program in four).

On a CUDA server the stretch is captured as a CUDA graph instead (``CudaGraph``): one
launch replays its kernels, the same kernels the op list would launch, so again bit-equal.
"""
from __future__ import annotations

import warnings

import torch

from rrto import codec

from .ops import flat_tensors, output_binding, written_args

ENABLED = True  # rrto-server --no-capture turns it off
MIN_STEPS = 8  # shorter stretches stay op by op: a graph call has its own fixed cost
MAX_EPOCHS = 8  # a program whose layouts keep changing stops being traced after this many
steps_run = 0  # steps this server process ran inside segments (the daemon's stats report it)
outputs_left_out = 0  # outputs of those steps no handle ever named (``Segment.elided``)
graphs_captured = 0  # segments captured as CUDA graphs

torch._C._set_graph_executor_optimize(False)  # run the traced ops as traced: no fusion, no folding


class _In:
    """An argument of the segment: input ``i`` of the graph."""
    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


class _Made:
    """An argument made inside the segment: the output at offset ``n``."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class Unfit(Exception):
    """The stretch cannot be a segment (found while tracing it)."""


class Segment:
    """Steps ``start`` to ``end - 1`` of a program, one graph call once ``trace`` has run."""

    def __init__(self, start: int, end: int, steps: list, read_after: frozenset = frozenset(),
                 dropped: frozenset = frozenset()):
        self.start, self.end = start, end
        self.graph = None
        self.broken = False  # failed or unfit once: op by op for the rest of the epoch
        self.sources: list = []  # per graph input: (0, offset) step output, (1, n) slot, (2, tensor) fixed
        self._index: dict = {}
        made: set = set()
        read: set = set()
        grown: dict = {}  # offset -> its layout once a later step grew it (``arange``'s out= tensor)
        self._grows: dict = {}  # index of a step inside -> the offset it grows
        self.templates = []
        for st in steps[start:end]:
            fills = {(id(box), where): f for box, where, f in st.fills}
            a, k = self._template(st.args, fills, made, read), self._template(st.kwargs, fills, made, read)
            self.templates.append((st, a, k))
            made.update(o for o in st.outs if o is not None)
            if st.metas and st.metas[0].grows_input:  # (``_fits``: its one out= tensor, made here)
                ((box, where),) = st.writes
                n = self._grows[len(self.templates) - 1] = fills[(id(st.args if box == "a" else st.kwargs), where)].n
                grown[n] = st.metas[0]._replace(grows_input=False)
        # Outputs the robot expects to drop within the iteration that no step after the segment
        # reads: the graph does not return them, and frees each after its last reader inside.
        self.elided = frozenset(o for o in made if o in dropped and o not in read_after and o not in grown)
        self.read = frozenset(read)  # outputs a step inside reads
        # per step: info, (offset, meta) of each output it binds, where its
        # outputs start in the graph's, and whether a step after the segment reads one of them
        self.binds, n = [], 0
        for st, _, _ in self.templates:
            mine = [(o, grown.get(o, m)) for o, m in zip(st.outs, st.metas) if o is not None and o not in self.elided]
            self.binds.append((st.info, mine, n, any(o in read_after for o, _ in mine)))
            n += len(mine)
        self.made = [(start + k, st.outs) for k, (st, _, _) in enumerate(self.templates)]  # AheadRun.made's
        self.new_bytes = sum(m.new_bytes for st, _, _ in self.templates for m in st.metas)
        self.later_bytes = sum(m.new_bytes for (st, _, _), b in zip(self.templates, self.binds) if not b[3]
                               for o, m in zip(st.outs, st.metas) if o not in self.elided)
        self.layouts: list = []  # (shape, stride, offset, dtype) of each graph output when traced

    def inputs(self, handles: dict, base: int, slots: dict) -> list | None:
        """The graph's inputs for the iteration at ``base``; None where one is missing."""
        try:
            return [handles[base + v] if k == 0 else handles[slots[v]] if k == 1 else v for k, v in self.sources]
        except KeyError:
            return None

    def trace(self, values: list, device: torch.device = torch.device("cpu")) -> bool:
        """Trace the steps once on ``values``, this run's inputs (the segment writes none of them);
        on a CUDA ``device``, capture them as a CUDA graph."""
        layouts, elided, read = self.layouts, self.elided, self.read
        grown = set(self._grows.values())
        actions: list = []  # per output: what binding it takes, decided on the eager pass

        def run(*ins, eager=False):
            own = {t.untyped_storage()._cdata for t in ins} if eager else ()
            made: dict = {}
            outs = []
            at: dict = {}  # offset -> where in ``outs`` (the eager pass)
            todo = iter(actions)
            for j, (st, a, k) in enumerate(self.templates):
                args, kwargs = _fill(a, ins, made), _fill(k, ins, made)
                for t in written_args(args, kwargs, st.writes) if eager else ():
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in own:
                        raise Unfit("writes an input in place")
                flat = flat_tensors(st.info.op(*args, **kwargs), [])
                if len(flat) != len(st.outs):
                    raise Unfit("output count")
                if st.info.uninitialised:  # zeroed as made: no robot reads what was in that memory
                    for t in flat:
                        if eager and (t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes):
                            raise Unfit("uninitialised memory the tensor does not cover")
                        t.zero_()
                for o, t, m in zip(st.outs, flat, st.metas):
                    if o is None:
                        continue
                    if eager:
                        actions.append(_binding(t, m, o in read, args, kwargs))
                        if o in grown and actions[-1] is not None:
                            raise Unfit("a step grows an output bound as a copy or a view")
                    bound, inside = _apply(actions[-1] if eager else next(todo), t, m, o in read)
                    made[o] = inside
                    if o in elided:
                        continue
                    if eager:
                        at[o] = len(outs)
                        layouts.append(_layout(bound))
                    outs.append(bound)
                if eager and j in self._grows:  # its out= tensor as grown here (later changes: unfit at run)
                    i = at[self._grows[j]]
                    layouts[i] = _layout(outs[i])
            return tuple(outs)

        # Sizes asked of a tensor while tracing are traced values: decide and note layouts on an
        # eager pass first (it writes nothing but what it made), then trace with the decisions fixed.
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run(*values, eager=True)
                if device.type == "cuda":
                    self.graph = CudaGraph(run, values, [k == 2 for k, _ in self.sources])
                else:
                    self.graph = torch.jit.trace(run, tuple(values), check_trace=False, strict=False)
        except Exception:  # noqa: BLE001 - anything the tracer cannot take stays op by op
            self.broken = True
            return False
        global graphs_captured
        graphs_captured += device.type == "cuda"
        return True

    def run(self, session, values: list, base: int) -> tuple | None:
        """Run the graph on ``values`` and bind to ``base`` + its offset each output a step after
        the segment reads; the others wait for ``bind(..., later=True)``, with their bytes held.
        None, nothing bound: it failed, or an output is not laid out as when traced (the op list
        runs it again). The caller has reserved ``new_bytes``."""
        try:
            with torch.no_grad():
                outs = self.graph(*values)
        except Exception:  # noqa: BLE001 - the op list runs it again and reports the step that fails
            self.broken = True
            return None
        if type(outs) is torch.Tensor:
            outs = (outs,)
        for t, (shape, stride, offset, dtype) in zip(outs, self.layouts):
            if t.shape != shape or t.stride() != stride or t.storage_offset() != offset or t.dtype != dtype:
                self.broken = True
                return None
        self.bind(session, outs, base, later=False)
        session.hold(self.later_bytes)
        global steps_run, outputs_left_out
        session.ops_run += self.end - self.start
        steps_run += self.end - self.start
        outputs_left_out += len(self.elided)
        return outs

    def bind(self, session, outs: tuple, base: int, later: bool) -> None:
        """Bind the outputs a step after the segment reads (``later`` False), or the others.

        Binding ~300 outputs is ~1 ms of Python on a CPU server; outputs no later step reads are
        bound after the run ahead has sent its replies (``AheadRun.bind_later``), off the
        inference's critical path, and before the session reads its next message."""
        if later:
            session.hold(-self.later_bytes)
        for info, mine, first, read_after in self.binds:
            if read_after is not later:
                session.bind_outputs(info, list(outs[first:first + len(mine)]), [base + o for o, _ in mine],
                                     [m for _, m in mine], (), {}, zeroed=True)

    def _template(self, x, fills: dict, made: set, read: set):
        """``x`` with each hole and tensor replaced by where the graph finds it."""
        if type(x) is list:
            return [self._item(x, i, v, fills, made, read) for i, v in enumerate(x)]
        return {key: self._item(x, key, v, fills, made, read) for key, v in x.items()}

    def _item(self, box, where, v, fills: dict, made: set, read: set):
        f = fills.get((id(box), where))
        if f is not None:
            if f.kind == "s" and f.n in made:
                read.add(f.n)
                return _Made(f.n)
            return self._source((0 if f.kind == "s" else 1, f.n))
        if isinstance(v, torch.Tensor):
            return self._source((2, v))
        if type(v) in (list, dict):
            return self._template(v, fills, made, read)
        return v

    def _source(self, src: tuple) -> _In:
        key = (src[0], id(src[1]) if src[0] == 2 else src[1])
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.sources)
            self.sources.append(src)
        return _In(i)


class CudaGraph:
    """A segment's kernels captured once as a CUDA graph, called as the traced graph would be.

    A graph reads and writes fixed addresses. Each call copies the inputs that change (all but
    the fixed tensors, which are the same tensors every run) into the buffers it was captured
    on, and replays. Its outputs live in the graph's own memory, which the next replay
    overwrites while the robot may still hold this iteration's: each is handed out in memory
    of its own, aliasing kept (outputs viewing one tensor view one copy of it; an output
    viewing an input views the input given; one viewing a fixed tensor views that tensor)."""

    def __init__(self, run, values: list, fixed: list):
        self.fixed = fixed
        self.static = [v if f else _same_layout(v) for v, f in zip(values, fixed)]
        side = torch.cuda.Stream()  # warm up on a side stream, as the capture runs: cuBLAS and
        side.wait_stream(torch.cuda.current_stream())  # cuDNN set up their workspaces outside it
        with torch.cuda.stream(side):
            run(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other sessions' threads keep running ops (and allocating) meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outs = run(*self.static)
        inputs = {_base(s): i for i, (s, f) in enumerate(zip(self.static, fixed)) if not f}
        fixed_bases = {_base(v) for v, f in zip(values, fixed) if f}
        owned: dict = {}  # storage in the graph's memory -> its place in ``pool``
        self.pool: list = []  # those storages, copied after each replay
        self.where = []  # per output: ("pool", n), ("input", i) or ("fixed", None)
        for t in self.outs:
            b = _base(t)
            if b in inputs:
                self.where.append(("input", inputs[b]))
            elif b in fixed_bases:
                self.where.append(("fixed", None))
            else:
                if b not in owned:
                    owned[b] = len(self.pool)
                    self.pool.append(t.untyped_storage())
                self.where.append(("pool", owned[b]))

    def __call__(self, *values) -> tuple:
        for s, v, f in zip(self.static, values, self.fixed):
            if f:
                continue
            if v.shape != s.shape or v.stride() != s.stride() or v.storage_offset() != s.storage_offset() \
                    or v.dtype != s.dtype:
                raise Unfit("an input is not laid out as when captured")
            s.copy_(v)
        self.graph.replay()
        copies = [st.clone() for st in self.pool]
        outs = []
        for t, (kind, n) in zip(self.outs, self.where):  # (each a tensor of its own: an in-place
            st = copies[n] if kind == "pool" else values[n].untyped_storage() if kind == "input" \
                else t.untyped_storage()  # transpose_ on one handle must not move another's)
            outs.append(_laid_out_as(t, st))
        return tuple(outs)


def _laid_out_as(t: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor:
    """A new tensor on ``storage`` with ``t``'s dtype, shape, strides and offset."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


def _same_layout(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s layout and storage size in memory of its own, holding ``t``'s values."""
    return _laid_out_as(t, torch.UntypedStorage(t.untyped_storage().nbytes(), device=t.device)).copy_(t)


def _base(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def plan(steps: list, epoch: int, dropped: frozenset = frozenset()) -> dict:
    """The segments of a program in this epoch, by first step (not traced yet); ``dropped``: the
    outputs the robot expects to drop within each iteration (``Segment.elided``)."""
    out: dict = {}
    i, n = 0, len(steps)
    read_from = [frozenset()] * (n + 1)  # per step: the offsets it or a step after it reads
    for j in range(n - 1, -1, -1):
        st = steps[j]
        read_from[j] = read_from[j + 1] | {f.n for _, _, f in st.fills if f.kind == "s"} if st is not None \
            else read_from[j + 1]
    while i < n:
        j, made = i, set()
        while j < n and _fits(steps[j], epoch, made):
            made.update(o for o in steps[j].outs if o is not None)
            j += 1
        if j - i >= MIN_STEPS:
            out[i] = Segment(i, j, steps, read_from[j], dropped)
        i = max(j, i + 1)
    return out


def _fits(st, epoch: int, made: set) -> bool:
    if st is None or st.kind != "op" or not st.static or st.epoch != epoch or st.metas is None:
        return False
    info = st.info
    if info.generator_arg or info.data_dependent or st.writes_fixed:
        return False
    if len(st.metas) != len(st.outs):
        return False
    grows = any(m.grows_input for m in st.metas)
    if grows and (len(st.metas) != 1 or len(st.writes) != 1):
        return False  # one out= tensor grown (``arange`` into its empty): ``Segment`` binds it grown
    if info.uninitialised and not all(codec.is_dense(m.shape, m.stride) for m in st.metas):
        return False  # gaps zero_() would not reach (the op list zeroes the whole storage)
    fills = {(id(box), where): f for box, where, f in st.fills}
    for box, where in st.writes:  # in place only into what this stretch made
        holder = st.args if box == "a" else st.kwargs
        if box == "a" and where >= len(holder) or box == "k" and where not in holder or holder[where] is None:
            if grows:
                return False
            continue
        f = fills.get((id(holder), where))
        if f is None or f.kind != "s" or f.n not in made:
            return False
    return True


def _binding(t: torch.Tensor, m, read_inside: bool, args, kwargs):
    """How ``Session.bind_outputs`` binds output ``t`` op by op (``output_binding``), for
    ``_apply`` to trace: None (as it is, or unusable), an int (a view of the same memory under
    the promised strides, at that storage offset) or "copy". Unfit where op by op would refuse
    it, where a step inside reads what op by op marks unusable, or for a copy with gaps (the
    session zero-fills those outside any op)."""
    how = output_binding(t, m, args, kwargs)
    if how == "unusable" and read_inside:
        raise Unfit("a step inside reads an output the op list would refuse")
    if how == "refused":
        raise Unfit("a view whose layout differs from its meta kernel's")
    if how == "view":
        return t.storage_offset()
    if how == "copy":
        if not codec.is_dense(m.shape, m.stride):
            raise Unfit("a copy to a layout with gaps")
        return "copy"
    return None


def _apply(how, t: torch.Tensor, m, read_inside: bool) -> tuple:
    """(what the segment returns for output ``t``, what a step inside reads of it). A view is
    made again at binding from ``t`` as returned, whose layout each run checks."""
    if how is None:
        return t, t
    if how == "copy":
        out = torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=t.device)
        out.copy_(t)
        return out, out
    return t, (t.as_strided(m.shape, m.stride, how) if read_inside else t)


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset(), t.dtype


def _fill(x, ins: tuple, made: dict):
    if type(x) is list:
        return [_fill(y, ins, made) for y in x]
    if type(x) is dict:
        return {k: _fill(v, ins, made) for k, v in x.items()}
    if type(x) is _In:
        return ins[x.i]
    if type(x) is _Made:
        return made[x.n]
    return x
