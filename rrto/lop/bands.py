"""The band executor: a band of the local chain written as ordinary ATen ops.

A band is rows [a, b) of the value a cut at ``depth`` ships. It starts from rows
[lo, hi) of the input (``Chain.need``) and runs each chain step on just the rows the
next steps need: real neighbour rows are the halo, and only where a band touches a
true border does it pad explicitly (``constant_pad_nd``: zeros, -inf before a max
pool); the op itself then runs with no padding on the rows. So a band is a list of
op steps in the server's program format (``{"t": "op", "op", "a", "k", "o"}``, tensors
as ``{"s": offset}`` / ``{"h": parameter}`` / ``{"i": constant}``): the robot runs it
here with its CPU copies of the parameters (``run_ops``), and the server runs the
same list as a registered program, with nothing but allowlisted ops.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rrto import codec
from rrto.record.program import Program

from .analysis import ROW, Chain, Node
from .halo import clip
from .plan import BandPlan

_NEG_INF = float("-inf")


@dataclass
class Band:
    a: int
    b: int
    lo: int  # rows [lo, hi) of the chain input the band reads (at offset ``first``)
    hi: int
    ops: list  # op steps; outputs at offsets first + 1, ...
    out: int  # offset of the band's result
    end: int  # first offset the band does not use
    nodes: list  # per op step, the chain node it computes (or pads and slices for)


def band(chain: Chain, depth: int, a: int, b: int, first: int = 0) -> Band:
    """Rows [a, b) of the value cut at ``depth``, its input slice at offset ``first``."""
    ranges = chain.ranges(depth, a, b)
    lo, hi = ranges.get(0, (0, 0))
    have = {0: (first, lo)}  # value -> (offset holding it, its first row)
    ops: list = []
    nodes: list = []
    nxt = [first + 1]

    def emit(name: str, args: list, kwargs: dict | None = None) -> int:
        off = nxt[0]
        nxt[0] += 1
        n_out = len(op_of(name)._schema.returns)  # only the first output is banded
        step = {"t": "op", "op": name, "a": args, "o": [off] + [None] * (n_out - 1)}
        if kwargs:
            step["k"] = kwargs
        ops.append(step)
        return off

    def rows_of(v: int, r0: int, r1: int, pad: float | None = None) -> int:
        """An offset holding rows [r0, r1) of value v; rows outside v are padding ``pad``."""
        off, first_row = have[v]  # holds rows ranges[v] of v
        c0, c1 = clip(r0, r1, chain.rows(v))
        if (c0, c1) != ranges[v]:
            off = emit("aten::slice.Tensor", [{"s": off}, chain.axis[v], c0 - first_row, c1 - first_row, 1])
        top, bottom = c0 - r0, r1 - c1
        if top or bottom:
            rank = len(chain.shapes[v])
            off = emit("aten::constant_pad_nd.default",
                       [{"s": off}, [0, 0] * (rank - 3) + [top, bottom], 0.0 if pad is None else pad])
        return off

    target = chain.value_at(depth)
    for j, n in enumerate(chain.nodes[1:depth], 1):
        if n.out is None or n.out not in ranges or ranges[n.out][1] <= ranges[n.out][0]:
            continue
        r0, r1 = ranges[n.out]
        have[n.out] = (_node_band(n, chain, r0, r1, rows_of, emit), r0)
        nodes += [j] * (len(ops) - len(nodes))
    out = have[target][0]
    r = ranges[target]
    if r != (a, b):  # cannot happen for a clipped band; a guard against a wrong plan
        raise ValueError(f"band [{a}, {b}) of a value with {chain.rows(target)} rows")
    return Band(a, b, lo, hi, ops, out, nxt[0], nodes)


def _node_band(n: Node, chain: Chain, r0: int, r1: int, rows_of: Callable, emit: Callable) -> int:
    a, k = copy.deepcopy(n.a), copy.deepcopy(n.k)
    name = n.name
    if n.kind in ("conv", "maxpool", "avgpool"):
        (v, _), = n.ins
        w0, w1 = n.window.need(r0, r1)
        a[0] = {"s": rows_of(v, w0, w1, _NEG_INF if n.kind == "maxpool" else 0.0)}
        a[n.pad_at] = _zero_row(a[n.pad_at], len(chain.shapes[v]) - 2)
        return emit(name, a, k)
    if n.kind in ("tconv", "up"):
        (v, _), = n.ins
        c0, c1 = clip(*n.window.need(r0, r1), chain.rows(v))
        a[0] = {"s": rows_of(v, c0, c1)}
        if n.kind == "tconv":
            w = n.window
            a[n.pad_at] = _zero_row(a[n.pad_at], len(chain.shapes[v]) - 2)
            start = r0 + w.p - c0 * w.s
        else:
            f = n.window.f
            if a[1] is not None:  # an explicit output size: the band's
                a[1] = [(c1 - c0) * f] + list(a[1][1:])
            start = r0 - c0 * f
        off = emit(name, a, k)
        return emit("aten::slice.Tensor", [{"s": off}, ROW, start, start + r1 - r0, 1])
    # bn, point-wise and cat: every banded operand sliced to the output's rows
    for v, path in n.ins:
        box = a
        for j in path[:-1]:
            box = box[j]
        box[path[-1]] = {"s": rows_of(v, r0, r1)}
    base, overload = name.split("::")[1].split(".")
    if base.endswith("_") and n.kind == "point":  # in place on a band would write a view: run it out of place
        name = f"aten::{base[:-1]}.{overload}"
    return emit(name, a, k)


def _zero_row(p: Any, dims: int) -> list:
    """A padding argument with 0 on the banded axis."""
    p = list(p) if isinstance(p, list) else [p] * dims
    if len(p) == 1:
        p = p * dims
    return [0] + p[1:]


# -- running op steps on the robot ------------------------------------------------------

_OPS: dict[str, Any] = {}


def op_of(name: str):
    """The OpOverload a wire name means (``aten::convolution.default``)."""
    op = _OPS.get(name)
    if op is None:
        base, overload = name.split("::")[1].split(".")
        op = _OPS[name] = getattr(getattr(torch.ops.aten, base), overload)
    return op


def constants(program: Program) -> list:
    """The program's inline constants as CPU tensors."""
    return [codec.frame_tensor(d, f, 1 << 16) for d, f in zip(program.descs, program.frames)]


def run_ops(ops: list, env: dict, params: dict, consts: list = (), times: list | None = None) -> dict:
    """Run op steps on CPU tensors: ``env`` maps offsets to tensors (filled with the outputs).
    ``times``: gets each op's seconds (the planner's profile)."""
    cpu = torch.device("cpu")
    clock = time.perf_counter

    def ref(kind: str, n: int):
        if kind != "s":
            raise ValueError("a band reads no tensor slots")
        return env[n]
    # plain CPU tensors only: an app's function mode (rrto's local mode has one) has nothing to do here
    with torch._C.DisableTorchFunction():
        for st in ops:
            t0 = clock()
            args = codec.decode_value(st["a"], params.__getitem__, consts.__getitem__, cpu, ref)
            kwargs = {key: codec.decode_value(v, params.__getitem__, consts.__getitem__, cpu, ref)
                      for key, v in st.get("k", {}).items()}
            res = op_of(st["op"])(*args, **kwargs)
            if times is not None:
                times.append(clock() - t0)  # decoding included: the band executor pays it too
            res = res if isinstance(res, (tuple, list)) else (res,)
            for o, t in zip(st["o"], res):
                if o is not None:
                    env[o] = t
    return env


def input_rows(chain: Chain, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the chain input ``x`` (along its row axis)."""
    return x.narrow(chain.axis[0], lo, hi - lo)


def run_band(chain: Chain, depth: int, a: int, b: int, x: torch.Tensor, params: dict,
             consts: list = ()) -> torch.Tensor:
    """Rows [a, b) of the value cut at ``depth``, computed from the full input ``x``."""
    bd = band(chain, depth, a, b)
    env = run_ops(bd.ops, {0: input_rows(chain, x, bd.lo, bd.hi)}, params, consts)
    return env[bd.out]


def node_times(chain: Chain, depth: int, x: torch.Tensor, params: dict, consts: list = ()) -> list[float]:
    """Seconds each chain node before ``depth`` takes on the robot, whole height, from one run."""
    bd = band(chain, depth, 0, chain.rows(chain.value_at(depth)))
    times: list = []
    run_ops(bd.ops, {0: input_rows(chain, x, bd.lo, bd.hi)}, params, consts, times)
    per_node = [0.0] * len(chain.nodes)
    for n, t in zip(bd.nodes, times):
        per_node[n] += t
    return per_node


def run_plan(chain: Chain, plan: BandPlan, x: torch.Tensor, params: dict, consts: list = ()) -> torch.Tensor:
    """Every band of ``plan`` computed here and stitched: the value a cut at ``plan.depth`` ships."""
    parts = [run_band(chain, plan.depth, a, b, x, params, consts) for a, b, _ in plan.bands()]
    return torch.cat(parts, chain.axis[chain.value_at(plan.depth)]) if len(parts) > 1 else parts[0]


def run_steps(program: Program, env: dict, params: dict, consts: list, a: int, b: int) -> dict:
    """Steps [a, b) of ``program`` as recorded (the unsplit reference), non-op steps skipped."""
    ops = [s.spec for s in program.steps[a:b] if s.kind == "op"]
    return run_ops(ops, env, params, consts)


# -- the server's side of a plan -----------------------------------------------------------

@dataclass
class Prefix:
    """What the server runs instead of steps [0, depth) of the program, as a program of its own.

    Offsets continue after the program's own (``first``), in the same iteration's handle
    range, and the stitched value lands on the program's offset for it, so the program's
    steps [depth, end) run unchanged after it. Steps [0, server_end) are the server's
    bands, each run on its own as soon as its input slice is up (``runs``: its steps [a, b),
    in the order of ``slices``), so the server computes band i while band i+1 is on the
    wire; the rest stitches.
    """
    steps: list
    slices: list  # (offset, lo, hi): the robot uploads rows [lo, hi) of the input here
    runs: list  # (a, b): the steps of the server band whose slice is slices[i]
    results: list  # (offset, Band): the robot computes the band and uploads its result here
    server_end: int
    end: int  # offsets used: program offsets < first <= ... < end


def prefix(chain: Chain, plan: BandPlan, first: int) -> Prefix:
    if not chain.clean(plan.depth):
        raise ValueError(f"a cut at depth {plan.depth} would leave tensors the server needs on the robot")
    nxt = first
    steps: list = []
    slices, runs, results, parts = [], [], [], []
    for a, b, robot in plan.bands():
        if robot:
            continue
        bd = band(chain, plan.depth, a, b, nxt)
        start = len(steps)
        steps.append({"t": "put"})
        steps += bd.ops
        slices.append((nxt, bd.lo, bd.hi))
        runs.append((start, len(steps)))
        parts.append((a, bd.out))
        nxt = bd.end
    server_end = len(steps)
    for a, b, robot in plan.bands():
        if robot:
            bd = band(chain, plan.depth, a, b)
            steps.append({"t": "put"})
            results.append((nxt, bd))
            parts.append((a, nxt))
            nxt += 1
    parts.sort()
    axis = chain.axis[chain.value_at(plan.depth)]
    steps.append({"t": "op", "op": "aten::cat.default", "a": [[{"s": o} for _, o in parts], axis],
                  "o": [chain.offset_at(plan.depth)]})
    return Prefix(steps, slices, runs, results, server_end, nxt)
