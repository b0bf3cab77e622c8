"""Synthetic profiles (conv chains, a ResNet-18-like net) for planner tests and the demo.

Times come from FLOP counts: ``flops / rate + per-op overhead`` on each side, so a
"slow robot" is a low ``robot_flops`` (a Jetson-like share of a CPU core is a few
GFLOP/s) and a fast server a high ``server_flops`` with a kernel-launch overhead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cost import Profile, StepCost


@dataclass(frozen=True)
class Speed:
    robot_flops: float = 4e9
    server_flops: float = 2e12
    robot_op_s: float = 20e-6
    server_op_s: float = 15e-6


class Net:
    """A tiny builder: each method appends a step and returns its index (-1 is the input)."""

    def __init__(self, rows: int, cols: int, channels: int, speed: Speed = Speed(), dtype_bytes: int = 4) -> None:
        self.rows, self.cols, self.ch = rows, cols, channels
        self.speed, self.nb = speed, dtype_bytes
        self.steps: list[StepCost] = []
        self._shape = {-1: (rows, cols, channels)}
        self._need = {-1: lambda a, b: (max(0, a), min(rows, b))}

    def _add(self, name, local, shape, flops, inputs, need=None, out_bytes=None) -> int:
        sp = self.speed
        r, c, ch = shape
        nbytes = out_bytes if out_bytes is not None else r * c * ch * self.nb
        self.steps.append(StepCost(name, local, r, nbytes, flops / sp.robot_flops + sp.robot_op_s,
                                   flops / sp.server_flops + sp.server_op_s, need, tuple(inputs)))
        i = len(self.steps) - 1
        self._shape[i], self._need[i] = shape, need
        return i

    def last(self) -> int:
        return len(self.steps) - 1

    def conv(self, src: int, cout: int, k: int = 3, s: int = 1, p: int = 1, d: int = 1, name: str = "conv") -> int:
        r, c, cin = self._shape[src]
        ro = (r + 2 * p - d * (k - 1) - 1) // s + 1
        co = (c + 2 * p - d * (k - 1) - 1) // s + 1
        inner = self._need[src]

        def need(a, b, inner=inner, r=r):
            return inner(max(0, a * s - p), min(r, (b - 1) * s - p + d * (k - 1) + 1))

        return self._add(name, True, (ro, co, cout), 2 * k * k * cin * cout * ro * co, [src], need)

    def pointwise(self, src: int, name: str = "relu", flops_per: float = 1.0) -> int:
        r, c, ch = self._shape[src]
        return self._add(name, True, (r, c, ch), flops_per * r * c * ch, [src], self._need[src])

    def add(self, x: int, y: int, name: str = "add") -> int:
        r, c, ch = self._shape[x]
        nx, ny = self._need[x], self._need[y]

        def need(a, b):
            (l1, h1), (l2, h2) = nx(a, b), ny(a, b)
            return min(l1, l2), max(h1, h2)

        return self._add(name, True, (r, c, ch), r * c * ch, [x, y], need)

    def dense(self, src: int, out: int, name: str = "fc") -> int:
        r, c, ch = self._shape[src]
        return self._add(name, False, (1, 1, out), 2 * r * c * ch * out, [src])

    def global_pool(self, src: int) -> int:
        r, c, ch = self._shape[src]
        return self._add("avgpool", False, (1, 1, ch), r * c * ch, [src])

    def profile(self, **kw) -> Profile:
        return Profile(self.steps, self.rows * self.cols * self.ch * self.nb, self.rows,
                       self.steps[-1].out_bytes, **kw)


def conv_chain(layers=((3, 1, 1, 32),) * 6, rows=224, cols=224, channels=3, classes=10, speed=Speed()) -> Profile:
    """A plain chain of conv(k, s, p, cout) + relu, then global pool + fc."""
    net = Net(rows, cols, channels, speed)
    x = -1
    for k, s, p, cout in layers:
        x = net.conv(x, cout, k, s, p)
        x = net.pointwise(x)
    net.dense(net.global_pool(x), classes)
    return net.profile()


def resnet18_like(rows=224, cols=224, speed=Speed(), classes=1000) -> Profile:
    """ResNet-18's op graph: stem, 8 basic blocks (conv-bn-relu-conv-bn-add-relu), pool, fc (~70 steps)."""
    net = Net(rows, cols, 3, speed)
    x = net.conv(-1, 64, 7, 2, 3, name="stem")
    x = net.pointwise(net.pointwise(x, "bn"))
    x = net.conv(x, 64, 3, 2, 1, name="maxpool")  # same row geometry as maxpool(3, 2, 1)
    net.steps[x].robot_s = net.steps[x].server_s = 1e-4  # a pool, not a conv: cheap
    ch = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            s = 2 if stage > 0 and block == 0 else 1
            y = net.conv(x, cout, 3, s, 1)
            y = net.pointwise(net.pointwise(y, "bn"))
            y = net.pointwise(net.conv(y, cout, 3, 1, 1), "bn")
            skip = x
            if s != 1 or ch != cout:
                skip = net.pointwise(net.conv(x, cout, 1, s, 0, name="downsample"), "bn")
            x = net.pointwise(net.add(y, skip))
            ch = cout
    net.dense(net.global_pool(x), classes)
    return net.profile()
