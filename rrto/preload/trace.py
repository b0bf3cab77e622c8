"""CUDA driver-call tracing: recording inside a traced app, and the per-inference report.

A traced process (``RRTO_TRACE_CUDA=1`` with the shim preloaded) keeps a copy of the
shim's counters after every ``torch.cuda.synchronize()``: an app that waits for its
result once per inference marks its inferences that way. At exit it writes what it saw
to ``RRTO_TRACE_OUT/<pid>.json`` (``rrto trace`` reads it) or, without that variable,
prints the report to stderr.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import statistics
import sys

from . import DriverCounters

# Report rows: (kind in preload.c, what it is called in the report).
KINDS = [("launch", "kernel launches"), ("graph", "graph launches"), ("copy", "memory copies"),
         ("memset", "memsets"), ("alloc", "allocations"), ("free", "frees"), ("sync", "synchronisations"),
         ("event", "event record/query/wait"), ("lookup", "entry-point lookups")]
REPLAY_MESSAGES = 2  # what rrto's record/replay sends per inference: the input up, the result down


class Tracer:
    """The traced process's side; created by the preload bootstrap."""

    def __init__(self):
        self.counters = DriverCounters()
        if not self.counters.enabled:
            raise RuntimeError("the rrto shim is loaded but RRTO_TRACE_CUDA=1 was not set when the process started")
        self.marks: list[list[int]] = []
        self.torch: str | None = None
        atexit.register(self.finish)

    def _snapshot(self) -> list[int]:
        return list(self.counters.snapshot().values())

    def watch_torch(self) -> None:
        """Mark an inference at every torch.cuda.synchronize() (called once torch is imported)."""
        import torch

        self.torch = torch.__version__
        original = torch.cuda.synchronize

        @functools.wraps(original)
        def synchronize(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                self.marks.append(self._snapshot())

        torch.cuda.synchronize = synchronize

    def finish(self) -> None:
        wrapped = self.counters.wrapped()
        if self.torch is None and wrapped == 0:
            return  # a helper process (pip, a shell tool) that neither used torch nor CUDA
        report = {"pid": os.getpid(), "program": os.path.basename(sys.argv[0]) if sys.argv else "python",
                  "argv": sys.argv, "torch": self.torch, "wrapped": wrapped, "names": self.counters.names,
                  "kinds": [self.counters.kinds[n] for n in self.counters.names],
                  "marks": self.marks, "total": self._snapshot()}
        out = os.environ.get("RRTO_TRACE_OUT")
        if out:
            path = os.path.join(out, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(report, f)
            os.replace(path + ".tmp", path)
        else:
            print(format_report(analyse(report)), file=sys.stderr)


def _by_kind(report: dict, counts: list[int]) -> dict[str, int]:
    out = {kind: 0 for kind, _ in KINDS}
    for kind, n in zip(report["kinds"], counts):
        out[kind] = out.get(kind, 0) + n
    out["all"] = sum(counts)
    return out


def analyse(report: dict, syncs_per_inference: int = 1, warmup: int = 1) -> dict:
    """Per-inference figures of one process's report: every ``syncs_per_inference``-th
    synchronize ends an inference; the median is taken after the first ``warmup`` ones."""
    ends = report["marks"][syncs_per_inference - 1::syncs_per_inference]
    previous = [0] * len(report["total"])
    per_inference = []
    for end in ends:
        per_inference.append(_by_kind(report, [a - b for a, b in zip(end, previous)]))
        previous = end
    steady = per_inference[warmup:] or per_inference[-1:]
    median = {k: statistics.median(d[k] for d in steady) for k in steady[0]} if steady else None
    calls = dict(zip(report["names"], report["total"]))
    return {"pid": report["pid"], "program": report["program"], "argv": report["argv"], "torch": report["torch"],
            "driver_used": report["wrapped"] > 0, "total": _by_kind(report, report["total"]),
            "calls": {name: n for name, n in calls.items() if n},
            "inferences": len(per_inference), "warmup": min(warmup, max(len(per_inference) - 1, 0)),
            "syncs_per_inference": syncs_per_inference, "per_inference_median": median,
            "per_inference": per_inference, "rrto_replay_messages_per_inference": REPLAY_MESSAGES}


def format_report(a: dict) -> str:
    head = f"rrto trace: {a['program']} (pid {a['pid']}, torch {a['torch'] or 'not imported'})"
    if not a["driver_used"]:
        return (f"{head}\n  no CUDA driver was used: 0 driver calls. The app never reached libcuda "
                "(a torch without CUDA, no GPU here, or the app ran on the CPU), so there is nothing to count.")
    lines = [head]
    total = a["total"]
    lines.append(f"  whole run: {total['all']} driver calls (" +
                 ", ".join(f"{total[k]} {name}" for k, name in KINDS if total[k]) + ")")
    m = a["per_inference_median"]
    if m is None:
        lines.append("  no torch.cuda.synchronize() calls, so no inference boundaries: totals only")
        return "\n".join(lines)
    unit = "synchronize()" if a["syncs_per_inference"] == 1 else f"{a['syncs_per_inference']} synchronize() calls"
    lines.append(f"  {a['inferences']} inferences (one per {unit}); median per inference after "
                 f"{a['warmup']} warm-up:")
    for k, name in KINDS:
        lines.append(f"    {name:26} {m[k]:>8g}")
    lines.append(f"    {'all driver calls':26} {m['all']:>8g}")
    lines.append(f"  a CUDA-API remoting system sends each driver call: {m['all']:g} messages per inference; "
                 f"rrto replay sends {REPLAY_MESSAGES} (the input up, the result down)")
    return "\n".join(lines)
