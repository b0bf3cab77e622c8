"""The Python calls that name the cuda device, made to mean rrto's virtual device.

A few calls touch C++ CUDA before any aten op exists: ``.cuda()``, ``.to("cuda")`` and
data factories such as ``torch.tensor(data, device="cuda")``. While rrto offloads, these
functions are replaced on torch's classes and modules (``install``), process-wide, so a
thread started before ``rrto.enable()`` sees the device too. Every other call of the app
goes to C++ untouched: the ops reach the runtime through RemoteTensor's
``__torch_dispatch__`` and the CUDA-key fallback (``cuda_backend``). This used to be a
torch function mode, which put a Python frame and a second pass through torch's argument
parser in front of every torch call of the app (1-2 us each; the keypoint net makes ~320 a
frame), and on a GPU server the robot's walk through the app is the frame.

The same replacements carry the shortcuts (``shortcuts.py``: conv and batch norm sent
straight to their aten op), two guards (no backward through remote tensors; no
page-locked memory), and ``model_calls``' (loading, TorchScript, compile, DataParallel).

In local mode "cuda" must become "cpu" in any call's device argument
(``torch.zeros(3, device="cuda")``), so there ``LocalDeviceMode``, a function mode, does it.
"""
from __future__ import annotations

import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedOpError
from . import model_calls
from .remote_tensor import CUDA0, RemoteTensor, is_cuda
from .shortcuts import SHORTCUTS

aten = torch.ops.aten
_CPU = torch.device("cpu")
_MISSING = object()


def install(runtime) -> callable:
    """Route the calls that name the cuda device to ``runtime``; returns the function that undoes it."""
    # torch._dynamo, on import, registers its stand-ins for torch's functions by identity and
    # signature; imported while ours are in place (torch imports it on first use of a Python
    # meta kernel, batch norm's) it fails. It is imported in any run (~0.8 s): first, then.
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - a Python this torch's dynamo does not support: nothing to clash with
        pass
    to = torch.Tensor.to
    moving = threading.local()  # per thread: ``depth`` of Module._apply calls, a model's tensors moving

    def upload(t: torch.Tensor, dtype, non_blocking: bool, memory_format, model_state: bool = False):
        if t.requires_grad and torch.is_grad_enabled():  # let autograd record the copy
            return aten._to_copy.default(t, dtype=dtype, device=CUDA0, non_blocking=non_blocking,
                                         memory_format=memory_format)
        return runtime.upload(t, dtype, memory_format, non_blocking,
                              model_state=model_state or getattr(moving, "depth", 0) > 0)

    def moving_model(apply):
        """``Module._apply`` (``.cuda()``, ``.to()``) whose uploads say they are a model's state."""
        def apply_(self, *args, **kwargs):
            moving.depth = getattr(moving, "depth", 0) + 1
            try:
                return apply(self, *args, **kwargs)
            finally:
                moving.depth -= 1
        return functools.wraps(apply)(apply_)

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        if type(self) is RemoteTensor:
            return self
        return upload(self, None, non_blocking, memory_format)

    def to_(self, *args, **kwargs):
        device, dtype, non_blocking, copy_, memory_format = _parse_to(args, kwargs)
        if not is_cuda(device):
            return to(self, *args, **kwargs)
        if type(self) is RemoteTensor:  # already on the device: a copy or a cast at most, done there
            if not copy_ and dtype in (None, self.dtype) and memory_format in (None, torch.preserve_format):
                return self
            return aten._to_copy.default(self, dtype=dtype, memory_format=memory_format)
        return upload(self, dtype, non_blocking, memory_format)

    def data_factory(make):
        def made_on_device(*args, **kwargs):
            if not is_cuda(kwargs.get("device")):
                return make(*args, **kwargs)
            kwargs = {**kwargs, "device": _CPU}
            grad = kwargs.pop("requires_grad", False)  # (as_tensor takes none) a leaf made on the device
            out = runtime.upload(make(*args, **kwargs))
            return out.requires_grad_() if grad else out
        return functools.wraps(make)(made_on_device)

    def no_backward(backward):
        def guarded(*args, **kwargs):
            if _any_remote(args, kwargs):
                raise UnsupportedOpError(
                    "rrto offloads inference; backward() through tensors on the virtual cuda device is not "
                    "supported yet. Run training locally (rrto --mode local) or on the server machine.")
            return backward(*args, **kwargs)
        return functools.wraps(backward)(guarded)

    shallow = torch._has_compatible_shallow_copy_type

    def compatible_shallow_copy_type(a, b) -> bool:
        # Else Module.cuda() would graft the remote tensor into the CPU Parameter (param.data = x),
        # a Parameter without a handle; this way _apply makes new remote Parameters.
        if (type(a) is RemoteTensor) != (type(b) is RemoteTensor):
            return False
        return shallow(a, b)

    patches = [(torch.Tensor, "cuda", functools.wraps(torch.Tensor.cuda)(cuda)),
               (torch.Tensor, "to", functools.wraps(to)(to_)),
               (torch.Tensor, "pin_memory", _unpinned),
               (torch, "_has_compatible_shallow_copy_type", compatible_shallow_copy_type)]
    patches += [(owner, name, data_factory(getattr(owner, name))) for owner, name in
                ((torch, "tensor"), (torch, "as_tensor"), (torch, "asarray"), (torch.Tensor, "new_tensor"))]
    patches += [(owner, name, no_backward(getattr(owner, name))) for owner, name in
                ((torch.Tensor, "backward"), (torch.autograd, "backward"), (torch.autograd, "grad"))]
    shortcuts = [(owner, name, _shortcut(getattr(owner, name), short)) for owner, name, short in SHORTCUTS]
    patches += shortcuts
    patches.append((torch.nn.Module, "_apply", moving_model(torch.nn.Module._apply)))
    models, forget = model_calls.replacements(lambda t: upload(t, None, False, torch.preserve_format, True),
                                              [fn for _, _, fn in shortcuts])
    # (a scripted model's own _apply moves its tensors too)
    models = [(owner, name, moving_model(fn) if name == "_apply" else fn) for owner, name, fn in models]
    restore = replace_attributes(patches + models)

    def undo() -> None:
        forget()
        restore()
    return undo


def install_local() -> callable:
    """Local mode's replacements (the function mode does the rest); returns the undo."""
    models, _ = model_calls.replacements(None, [])
    return replace_attributes(models)


def _shortcut(full, short):
    """``full``, unless its first argument is a RemoteTensor and ``short`` takes the call."""
    def call(*args, **kwargs):
        if args and type(args[0]) is RemoteTensor:
            out = short(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return full(*args, **kwargs)
    return functools.wraps(full)(call)


def _unpinned(self, device=None):
    return self  # no page-locked memory without CUDA; a plain CPU tensor uploads the same


def replace_attributes(patches: list) -> callable:
    """Set each ``(owner, name, value)``; returns the function that puts the old ones back."""
    saved = [(owner, name, vars(owner).get(name, _MISSING)) for owner, name, _ in patches]
    for owner, name, fn in patches:
        setattr(owner, name, fn)

    def restore() -> None:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)  # it was inherited (from torch._C.TensorBase) or new
            else:
                setattr(owner, name, old)
    return restore


class LocalDeviceMode(TorchFunctionMode):
    """Local mode: "cuda" in a Python call means the CPU (per thread, as torch modes are)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in _LOCAL_HANDLED:
            return func(*args)
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to:
            device, dtype, non_blocking, copy_, memory_format = _parse_to(args[1:], kwargs)
            if is_cuda(device):
                return args[0].to(_CPU, dtype, non_blocking, copy_, memory_format=memory_format or torch.preserve_format)
        elif "device" in kwargs and is_cuda(kwargs["device"]):
            return func(*args, **{**kwargs, "device": _CPU})
        return func(*args, **kwargs)


_LOCAL_HANDLED = frozenset((torch.Tensor.cuda, torch.Tensor.to, torch.Tensor.pin_memory))


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

