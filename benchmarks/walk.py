"""The robot's walk through the app: its CPU time per replayed frame, and per op.

    python -m benchmarks.walk                                  # embedded server, issue-3 models
    python -m benchmarks.walk --server tcp://gpu-box:5555 --models keypoint:128x224 --frames 40

On a fast link with a fast server, a replayed frame lasts as long as the robot takes to
walk the app's ops (the server ran the frame ahead meanwhile): that walk is the frame.
This measures the app thread's own CPU time (``time.thread_time``: not the server's, not
time spent waiting for it), median of several runs, for:

* ``wrapper op``: one op on a Python tensor subclass that does nothing but make its output,
  what torch itself costs any such subclass (the floor of a transparent offloader);
* ``replayed op``: one op of a replayed 100-op relu/add loop;
* each model: its replayed frame, and that over the ops of a frame, what one op of the app
  costs the robot all told (the app's Python, torch's dispatch, rrto).

Compare hosts with it: a robot whose per-op figures are high walks slowly whatever the link.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .workloads import parse_workload

DEFAULT_MODELS = "resnet18:128,mobilenet_v2:128,keypoint:128x224,scene:8x32x32"  # issue 3's benchmark
RUNS = 5  # timed runs of each figure; the median is reported


def thread_ms(run, frames: int) -> float:
    """Median over ``RUNS`` runs of the calling thread's CPU milliseconds per call of ``run(i)``."""
    per = []
    for _ in range(RUNS):
        t = time.thread_time()
        for i in range(frames):
            run(i)
        per.append((time.thread_time() - t) / frames * 1e3)
    return statistics.median(per)


class _Bare(torch.Tensor):
    """A tensor subclass that only makes its output: torch's own cost of one op on any such subclass."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        a = args[0]
        return torch.Tensor._make_wrapper_subclass(_Bare, a.shape, dtype=a.dtype, device="meta")


def wrapper_op_us(n: int = 2000) -> float:
    x = torch.Tensor._make_wrapper_subclass(_Bare, (1, 16, 8, 8), dtype=torch.float32, device="meta")
    return thread_ms(lambda i: F.relu(x), n) * 1e3


def _loop(x: torch.Tensor) -> torch.Tensor:
    y = x
    for _ in range(50):
        y = F.relu(y) + x
    return y


def replayed_op_us(frames: int) -> float:
    inputs = [torch.randn(1, 16, 8, 8) for _ in range(4)]
    for i in range(8):  # recorded, then replayed
        _loop(inputs[i % 4].cuda()).cpu()
    return thread_ms(lambda i: _loop(inputs[i % 4].cuda()).cpu(), frames) * 1e3 / 100


def replayed_ms(spec: str, frames: int, stats) -> tuple[float, float, int]:
    """The replayed frame's CPU time, the ops of a frame, and how many of the timed frames replayed."""
    work = parse_workload(spec)
    step, inputs = work.server_step("cuda"), list(work.inputs(4))

    def frame(i):
        for t in step(inputs[i % 4]):
            t.cpu()

    for i in range(8):  # recorded, then replayed
        frame(i)
    ops, replayed = stats.ops_intercepted, stats.replayed_inferences
    walk = thread_ms(frame, frames)
    return walk, (stats.ops_intercepted - ops) / (RUNS * frames), stats.replayed_inferences - replayed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.walk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="tcp://host:port of an rrto-server (default: an embedded one)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    p.add_argument("--frames", type=int, default=20, help=f"frames per timed run; {RUNS} runs, median (default 20)")
    ns = p.parse_args(argv)
    try:
        specs = [s for s in ns.models.split(",") if s]
        for s in specs:
            parse_workload(s)
    except ValueError as e:
        print(f"benchmarks.walk: {e}", file=sys.stderr)
        return 2
    import rrto
    torch.set_num_threads(1)  # a robot's one core
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}; robot thread CPU time, median of {RUNS} runs",
          flush=True)
    print(f"wrapper op (torch's cost for any tensor subclass): {wrapper_op_us():.2f} us", flush=True)
    rows = []
    with torch.no_grad():
        rrto.enable(server=ns.server, mode="replay", progress=False)
        try:
            print(f"replayed op (100-op relu/add loop): {replayed_op_us(ns.frames):.2f} us", flush=True)
            for spec in specs:
                print(f"  {spec} ...", file=sys.stderr, flush=True)
                rows.append((spec, *replayed_ms(spec, ns.frames, rrto.current().stats)))
        finally:
            rrto.disable()
    print("| model | replayed frame, robot CPU ms | ops / frame | robot CPU us / op | frames replayed |\n"
          "| --- | --- | --- | --- | --- |")
    for spec, walk, ops, replayed in rows:
        per_op = walk / ops * 1e3 if ops else float("nan")
        print(f"| {spec} | {walk:.2f} | {ops:.0f} | {per_op:.1f} | {replayed} of {RUNS * ns.frames} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
