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
page-locked memory) and ``torch.load`` / ``torch.jit.load``, whose ``map_location="cuda"``
(or a file saved from a GPU) would make CUDA storages, which no tensor of the virtual
device has; TorchScript modules move with ``.cuda()`` slot by slot. ``torch.compile``
returns the model as written: its compilers would build kernels for a GPU that is not here.
``DataParallel`` on the one device calls its module, as torch does with one GPU.

In local mode "cuda" must become "cpu" in any call's device argument
(``torch.zeros(3, device="cuda")``), so there ``LocalDeviceMode``, a function mode, does it.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedOpError
from .remote_tensor import CUDA0, RemoteTensor
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

    def upload(t: torch.Tensor, dtype, non_blocking: bool, memory_format):
        if t.requires_grad and torch.is_grad_enabled():  # let autograd record the copy
            return aten._to_copy.default(t, dtype=dtype, device=CUDA0, non_blocking=non_blocking,
                                         memory_format=memory_format)
        return runtime.upload(t, dtype, memory_format, non_blocking)

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        if type(self) is RemoteTensor:
            return self
        return upload(self, None, non_blocking, memory_format)

    def to_(self, *args, **kwargs):
        device, dtype, non_blocking, copy_, memory_format = _parse_to(args, kwargs)
        if not _is_cuda(device):
            return to(self, *args, **kwargs)
        if type(self) is RemoteTensor:  # already on the device: a copy or a cast at most, done there
            if not copy_ and dtype in (None, self.dtype) and memory_format in (None, torch.preserve_format):
                return self
            return aten._to_copy.default(self, dtype=dtype, memory_format=memory_format)
        return upload(self, dtype, non_blocking, memory_format)

    def data_factory(make):
        def made_on_device(*args, **kwargs):
            if not _is_cuda(kwargs.get("device")):
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
    patches += _checkpoint_loads(lambda t: upload(t, None, False, torch.preserve_format))
    script, forget = scripting_as_torchs(torch.jit.script, [fn for _, _, fn in shortcuts])
    patches += [(torch.jit, "trace", _untraceable(torch.jit.trace)), (torch.jit, "script", script)]
    restore = replace_attributes(patches)

    def undo() -> None:
        forget()
        restore()
    return undo


def scripting_as_torchs(script, wrappers: list) -> tuple[callable, callable]:
    """(``torch.jit.script``, its undo) that compiles each wrapper as the torch function it wraps:
    a model scripted while rrto offloads (``F.conv2d`` in ``Conv2d.forward``) would otherwise
    fail on our Python wrapper. Set up at the first script, not at install: under the
    LD_PRELOAD shim rrto starts inside torch's import, where compiling deadlocks on the import
    lock. (torch.jit's tables are private: on a torch without them, scripting such a model
    fails as before, and nothing else changes.)"""
    registered, table, ready = [], {}, []

    def register() -> None:
        nonlocal table
        try:
            from torch.jit import _builtins, _state
            table = _builtins._get_builtin_table()
            for fn in wrappers:
                builtin = _builtins._find_builtin(fn.__wrapped__)
                if builtin is not None:  # a C++ function (torch.conv2d): the aten op by name
                    _builtins._register_builtin(fn, builtin)
                    registered.append(fn)
                else:  # a Python one (F.batch_norm): its compiled form, as torch caches it (~10 ms)
                    with warnings.catch_warnings():  # (torch 2.13 deprecates torch.jit.script)
                        warnings.simplefilter("ignore")
                        _state._set_jit_function_cache(fn, script(fn.__wrapped__))
        except Exception:  # noqa: BLE001
            pass

    def script_(obj, *args, **kwargs):
        if not ready:
            ready.append(True)
            register()
        return script(obj, *args, **kwargs)

    def forget() -> None:  # (ids of dead functions are reused: no stale builtin may stay)
        for fn in registered:
            table.pop(id(fn), None)
    return functools.wraps(script)(script_), forget


def install_local() -> callable:
    """Local mode's replacements (the function mode does the rest); returns the undo."""
    return replace_attributes(_checkpoint_loads(None))


def _checkpoint_loads(move) -> list:
    load = checkpoint_loader(torch.load, move)
    jit_load = script_module_loader(torch.jit.load, move is not None)
    patches = [(torch, "load", load), (torch.serialization, "load", load), (torch.jit, "load", jit_load),
               (torch, "compile", eager_compile(torch.compile)),
               (torch.nn.DataParallel, "forward", one_device_forward(torch.nn.DataParallel.forward))]
    if move is not None:
        patches.append((torch.jit.RecursiveScriptModule, "_apply", _script_module_apply))
    return patches


def eager_compile(compile_):
    """``torch.compile`` while rrto is on: the model as it is. Its compilers would build kernels
    for a cuda device this machine does not have; offloaded, the server replays the recorded
    op sequence (as a CUDA graph on a GPU server) instead. Forms: ``torch.compile(m)``,
    ``@torch.compile``, ``@torch.compile(mode=...)``, ``module.compile()``. Says so once."""
    said = []

    def as_written(model=None, **options):
        if model is None:
            return lambda m: as_written(m, **options)
        if not said:
            said.append(True)
            warnings.warn("rrto: torch.compile() returns the model as written: its compilers would build "
                          "kernels for a cuda device this machine does not have (offloaded, the server "
                          "replays the recorded op sequence instead)", RuntimeWarning, stacklevel=2)
        return model
    return functools.wraps(compile_)(as_written)


def one_device_forward(forward):
    """``DataParallel.forward`` on the one virtual device: what torch does with one GPU (move the
    inputs there, call the module), without its scatter, which needs CUDA's C++ (``_scatter``)."""
    def on_one_device(self, *inputs, **kwargs):
        if len(self.device_ids) > 1:
            return forward(self, *inputs, **kwargs)
        inputs, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.cuda, (inputs, kwargs))
        return self.module(*inputs, **kwargs)
    return functools.wraps(forward)(on_one_device)


def script_module_loader(load, upload: bool):
    """``torch.jit.load`` that loads a TorchScript model bound for cuda (``map_location="cuda"``,
    or saved from a GPU) on the CPU, then moves it with ``.cuda()`` (``upload``; local mode: not).
    torch's C++ loader would make its tensors on the device empty and shapeless."""
    def jit_load(f, map_location=None, *args, **kwargs):
        if not (_is_cuda(map_location) or map_location is None and _saved_on_cuda(f)):
            return load(f, map_location, *args, **kwargs)
        module = load(f, "cpu", *args, **kwargs)
        return module.cuda() if upload else module
    return functools.wraps(load)(jit_load)


def _saved_on_cuda(f) -> bool:
    """Whether a TorchScript archive holds tensors saved on a GPU: a "cuda" location among the
    strings of its pickles, read without unpickling anything."""
    import pickletools
    import zipfile
    pos = f.tell() if hasattr(f, "tell") else None
    try:
        with zipfile.ZipFile(f) as archive:
            for name in archive.namelist():
                if name.endswith(("/data.pkl", "/constants.pkl")):
                    for _, arg, _ in pickletools.genops(archive.read(name)):
                        if type(arg) is str and arg.startswith("cuda"):
                            return True
    except (OSError, ValueError, zipfile.BadZipFile):
        pass  # torch's loader says what is wrong with the file
    finally:
        if pos is not None:
            f.seek(pos)
    return False


def _script_module_apply(self, fn, recurse=True):
    """``RecursiveScriptModule._apply`` (``.cuda()``, ``.to()``, ``.half()``): its parameters live
    in C++ slots and come back as plain tensors, which torch's ``_apply`` can only change in
    place (``param.data = ...``); a CPU tensor cannot become a RemoteTensor in place, so the
    slot gets the new tensor."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    with torch.no_grad():
        for slots in (self._parameters, self._buffers):
            for key, t in slots.items():
                if t is not None:
                    slots[key] = fn(t)
    return self


def checkpoint_loader(load, move):
    """``torch.load`` that loads the storages bound for cuda (``map_location="cuda"``, or saved
    from a GPU) on the CPU, then hands their tensors to ``move``: the upload, or None in local
    mode, where cuda is the CPU. torch's own would make a CUDA storage, which only a GPU has."""
    def load_(f, map_location=None, *args, **kwargs):
        if isinstance(map_location, (str, torch.device)) and not _is_cuda(map_location):
            return load(f, map_location, *args, **kwargs)  # ("cpu", "meta": torch's path, untouched)
        bound: set = set()  # the StorageImpls that go to cuda

        def restore(storage, location):
            where = _location(map_location, storage, location)
            if not isinstance(where, str):
                return where  # the app's map_location function placed it
            if where.startswith("cuda"):
                bound.add(storage._cdata)
                return storage
            return torch.serialization.default_restore_location(storage, where)

        obj = load(f, restore, *args, **kwargs)
        return obj if move is None or not bound else _moved(obj, bound, move, {})
    return functools.wraps(load)(load_)


def _location(map_location, storage, location: str):
    """Where torch.load would put a storage saved at ``location`` (a storage: the app's function placed it)."""
    if map_location is None:
        return location
    if isinstance(map_location, dict):
        return map_location.get(location, location)
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    placed = map_location(storage, location)
    return location if placed is None else placed


def _moved(obj, bound: set, move, memo: dict):
    """``obj`` with each tensor on a storage bound for cuda moved (containers and modules in place)."""
    if isinstance(obj, torch.Tensor):
        out = memo.get(id(obj))
        if out is None:
            out = obj
            if obj.device.type == "cpu" and obj.layout == torch.strided and obj.untyped_storage()._cdata in bound:
                out = move(obj.detach())
                if isinstance(obj, torch.nn.Parameter):
                    out = torch.nn.Parameter(out, obj.requires_grad)
            memo[id(obj)] = out
        return out
    if isinstance(obj, torch.nn.Module):  # a whole pickled model
        return obj._apply(lambda t: _moved(t, bound, move, memo))
    if isinstance(obj, dict):  # (in place: a state dict's type and its _metadata stay)
        for k in list(obj):
            obj[k] = _moved(obj[k], bound, move, memo)
        return obj
    if isinstance(obj, list):
        obj[:] = [_moved(v, bound, move, memo) for v in obj]
        return obj
    if type(obj) is tuple:
        return tuple(_moved(v, bound, move, memo) for v in obj)
    return obj


def _untraceable(trace):
    """``torch.jit.trace`` refuses a model or inputs on the virtual device, saying what to do:
    the tracer would record rrto's own work (meta kernels, shortcuts) instead of the app's."""
    def refused(func, example_inputs=None, *args, **kwargs):
        owned = func.parameters() if isinstance(func, torch.nn.Module) else ()
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if any(type(t) is RemoteTensor for t in (*inputs, *owned, *kwargs.get("example_kwarg_inputs", {}).values())):
            raise UnsupportedOpError(
                "rrto: torch.jit.trace of a model or inputs on the virtual cuda device is not supported. Trace on "
                "the CPU (before .cuda()), save it, and load it here: torch.jit.load(path, map_location='cuda'); "
                "or use torch.jit.script(model), which works on the device.")
        return trace(func, example_inputs, *args, **kwargs)
    return functools.wraps(trace)(refused)


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
            if _is_cuda(device):
                return args[0].to(_CPU, dtype, non_blocking, copy_, memory_format=memory_format or torch.preserve_format)
        elif "device" in kwargs and _is_cuda(kwargs["device"]):
            return func(*args, **{**kwargs, "device": _CPU})
        return func(*args, **kwargs)


_LOCAL_HANDLED = frozenset((torch.Tensor.cuda, torch.Tensor.to, torch.Tensor.pin_memory))


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means a cuda device, as in torch


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

