"""Two models in two app threads at once (a ROS node's camera and lidar callbacks).

    python -m benchmarks.threads [--rtt-ms 4] [--models mobilenet_v2:128,keypoint:128x224] \\
        [--modes replay,eager] [--frames 40] [--repeats 2] [--out threads.json]

Starts a CPU server on loopback (behind ``benchmarks.relay`` when ``--rtt-ms`` > 0) and, per
mode and repeat, runs each model alone in a thread, then both at once in two threads.
Reports each model's median frame (upload to result on the CPU), the wall time of all
frames, how many frames replayed and the messages sent per frame (recording frames too). Runs alternate so that
a drift of the machine shows in both.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time

import torch

from .links import start_ready, start_relay, stop
from .workloads import EXAMPLES, parse_workload


def _model(name: str):
    """(model on the CPU, an input frame) for a workload name."""
    sys.path.insert(0, str(EXAMPLES))
    import models
    w = parse_workload(name)
    torch.manual_seed(0)
    if w.kind == "classifier":
        net, x = models.CLASSIFIERS[name.split(":")[0]](), torch.randn(1, 3, w.dims[0], w.dims[0])
    elif w.kind == "keypoint":
        net, x = models.KeypointNet(), torch.randn(1, 3, *w.dims)
    else:
        raise SystemExit(f"{name}: only classifiers and keypoint nets here")
    return models.randomize_norms(net, 0).eval(), x


def _frames(net, x, n: int, times: list) -> None:
    with torch.no_grad():
        for _ in range(n):
            t = time.perf_counter()
            y = net(x.cuda())
            (y[0] if isinstance(y, tuple) else y).cpu()
            times.append(time.perf_counter() - t)


def measure(url: str, mode: str, nets: list, frames: int, warmup: int, together: bool) -> dict:
    """One run: the models one after another in a thread each, or all at once."""
    import rrto
    rrto.enable(server=url, mode=mode, timeout=60)
    try:
        moved = [(copy.deepcopy(net).cuda(), x) for net, x in nets]
        times: list = [[] for _ in moved]
        threads = [threading.Thread(target=_frames, args=(net, x, warmup + frames, times[k]))
                   for k, (net, x) in enumerate(moved)]
        sent = rrto.current().stats.messages_sent  # (the weights went up)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
            if not together:
                t.join()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        s = rrto.current().stats.snapshot()
    finally:
        rrto.disable()
    n = len(nets) * (warmup + frames)
    return {"median_ms": [round(statistics.median(t[warmup:]) * 1e3, 2) for t in times], "wall_s": round(wall, 3),
            "replayed": s["replayed_inferences"], "frames": n, "messages_per_frame": round((s["messages_sent"] - sent) / n, 1),
            "runs_recalled": s.get("runs_recalled", 0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mobilenet_v2:128,keypoint:128x224", help="two or more, comma-separated")
    p.add_argument("--modes", default="replay,eager")
    p.add_argument("--rtt-ms", type=float, default=4.0, help="round trip added by a relay (0: plain loopback)")
    p.add_argument("--frames", type=int, default=40, help="measured frames per model and run")
    p.add_argument("--warmup", type=int, default=10, help="frames per model before measuring (recording)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="write the runs as JSON here")
    a = p.parse_args(argv)
    names = [m for m in a.models.split(",") if m]
    nets = [_model(m) for m in names]
    server, found = start_ready([sys.executable, "-m", "server", "--listen", "tcp://127.0.0.1:0", "--device", "cpu",
                                 "--log-level", "warning"], r"listening on tcp://([\d.]+):(\d+)")
    relay = None
    try:
        host, port = found[0].group(1), int(found[0].group(2))
        if a.rtt_ms > 0:
            relay, where, _prio = start_relay([], {"server": (host, port)}, a.rtt_ms)
            host, port = where["server"]
        url = f"tcp://{host}:{port}"
        runs = []
        for r in range(a.repeats):
            for mode in a.modes.split(","):
                for together in (False, True):
                    res = measure(url, mode, nets, a.frames, a.warmup, together)
                    res.update(mode=mode, together=together, repeat=r)
                    runs.append(res)
                    print(f"{mode:7} {'together' if together else 'alone   '} "
                          + "  ".join(f"{n} {ms:6.1f} ms" for n, ms in zip(names, res["median_ms"]))
                          + f"  wall {res['wall_s']:5.2f} s  replayed {res['replayed']}/{res['frames']}"
                          f"  {res['messages_per_frame']} msgs/frame", flush=True)
    finally:
        stop(relay)
        stop(server)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"models": names, "rtt_ms": a.rtt_ms, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
