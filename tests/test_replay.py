"""Record-then-replay correctness: every replayed output equals the local eager one.

Robot and server run the same torch build on the same CPU, so replayed results must be
bit-equal to local ones. Each test also checks that replay really engaged (the stats
count replayed inferences), so a replayer that silently fell back to eager would fail.
"""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import rrto

from .conftest import run_rrto
from .test_examples import run_example

LOOPS = [
    ("camera_loop.py", ["--frames", "20", "--size", "64"]),
    ("camera_loop.py", ["--frames", "20", "--arch", "mobilenet_v2", "--size", "64"]),
    ("keypoint_loop.py", ["--frames", "20", "--height", "96", "--width", "160", "--conf", "0.5"]),
    ("scene_completion.py", ["--steps", "20", "--grid", "8", "24", "24"]),
]


@pytest.mark.parametrize("script, args", LOOPS, ids=lambda v: v if isinstance(v, str) else " ".join(v[2:4]))
def test_example_loop_replays_with_outputs_equal_to_local(tmp_path, server, script, args):
    local = run_example(tmp_path, script, args, "--mode", "local")
    stats_path = tmp_path / "stats.json"
    replayed = run_example(tmp_path, script, args, "--server", server.url, "--stats", str(stats_path))
    assert local.keys() == replayed.keys() and local
    for key in local:
        assert np.array_equal(local[key], replayed[key]), f"{script}: {key} differs from the local run"
    s = json.loads(stats_path.read_text())
    assert s["mode"] == "replay" and s["sequence_found"]
    assert s["replay_divergences"] == 0
    assert s["replayed_inferences"] >= 20 - 5, f"replay engaged late: {s}"  # by iteration 5
    # one message per upload: the server runs ahead and sends every wait's answer unasked
    assert s["messages_per_replayed_inference"] == s["sequence_uploads"], s
    assert s["answered_ahead"] >= s["sequence_waits"] * (s["replayed_inferences"] - 1), s


def test_progress_reports_when_replay_engages(server):
    res = run_rrto("--server", server.url, "--progress", "examples/camera_loop.py", "--frames", "5", "--size", "64")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rrto: replaying a recorded sequence of" in res.stderr
    assert "replayed 3 inferences" in res.stderr.splitlines()[-1]


# -- divergence: the app does something the recording did not -------------------------

class TinyNet(nn.Module):
    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 4)
        self.alt = nn.Linear(width, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return y.mean((2, 3))


def run_loop(step, frames: int, server_url: str | None):
    """Outputs of ``step(i, device, state)`` per frame, locally (server_url None) or replayed."""
    if server_url is None:
        state: dict = {}
        return [step(i, torch.device("cpu"), state) for i in range(frames)], None
    rrto.enable(server=server_url, mode="replay", timeout=20)
    try:
        state = {}
        outs, replayed = [], []
        for i in range(frames):
            outs.append(step(i, torch.device("cuda"), state))
            replayed.append(rrto.current().stats.replayed_inferences)
        return outs, (replayed, rrto.current().stats.snapshot())
    finally:
        rrto.disable()


def assert_same(local, remote):
    assert len(local) == len(remote)
    for i, (a, b) in enumerate(zip(local, remote)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"frame {i}"
        assert torch.equal(a, b), f"frame {i}: replayed output differs from local"


def frames_of(size: int, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, size, size, generator=g) for _ in range(n)]


def replayed_between(replayed: list, a: int, b: int) -> int:
    """Inferences replayed during frames a..b-1."""
    return replayed[b - 1] - (replayed[a - 1] if a else 0)


def test_data_dependent_branch_that_flips_every_few_frames(server):
    xs = frames_of(16, 24)
    for i in range(24):  # the sign of the input's mean flips every 4th frame
        xs[i] = xs[i].abs() * (-1 if i % 4 == 3 else 1)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        net = st["net"]
        with torch.no_grad():
            x = xs[i].to(dev)
            f = net(x)
            out = net.head(f) if x.mean().item() > 0 else net.alt(f) * 2
            return out.cpu()

    local, _ = run_loop(step, 24, None)
    remote, (replayed, s) = run_loop(step, 24, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 3, s  # each flip leaves the recorded branch
    assert replayed_between(replayed, 16, 24) >= 5, replayed  # and replay picks up again after it


def test_input_resolution_changes_mid_run(server):
    xs = frames_of(16, 10) + frames_of(24, 10, seed=2)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        with torch.no_grad():
            return st["net"].head(st["net"](xs[i].to(dev))).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 12, 20) == 8, replayed


def test_scalar_argument_changes(server):
    xs = frames_of(16, 20)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        threshold = 0.1 if i < 10 else 0.3
        with torch.no_grad():
            f = st["net"](xs[i].to(dev))
            return (f > threshold).float().mul(f).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 1, s  # frame 10 left the recording at the comparison
    assert replayed_between(replayed, 14, 20) == 6, replayed


def test_a_scalar_equal_in_value_but_not_in_type_changes(server):
    """1, 1.0 and True are equal in Python, but an int tensor plus 1.0 is a float tensor and a
    mask plus 1 an int one: the plan cache and the replay check must tell them apart."""
    xs = frames_of(16, 24)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        offset = 1 if i < 8 else 1.0 if i < 16 else True
        with torch.no_grad():
            f = st["net"](xs[i].to(dev))
            counts = (f > 0).sum(1)  # int64
            return torch.cat([(counts + offset).float(), (counts + offset) / 3,
                              ((f > 0) + offset).flatten().float(), counts.clamp(min=offset * 2) / 2]).cpu()

    local, _ = run_loop(step, 24, None)
    remote, (replayed, s) = run_loop(step, 24, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 2, s  # frames 8 and 16 leave the recording
    assert replayed_between(replayed, 20, 24) == 4, replayed


def test_a_zero_that_changes_sign(server):
    """0.0 == -0.0, but 1 / (x * -0.0) is -inf where 1 / (x * 0.0) is inf."""
    xs = [x.abs() + 0.1 for x in frames_of(8, 16)]

    def step(i, dev, st):
        zero = 0.0 if i < 8 else -0.0
        return (1 / (xs[i].to(dev) * zero)).sum((2, 3)).cpu()

    local, _ = run_loop(step, 16, None)
    remote, (replayed, s) = run_loop(step, 16, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 1 and replayed_between(replayed, 12, 16) == 4, (replayed, s)


def test_a_scalar_that_changes_every_third_frame_before_a_data_dependent_tail(server):
    """Every third frame divides by another number: replay leaves the recording at the division,
    after the server ran the whole frame ahead. On the way it grew tensors in place: a
    ``torch.arange(n, device=...)`` is an ``empty`` that ``arange.out`` grows (the keypoint
    net's grid). Turning back must shrink them again before restoring their old values."""
    xs = frames_of(16, 24)
    torch.manual_seed(7)
    head = nn.Linear(8, 6)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = (TinyNet().eval().to(dev), copy.deepcopy(head).to(dev))
        net, lin = st["net"]
        with torch.no_grad():
            x = xs[i].to(dev) / (254.0 if i % 3 == 0 else 255.0)
            f = torch.relu(net.conv(x)).flatten(2).transpose(1, 2)[0]  # (pixels, 8)
            pred = lin(f) + torch.arange(6, device=dev) / 10
            keep = pred[pred[:, 4] > 0.4]
            order = keep[:, 4].argsort(descending=True)[:5]
            return keep[order].cpu()

    local, _ = run_loop(step, 24, None)
    remote, (replayed, s) = run_loop(step, 24, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 4, s


def test_weights_updated_in_place_between_frames(server):
    xs = frames_of(16, 20)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        net = st["net"]
        with torch.no_grad():
            if i % 5 == 4:
                for p in net.parameters():
                    p.mul_(1.5).add_(0.01)
            return net.head(net(xs[i].to(dev))).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 10, 20) >= 7, replayed


def test_model_replaced_by_another(server):
    xs = frames_of(16, 20)

    def step(i, dev, st):
        if i in (0, 10):
            st["net"] = TinyNet(seed=i).eval().to(dev)
        with torch.no_grad():
            return st["net"].head(st["net"](xs[i].to(dev))).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    assert_same(local, remote)
    assert s["recorded_inferences"] >= 4, s  # the old model's program went with its weights: recorded again
    assert replayed_between(replayed, 14, 20) == 6, replayed


@pytest.mark.parametrize("old_goes_first", [True, False], ids=["old-freed-first", "new-moved-first"])
def test_model_replaced_by_another_behind_preprocessing(server, old_goes_first):
    """The old model freed, its program goes with it, on the server and on the robot: the new
    model's frame 0 begins with steps that match the old program (normalisation, no weight),
    which must not be sent as a run of the dropped program. The new model's tensors, moving to
    the device while the old program is armed, are not taken for an inference's input."""
    xs = frames_of(16, 20)

    def step(i, dev, st):
        if i in (0, 10):
            if old_goes_first:
                st["net"] = None
            st["net"] = TinyNet(seed=i).eval().to(dev)
        with torch.no_grad():
            x = (xs[i].to(dev) * 2.0 - 1.0).clamp(-3.0, 3.0)
            return st["net"].head(st["net"](x)).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    assert_same(local, remote)
    # (a parameter taken for the recorded input would diverge once per tensor)
    assert s["replay_divergences"] <= 1 and s["recorded_inferences"] >= 4, s
    assert replayed_between(replayed, 14, 20) == 6, replayed


def test_recurrent_state_carried_between_frames(server):
    """Each frame reads the previous frame's output: a tensor from outside the iteration."""
    xs = frames_of(16, 16)

    def step(i, dev, st):
        if "net" not in st:
            st["net"], st["h"] = TinyNet().eval().to(dev), torch.zeros(1, 4, device=dev)
        with torch.no_grad():
            st["h"] = torch.tanh(st["net"].head(st["net"](xs[i].to(dev))) + 0.5 * st["h"])
            return st["h"].cpu()

    local, _ = run_loop(step, 16, None)
    remote, (replayed, s) = run_loop(step, 16, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 5, 16) == 11, replayed


def test_two_uploads_item_in_the_middle_and_a_dict_output(server):
    xs, ys = frames_of(16, 14), frames_of(16, 14, seed=3)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        net = st["net"]
        with torch.no_grad():
            a, b = net(xs[i].to(dev)), net(ys[i].to(dev))
            gap = (a - b).abs().max().item()  # a sync in the middle of the sequence
            out = {"sum": (a + b) / 2, "head": net.head(a) if gap < 1e6 else None}
            return torch.cat([out["sum"].cpu(), out["head"].cpu(), torch.tensor([[gap]])], 1)

    local, _ = run_loop(step, 14, None)
    remote, (replayed, s) = run_loop(step, 14, server.url)
    assert_same(local, remote)
    assert s["sequence_uploads"] == 2 and s["sequence_waits"] >= 3, s
    assert replayed_between(replayed, 4, 14) == 10, replayed
    assert s["messages_per_replayed_inference"] <= s["sequence_uploads"] + s["sequence_waits"], s


@pytest.mark.parametrize("calls", [2, 3])
def test_a_model_called_several_times_on_one_upload_replays_the_whole_frame(server, calls):
    """Each call ends on a download, and each looks like an inference of its own reading a
    persistent input. The frame (the upload and every call) is the sequence: one message."""
    xs = frames_of(16, 14)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        with torch.no_grad():
            x = xs[i].to(dev) * 2 - 1
            return torch.cat([st["net"](x).cpu() for _ in range(calls)])

    local, _ = run_loop(step, 14, None)
    remote, (replayed, s) = run_loop(step, 14, server.url)
    assert_same(local, remote)
    assert s["sequence_uploads"] == 1 and s["sequence_waits"] == calls, s
    assert replayed_between(replayed, 5, 14) == 9, replayed
    assert s["messages_per_replayed_inference"] == 1 and s["replay_divergences"] == 0, s


def test_a_channels_last_model_stays_channels_last(server):
    """cudnn gives a convolution channels_last outputs when its input or weight is; the meta
    kernel both ends size outputs with says contiguous. The robot sees torch's strides, and
    the server, promised them, computes in that layout (no copy): bit-equal to local."""
    xs = frames_of(16, 10)
    cl = torch.channels_last

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev).to(memory_format=cl)
        net = st["net"]
        with torch.no_grad():
            x = xs[i].to(dev).to(memory_format=cl)
            y = net.conv(x)
            assert y.is_contiguous(memory_format=cl) and not y.is_contiguous(), y.stride()
            z = torch.relu(net.bn(y))
            assert z.stride() == y.stride()
            return torch.cat([z.flatten(1), net(x)], 1).cpu()

    local, _ = run_loop(step, 10, None)
    remote, (replayed, s) = run_loop(step, 10, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 4, 10) == 6, replayed


def _normalised(xs, std_of):
    """An app that makes its constants on the device every frame (``std_of(i)``: frame i's std)."""
    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        with torch.no_grad():
            x = xs[i].to(dev)
            mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
            std = torch.tensor(std_of(i), device=dev).view(1, 3, 1, 1)
            cache = torch.tensor([], device=dev)  # how a transformers KV cache starts, every forward
            return torch.cat([cache, st["net"]((x - mean) / std).view(-1)]).cpu()
    return step


def test_constants_made_on_the_device_each_frame_cost_no_message(server):
    xs = frames_of(16, 12)
    step = _normalised(xs, lambda i: [0.229, 0.224, 0.225])
    local, _ = run_loop(step, 12, None)
    remote, (replayed, s) = run_loop(step, 12, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 4, 12) == 8, replayed
    assert s["sequence_uploads"] == 1 and s["messages_per_replayed_inference"] == 1, s  # only the input travels


def test_a_constant_that_changes_is_an_upload_from_then_on(server):
    xs = frames_of(16, 22)
    step = _normalised(xs, lambda i: [0.229, 0.224, 0.225] if i < 12 else [0.5 + i // 3 / 100] * 3)
    local, _ = run_loop(step, 22, None)
    remote, (replayed, s) = run_loop(step, 22, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 4, 12) == 8, replayed
    assert s["replay_divergences"] >= 1, s  # frame 12 left the recording at the constant
    # std is recorded as an upload from then on, so its new value every third frame is no divergence
    assert replayed_between(replayed, 15, 22) == 7, replayed
    assert s["sequence_uploads"] >= 2, s


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch 2.13 deprecates TorchScript)
def test_a_torchscript_model_replays(server):
    xs = frames_of(16, 12)
    archive = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyNet().eval()), archive)

    def step(i, dev, st):
        if "net" not in st:
            archive.seek(0)
            st["net"] = torch.jit.load(archive, map_location=dev)
        with torch.no_grad():
            return st["net"](xs[i].to(dev)).cpu()

    local, _ = run_loop(step, 12, None)
    remote, (replayed, s) = run_loop(step, 12, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 4, 12) == 8, replayed
    assert s["messages_per_replayed_inference"] == 1, s


def test_a_policy_that_samples_its_actions_replays_the_servers_random_stream(server):
    """An RL policy on the robot: torch.distributions (whose argument checks end in
    _is_all_true), Normal and Categorical samples drawn on the device each frame."""
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    observations = [torch.randn(1, 8, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def run(mode: str):
        rrto.enable(server=server.url, mode=mode, timeout=20)
        try:
            net = copy.deepcopy(policy).cuda()
            log_std = torch.zeros(2).cuda()
            torch.cuda.manual_seed(1)
            out = []
            with torch.no_grad():
                for obs in observations:
                    mu_logits = net(obs.cuda())
                    normal = torch.distributions.Normal(mu_logits[:, :2], log_std.exp())
                    action = normal.sample()
                    choice = torch.distributions.Categorical(logits=mu_logits[:, 2:])
                    out.append(torch.cat([action, normal.log_prob(action), choice.sample()[:, None].float(),
                                          choice.entropy()[:, None]], 1).cpu())
            return out, rrto.current().stats.snapshot()
        finally:
            rrto.disable()

    eager, _ = run("eager")
    replayed, s = run("replay")
    assert_same(eager, replayed)  # the same ops in the same order draw the same numbers
    assert s["replayed_inferences"] >= 8 and s["messages_per_replayed_inference"] == 1, s


def test_a_recurrent_model_carrying_its_state_replays(server):
    """An LSTM over a stream of observations, its (h, c) fed back each frame: CUDA's fused cells
    on the device, the state a tensor from outside each iteration (a slot)."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(8, 16, batch_first=True).eval(), nn.Linear(16, 2).eval()
    observations = [torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    def run(mode: str | None):
        if mode is not None:
            rrto.enable(server=server.url, mode=mode, timeout=20)
        dev = "cpu" if mode is None else "cuda"
        try:
            rnn, lin = copy.deepcopy(lstm).to(dev), copy.deepcopy(head).to(dev)
            state, out = None, []
            with torch.no_grad():
                for obs in observations:
                    y, state = rnn(obs.to(dev), state)
                    out.append(lin(y[:, -1]).cpu())
            return out, (rrto.current().stats.snapshot() if mode else None)
        finally:
            if mode is not None:
                rrto.disable()

    local, _ = run(None)
    eager, _ = run("eager")
    replayed, s = run("replay")
    assert_same(eager, replayed)
    for a, b in zip(local, replayed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # (fused gates: another order of sums)
    # one message a frame: at the upload the robot names the state the app will pass in (the
    # previous iteration's outputs), so the server runs the frame ahead (the first replayed
    # frame, with no replayed frame before it, asks for its download)
    assert s["replayed_inferences"] >= 8 and s["answered_ahead"] >= s["replayed_inferences"] - 1, s
    assert s["messages_per_replayed_inference"] <= 1 + 1 / s["replayed_inferences"] + 1e-3, s


def test_a_recurrent_state_that_is_not_the_last_frames_is_no_wrong_answer(server):
    """Every fourth frame the app passes the state of two frames back: the state named at the
    upload was wrong and the server ran the frame ahead with it; it must take those steps back."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(8, 16, batch_first=True).eval(), nn.Linear(16, 2).eval()
    observations = [torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(20)]

    def step(i, dev, st):
        if "rnn" not in st:
            st["rnn"], st["lin"], st["states"] = copy.deepcopy(lstm).to(dev), copy.deepcopy(head).to(dev), [None]
        states = st["states"]
        state = states[-2] if i % 4 == 3 and len(states) > 1 else states[-1]
        with torch.no_grad():
            y, new = st["rnn"](observations[i].to(dev), state)
            states[:] = [states[-1], new]
            return st["lin"](y[:, -1]).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    for i, (a, b) in enumerate(zip(local, remote)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"frame {i}")
    assert s["replay_divergences"] >= 3, s  # frames 7, 11, 15, 19 left the recording at the state
    assert replayed_between(replayed, 4, 20) >= 8, replayed


# -- running ahead: the server runs the iteration before the robot confirms it ----------------

def test_turning_away_before_an_in_place_op_the_server_ran_ahead(server):
    """Every 5th frame the app skips the in-place relu_/mul_ the recording has and reads the
    conv output itself. The server ran them ahead, so it must put the old values back."""
    xs = frames_of(16, 20)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        with torch.no_grad():
            y = st["net"].conv(xs[i].to(dev))
            if i % 5 == 4:
                out = y * 2
            else:
                y.relu_()
                y.mul_(3)
                out = y
            return out.sum((2, 3)).cpu()

    local, _ = run_loop(step, 20, None)
    remote, (replayed, s) = run_loop(step, 20, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 2 and s["answered_ahead"] >= 8, s
    assert replayed_between(replayed, 15, 20) >= 3, replayed


def test_turning_away_inside_a_captured_stretch_of_steps(server):
    """A deeper net runs ahead as one traced graph (server/capture.py). Every 5th frame the app
    stops half-way, before an in-place relu_, and reads what it has: the server makes the
    steps before the turn again op by op, so that the app sees what eager would give it."""
    from .conftest import RawClient
    xs = frames_of(16, 20)
    torch.manual_seed(3)
    stem = nn.Conv2d(3, 8, 1).eval()
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                        nn.ReLU(inplace=True))]).eval()

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = (copy.deepcopy(stem).to(dev), copy.deepcopy(net).to(dev))
        first, body = st["net"]
        with torch.no_grad():
            y = first(xs[i].to(dev))
            for j, m in enumerate(body):
                if i % 5 == 4 and j == 8:  # before the in-place ReLU of the third block
                    return (y * 2).sum((2, 3)).cpu()
                y = m(y)
            return y.sum((2, 3)).cpu()

    stats = RawClient(server.url)
    stats.hello()
    try:
        before = stats.request({"t": "stats"})["captured_steps"]
        local, _ = run_loop(step, 20, None)
        remote, (replayed, s) = run_loop(step, 20, server.url)
        assert_same(local, remote)
        assert s["replay_divergences"] >= 2, s
        assert replayed_between(replayed, 15, 20) >= 3, replayed
        assert stats.request({"t": "stats"})["captured_steps"] - before >= 8 * 10, "no segment ran"
    finally:
        stats.close()


def _two_stretches(seed: int = 5):
    """Two stacks of conv, norm and relu: each runs ahead as one traced graph (server/capture.py),
    split by a wait between them."""
    torch.manual_seed(seed)
    def stack():
        return nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                             nn.ReLU())]).eval()
    return nn.Conv2d(3, 8, 1).eval(), stack(), stack()


def _left_out(server_url: str) -> int:
    from .conftest import RawClient
    raw = RawClient(server_url)
    try:
        raw.hello()
        return raw.request({"t": "stats"})["outputs_left_out"]
    finally:
        raw.close()


def test_a_tensor_the_app_used_to_drop_but_holds_is_made_again(server):
    """Outputs the app drops within an iteration are never bound on the server: its traced graphs
    free them as eager would. At frame 4 the app holds one of them into a turn away after the wait
    between the two graphs; at frame 9 another past the iteration's end (it reads it after the
    download). The robot names each when it settles the run and the server makes it again."""
    xs = frames_of(16, 24)
    first, body1, body2 = _two_stretches()

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = tuple(copy.deepcopy(m).to(dev) for m in (first, body1, body2))
        stem, b1, b2 = st["net"]
        held = {}
        with torch.no_grad():
            y = stem(xs[i].to(dev))
            for j, m in enumerate(b1):
                y = m(y)
                if (j, i) in ((4, 4), (1, 9)):
                    held[j] = y  # a norm's output, read by the relu after it; dropped in other frames
            scale = y.mean().item()  # a wait: the graphs end here
            for j, m in enumerate(b2):
                if 4 in held and j == 4:  # turn away, reading the held tensor
                    return (y.sum((2, 3)) + held[4].mean((2, 3)) * scale).cpu()
                y = m(y)
            out = y.sum((2, 3)).cpu()
            if 1 in held:  # held past the iteration's end
                out = out + held[1].mean((2, 3)).cpu()
            return out

    local, _ = run_loop(step, 24, None)
    before = _left_out(server.url)
    remote, (replayed, s) = run_loop(step, 24, server.url)
    assert_same(local, remote)
    assert s["replay_divergences"] >= 1, s
    assert replayed_between(replayed, 12, 24) >= 10, replayed
    assert _left_out(server.url) - before >= 5 * 10, "no segment left out the outputs the app drops"


def test_a_running_count_stops_the_run_ahead(server):
    """A tensor that outlives the iteration is written every frame: the server runs up to it
    and waits for the robot to confirm (answered_ahead stays 0), results stay exact."""
    xs = frames_of(16, 14)

    def step(i, dev, st):
        if "net" not in st:
            st["net"], st["count"] = TinyNet().eval().to(dev), torch.zeros(4, device=dev)
        with torch.no_grad():
            f = st["net"](xs[i].to(dev))
            st["count"].add_(1)
            return (st["net"].head(f) + st["count"]).cpu()

    local, _ = run_loop(step, 14, None)
    remote, (replayed, s) = run_loop(step, 14, server.url)
    assert_same(local, remote)
    assert replayed_between(replayed, 5, 14) == 9, replayed
    assert s["answered_ahead"] == 0 and s["messages_per_replayed_inference"] == 2, s


def test_confirmed_replay_without_running_ahead(server, monkeypatch):
    """RRTO_AHEAD=0: the server runs only what the robot confirmed; a message per wait."""
    monkeypatch.setenv("RRTO_AHEAD", "0")
    xs = frames_of(16, 12)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = TinyNet().eval().to(dev)
        with torch.no_grad():
            f = st["net"](xs[i].to(dev))
            return f.cpu(), st["net"].head(f).cpu()

    local, _ = run_loop(step, 12, None)
    remote, (replayed, s) = run_loop(step, 12, server.url)
    for (a1, a2), (b1, b2) in zip(local, remote):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert replayed_between(replayed, 5, 12) == 7, replayed
    assert s["answered_ahead"] == 0 and s["messages_per_replayed_inference"] == 3, s


# -- random number generators: the app's own torch.Generator("cuda") -----------------

def _generator_loop(server_url: str | None, scenario: str, frames: int = 12):
    """A diffusion-like policy on the robot: noise drawn each denoising step from the app's
    generator. ``server_url`` None: local mode (the CPU generator, seeded the same)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    obs = [torch.randn(1, 4, generator=torch.Generator().manual_seed(i)) for i in range(frames)]

    def sample(n, o, g):
        x = torch.randn(1, 4, device="cuda", generator=g)
        for _ in range(3):
            x = x - 0.1 * n(torch.cat([x, o], 1)) + 0.05 * torch.randn(x.shape, device="cuda", generator=g)
        return x

    rrto.enable(server=server_url, mode="local" if server_url is None else "replay", timeout=20, progress=False)
    try:
        n, out, states = copy.deepcopy(net).cuda(), [], []
        g = torch.Generator(device="cuda").manual_seed(7)
        assert isinstance(g, torch.Generator) and g.device == torch.device("cuda", 0)
        assert isinstance(torch.Generator(), torch.Generator)  # the CPU's is torch's own
        with torch.no_grad():
            for o in obs:
                if scenario == "made each frame":
                    out.append(sample(n, o.cuda(), torch.Generator("cuda").manual_seed(3)).cpu())
                elif scenario == "state read mid-frame":
                    x = sample(n, o.cuda(), g)
                    states.append(g.get_state().clone())  # the server ran the frame ahead: it stops here
                    out.append((x + torch.randn(1, 4, device="cuda", generator=g)).cpu())
                elif scenario == "fork_rng":
                    x = o.cuda()
                    with torch.random.fork_rng(devices=[0], device_type="cuda"):
                        noise = torch.randn(1, 4, device="cuda")
                    after = torch.randn(1, 4, device="cuda")  # the state was put back: the same numbers
                    out.append(torch.cat([noise, after, n(torch.cat([x + noise, x], 1))]).cpu())
                else:
                    out.append(sample(n, o.cuda(), g).cpu())
        return out, states, None if server_url is None else rrto.current().stats.snapshot()
    finally:
        rrto.disable()


@pytest.mark.parametrize("scenario", ["made once", "made each frame", "state read mid-frame"])
def test_an_apps_cuda_generator_draws_the_servers_numbers_and_replays(server, scenario):
    """A CPU server's generator is torch's CPU one: seeded alike, it draws what local mode draws."""
    local, local_states, _ = _generator_loop(None, scenario)
    replayed, states, s = _generator_loop(server.url, scenario)
    assert_same(local, replayed)
    assert len(states) == len(local_states) and all(torch.equal(a, b) for a, b in zip(local_states, states))
    assert s["replay_divergences"] == 0, s
    assert s["replayed_inferences"] >= (3 if scenario == "made each frame" else 10), s


def test_fork_rng_puts_the_servers_generator_state_back_and_replays(server):
    replayed, _, s = _generator_loop(server.url, "fork_rng")
    for frame in replayed:
        assert torch.equal(frame[0], frame[1])  # what fork_rng drew is drawn again after it
    assert not torch.equal(replayed[0][0], replayed[1][0])  # (the draw after it moved the stream on)
    assert s["replayed_inferences"] >= 10 and s["replay_divergences"] == 0, s


def test_a_seed_in_the_middle_of_a_replayed_frame(server):
    """A seed after ops the server ran ahead: the ops after it go as runs of their own (before,
    the settlement of the run ahead ran them a second time: 'handle ... already in use')."""
    net = TinyNet().eval()
    xs = frames_of(16, 12)

    def step(i, dev, st):
        if "net" not in st:
            st["net"] = copy.deepcopy(net).to(dev)
        with torch.no_grad():
            f = st["net"](xs[i].to(dev))
            torch.cuda.manual_seed(5)
            return (f + torch.rand(f.shape, device=dev)).cpu()

    def run(mode):
        rrto.enable(server=server.url, mode=mode, timeout=20, progress=False)
        try:
            st = {}
            return [step(i, "cuda", st) for i in range(12)], rrto.current().stats.snapshot()
        finally:
            rrto.disable()

    eager, _ = run("eager")
    replayed, s = run("replay")
    assert_same(eager, replayed)
    assert s["replayed_inferences"] >= 8 and s["replay_divergences"] == 0, s


def test_a_cpu_generator_given_to_a_cuda_op_is_torchs_error(remote):
    with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
        torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
    assert torch.randn(3, device="cuda", generator=torch.Generator("cuda")).cpu().shape == (3,)  # still serving
