"""Per-frame timings of an app, written as JSON with ``--timings PATH`` (for benchmarks).

Each frame records its wall time, measured up to a ``torch.cuda.synchronize()`` as CUDA
timing needs, and the CPU time this process spent in it (all threads).
"""
from __future__ import annotations

import json
import time

import torch


class FrameTimer:
    def __init__(self, path: str | None):
        self.path, self.frames = path, []

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> float:
        """End the frame (after the GPU finished it); returns its wall time in seconds."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.frames.append({"wall_s": wall, "cpu_s": time.process_time() - self.c0})
        return wall

    def write(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump({"frames": self.frames}, f)
