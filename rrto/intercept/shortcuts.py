"""Composite calls on the virtual device sent straight to the one aten op they end in.

``F.batch_norm`` and ``torch.conv2d`` are C++ composites: on a RemoteTensor they pass
the Python argument parser twice, walk a chain of C++ checks, and reach rrto as
``native_batch_norm`` plus an ``empty`` (batch norm's unused reserve buffer) or as
``convolution``. That chain was a quarter of the robot's time per replayed op in a
conv net. Where the call is the plain inference case, the shortcut (installed in place of
the torch function by ``device_calls``) hands the aten op to the runtime itself: same op, same arguments, same result, one dispatch. Anything else
(training, autograd recording, unbatched input, string padding, a CPU tensor among the
arguments) returns NotImplemented and takes torch's own path, errors included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .remote_tensor import RemoteTensor

aten = torch.ops.aten


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _batch_norm(input=None, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5, *extra, **unknown):
    if extra or unknown or training or type(input) is not RemoteTensor or type(running_mean) is not RemoteTensor \
            or type(running_var) is not RemoteTensor or not eps >= 0.0 or input.dim() < 2:
        return NotImplemented
    c = input.shape[1]
    for t in (weight, bias):
        if t is not None and (type(t) is not RemoteTensor or t.numel() != c):
            return NotImplemented
    if running_mean.numel() != c or running_var.numel() != c or input.numel() == 0 or \
            _needs_autograd(input, weight, bias):
        return NotImplemented
    return input._rt.call(aten.native_batch_norm.default,
                          (input, weight, bias, running_mean, running_var, False, float(momentum), float(eps)),
                          {}, first=True)[0]


def _spatial(v, n: int) -> list | None:
    """An int or n ints as the list the dispatcher passes on; None for anything else."""
    if type(v) is int:
        return [v] * n
    if type(v) in (tuple, list) and len(v) == n and all(type(x) is int for x in v):
        return list(v)
    return None


def _conv(n: int):
    def conv(input=None, weight=None, bias=None, stride=1, padding=0, dilation=1, groups=1, *extra, **unknown):
        if extra or unknown or type(input) is not RemoteTensor or type(weight) is not RemoteTensor \
                or input.dim() != n + 2 or type(groups) is not int or input.dtype.is_complex:
            return NotImplemented
        if bias is not None and (type(bias) is not RemoteTensor or bias.dtype != input.dtype):
            return NotImplemented
        s, p, d = _spatial(stride, n), _spatial(padding, n), _spatial(dilation, n)
        if s is None or p is None or d is None or _needs_autograd(input, weight, bias):
            return NotImplemented
        return input._rt.call(aten.convolution.default, (input, weight, bias, s, p, d, False, [0] * n, groups), {})
    return conv


# (owner, name, shortcut): each conv has two names, torch.conv2d and F.conv2d (one builtin).
SHORTCUTS = [(F, "batch_norm", _batch_norm)] + [
    (owner, f"conv{n}d", _conv(n)) for n in (1, 2, 3) for owner in (torch, F)]
