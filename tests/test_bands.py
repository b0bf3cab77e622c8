"""Banded execution of every example model equals unsplit execution.

Each model is recorded under rrto against the real server (replay mode), its local
chain analysed, and its bands written as ATen op steps. On the robot's side the bands
run here on CPU copies of the parameters; on the server's side the same steps run as a
registered program on the real server, fed by input slices uploaded over zmq, stitched
by the server, and followed by the rest of the recorded program. Results must match the
unsplit model (allclose rtol 1e-4, atol 1e-5).
"""
from __future__ import annotations

import pytest
import torch

from rrto import codec
from rrto.lop.analysis import analyse
from rrto.lop.bands import constants, input_rows, prefix, run_ops, run_plan, run_steps
from rrto.lop.plan import BandPlan

from .conftest import RawClient
from .lop_models import example_models, record

MODELS = list(example_models())


@pytest.fixture(scope="module")
def recorded(server):
    out = {}
    for name, (make, shape) in example_models().items():
        prog, params, cpu = record(server.url, make, shape)
        out[name] = (prog, params, cpu, shape)
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def depths(chain, k: int = 4) -> list[int]:
    """A few clean cuts spread over the chain: the first conv's, the deepest, some between."""
    cuts = [d for d in chain.cuts() if d > 1]
    pick = {cuts[0], cuts[-1]} | {cuts[len(cuts) * i // k] for i in range(1, k)}
    return sorted(pick)


@pytest.mark.parametrize("name", MODELS)
def test_chain_found(recorded, name):
    prog, *_ = recorded[name]
    chain = analyse(prog)
    assert len(chain) > 10, chain.ends
    kinds = {n.kind for n in chain.nodes}
    assert {"conv", "bn", "point"} <= kinds or name == "vgg11"
    assert "conv" in kinds and len(chain.cuts()) >= 5
    if name == "SceneCompletionNet":
        assert "tconv" in kinds and chain.shapes[0][2] == 16  # banded along depth
    if name == "KeypointNet":
        assert {"up", "cat"} <= kinds
    # what the cost model reads per step
    info = chain.steps()
    assert len(info) == len(chain)
    H = chain.input_rows
    for st in info[1:]:
        assert st.clean == chain.clean(st.index + 1) and st.bytes > 0 and st.rows > 0
        if st.clean:
            assert st.need(0, st.rows) == (0, H)  # all rows need the whole input
            lo, hi = st.need(0, 1)
            assert lo == 0 and 0 < hi <= H  # the top row needs a top band of the input
        los, his = st.row_needs()  # the planner's table, all rows at once
        assert list(zip(los.tolist(), his.tolist())) == [st.need(r, r + 1) for r in range(st.rows)]


@pytest.mark.parametrize("name", MODELS)
def test_bands_equal_unsplit_for_1_to_8_bands(recorded, name):
    prog, params, _, shape = recorded[name]
    chain = analyse(prog)
    consts = constants(prog)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    x0 = prog.steps[0].out_offsets[0]
    for depth in depths(chain):
        full = run_steps(prog, {x0: x}, params, consts, 1, depth)[chain.offset_at(depth)]
        H = chain.rows(chain.value_at(depth))
        for n in range(1, 9):
            cuts = BandPlan.even(depth, H, (True,) * n)
            got = run_plan(chain, cuts, x, params, consts)
            assert close(got, full), f"{name}: depth {depth}, {n} bands: max error {(got - full).abs().max()}"
            # uneven bands too: one thin band at the top
            if H > n + 1:
                uneven = BandPlan(depth, (0, 1) + tuple(1 + (H - 1) * i // (n - 1) for i in range(1, n)) if n > 1
                                  else (0, H), (True,) * n)
                assert close(run_plan(chain, uneven, x, params, consts), full), f"{name}: {uneven}"


def assignments(n: int) -> list[tuple]:
    """A small grid of robot/server assignments of n bands."""
    out = {(True,) * n, (False,) * n, tuple(i % 2 == 0 for i in range(n)), tuple(i < n // 2 for i in range(n)),
           tuple(i == n - 1 for i in range(n))}
    return sorted(out)


@pytest.mark.parametrize("name", MODELS)
def test_server_runs_its_bands_and_the_rest(recorded, server, name):
    """Server bands and the stitch run on the real server; robot bands here; output equals the model's."""
    prog, params, cpu, shape = recorded[name]
    chain = analyse(prog)
    consts = constants(prog)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = cpu(x)
    get = next(i for i, s in enumerate(prog.steps) if s.kind == "get")
    out_off = prog.steps[get].roles[0][1]
    c = RawClient(server.url, timeout_ms=30_000)
    try:
        c.hello()
        for h, t in params.items():  # the parameters under the handles the program names
            desc, buf, _ = codec.tensor_frame(t.contiguous())
            c.send({"t": "put", "h": h, "d": desc}, [buf])
        header, frames = prog.spec()
        header["p"] = 1
        assert c.request({"t": "prog", **header}, frames).get("t") != "err"
        pid, base = 2, 2**51
        combos = [(d, n, r) for d in depths(chain, 2) for n in (1, 3, 8) for r in assignments(n)
                  if n <= chain.rows(chain.value_at(d))]
        for depth, n, robot in combos:
            H = chain.rows(chain.value_at(depth))
            plan = BandPlan.even(depth, H, robot)
            pre = prefix(chain, plan, prog.n_handles)
            r = c.request({"t": "prog", "p": pid, "steps": pre.steps, "in": [], "drop": pid - 1 if pid > 2 else None})
            assert r.get("t") != "err", r
            # the server's bands tile steps [0, server_end), one run each
            assert [a for a, _ in pre.runs] == ([0] + [b for _, b in pre.runs[:-1]] if pre.runs else [])
            assert (pre.runs[-1][1] if pre.runs else 0) == pre.server_end
            for (off, lo, hi), (a, b) in zip(pre.slices, pre.runs):  # each server band's input, then its run
                desc, buf, _ = codec.tensor_frame(input_rows(chain, x, lo, hi).contiguous())
                c.send({"t": "put", "h": base + off, "d": desc}, [buf])
                c.send({"t": "free", "pre": [[pid, base, a, b, []]]})
            for off, bd in pre.results:  # each robot band as soon as it is done
                t = run_ops(bd.ops, {0: input_rows(chain, x, bd.lo, bd.hi)}, params, consts)[bd.out]
                desc, buf, _ = codec.tensor_frame(t.contiguous())
                c.send({"t": "put", "h": base + off, "d": desc}, [buf])
            r = c.request({"t": "get", "h": base + out_off,
                           "pre": [[pid, base, pre.server_end, len(pre.steps), []], [1, base, depth, get, []]]})
            assert r.get("t") != "err", (depth, n, robot, r)
            got = codec.frame_tensor(r["d"], c.frames[0], 1 << 30)
            assert close(got, want), f"{name}: depth {depth}, bands {robot}: max error {(got - want).abs().max()}"
            c.send({"t": "free", "fr": list(range(base, base + pre.end))})
            base += pre.end
            pid += 1
    finally:
        c.close()
