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

from .halo import IDENTITY, Transposed, Window, need_graph

ROW = 2  # the banded axis


@dataclass(frozen=True)
class Upsample:
    """Nearest upsampling by an integer factor on the rows: output row o reads row o // f."""
    f: int

    def need(self, a: int, b: int) -> tuple[int, int]:
        return (a // self.f, (b - 1) // self.f + 1) if b > a else (0, 0)


@dataclass
class Node:
    """One chain step. ``kind``: input, conv, tconv, maxpool, avgpool, point, bn, cat, up, free."""
    step: int
    name: str
    kind: str
    a: list = field(default_factory=list)  # the op's wire arguments (markers: {"s": off}, {"h"}, {"i"})
    k: dict = field(default_factory=dict)
    ins: tuple = ()  # banded values read, with the argument path where each sits
    out: int | None = None  # the banded value made
    off: int | None = None  # the handle offset that holds it
    window: Any = IDENTITY


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


class Chain:
    def __init__(self, program: Program, nodes: list[Node], shapes: dict, dtypes: dict, ends: str,
                 reads: dict, side_reads: dict):
        self.program, self.nodes, self.shapes, self.dtypes = program, nodes, shapes, dtypes
        self.ends = ends  # why the chain stops where it does
        self._reads = reads  # value -> last step reading it
        self._side_reads = side_reads  # step -> last step reading one of its non-banded outputs
        self._outs = [n.out for n in nodes]

    def __len__(self) -> int:
        """Steps [0, len) are the chain (step 0: the input upload); 0 if there is no chain."""
        return len(self.nodes)

    def rows(self, v: int) -> int:
        return self.shapes[v][ROW]

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
        rows = {v: s[ROW] for v, s in self.shapes.items()}
        return need_graph(self.graph(depth), rows, self.value_at(depth), a, b)

    def need(self, depth: int, a: int, b: int) -> tuple[int, int]:
        """Rows of the input (clipped) that rows [a, b) of the value cut at ``depth`` need."""
        return self.ranges(depth, a, b).get(0, (0, 0))

    def steps(self) -> list[StepInfo]:
        out = []
        for i, n in enumerate(self.nodes):
            v = self.value_at(i + 1)
            live = self.live(i + 1)
            out.append(StepInfo(i, n.name, True, self.rows(v), sum(self.nbytes(u) for u in live) or self.nbytes(v),
                                self.clean(i + 1), self))
        return out


def analyse(program: Program) -> Chain:
    """The local chain of ``program`` (empty when it does not start with an upload)."""
    steps = program.steps
    if not steps or steps[0].kind != "put":
        return Chain(program, [], {}, {}, "the program does not start with an upload", {}, {})
    meta = steps[0].key[1]
    if len(meta.shape) < 3 or not meta.dtype.is_floating_point:
        return Chain(program, [], {}, {}, "the input has no rows to band", {}, {})
    shapes, dtypes = {0: tuple(meta.shape)}, {0: meta.dtype}
    value = {steps[0].out_offsets[0]: 0}  # handle offset -> its current banded value
    side: dict[int, int] = {}  # offset of a non-banded output of a chain step -> that step
    made_free: set = set()  # offsets made by free steps
    nodes = [Node(0, "upload", "input", out=0, off=steps[0].out_offsets[0])]
    reads: dict[int, int] = {}
    side_reads: dict[int, int] = {}
    ends = "the program ends"
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
        node, why = _classify(i, st, value, side, shapes, dtypes)
        if node is None:
            ends = f"step {i} ({st.name}) is not local along the rows: {why}"
            break
        for v, _ in node.ins:
            reads[v] = i
        nodes.append(node)
    else:
        i = len(steps)
    # reads after the chain: the server needs those values (and side outputs) whole
    for st in steps[len(nodes):]:
        for r in st.roles:
            if r[0] == IN:
                if r[1] in value:
                    reads[value[r[1]]] = len(steps)
                if r[1] in side:
                    side_reads[side[r[1]]] = len(steps)
    return Chain(program, nodes, shapes, dtypes, ends, reads, side_reads)


# -- classification ---------------------------------------------------------------------

_BN = {"native_batch_norm": 5, "_native_batch_norm_legit_no_training": None}
_MAXPOOL = {"max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool2d", "max_pool3d", "max_pool1d"}
_AVGPOOL = {"avg_pool2d", "avg_pool3d", "avg_pool1d"}
_UPSAMPLE = {"upsample_nearest2d", "upsample_nearest3d", "upsample_nearest1d"}


class _Ref:
    __slots__ = ("kind", "n")

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n


def _classify(i: int, st, value: dict, side: dict, shapes: dict, dtypes: dict) -> tuple[Node | None, str]:
    op = st.key[0]
    base, overload = op._schema.name.split("::")[-1], op._overloadname
    spec = st.spec
    a, k = spec.get("a", []), spec.get("k", {})
    if "out" in k:
        return None, "it writes into an out= tensor"
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
    outs = st.out_offsets
    shape_in = shapes[banded[0][0]]
    rank = len(shape_in)
    try:
        out_shapes = _out_shapes(op, st.key)
    except Exception as e:  # noqa: BLE001 - a meta kernel we cannot run: not local
        return None, f"its output shape is unknown ({type(e).__name__})"
    out_shape, out_dtype = out_shapes[0]
    if len(out_shape) != rank:
        return None, "its output has another rank"
    window: Any = IDENTITY
    kind = "point"
    first_only = True  # only argument 0 is banded
    if base == "convolution" and overload == "default":
        stride, pad, dil, transposed, opad = a[3], a[4], a[5], a[6], a[7]
        kk = metas[1][0][ROW]
        if len(refs) < 2 or refs[1][0] != (1,) or "h" not in refs[1][1]:
            return None, "its weight is not a parameter"
        if transposed:
            window = Transposed(kk, stride[0], pad[0], dil[0])
            if opad[0] != 0 or not window.gapless:
                return None, "a transposed convolution with gaps or output padding on the rows"
            kind = "tconv"
        else:
            window, kind = Window(kk, stride[0], pad[0], dil[0]), "conv"
    elif base in _MAXPOOL or base in _AVGPOOL:
        ks = a[1]
        s = a[2] if len(a) > 2 and a[2] else ks
        p = a[3] if len(a) > 3 else 0
        if base in _MAXPOOL:
            d = a[4] if len(a) > 4 else 1
            kind = "maxpool"
        else:
            d, ceil = 1, a[4] if len(a) > 4 else False
            include = a[5] if len(a) > 5 else True
            div = a[6] if len(a) > 6 else None
            p0 = p[0] if isinstance(p, list) else p
            if ceil or div is not None or (p0 and not include):
                return None, "an average pool whose divisor depends on the border"
            kind = "avgpool"
        first = lambda x: x[0] if isinstance(x, list) else x  # noqa: E731
        window = Window(first(ks), first(s), first(p), first(d))
    elif base in _BN:
        if base == "native_batch_norm" and a[5] is not False:
            return None, "batch-norm in training mode mixes rows"
        kind = "bn"
    elif base == "cat" and overload == "default":
        dim = (a[1] if len(a) > 1 else k.get("dim", 0)) % rank
        if dim == ROW:
            return None, "it concatenates along the rows"
        kind, first_only = "cat", False
    elif base in _UPSAMPLE:
        f = out_shape[ROW] // shape_in[ROW]
        if f * shape_in[ROW] != out_shape[ROW]:
            return None, "upsampling by a non-integer factor"
        window, kind = Upsample(f), "up"
    elif torch.Tag.pointwise in op.tags and not _has_generator(op):
        first_only = False
    else:
        return None, f"{base} mixes rows"
    rows_out = out_shape[ROW]
    for v, path, m in banded:
        if first_only and path != (0,):
            return None, "a banded tensor in a position that is not the input"
        if kind in ("point", "cat") and (shapes[v][ROW] != rows_out):
            return None, "operands with different rows"
    if kind == "point":
        for path, m in params:  # a per-channel constant, or any tensor without rows
            shp = m[0]
            j = ROW - (rank - len(shp))
            if 0 <= j < len(shp) and shp[j] != 1:
                return None, "an operand that varies along the rows but is not banded"
    if inplace:
        if not banded or banded[0][1] != (0,):
            return None, "it writes in place into a tensor outside the chain"
        off = next(r[1] for r in st.roles if r[0] == IN)
    else:
        off = outs[0]
        if off is None:
            return None, "it returns no new tensor"
        for o in outs[1:]:
            if o is not None:
                side[o] = i
    v = len(shapes)
    shapes[v], dtypes[v] = tuple(out_shape), out_dtype
    value[off] = v
    return Node(i, st.name, kind, a, k, tuple((u, p) for u, p, _ in banded), v, off, window), ""


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


