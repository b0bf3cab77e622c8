"""Which steps of a recorded Program are local along the banded axis, and what a band needs.

A Program starts with the upload of the input (step 0). Its *local chain* is the
longest run of steps after it in which every step that reads a chain tensor is local
along dim 2 (the rows: H of NCHW, D of NCDHW): convolution (also transposed),
max/avg pooling, eval batch-norm, element-wise ops whose other operands broadcast
along the rows, channel concatenation, nearest upsampling by an integer factor.
The first step that reads a chain tensor and is none of these (linear, softmax,
global pooling, a view that mixes rows, attention, a download) ends the chain.
Steps that read no chain tensor (a factory, a workspace) are *free*: they stay in
the chain and the server runs them.

Tensors are SSA *values*: an in-place op (``relu_``) makes a new value of the same
handle offset. Value 0 is the uploaded input. Every chain step is a ``Node`` holding
its op's wire form, so a band can be written as ordinary ATen ops (``bands.py``).

A *cut* at depth d (the robot runs steps [0, d)) is clean when exactly one chain
value made before d is read from d on: the value the robot ships in bands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rrto.record.program import IN, Program

from .halo import IDENTITY, Transposed, Window, need_graph, need_rows

ROW = 2  # the banded axis


@dataclass(frozen=True)
class Upsample:
    """Nearest upsampling by an integer factor on the rows: output row o reads row o // f."""
    f: int

    def need(self, a: int, b: int) -> tuple[int, int]:
        return self.span(a, b) if b > a else (0, 0)

    def span(self, a, b):
        """``need`` of a non-empty range; elementwise on arrays of rows too."""
        return (a // self.f, (b - 1) // self.f + 1)


@dataclass
class Node:
    """One chain step. ``kind``: input, conv, tconv, maxpool, avgpool, point, bn, cat, up, view, free."""
    step: int
    name: str
    kind: str
    a: list = field(default_factory=list)  # the op's wire arguments (markers: {"s": off}, {"h"}, {"i"})
    k: dict = field(default_factory=dict)
    ins: tuple = ()  # banded values read, with the argument path where each sits
    out: int | None = None  # the banded value made
    off: int | None = None  # the handle offset that holds it
    window: Any = IDENTITY
    pad_at: int | None = None  # the argument that holds the op's padding (windowed ops)


@dataclass
class StepInfo:
    """What the cost model needs of step ``index`` (a cut right after it: depth index + 1)."""
    index: int
    name: str
    local: bool  # a chain step (free steps included)
    rows: int  # rows of the value shipped at this cut
    bytes: int  # bytes of everything live at this cut (what the server would need)
    clean: bool  # the cut after this step ships a single banded value
    chain: "Chain"

    def need(self, a: int, b: int) -> tuple[int, int]:
        """Rows of the chain input that rows [a, b) of this step's output need."""
        return self.chain.need(self.index + 1, a, b)

    def row_needs(self) -> tuple:
        """``need(r, r + 1)`` of every output row, as two arrays (lo, hi)."""
        return self.chain.row_needs(self.index + 1)


class Chain:
    def __init__(self, program: Program, nodes: list[Node], state: "_State", ends: str, reads: dict,
                 side_reads: dict):
        self.program, self.nodes = program, nodes
        self.shapes, self.dtypes, self.axis = state.shapes, state.dtypes, state.axis  # per value
        self.ends = ends  # why the chain stops where it does
        self._reads = reads  # value -> last step reading it
        self._side_reads = side_reads  # step -> last step reading one of its non-banded outputs
        self._outs = [n.out for n in nodes]
        self._rows = {v: self.rows(v) for v in self.shapes}
        self._need: dict = {}  # (depth, a, b) -> input rows: the planner asks for the same bands again and again

    def __len__(self) -> int:
        """Steps [0, len) are the chain (step 0: the input upload); 0 if there is no chain."""
        return len(self.nodes)

    def rows(self, v: int) -> int:
        return self.shapes[v][self.axis[v]]

    def nbytes(self, v: int) -> int:
        n = 1
        for s in self.shapes[v]:
            n *= s
        return n * self.dtypes[v].itemsize

    @property
    def input_rows(self) -> int:
        return self.rows(0) if self.nodes else 0

    def value_at(self, depth: int) -> int:
        """The banded value made last before ``depth`` (what a cut there ships)."""
        return next(o for o in reversed(self._outs[:depth]) if o is not None)

    def offset_at(self, depth: int) -> int:
        """The handle offset of ``value_at(depth)`` in the program."""
        return next(n.off for n in reversed(self.nodes[:depth]) if n.out is not None)

    def live(self, depth: int) -> list[int]:
        """Chain values made before ``depth`` and read from ``depth`` on."""
        return [n.out for n in self.nodes[:depth] if n.out is not None and self._reads.get(n.out, -1) >= depth]

    def clean(self, depth: int) -> bool:
        """A cut at ``depth`` ships one banded value and nothing else the server would need."""
        if not 1 <= depth <= len(self.nodes):
            return False
        if any(self._side_reads.get(s, -1) >= depth for s in range(depth)):
            return False
        live = self.live(depth)
        return live == [self.value_at(depth)] or (not live and depth == len(self.nodes))

    def cuts(self) -> list[int]:
        """Every clean depth."""
        return [d for d in range(1, len(self.nodes) + 1) if self.clean(d)]

    def graph(self, depth: int) -> list:
        """(value, [(input value, window), ...]) of the banded nodes before ``depth``."""
        return [(n.out, [(v, n.window) for v, _ in n.ins]) for n in self.nodes[1:depth] if n.out is not None]

    def ranges(self, depth: int, a: int, b: int) -> dict:
        """Rows of every value that rows [a, b) of the value cut at ``depth`` need."""
        return need_graph(self.graph(depth), self._rows, self.value_at(depth), a, b)

    def row_needs(self, depth: int) -> tuple:
        """``need(depth, r, r + 1)`` for every row r of the value cut at ``depth``, as two arrays."""
        return need_rows(self.graph(depth), self._rows, self.value_at(depth))

    def need(self, depth: int, a: int, b: int) -> tuple[int, int]:
        """Rows of the input (clipped) that rows [a, b) of the value cut at ``depth`` need."""
        key = (depth, a, b)
        lo_hi = self._need.get(key)
        if lo_hi is None:
            lo_hi = self._need[key] = self.ranges(depth, a, b).get(0, (0, 0))
        return lo_hi

    def steps(self) -> list[StepInfo]:
        out = []
        for i, n in enumerate(self.nodes):
            v = self.value_at(i + 1)
            live = self.live(i + 1)
            out.append(StepInfo(i, n.name, True, self.rows(v), sum(self.nbytes(u) for u in live) or self.nbytes(v),
                                self.clean(i + 1), self))
        return out


def analyse(program: Program) -> Chain:
    """The local chain of ``program``: the longest over the input's possible row axes."""
    steps = program.steps
    if not steps or steps[0].kind != "put":
        return Chain(program, [], _State({}), "the program does not start with an upload", {}, {})
    meta = steps[0].key[1]
    best = None
    # the input's row axis: NC(D)HW uploads band along dim 2; an HWC camera frame along dim 0
    for ax in sorted(range(len(meta.shape)), key=lambda d: (d != ROW, d)):
        if meta.shape[ax] < 2:
            continue
        chain = _analyse(program, ax)
        score = (sum(n.kind not in ("point", "free", "input") for n in chain.nodes), len(chain))
        if best is None or score > best[0]:
            best = (score, chain)
    if best is None:
        return Chain(program, [], _State({}), "the input has no rows to band", {}, {})
    return best[1]


class _State:
    """Per value: shape, dtype, row axis; per handle offset: its current value."""

    def __init__(self, value: dict):
        self.value = value
        self.shapes: dict = {}
        self.dtypes: dict = {}
        self.axis: dict = {}
        self.side: dict[int, int] = {}  # offset of a non-banded output -> the step that made it
        self.viewed: set = set()  # values that share storage with another value (views)

    def new(self, shape, dtype, axis) -> int:
        v = len(self.shapes)
        self.shapes[v], self.dtypes[v], self.axis[v] = tuple(shape), dtype, axis
        return v


def _analyse(program: Program, axis: int) -> Chain:
    steps = program.steps
    meta = steps[0].key[1]
    stt = _State({steps[0].out_offsets[0]: 0})
    stt.new(meta.shape, meta.dtype, axis)
    made_free: set = set()  # offsets made by free steps
    nodes = [Node(0, "upload", "input", out=0, off=steps[0].out_offsets[0])]
    reads: dict[int, int] = {}
    side_reads: dict[int, int] = {}
    ends = "the program ends"
    value, side = stt.value, stt.side
    for i in range(1, len(steps)):
        st = steps[i]
        offs = [r[1] for r in st.roles if r[0] == IN]
        chain_offs = [o for o in offs if o in value]
        for o in offs:
            if o in side:
                side_reads[side[o]] = i
        if st.kind != "op":
            ends = f"step {i} ({st.kind}) waits for the server"
            break
        if not chain_offs and all(o in made_free or o not in side for o in offs):
            nodes.append(Node(i, st.name, "free"))
            for o in st.out_offsets:
                if o is not None:
                    side[o] = i  # not banded: a cut after it must leave it to the server
                    made_free.add(o)
            continue
        node, why = _classify(i, st, stt)
        if node is None:
            ends = f"step {i} ({st.name}) is not local along the rows: {why}"
            break
        for v, _ in node.ins:
            reads[v] = i
        nodes.append(node)
    # reads after the chain: the server needs those values (and side outputs) whole
    for st in steps[len(nodes):]:
        for r in st.roles:
            if r[0] == IN:
                if r[1] in value:
                    reads[value[r[1]]] = len(steps)
                if r[1] in side:
                    side_reads[side[r[1]]] = len(steps)
    return Chain(program, nodes, stt, ends, reads, side_reads)


# -- classification ---------------------------------------------------------------------

# conv-like ops: (stride, padding, dilation, output padding) argument positions, and the
# defaults that fill an argument list the wire form left short
_CONV = {
    "convolution.default": ((3, 4, 5, 7), None),
    "conv1d.default": ((3, 4, 5, None), [None, [1], [0], [1], 1]),
    "conv2d.default": ((3, 4, 5, None), [None, [1], [0], [1], 1]),
    "conv3d.default": ((3, 4, 5, None), [None, [1], [0], [1], 1]),
    "conv_transpose1d.input": ((3, 4, 7, 5), [None, [1], [0], [0], 1, [1]]),
    "conv_transpose2d.input": ((3, 4, 7, 5), [None, [1], [0], [0], 1, [1]]),
    "conv_transpose3d.input": ((3, 4, 7, 5), [None, [1], [0], [0], 1, [1]]),
}
_BN = {"native_batch_norm": 5, "_native_batch_norm_legit_no_training": None, "batch_norm": 5}
_MAXPOOL = {"max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool2d", "max_pool3d", "max_pool1d"}
_AVGPOOL = {"avg_pool2d", "avg_pool3d", "avg_pool1d"}
_UPSAMPLE = {"upsample_nearest2d", "upsample_nearest3d", "upsample_nearest1d"}
_VIEWS = {"permute", "unsqueeze", "squeeze"}
_CASTS = {"to.dtype", "_to_copy.default", "clone.default"}


def _classify(i: int, st, stt: _State) -> tuple[Node | None, str]:
    op = st.key[0]
    base, overload = op._schema.name.split("::")[-1], op._overloadname
    full = f"{base}.{overload}"
    spec = st.spec
    a, k = list(spec.get("a", [])), dict(spec.get("k", {}))
    value, side, shapes = stt.value, stt.side, stt.shapes
    if "out" in k:
        return None, "it writes into an out= tensor"
    if full in _CASTS and set(k) - {"dtype", "memory_format", "non_blocking", "copy"}:
        return None, "a copy that changes more than the dtype"
    metas = _metas(st.key)  # per tensor argument, in marker order: (shape, dtype)
    refs: list = []  # (path, marker) of every tensor argument
    _markers(a, (), refs)
    if len(refs) != len(metas):
        return None, "its arguments could not be matched with its signature"
    banded, params = [], []
    for (path, mk), m in zip(refs, metas):
        if "s" in mk:
            off = mk["s"]
            if off in side:
                return None, "it reads a tensor that is not banded (batch-norm statistics, pool indices, a factory's)"
            if off not in value:
                return None, "it reads a tensor made outside the chain"
            banded.append((value[off], path, m))
        elif "x" in mk:
            return None, "it reads a tensor that changes every inference from outside the chain"
        else:
            params.append((path, m))
    inplace = bool(st.pattern) and not st.pattern[0]
    v0 = banded[0][0]
    ax = stt.axis[v0]
    shape_in = shapes[v0]
    rank = len(shape_in)
    try:
        out_shapes = _out_shapes(op, st.key)
    except Exception as e:  # noqa: BLE001 - a meta kernel we cannot run: not local
        return None, f"its output shape is unknown ({type(e).__name__})"
    out_shape, out_dtype = out_shapes[0]
    window: Any = IDENTITY
    kind, pad_at, out_ax = "point", None, ax
    first_only = True  # only argument 0 is banded
    windowed = False
    if full in _CONV:
        (si, pi, di, oi), fill = _CONV[full]
        if fill is not None:  # positions 2, 3, ...: the defaults of what the call left out
            a += fill[len(a) - 2:]
        if len(refs) < 2 or refs[1][0] != (1,) or "h" not in refs[1][1]:
            return None, "its weight is not a parameter"
        kk = metas[1][0][ROW]
        transposed = a[6] if full == "convolution.default" else full.startswith("conv_transpose")
        stride, pad, dil = _first(a[si]), _first(a[pi]), _first(a[di])
        if transposed:
            window = Transposed(kk, stride, pad, dil)
            if _first(a[oi]) != 0 or not window.gapless:
                return None, "a transposed convolution with gaps or output padding on the rows"
            kind = "tconv"
        else:
            window, kind = Window(kk, stride, pad, dil), "conv"
        pad_at, windowed = pi, True
    elif base in _MAXPOOL or base in _AVGPOOL:
        while len(a) < 4:  # defaults: stride [] (the kernel), padding 0
            a.append([] if len(a) == 2 else 0)
        ks, s, p = _first(a[1]), _first(a[2]) if a[2] else _first(a[1]), _first(a[3])
        if base in _MAXPOOL:
            d = _first(a[4]) if len(a) > 4 else 1
            kind = "maxpool"
        else:
            d, ceil = 1, a[4] if len(a) > 4 else False
            include = a[5] if len(a) > 5 else True
            div = a[6] if len(a) > 6 else None
            if ceil or div is not None or (p and not include):
                return None, "an average pool whose divisor depends on the border"
            kind = "avgpool"
        window, pad_at, windowed = Window(ks, s, p, d), 3, True
    elif base in _BN:
        if _BN[base] is not None and a[_BN[base]] is not False:
            return None, "batch-norm in training mode mixes rows"
        if ax < 2:
            return None, "batch-norm across the rows"
        kind = "bn"
    elif full == "cat.default":
        dim = (a[1] if len(a) > 1 else k.get("dim", 0)) % rank
        if dim == ax:
            return None, "it concatenates along the rows"
        kind, first_only = "cat", False
    elif base in _UPSAMPLE:
        if ax != ROW:
            return None, "upsampling on another axis"
        f = out_shape[ROW] // shape_in[ROW]
        if f * shape_in[ROW] != out_shape[ROW]:
            return None, "upsampling by a non-integer factor"
        window, kind = Upsample(f), "up"
    elif base in _VIEWS:
        if full == "permute.default":
            dims = [d % rank for d in a[1]]
            out_ax = dims.index(ax)
        elif full == "unsqueeze.default":
            d = a[1] % (rank + 1)
            out_ax = ax + (d <= ax)
        elif full == "squeeze.dim":
            d = a[1] % rank
            if d == ax:
                return None, "it squeezes the rows away"
            out_ax = ax - (d < ax)
        else:
            return None, f"{full} may move the rows"
        kind = "view"
    elif full in _CASTS or (torch.Tag.pointwise in op.tags and not _has_generator(op)):
        first_only = False
    else:
        return None, f"{base} mixes rows"
    if windowed and ax != ROW:
        return None, f"its window slides along dim {ROW}, the rows are dim {ax}"
    if len(out_shape) != rank and kind != "view":
        return None, "its output has another rank"
    rows_out = out_shape[out_ax]
    for v, path, m in banded:
        if first_only and path != (0,):
            return None, "a banded tensor in a position that is not the input"
        if kind in ("point", "cat") and (stt.axis[v] != ax or shapes[v][ax] != rows_out or len(shapes[v]) != rank):
            return None, "operands with different rows"
    if kind == "point":
        for path, m in params:  # a per-channel constant, or any tensor without rows
            shp = m[0]
            j = ax - (rank - len(shp))
            if 0 <= j < len(shp) and shp[j] != 1:
                return None, "an operand that varies along the rows but is not banded"
    outs = st.out_offsets
    if inplace:
        if not banded or banded[0][1] != (0,):
            return None, "it writes in place into a tensor outside the chain"
        if v0 in stt.viewed and kind != "view":
            return None, "it writes in place through a view"
        off = next(r[1] for r in st.roles if r[0] == IN)
    else:
        off = outs[0]
        if off is None:
            return None, "it returns no new tensor"
        for o in outs[1:]:
            if o is not None:
                side[o] = i
    v = stt.new(out_shape, out_dtype, out_ax)
    if kind == "view":
        stt.viewed |= {v0, v}
    value[off] = v
    return Node(i, st.name, kind, a, k, tuple((u, p) for u, p, _ in banded), v, off, window, pad_at), ""


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) else x


def _has_generator(op) -> bool:
    return any(x.name == "generator" for x in op._schema.arguments)


def _markers(x: Any, path: tuple, out: list) -> None:
    if type(x) is list:
        for j, y in enumerate(x):
            _markers(y, path + (j,), out)
    elif type(x) is dict and len(x) == 1 and next(iter(x)) in ("s", "h", "i", "x"):
        out.append((path, x))


def _is_meta(x) -> bool:
    return hasattr(x, "_fields") and hasattr(x, "shape") and hasattr(x, "dtype")


def _is_cpu(x) -> bool:
    return type(x) is tuple and len(x) == 6 and x[0] == "cpu"


def _metas(key) -> list:
    """(shape, dtype) of every tensor argument in the recorded signature, in order."""
    out: list = []

    def walk(x):
        if _is_meta(x):
            out.append((tuple(x.shape), x.dtype))
        elif _is_cpu(x):
            out.append((tuple(x[2]), x[5]))
        elif type(x) is tuple:
            for y in x:
                walk(y)
    walk(key[1])
    return out


def _out_shapes(op, key) -> list:
    """Output (shape, dtype) of the recorded call, from its meta kernel."""
    def conv(x):
        if _is_meta(x):
            return torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device="meta")
        if _is_cpu(x):
            return torch.empty_strided(x[2], x[3], dtype=x[5], device="meta")
        if type(x) is tuple:
            return [conv(y) for y in x]
        if isinstance(x, torch.device):
            return torch.device("meta")
        return x
    args = conv(key[1])
    kwargs = {k: conv(v) for k, v in key[2]} if key[2] else {}
    res = op(*args, **kwargs)
    res = res if isinstance(res, (tuple, list)) else (res,)
    return [(tuple(r.shape), r.dtype) for r in res if isinstance(r, torch.Tensor)]


