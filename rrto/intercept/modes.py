"""The torch function mode that makes "cuda" in Python calls mean rrto's virtual device.

It handles the few calls that would touch C++ CUDA before any aten op exists:
``.cuda()``, ``.to("cuda")`` and data factories such as ``torch.tensor(data,
device="cuda")``; everything else passes through. The ops themselves reach the
runtime through RemoteTensor's ``__torch_dispatch__`` and the CUDA-key fallback
(``cuda_backend``). In local mode the mode rewrites "cuda" to "cpu" and that is all.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedOpError
from .remote_tensor import CUDA0, RemoteTensor
from .shortcuts import SHORTCUTS

aten = torch.ops.aten
_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_BACKWARD = {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
_CPU = torch.device("cpu")
# Every func __torch_function__ does more with than call it; the rest, called without keywords
# (most ops of a forward pass), take the short way: one set lookup.
_HANDLED = frozenset((*SHORTCUTS, torch.Tensor.cuda, torch.Tensor.to, *_BACKWARD, torch.Tensor.pin_memory,
                      torch._has_compatible_shallow_copy_type))


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means a cuda device, as in torch


class DeviceFunctionMode(TorchFunctionMode):
    """Routes the Python calls that name the cuda device to rrto (or to the CPU, in local mode)."""

    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime
        self.local = runtime is None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in _HANDLED:
            return func(*args)
        kwargs = kwargs or {}
        short = SHORTCUTS.get(func)
        if short is not None and not self.local:
            out = short(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func is torch.Tensor.cuda:
            return self._cuda(*args, **kwargs)
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if func in _BACKWARD and not self.local and _any_remote(args, kwargs):
            raise UnsupportedOpError(
                "rrto offloads inference; backward() through tensors on the virtual cuda device is not "
                "supported yet. Run training locally (rrto --mode local) or on the server machine.")
        if func is torch.Tensor.pin_memory:
            return args[0]  # no page-locked memory without CUDA; a plain CPU tensor uploads the same
        if func is torch._has_compatible_shallow_copy_type and (type(args[0]) is RemoteTensor) != (
                type(args[1]) is RemoteTensor):
            # Else Module.cuda() would graft the remote tensor into the CPU Parameter (param.data = x),
            # a Parameter without a handle; this way _apply makes new remote Parameters.
            return False
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            if self.local:
                return func(*args, **{**kwargs, "device": _CPU})
            if func in _DATA_FACTORIES:
                cpu = func(*args, **{**kwargs, "device": _CPU, "requires_grad": False})
                out = self.runtime.upload(cpu)
                return out.requires_grad_() if kwargs.get("requires_grad") else out
        return func(*args, **kwargs)

    def _cuda(self, t, device=None, non_blocking=False, memory_format=torch.preserve_format):
        if self.local or type(t) is RemoteTensor:
            return t
        return self._upload(t, None, non_blocking, memory_format)

    def _upload(self, t, dtype, non_blocking, memory_format):
        if t.requires_grad and torch.is_grad_enabled():  # let autograd record the copy
            return aten._to_copy.default(t, dtype=dtype, device=CUDA0, non_blocking=non_blocking,
                                         memory_format=memory_format)
        return self.runtime.upload(t, dtype, memory_format, non_blocking)

    def _to(self, args, kwargs):
        t = args[0]
        device, dtype, non_blocking, copy_, memory_format = _parse_to(args[1:], kwargs)
        if not _is_cuda(device):
            return torch.Tensor.to(*args, **kwargs)
        if self.local:
            return t.to(_CPU, dtype, non_blocking, copy_, memory_format=memory_format or torch.preserve_format)
        if type(t) is RemoteTensor:  # already on the device: a copy or a cast at most, done there
            if not copy_ and dtype in (None, t.dtype) and memory_format in (None, torch.preserve_format):
                return t
            return aten._to_copy.default(t, dtype=dtype, memory_format=memory_format)
        return self._upload(t, dtype, non_blocking, memory_format)


def _any_remote(args, kwargs) -> bool:
    for a in (*args, *kwargs.values()):
        if type(a) is RemoteTensor or isinstance(a, (list, tuple)) and any(type(b) is RemoteTensor for b in a):
            return True
    return False


def _parse_to(args, kwargs):
    """(device, dtype, non_blocking, copy, memory_format) of any Tensor.to(...) call form."""
    kwargs = dict(kwargs)
    copy_ = kwargs.pop("copy", False)  # torch's parser of .to() arguments takes no copy
    bools = [i for i, a in enumerate(args) if isinstance(a, bool)]  # non_blocking, then copy, in every form
    if len(bools) > 1:
        copy_, args = args[bools[1]], args[:bools[1]] + args[bools[1] + 1:]
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, non_blocking, copy_, memory_format
