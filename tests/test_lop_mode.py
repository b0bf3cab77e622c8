"""--mode lop: each example loop, unmodified, offloaded with banded uploads, equals local.

The input goes up in row bands (server bands first), the robot computes one band of the
local chain on its own CPU copies of the weights while the others travel, the server
stitches and runs the rest. Results must match the local run (allclose rtol 1e-4,
atol 1e-5: band edges may sum in another order), and the stats must show that banded
iterations really ran.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import rrto
from examples import models as M
from rrto.lop.analysis import analyse
from rrto.lop.planning import download_bytes
from rrto.lop.robot import PlanTrial

from .test_examples import run_example
from .test_replay import LOOPS, frames_of, run_loop

LOP_LOOPS = [loop for loop in LOOPS if "mobilenet_v2" not in loop[1]]  # resnet18 covers the camera loop


@pytest.mark.parametrize("script, args", LOP_LOOPS, ids=lambda v: v if isinstance(v, str) else " ".join(v[2:4]))
def test_example_loop_under_lop_equals_local(tmp_path, server, script, args, monkeypatch):
    # the fixed plan (4 even bands, the robot takes the top one): LOSS's choice depends on timings
    monkeypatch.setenv("RRTO_LOP_PLANNER", "fixed")
    local = run_example(tmp_path, script, args, "--mode", "local")
    stats_path = tmp_path / "stats.json"
    lop = run_example(tmp_path, script, args, "--server", server.url, "--mode", "lop", "--stats", str(stats_path))
    assert local.keys() == lop.keys() and local
    # keypoint_loop's people/keypoints are NMS selections from pred: with random weights many
    # candidates tie within 1e-6, so a last-bit difference may pick another one. pred itself is checked.
    for key in [k for k in local if not k.startswith(("people", "keypoints"))]:
        assert local[key].shape == lop[key].shape, key
        assert np.allclose(local[key], lop[key], rtol=1e-4, atol=1e-5), \
            f"{script}: {key} differs from the local run by {np.abs(local[key] - lop[key]).max()}"
    s = json.loads(stats_path.read_text())
    assert s["mode"] == "lop" and s["sequence_found"] and s["replay_divergences"] == 0
    assert s["lop_bands"] >= 2 and 1 <= s["lop_robot_bands"] < s["lop_bands"], s
    assert s["lop_inferences"] >= 20 - 5, f"lop engaged late or not at all: {s}"
    # the app syncs once a frame: every frame after the one in which planning ended went up in bands
    assert s["lop_inferences"] == s["syncs"] - s["lop_planned_at_sync"] - 1, s
    # after the bands, the server runs the rest ahead: every wait of a banded inference is answered unasked
    assert s["answered_ahead"] >= s["sequence_waits"] * s["lop_inferences"], s


@pytest.mark.parametrize("mode", ["lop", "partition"])
def test_planned_modes_equal_local(server, mode):
    """LOSS (lop) and the best layer cut (partition) plan from this machine's own timings and
    link probes, in the background: the loop runs until planning has ended (however long that
    takes on a loaded machine), then on the plan. Whatever it chose, every frame matches local."""
    xs = frames_of(64, 8, seed=3)
    torch.manual_seed(0)
    net = M.randomize_norms(M.resnet18(10), 1).eval()
    with torch.no_grad():
        local = [net(x) for x in xs]
    rrto.enable(server=server.url, mode=mode, timeout=20)
    try:
        stats = rrto.current().stats
        remote, after = net.to("cuda"), None
        deadline = time.monotonic() + 120
        with torch.no_grad():
            for i in range(10_000):
                y = remote(xs[i % len(xs)].to("cuda")).cpu()
                torch.cuda.synchronize()  # a frame ends as the example apps' frames do
                assert torch.allclose(local[i % len(xs)], y, rtol=1e-4, atol=1e-5), f"frame {i}"
                if after is None and stats.lop_planned_at_sync >= 0:
                    after = i + 3  # the plan runs from the next frame: three frames on it
                if i == after or time.monotonic() > deadline:
                    break
        s = stats.snapshot()
    finally:
        rrto.disable()
    assert after is not None, f"planning did not end in 120 s: {s}"
    assert s["mode"] == mode and s["sequence_found"] and s["replay_divergences"] == 0, s
    assert s["lop_server_measured"], f"the plan did not use the server's own step times: {s}"
    if mode == "partition":  # a layer cut: one band, computed by the robot, or none (full offload)
        assert s["lop_bands"] in (0, 1) and s["lop_robot_bands"] == s["lop_bands"], s
    if s["lop_bands"]:
        # lop timed the plan against whole uploads first (its frames alternate: every one was checked
        # above); partition runs its cut untimed. The three frames after planning ran on what was kept.
        trial = PlanTrial.SKIP + PlanTrial.FRAMES if mode == "lop" else 0
        assert s["lop_inferences"] == trial + (3 if s["lop_kept_bands"] else 0), s
        if mode == "lop":
            assert s["lop_trial_bands_ms"] > 0 and s["lop_trial_whole_ms"] > 0, s
            faster = s["lop_trial_bands_ms"] < s["lop_trial_whole_ms"] * (1 - PlanTrial.MARGIN)
            assert s["lop_kept_bands"] == faster, s


def test_plan_trial_keeps_the_faster():
    """The trial's bookkeeping: blocks of each kind, warm-up frames left out, the median decides,
    a tie goes to whole uploads; inferences of the other kind (a shape change, a re-plan) are ignored."""
    def run(bands_s, whole_s):
        t = PlanTrial()
        seen = []
        while t.kept is None:
            kind = t.bands
            seen.append(kind)
            t.ended(not kind, 1.0)  # an inference that went up the other way: not counted
            t.ended(kind, (bands_s if kind else whole_s) + 0.0001 * (len(seen) % 3))
        return t, seen
    n = PlanTrial.SKIP + PlanTrial.FRAMES
    t, seen = run(0.020, 0.025)
    assert t.kept and t.bands and seen == [True] * n + [False] * n
    assert t.median(True) < t.median(False)
    t, _ = run(0.025, 0.020)
    assert t.kept is False and t.bands is False
    t, _ = run(0.0200, 0.0201)  # within the margin: whole uploads cost the robot less
    assert t.kept is False
    t, _ = run(0.050, 0.020)
    t.ended(False, 0.001)  # decided: later inferences change nothing
    assert t.kept is False and len(t.times[False]) == PlanTrial.FRAMES


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.Conv2d(8, 8, 3, 1, 2, 2))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_divergence_inside_the_banded_steps_stays_correct(server, monkeypatch):
    """Every 5th frame the app reads an early feature map: eager from there, on real tensors."""
    monkeypatch.setenv("RRTO_LOP_PLANNER", "fixed")  # banded for sure (LOSS may choose full offload)
    xs = frames_of(32, 20)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = Net().eval().to(dev)
        net = st["net"]
        with torch.no_grad():
            x = xs[i].to(dev)
            if i % 5 == 4:
                y = net.body[1](net.body[0](x))  # a shorter sequence: leaves the program at step 3
                return (y * 2).sum((2, 3)).cpu()
            if i % 7 == 6:  # leaves it after the banded steps, in what the server ran ahead
                return (net.body(x).amax((2, 3)) * 3).cpu()
            return net(x).cpu()

    local, _ = run_loop(step, 20, None)
    rrto.enable(server=server.url, mode="lop", timeout=20)
    try:
        st: dict = {}
        remote = [step(i, torch.device("cuda"), st) for i in range(20)]
        s = rrto.current().stats.snapshot()
    finally:
        rrto.disable()
    for i, (a, b) in enumerate(zip(local, remote)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"frame {i}"
    assert s["lop_inferences"] >= 8 and s["replay_divergences"] >= 3, s


def test_the_planner_models_the_download_the_app_makes(server):
    """An inference ends with what the app reads back (a detector: a few boxes), not with the
    local chain's output: modelling the latter made full offload look twice as slow."""
    net = Net().eval()
    with torch.no_grad():
        features = net.body(frames_of(32, 1)[0])  # [1, 8, 9, 9]
    rrto.enable(server=server.url, mode="replay", timeout=20)
    try:
        rnet = net.to("cuda")
        with torch.no_grad():
            for x in frames_of(32, 4):
                rnet.body(x.to("cuda"))[:, :2, :1].cpu()  # what the app reads: 2 channels of one row
        program = rrto.current().runtime.replayer.program
    finally:
        rrto.disable()
    assert program is not None, "the sequence was not adopted"
    assert download_bytes(program) == features[:, :2, :1].numel() * 4
    assert analyse(program).steps()[-1].bytes >= features.numel() * 4  # the chain's output: the whole map


def test_lop_measures_its_link_and_walk_online_and_replans_when_the_bandwidth_moves(server):
    """The planner's inputs come from the inferences themselves (each one's first round trip,
    minus what the server says it spent; the robot's walk through the app's calls). When the
    measured bandwidth enters another bin, LOSS plans for it in the background and the robot
    runs that plan from the next inference on, still equal to local."""
    xs = frames_of(64, 8, seed=5)
    torch.manual_seed(0)
    net = M.randomize_norms(M.resnet18(10), 1).eval()
    with torch.no_grad():
        local = [net(x) for x in xs]
    rrto.enable(server=server.url, mode="lop", timeout=20)
    try:
        stats = rrto.current().stats
        planner = rrto.current().runtime.lop.planner
        remote = net.to("cuda")

        def frame(i):
            y = remote(xs[i % len(xs)].to("cuda")).cpu()
            torch.cuda.synchronize()
            assert torch.allclose(local[i % len(xs)], y, rtol=1e-4, atol=1e-5), f"frame {i}"

        with torch.no_grad():
            i, deadline = 0, time.monotonic() + 120
            while not (stats.lop_planned_at_sync >= 0 and planner.reference_rate and stats.lop_walk_ms > 0) \
                    and time.monotonic() < deadline:
                frame(i)
                i += 1
                time.sleep(0.05)  # (the watcher applies what was measured once a second)
            assert planner.current is not None, f"planning did not end in 120 s: {stats.snapshot()}"
            assert planner.reference_rate and stats.lop_walk_ms > 0 and stats.lop_link_mbit > 0, stats.snapshot()
            before, probed = planner.current, planner.link.link()
            fast = probed.bandwidth
            # the next inferences' transfers as they would come in on a link 100x slower
            slow_rate = planner.reference_rate / 100
            planner.observe([(n, probed.rtt + n / slow_rate) for n in (60_000, 120_000) * 8], None, None)
            while planner.current is before and time.monotonic() < deadline:
                time.sleep(0.2)  # the watcher ticks once a second; the new bin must hold for two ticks
            now = planner.current
            assert now is not before, "the planner did not plan for the new bandwidth"
            assert now.bandwidth == pytest.approx(fast / 100, rel=0.35), (now.bandwidth, fast)
            for _ in range(3):  # the robot installs the new plan at the next upload, runs it from the one after
                frame(i)
                i += 1
            s = stats.snapshot()
    finally:
        rrto.disable()
    assert s["lop_link_mbit"] * 1e6 / 8 == pytest.approx(fast / 100, rel=0.35), s
    usable = now.plan.depth > 0 and any(now.plan.robot)
    print(f"plan at {before.bandwidth * 8e-6:.0f} Mbit/s: {before.plan}; at {now.bandwidth * 8e-6:.0f}: {now.plan}")
    # what the robot runs is what the planner chose for the bandwidth measured now
    assert (s["lop_depth"], s["lop_bands"]) == ((now.plan.depth, now.plan.n_bands) if usable else (0, 0)), s
    if now.plan != before.plan:
        assert s["lop_replans"] >= 1, s

