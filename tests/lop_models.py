"""Recorded programs of the example models, for the LOP tests: each model runs under rrto
(replay mode, the real server) until its sequence is adopted; the robot's CPU copies of the
parameters are kept by handle, as the lop runtime keeps them."""
from __future__ import annotations

import copy

import torch

import rrto
from examples import models as M


def example_models() -> dict:
    """name -> (model factory, input shape): small inputs keep the tests fast."""
    return {
        "resnet18": (lambda: M.randomize_norms(M.resnet18(10), 1), (1, 3, 64, 64)),
        "vgg11": (lambda: M.vgg11(10), (1, 3, 64, 64)),
        "mobilenet_v2": (lambda: M.randomize_norms(M.mobilenet_v2(10), 2), (1, 3, 64, 64)),
        "KeypointNet": (lambda: M.randomize_norms(M.KeypointNet(width=8), 3), (1, 3, 64, 96)),
        "SceneCompletionNet": (lambda: M.randomize_norms(M.SceneCompletionNet(classes=5, width=4), 4),
                               (1, 1, 16, 16, 16)),
    }


def record(server_url: str, make, shape, frames: int = 4):
    """(program, params by handle, the CPU model) of ``make()`` recorded against the server."""
    torch.manual_seed(0)
    net = make().eval()
    cpu = copy.deepcopy(net)
    rrto.enable(server=server_url, mode="replay", timeout=30)
    try:
        rnet = net.to("cuda")
        params = {t._h: c.detach() for t, c in zip(rnet.state_dict(keep_vars=True).values(), cpu.state_dict().values())}
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _ in range(frames):
                out = rnet(torch.randn(shape, generator=g).cuda())
                out.cpu()
        program = rrto.current().runtime.replayer.program
    finally:
        rrto.disable()
    assert program is not None, "the sequence was not adopted"
    return program, params, cpu
