"""One robot of the load test: 200 replayed inferences of its own small model, checked against local.

Waits at inference 100 and at the end for the test's go-ahead (files in a shared
directory), so the test can read the server's memory while every robot is connected.
"""
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import rrto

rank, url, sync_dir, n = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(rank)  # every robot has different weights: a mix-up between sessions would show
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
g = torch.Generator().manual_seed(100 + rank)
xs = [torch.randn(1, 3, 16, 16, generator=g) for _ in range(8)]
with torch.no_grad():
    expected = [net(x) for x in xs]


def wait_for(name: str) -> None:
    deadline = time.time() + 120
    while not (sync_dir / name).exists():
        if time.time() > deadline:
            sys.exit(f"robot {rank}: no {name} from the test")
        time.sleep(0.02)


rrto.enable(server=url, mode="replay", timeout=30)
remote = net.cuda()
wrong = 0
t0 = time.perf_counter()
with torch.no_grad():
    for i in range(n):
        y = remote(xs[i % len(xs)].cuda()).cpu()
        wrong += not torch.equal(y, expected[i % len(xs)])
        if i + 1 == n // 2:
            (sync_dir / f"half{rank}").touch()
            wait_for("go")
elapsed = time.perf_counter() - t0
stats = rrto.current().stats.snapshot()
(sync_dir / f"done{rank}").write_text(json.dumps({"wrong": wrong, "elapsed": elapsed, "stats": stats}))
wait_for("end")
rrto.disable()
