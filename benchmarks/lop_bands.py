"""Banded vs unsplit execution of a model's local chain on this CPU (the robot's side of lop).

    python -m benchmarks.lop_bands [--model resnet18] [--size 224] [--threads 1]

Records the model under rrto against a local server, analyses its chain, and times the
chain up to several cuts unsplit (the recorded ops) and in n bands (1..8), all computed
here: the cost of halos (rows recomputed at band edges) and of smaller kernels.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from rrto.lop.analysis import analyse
from rrto.lop.bands import band, constants, run_plan, run_steps
from rrto.lop.plan import BandPlan


def best_of(f, n: int = 5) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    from tests.conftest import ServerProcess
    from tests.lop_models import example_models, record
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18", choices=list(example_models()))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)
    make, shape = example_models()[ns.model]
    shape = shape[:2] + (ns.size,) * (len(shape) - 2)
    server = ServerProcess()
    try:
        prog, params, _ = record(server.url, make, shape, frames=3)
    finally:
        server.stop()
    torch.set_num_threads(ns.threads)
    chain = analyse(prog)
    consts = constants(prog)
    x = torch.randn(shape)
    x0 = prog.steps[0].out_offsets[0]
    cuts = [d for d in chain.cuts() if d > 1]
    picks = sorted({cuts[0], cuts[len(cuts) // 3], cuts[2 * len(cuts) // 3], cuts[-1]})
    print(f"{ns.model} {tuple(shape)}, {ns.threads} thread(s), chain of {len(chain)} steps "
          f"(ends: {chain.ends})")
    print(f"{'depth':>5} {'rows':>5} {'unsplit ms':>10} " + " ".join(f"{n:>2} bands" for n in range(1, 9))
          + "   (ms; input rows read / H at 8 bands)")
    with torch.no_grad():
        for d in picks:
            rows = chain.rows(chain.value_at(d))
            unsplit = best_of(lambda: run_steps(prog, {x0: x.clone()}, params, consts, 1, d))
            cells = []
            for n in range(1, 9):
                if n > rows:
                    cells.append(f"{'-':>8}")
                    continue
                plan = BandPlan.even(d, rows, (True,) * n)
                cells.append(f"{best_of(lambda: run_plan(chain, plan, x, params, consts)) * 1e3:8.1f}")
            plan = BandPlan.even(d, rows, (True,) * min(8, rows))
            read = sum(band(chain, d, a, b).hi - band(chain, d, a, b).lo for a, b, _ in plan.bands())
            print(f"{d:>5} {rows:>5} {unsplit * 1e3:10.1f} " + " ".join(cells)
                  + f"   {read / chain.input_rows:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
