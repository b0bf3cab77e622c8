"""Collector pauses: torch's import-time objects are frozen on the robot and on the server.

A full collection walks every tracked object. torch and the modules its meta kernels
import make ~300k; rrto's per-op allocations trigger a full collection every ~100 replayed
frames, a 120-185 ms stall of the app (or, on the server, of every robot). After the
warm-up both sides ``gc.freeze()`` them, so a full collection walks only what came later.
"""
from __future__ import annotations

import gc
import time

import torch
from torch import nn

import rrto

from .conftest import RawClient


def _until(cond, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()


def test_robot_walks_only_what_came_after_its_warm_up(server):
    rrto.enable(server=server.url, mode="replay", timeout=20)
    try:
        assert _until(lambda: gc.get_freeze_count() > 100_000), gc.get_freeze_count()
        x = torch.randn(1, 3, 32, 32)
        outs, held = {}, {}
        for seed in (1, 2):  # a model made after the freeze, then another in its place
            net = _net(seed).cuda()  # (drops the first model: its only reference was ``net``)
            gc.collect()
            with torch.no_grad():
                for _ in range(8):
                    outs[seed] = net(x.cuda()).cpu()
            held[seed] = torch.cuda.memory_allocated()
        del net
        walked, frozen = len(gc.get_objects()), gc.get_freeze_count()
        assert walked * 4 < frozen, (walked, frozen)
        # the first model's tensors were freed on the server: with the second it holds one model's worth, not two
        assert held[2] <= held[1], held
        assert rrto.current().stats.replayed_inferences >= 8
    finally:
        rrto.disable()
    for seed in (1, 2):
        assert torch.equal(outs[seed], _net(seed)(x).detach())


def test_server_walks_only_what_came_after_its_warm_up(server):
    c = RawClient(server.url)
    c.hello()
    try:
        assert _until(lambda: c.request({"t": "stats"})["gc_frozen_objects"] > 100_000)
        s = c.request({"t": "stats"})
        assert s["gc_tracked_objects"] * 4 < s["gc_frozen_objects"], s
    finally:
        c.close()
