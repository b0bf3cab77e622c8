"""Halo arithmetic: which input rows a band of output rows needs.

The banded axis is dim 2 (H of NCHW, D of NCDHW). For a sliding window with kernel k,
stride s, padding p and dilation d, output rows [a, b) read input rows

    [a*s - p, (b-1)*s - p + d*(k-1) + 1)

*unclipped*: the part outside [0, H) is the op's own padding, which a band
reproduces with an explicit pad only where it touches a true border. A transposed
convolution inverts the map: output row o (in unpadded coordinates u = o + p) takes
input rows i with i*s <= u <= i*s + d*(k-1).

``need_graph`` composes windows through a graph of values (a chain with residual
branches): a value read by several consumers must cover the union of their needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A convolution or pooling window on the banded axis (k=1, s=1: point-wise)."""
    k: int = 1
    s: int = 1
    p: int = 0
    d: int = 1

    def need(self, a: int, b: int) -> tuple[int, int]:
        """Input rows (unclipped) that output rows [a, b) read."""
        return (0, 0) if b <= a else self.span(a, b)

    def span(self, a, b):
        """``need`` of a non-empty range; elementwise on arrays of rows too."""
        return (a * self.s - self.p, (b - 1) * self.s - self.p + self.d * (self.k - 1) + 1)

    def out_rows(self, h: int, ceil_mode: bool = False) -> int:
        """Output rows of an input of ``h`` rows, as torch computes them."""
        span = h + 2 * self.p - self.d * (self.k - 1) - 1
        n = (-(-span // self.s) if ceil_mode else span // self.s) + 1
        if ceil_mode and (n - 1) * self.s >= h + self.p:  # the last window must start inside
            n -= 1
        return max(n, 0)

    @property
    def pointwise(self) -> bool:
        return self.k == 1 and self.s == 1 and self.p == 0


@dataclass(frozen=True)
class Transposed:
    """A transposed convolution's window on the banded axis (output_padding 0 on it)."""
    k: int
    s: int = 1
    p: int = 0
    d: int = 1

    def need(self, a: int, b: int) -> tuple[int, int]:
        return (0, 0) if b <= a else self.span(a, b)

    def span(self, a, b):
        """``need`` of a non-empty range; elementwise on arrays of rows too."""
        return (-(-(a + self.p - self.d * (self.k - 1)) // self.s), (b - 1 + self.p) // self.s + 1)

    def out_rows(self, h: int, output_padding: int = 0) -> int:
        return (h - 1) * self.s - 2 * self.p + self.d * (self.k - 1) + 1 + output_padding

    @property
    def gapless(self) -> bool:
        """Every output row gets a contribution from some input row (s <= d*(k-1) + 1)."""
        return self.s <= self.d * (self.k - 1) + 1


IDENTITY = Window()


def clip(lo: int, hi: int, rows: int) -> tuple[int, int]:
    """[lo, hi) clipped to [0, rows): the rows a band must really read."""
    lo, hi = max(lo, 0), min(hi, rows)
    return (lo, hi) if hi > lo else (0, 0)


def hull(r1: tuple[int, int] | None, r2: tuple[int, int]) -> tuple[int, int]:
    """The smallest range covering both (an empty range covers nothing)."""
    if r1 is None or r1[1] <= r1[0]:
        return r2
    if r2[1] <= r2[0]:
        return r1
    return (min(r1[0], r2[0]), max(r1[1], r2[1]))


def chain_need(windows: list, heights: list[int], a: int, b: int) -> tuple[int, int]:
    """Rows of the chain's input that output rows [a, b) of its last layer need.

    ``windows[i]`` maps layer i's output to its input; ``heights[i]`` is layer i's input
    height. Intermediate needs are clipped (rows outside are padding, not computed).
    """
    lo, hi = a, b
    for w, h in zip(reversed(windows), reversed(heights)):
        lo, hi = clip(*w.need(lo, hi), h)
    return lo, hi


def need_graph(nodes: list, rows: dict, out: int, a: int, b: int) -> dict:
    """Rows of every value that rows [a, b) of value ``out`` need.

    ``nodes``: (output value, [(input value, window), ...]) in execution order;
    ``rows``: value -> its number of rows. Returns value -> clipped (lo, hi) for every
    value the band depends on (the inputs of a branch point get the hull of all needs).
    """
    need: dict = {out: clip(a, b, rows[out])}
    for v, ins in reversed(nodes):
        r = need.get(v)
        if r is None or r[1] <= r[0]:
            continue
        for u, w in ins:
            need[u] = hull(need.get(u), clip(*w.need(*r), rows[u]))
    return need


def need_rows(nodes: list, rows: dict, out: int) -> tuple[np.ndarray, np.ndarray]:
    """``need_graph(nodes, rows, out, r, r + 1)[0]`` for every row r of ``out`` at once: the
    chain-input rows [lo, hi) each single output row needs ((0, 0): none), as two arrays.
    Windows map arrays of rows with ``span``."""
    r = np.arange(rows[out], dtype=np.int64)
    need: dict = {out: (r, r + 1)}
    for v, ins in reversed(nodes):
        got = need.get(v)
        if got is None:
            continue
        lo, hi = got
        empty = hi <= lo
        for u, w in ins:
            a, b = w.span(lo, np.maximum(hi, lo + 1))  # (empty ranges are masked below)
            a, b = np.maximum(a, 0), np.minimum(b, rows[u])
            gone = empty | (b <= a)
            a, b = np.where(gone, 0, a), np.where(gone, 0, b)
            old = need.get(u)
            if old is not None:  # hull: an empty range covers nothing
                o_empty, n_empty = old[1] <= old[0], b <= a
                a = np.where(o_empty, a, np.where(n_empty, old[0], np.minimum(old[0], a)))
                b = np.where(o_empty, b, np.where(n_empty, old[1], np.maximum(old[1], b)))
            need[u] = (a, b)
    return need.get(0, (np.zeros_like(r), np.zeros_like(r)))
