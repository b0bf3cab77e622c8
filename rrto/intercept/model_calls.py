"""The calls that load, convert and compile whole models, made to work on the virtual device.

``device_calls`` makes tensors reach rrto's device; this makes models do:

* ``torch.load`` and ``torch.jit.load``: ``map_location="cuda"`` (or a file saved on a GPU)
  would make CUDA storages, which no tensor of the virtual device has. The file loads on
  the CPU and its tensors move (are uploaded; in local mode, where cuda is the CPU, stay).
* TorchScript: a ScriptModule's ``.cuda()`` fills its C++ slots; ``torch.jit.script``
  compiles rrto's shortcuts as the torch functions they stand for; ``torch.jit.trace`` of
  a model on the device says what to do instead.
* ``torch.compile`` returns the model as written; ``DataParallel`` calls its module on the
  one device, as torch does with one GPU.
"""
from __future__ import annotations

import functools
import struct
import warnings
import zipfile

import torch

from ..errors import UnsupportedOpError
from .remote_tensor import DISPATCH_ERRORS, RemoteTensor, is_cuda


def replacements(move, shortcuts: list) -> tuple[list, callable]:
    """``(owner, name, function)`` for ``device_calls.replace_attributes``, and what undoes the
    rest. ``move(tensor)``: the upload (None in local mode); ``shortcuts``: the wrappers that
    ``torch.jit.script`` must compile as the torch functions they wrap."""
    load = checkpoint_loader(torch.load, move)
    patches = [(torch, "load", load), (torch.serialization, "load", load),
               (torch.jit, "load", script_module_loader(torch.jit.load, move is not None)),
               (torch, "compile", eager_compile(torch.compile)),
               (torch.nn.DataParallel, "forward", one_device_forward(torch.nn.DataParallel.forward))]
    if move is None:
        return patches, lambda: None
    script, forget = scripting_as_torchs(torch.jit.script, shortcuts)
    patches += [(torch.jit.RecursiveScriptModule, "_apply", _script_module_apply),
                (torch._C.ScriptFunction, "__call__", script_errors_kept(torch._C.ScriptFunction.__call__)),
                (torch._C.ScriptMethod, "__call__", script_errors_kept(torch._C.ScriptMethod.__call__)),
                (torch.jit, "script", script), (torch.jit, "trace", _untraceable(torch.jit.trace))]
    return patches, forget


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


def script_errors_kept(call):
    """``__call__`` of a scripted function or method that raises what rrto raised inside it.

    The TorchScript interpreter reports an exception from an op on the virtual device as
    ``RuntimeError: `` with nothing after it (``DispatchErrors``). The error rrto raised (an
    op the server refuses, tensors on two devices, a lost link) is raised instead, the
    TorchScript traceback added as a note, so the app sees what it would see unscripted."""
    def call_keeping_errors(self, *args, **kwargs):
        errors = DISPATCH_ERRORS
        outer, errors.armed, errors.error = errors.armed, True, None
        try:
            return call(self, *args, **kwargs)
        except Exception as e:  # (RuntimeError in torch 2.13; torch.jit.Error, a script's own raise, is not one)
            lost, text = errors.error, str(e).rstrip()
            # (only an emptied message: an error an ignored Python function caught is not this one's cause)
            if lost is None or lost is e or not text.rsplit("\n", 1)[-1].endswith(":"):
                raise
            trace = text.rsplit("\n", 1)[0]
            if hasattr(lost, "add_note"):
                lost.add_note(f"(raised inside TorchScript) {trace}")
            raise lost from None
        finally:
            errors.armed, errors.error = outer, None
    return functools.wraps(call)(call_keeping_errors)


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
        if not (is_cuda(map_location) or map_location is None and _saved_on_cuda(f)):
            return load(f, map_location, *args, **kwargs)
        module = load(f, "cpu", *args, **kwargs)
        return module.cuda() if upload else module
    return functools.wraps(load)(jit_load)


def _pickled(text: str) -> tuple[bytes, bytes]:
    """``text`` as a pickle stores a string (protocol 2's BINUNICODE, 4's SHORT_BINUNICODE)."""
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b, b"\x8c" + bytes([len(b)]) + b


_CUDA_LOCATIONS = tuple(p for n in ["cuda"] + [f"cuda:{i}" for i in range(16)] for p in _pickled(n))


def _saved_on_cuda(f) -> bool:
    """Whether a TorchScript archive holds tensors saved on a GPU: a storage location "cuda"
    or "cuda:N" among the strings of its pickles, found in their bytes (nothing is unpickled)."""
    pos = f.tell() if hasattr(f, "tell") else None
    try:
        with zipfile.ZipFile(f) as archive:
            for name in archive.namelist():
                if name.endswith(("/data.pkl", "/constants.pkl")):
                    data = archive.read(name)
                    if any(loc in data for loc in _CUDA_LOCATIONS):
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
        if isinstance(map_location, (str, torch.device)) and not is_cuda(map_location):
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
