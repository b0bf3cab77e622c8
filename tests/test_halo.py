"""Halo arithmetic against brute force: the real torch op run on the rows a band needs
(real neighbour rows, explicit padding only at true borders) gives exactly the unsplit
op's rows of that band."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from rrto.lop.analysis import Upsample
from rrto.lop.halo import Transposed, Window, chain_need, clip, need_graph, need_rows

torch.manual_seed(0)


def pad_rows(x: torch.Tensor, top: int, bottom: int, value: float = 0.0) -> torch.Tensor:
    return F.pad(x, [0, 0] * (x.dim() - 3) + [top, bottom], value=value) if top or bottom else x


def take(x: torch.Tensor, lo: int, hi: int, value: float = 0.0) -> torch.Tensor:
    """Rows [lo, hi) of x along dim 2, rows outside [0, H) as padding ``value``."""
    H = x.shape[2]
    c0, c1 = clip(lo, hi, H)
    return pad_rows(x[:, :, c0:c1], c0 - lo, hi - c1, value)


def conv_fn(w, s, p, d, dims=2):
    conv = F.conv2d if dims == 2 else F.conv3d

    def full(x):
        return conv(x, w, stride=s, padding=p, dilation=d)

    def band(x_rows):  # the same conv with no padding on the banded axis
        return conv(x_rows, w, stride=s, padding=(0,) + (p,) * (dims - 1), dilation=d)
    return full, band


@pytest.mark.parametrize("k, s, p, d", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 2, 3, 1), (3, 1, 1, 2),
                                        (3, 2, 3, 2), (7, 2, 3, 1), (1, 2, 0, 1), (6, 2, 2, 1), (5, 3, 1, 2)])
def test_conv_band_equals_unsplit_rows(k, s, p, d):
    H = 23
    x = torch.randn(1, 3, H, 11)
    w = torch.randn(4, 3, k, k)
    full, band = conv_fn(w, s, p, d)
    y = full(x)
    win = Window(k, s, p, d)
    assert win.out_rows(H) == y.shape[2]
    for a, b in [(0, 1), (0, y.shape[2]), (1, 3), (y.shape[2] - 2, y.shape[2]), (2, 5)]:
        if b > y.shape[2] or a >= b:
            continue
        lo, hi = win.need(a, b)
        got = band(take(x, lo, hi))
        assert got.shape[2] == b - a
        assert torch.allclose(got, y[:, :, a:b], rtol=1e-5, atol=1e-6), (a, b)


def test_need_is_tight():
    """Changing a row just outside the need leaves the band alone; its border rows matter."""
    H, win = 30, Window(3, 2, 1, 2)
    x = torch.randn(1, 1, H, 5)
    w = torch.randn(1, 1, 3, 3)
    y = F.conv2d(x, w, stride=2, padding=1, dilation=2)
    a, b = 4, 7
    lo, hi = win.need(a, b)
    assert 0 < lo and hi < H
    for row, changes in [(lo - 1, False), (hi, False), (lo, True), (hi - 1, True)]:
        x2 = x.clone()
        x2[:, :, row] += 100
        y2 = F.conv2d(x2, w, stride=2, padding=1, dilation=2)
        assert (not torch.allclose(y2[:, :, a:b], y[:, :, a:b])) == changes, row


@pytest.mark.parametrize("k, s, p, ceil", [(3, 2, 1, False), (3, 2, 1, True), (2, 2, 0, True), (3, 3, 0, True),
                                           (2, 2, 0, False), (3, 2, 0, True)])
@pytest.mark.parametrize("H", [15, 16, 17])
def test_max_pool_band_with_ceil_mode(k, s, p, ceil, H):
    x = torch.randn(1, 2, H, 9)
    y = F.max_pool2d(x, k, s, p, ceil_mode=ceil)
    win = Window(k, s, p)
    assert win.out_rows(H, ceil) == y.shape[2]
    n = y.shape[2]
    for a, b in itertools.combinations(range(n + 1), 2):
        lo, hi = win.need(a, b)
        got = F.max_pool2d(take(x, lo, hi, float("-inf")), k, s, (0, p), ceil_mode=ceil)  # exact rows: no ceil row
        assert torch.equal(got, y[:, :, a:b]), (a, b)


def test_avg_pool_counting_padding():
    x = torch.randn(1, 2, 14, 9)
    y = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True)
    win = Window(3, 2, 1)
    for a, b in [(0, 2), (2, 5), (5, 7)]:
        got = F.avg_pool2d(take(x, *win.need(a, b)), 3, 2, (0, 1), count_include_pad=True)
        assert torch.allclose(got, y[:, :, a:b], atol=1e-6)


@pytest.mark.parametrize("k, s, p", [(3, 1, 1), (3, 2, 1), (3, 2, 0)])
def test_3d_conv_bands_on_depth(k, s, p):
    D = 13
    x = torch.randn(1, 2, D, 6, 7)
    w = torch.randn(3, 2, k, k, k)
    full, band = conv_fn(w, s, p, 1, dims=3)
    y = full(x)
    win = Window(k, s, p)
    n = y.shape[2]
    for a, b in [(0, 1), (0, n), (1, n - 1), (n - 2, n)]:
        got = band(take(x, *win.need(a, b)))
        assert torch.allclose(got, y[:, :, a:b], rtol=1e-5, atol=1e-5), (a, b)


@pytest.mark.parametrize("k, s, p", [(2, 2, 0), (3, 2, 1), (4, 2, 1), (3, 1, 1)])
def test_transposed_conv_bands(k, s, p):
    H = 9
    x = torch.randn(1, 3, H, 5)
    w = torch.randn(3, 2, k, k)
    y = F.conv_transpose2d(x, w, stride=s, padding=p)
    win = Transposed(k, s, p)
    assert win.gapless and win.out_rows(H) == y.shape[2]
    n = y.shape[2]
    for a, b in itertools.combinations(range(n + 1), 2):
        lo, hi = clip(*win.need(a, b), H)
        z = F.conv_transpose2d(x[:, :, lo:hi], w, stride=s, padding=(0, p))
        got = z[:, :, a + p - lo * s:b + p - lo * s]
        assert torch.allclose(got, y[:, :, a:b], rtol=1e-5, atol=1e-5), (a, b)


def test_chain_of_six_layers():
    """conv s2 p3 k7 -> maxpool(ceil) -> conv d2 -> conv s2 p0 -> conv k1 -> conv p1."""
    layers = [(Window(7, 2, 3), lambda x, pr: F.conv2d(x, w[0], stride=2, padding=(0, 3))),
              (Window(3, 2, 1), lambda x, pr: F.max_pool2d(x, 3, 2, (0, 1), ceil_mode=True)),
              (Window(3, 1, 2, 2), lambda x, pr: F.conv2d(x, w[2], padding=(0, 2), dilation=2)),
              (Window(3, 2, 0), lambda x, pr: F.conv2d(x, w[3], stride=2)),
              (Window(1), lambda x, pr: torch.relu(F.conv2d(x, w[4]))),
              (Window(3, 1, 1), lambda x, pr: F.conv2d(x, w[5], padding=(0, 1)))]
    w = [torch.randn(4, 3, 7, 7), None, torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3), torch.randn(4, 4, 1, 1),
         torch.randn(4, 4, 3, 3)]
    x = torch.randn(1, 3, 97, 20)

    def full(x):
        x = F.conv2d(x, w[0], stride=2, padding=3)
        x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        x = F.conv2d(x, w[2], padding=2, dilation=2)
        x = F.conv2d(x, w[3], stride=2)
        x = torch.relu(F.conv2d(x, w[4]))
        return F.conv2d(x, w[5], padding=1)
    y = full(x)
    heights, h = [], x.shape[2]
    for i, (win, _) in enumerate(layers):
        heights.append(h)
        h = win.out_rows(h, ceil_mode=(i == 1))
    assert h == y.shape[2]
    for a, b in [(0, 1), (0, h), (1, 3), (h - 1, h), (2, h - 2)]:
        lo, hi = chain_need([wi for wi, _ in layers], heights, a, b)
        # run the band layer by layer, each on exactly the rows the next one needs
        rows = [(a, b)]
        for win, hh in zip(reversed(layers[1:]), reversed(heights[1:])):
            rows.append(clip(*win[0].need(*rows[-1]), hh))
        rows.reverse()  # rows[i]: output rows of layer i
        t, have = x[:, :, lo:hi], (lo, hi)
        for i, (win, f) in enumerate(layers):
            want = win.need(*rows[i])
            t = take(t, want[0] - have[0], want[1] - have[0], float("-inf") if i == 1 else 0.0)
            # t holds exactly the in-range rows of ``have``: whatever else ``want`` covers is border padding
            t = f(t, None)
            have = rows[i]
        assert torch.allclose(t, y[:, :, a:b], rtol=1e-4, atol=1e-5), (a, b)


def test_residual_block_needs_union_of_branches():
    """y = relu(conv3x3(conv3x3 s2(x)) + conv1x1 s2(x)): x must cover both branches' needs."""
    w1, w2, w3 = torch.randn(4, 3, 3, 3), torch.randn(4, 4, 3, 3), torch.randn(4, 3, 1, 1)
    x = torch.randn(1, 3, 40, 8)
    b1 = F.conv2d(x, w1, stride=2, padding=1)
    y = torch.relu(F.conv2d(b1, w2, padding=1) + F.conv2d(x, w3, stride=2))
    H = {0: 40, 1: 20, 2: 20, 3: 20, 4: 20}
    nodes = [(1, [(0, Window(3, 2, 1))]), (2, [(1, Window(3, 1, 1))]), (3, [(0, Window(1, 2, 0))]),
             (4, [(2, IDENT), (3, IDENT)])]
    for a, b in [(0, 20), (0, 5), (5, 9), (15, 20), (19, 20)]:
        need = need_graph(nodes, H, 4, a, b)
        assert need[4] == (a, b)
        # the skip (1x1 stride 2) alone needs rows 2a .. 2b-1; the body needs more
        assert need[0][0] <= 2 * a and need[0][1] >= 2 * (b - 1) + 1
        assert need[0] == clip(2 * a - 3, 2 * b + 2, 40)  # body: b1 rows [a-1, b+1), x rows [2a-3, 2b+2)
        xs = x[:, :, need[0][0]:need[0][1]]
        lo0 = need[0][0]
        r1 = Window(3, 2, 1).need(*need[1])
        t1 = F.conv2d(take(xs, r1[0] - lo0, r1[1] - lo0), w1, stride=2, padding=(0, 1))
        r2 = Window(3, 1, 1).need(a, b)
        t2 = F.conv2d(take(t1, r2[0] - need[1][0], r2[1] - need[1][0]), w2, padding=(0, 1))
        r3 = Window(1, 2, 0).need(a, b)
        t3 = F.conv2d(xs[:, :, r3[0] - lo0:r3[1] - lo0], w3, stride=2)
        assert torch.allclose(torch.relu(t2 + t3), y[:, :, a:b], rtol=1e-4, atol=1e-5)


IDENT = Window()


def test_need_rows_equals_need_graph_row_by_row():
    """The planner's table of single-row needs, computed for all rows at once, is need_graph's:
    stride, dilation, padding past the border, a residual join, a transposed conv, an upsample."""
    nodes = [(1, [(0, Window(7, 2, 3))]), (2, [(1, Window(3, 2, 1, 2))]), (3, [(2, Window(3, 1, 1))]),
             (4, [(1, Window(1, 2, 0))]), (5, [(3, IDENT), (4, IDENT)]), (6, [(5, Transposed(4, 2, 1))]),
             (7, [(6, Upsample(2))]), (8, [(7, Window(5, 1, 0))])]
    rows = {0: 64, 1: 32, 2: 16, 3: 16, 4: 16, 5: 16, 6: 32, 7: 64, 8: 60}
    for out in range(1, 9):
        sub = [n for n in nodes if n[0] <= out]
        lo, hi = need_rows(sub, rows, out)
        want = [need_graph(sub, rows, out, r, r + 1).get(0, (0, 0)) for r in range(rows[out])]
        assert list(zip(lo.tolist(), hi.tolist())) == want, out
