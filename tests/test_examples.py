"""Each example app, unmodified, offloaded to a real server: outputs bit-equal to a local CPU run.

Robot and server run the same torch build on the same CPU, so the same kernels run
on the same inputs: equality is exact, not a tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import run_rrto

EXAMPLES = [
    ("camera_loop.py", ["--frames", "2"]),
    ("camera_loop.py", ["--frames", "2", "--arch", "mobilenet_v2", "--size", "160"]),
    ("keypoint_loop.py", ["--frames", "2"]),
    ("scene_completion.py", ["--steps", "2", "--grid", "8", "32", "32"]),
]


def run_example(tmp_path, script: str, args: list[str], *rrto_args: str) -> dict:
    out = tmp_path / f"{script}-{len(list(tmp_path.iterdir()))}.npz"
    res = run_rrto(*rrto_args, f"examples/{script}", *args, "--save", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("script, args", EXAMPLES, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_offloaded_example_equals_local_cpu(tmp_path, server, script, args):
    local = run_example(tmp_path, script, args, "--mode", "local")
    offloaded = run_example(tmp_path, script, args, "--server", server.url)
    assert local.keys() == offloaded.keys() and local
    for key in local:
        assert local[key].shape == offloaded[key].shape, key
        assert np.array_equal(local[key], offloaded[key]), f"{script}: {key} differs from the local CPU run"


def test_rpc_mode_gives_the_same_answer(tmp_path, server):
    args = ["--frames", "1", "--size", "96"]
    eager = run_example(tmp_path, "camera_loop.py", args, "--server", server.url)
    rpc = run_example(tmp_path, "camera_loop.py", args, "--server", server.url, "--mode", "rpc")
    assert np.array_equal(eager["logits"], rpc["logits"])


def test_demo_with_embedded_server_prints_latency_and_messages():
    res = run_rrto("--progress", "examples/camera_loop.py", "--frames", "3", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    frames = [line for line in res.stdout.splitlines() if line.startswith("frame")]
    syncs = [line for line in res.stderr.splitlines() if line.startswith("rrto: sync")]
    assert len(frames) == 3 and all(" ms " in line for line in frames)
    assert len(syncs) == 3 and all("messages" in line and "round trips" in line for line in syncs)
    assert "(embedded)" in res.stderr
