"""A plain CUDA app for the fault tests: a small CNN over frames, optionally with recurrent state.

Run under ``python -m rrto``. Prints ``iter I`` after each frame (the test kills, stops
or blocks the server on those cues), then one JSON line: how many outputs differ from
the same computation on this machine's CPU, each frame's wall time, and rrto's counters
at each frame (so the test sees offloading stop and start again).

    fault_robot.py N [--recurrent] [--pause S] [--threads K]

``--threads K``: K threads run the loop at once on the same net, each over its own frames
(a ROS node's callbacks); thread 0 prints the cues.
"""
import argparse
import copy
import json
import threading
import time

import torch
from torch import nn

import rrto


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu_(self.b1(self.c1(x)))
        z = self.b2(self.c2(y))
        z += y  # in place, as in a ResNet block
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z.relu_(), 1), 1))


class Cell(nn.Module):
    """Recurrent state that lives on the device across frames, updated in place through a view."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(10 + 16, 16)

    def forward(self, feat, h):
        new = torch.tanh(self.w(torch.cat([feat, h], 1)))
        h.mul_(0.5)
        h[:, :8].add_(new[:, :8])  # a write through a view of the state
        h[:, 8:] = new[:, 8:]
        return feat + h[:, :10].sum(1, keepdim=True)


def run(n, recurrent, pause, frames, net, cell, device, log):
    outs, walls = [], []
    with torch.inference_mode():
        h = torch.zeros(1, 16, device=device)
        for i in range(n):
            t0 = time.perf_counter()
            x = frames[i].to(device)
            y = net(x)
            if recurrent:
                y = cell(y, h)
            outs.append(y.cpu())
            walls.append(time.perf_counter() - t0)
            if log is not None:
                off = rrto.current()
                s = off.stats if off is not None else None
                log.append({"i": i, "lost": bool(off and off.runtime and off.runtime.lost),
                            "sent": s.messages_sent if s else 0, "replayed": s.replayed_inferences if s else 0})
                print(f"iter {i}", flush=True)
            if pause:
                time.sleep(pause)
        outs.append(h.cpu())
    return outs, walls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int)
    p.add_argument("--recurrent", action="store_true")
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(0)
    net, cell = Net().eval(), Cell().eval()
    for b in (net.b1, net.b2):  # non-trivial running statistics
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    frames = [torch.rand(1, 3, 24, 24, generator=g) for _ in range(a.n)]
    ref_net, ref_cell = copy.deepcopy(net), copy.deepcopy(cell)  # the app's CPU copy, for the reference
    log: list = []
    net, cell = net.cuda(), cell.cuda()
    streams = [frames[k:] + frames[:k] for k in range(a.threads)]  # each thread's own order
    ran: list = [None] * a.threads

    def loop(k):
        ran[k] = run(a.n, a.recurrent, a.pause, streams[k], net, cell, "cuda", log if k == 0 else None)
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(1, a.threads)]
    for t in threads:
        t.start()
    loop(0)
    for t in threads:
        t.join()
    outs, walls = ran[0]
    diff = []
    for k in range(a.threads):
        expected, _ = run(a.n, a.recurrent, 0.0, streams[k], ref_net, ref_cell, "cpu", None)
        diff += [float((o - e).abs().max()) for o, e in zip(ran[k][0], expected)]
    s = rrto.current().stats
    stats = {k: getattr(s, k) for k in ("faults", "reconnects", "local_ops", "weights_adopted", "lineage_cuts",
                                        "replayed_inferences", "replayers")}
    print(json.dumps({"n": len(outs), "checked": len(diff), "wrong": sum(d > 1e-5 for d in diff), "max_diff": max(diff),
                      "walls": walls, "log": log, "stats": stats}), flush=True)


if __name__ == "__main__":
    main()
