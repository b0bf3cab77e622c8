"""A server on a real GPU: captured CUDA graphs give what the op list gives (server/capture.py).

These run only where torch sees a CUDA GPU (CI has none: they are skipped there, and run on
the lent GPU machine). The robot side runs in this process or in example processes, on the
same torch build: a CUDA build, so they also check that rrto's virtual device keeps every
"cuda" tensor remote there (``rrto/intercept/cuda_backend.py``).

A CUDA server and a CPU robot use different kernels, so results are compared bit for bit
between a server that captures graphs and one that runs the op list (``--no-capture``), and
only loosely with the local CPU run.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from .conftest import RawClient, ServerProcess
from .test_examples import run_example
from .test_replay import LOOPS, frames_of, replayed_between, run_loop

HAS_GPU = torch.backends.cuda.is_built() and torch._C._cuda_getDeviceCount() > 0
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU for the server")


@pytest.fixture(scope="module")
def cuda_servers():
    graphs = ServerProcess("--device", "cuda")
    oplist = ServerProcess("--device", "cuda", "--no-capture")
    yield graphs, oplist
    for s in (graphs, oplist):
        assert s.alive(), "".join(s.log[-20:])
        s.stop()


def server_stats(url: str) -> dict:
    raw = RawClient(url)
    try:
        raw.hello()
        return raw.request({"t": "stats"})
    finally:
        raw.close()


def assert_close_to_local(local: np.ndarray, remote: np.ndarray, what: str) -> None:
    """TF32 convolutions and other kernels: a GPU's sums round differently from the CPU's."""
    scale = max(1.0, float(np.abs(local).max(initial=0)))
    assert np.allclose(local, remote, rtol=1e-2, atol=1e-2 * scale), f"{what}: far from the local CPU run"


@pytest.mark.parametrize("script, args", LOOPS, ids=lambda v: v if isinstance(v, str) else " ".join(v[2:4]))
def test_cuda_graphs_give_the_op_lists_results(tmp_path, cuda_servers, script, args):
    graphs, oplist = cuda_servers
    before = server_stats(graphs.url)
    stats_path = tmp_path / "stats.json"
    captured = run_example(tmp_path, script, args, "--server", graphs.url, "--stats", str(stats_path))
    after = server_stats(graphs.url)
    stepwise = run_example(tmp_path, script, args, "--server", oplist.url)
    local = run_example(tmp_path, script, args, "--mode", "local")
    assert captured.keys() == stepwise.keys() == local.keys() and local
    for key in local:
        assert np.array_equal(captured[key], stepwise[key]), f"{script}: {key} differs from the op list's"
    # The networks' raw outputs only: what is thresholded, ranked or argmaxed from them (occupied
    # cells, kept people) may flip on a near tie between the two rounding orders.
    raw = [k for k in local if k.startswith(("logits", "pred"))]
    assert raw, sorted(local)
    for key in raw:
        assert_close_to_local(local[key], captured[key], f"{script}: {key}")
    s = json.loads(stats_path.read_text())
    assert s["mode"] == "replay" and s["replayed_inferences"] >= 15 and s["replay_divergences"] == 0, s
    assert after["cuda_graphs"] > before["cuda_graphs"], "no CUDA graph was captured"
    assert after["captured_steps"] - before["captured_steps"] >= 8 * 10, "the graphs did not replay"
    assert oplist.alive() and graphs.alive()


def _deep(seed: int = 4):
    torch.manual_seed(seed)
    return nn.Conv2d(3, 8, 1).eval(), nn.Sequential(*[m for _ in range(4) for m in (
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))]).eval()


def test_outputs_held_across_later_replays_keep_their_values(cuda_servers):
    """A graph writes its outputs to the same memory every replay: the app keeps every frame's
    output and a view of it until the end, then reads them all."""
    graphs, oplist = cuda_servers
    xs = frames_of(16, 14)
    stem, body = _deep()

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = (copy.deepcopy(stem).to(dev), copy.deepcopy(body).to(dev))
            st["held"] = []
        first, rest = st["net"]
        with torch.no_grad():
            y = rest(first(xs[i].to(dev)))
            st["held"].append((y, y[:, 2:5]))
            out = y.sum((2, 3)).cpu()
            if i == len(xs) - 1:
                return torch.cat([out.flatten()] + [t.cpu().flatten() for pair in st["held"] for t in pair])
            return out

    before = server_stats(graphs.url)["captured_steps"]
    a, (replayed, s) = run_loop(step, len(xs), graphs.url)
    assert server_stats(graphs.url)["captured_steps"] - before >= 8 * 8, "the graph did not replay"
    b, _ = run_loop(step, len(xs), oplist.url)
    local, _ = run_loop(step, len(xs), None)
    assert replayed_between(replayed, 5, len(xs)) >= 8 and s["replay_divergences"] == 0, s
    for i, (x, y, z) in enumerate(zip(a, b, local)):
        assert torch.equal(x, y), f"frame {i}: a held output changed under a later replay"
        assert_close_to_local(z.numpy(), x.numpy(), f"frame {i}")


def test_turning_away_inside_a_graph_and_weights_changed_in_place(cuda_servers):
    """Every 5th frame the app stops half-way through a captured stretch; at frame 9 it scales a
    weight in place (the graph reads the weight where it lies, so it sees the new values)."""
    graphs, oplist = cuda_servers
    xs = frames_of(16, 20)
    stem, body = _deep(seed=6)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = (copy.deepcopy(stem).to(dev), copy.deepcopy(body).to(dev))
        first, rest = st["net"]
        with torch.no_grad():
            if i == 9:
                rest[3].weight.mul_(0.5)
            y = first(xs[i].to(dev))
            for j, m in enumerate(rest):
                if i % 5 == 4 and j == 8:
                    return (y * 2).sum((2, 3)).cpu()
                y = m(y)
            return y.sum((2, 3)).cpu()

    before = server_stats(graphs.url)["captured_steps"]
    a, (replayed, s) = run_loop(step, 20, graphs.url)
    assert server_stats(graphs.url)["captured_steps"] - before >= 8 * 6, "the graph did not replay"
    b, _ = run_loop(step, 20, oplist.url)
    local, _ = run_loop(step, 20, None)
    assert s["replay_divergences"] >= 2 and replayed_between(replayed, 15, 20) >= 3, (replayed, s)
    for i, (x, y, z) in enumerate(zip(a, b, local)):
        assert torch.equal(x, y), f"frame {i}: differs from the op list's"
        assert_close_to_local(z.numpy(), x.numpy(), f"frame {i}")
