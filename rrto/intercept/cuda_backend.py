"""The virtual device's backend: what torch reaches when an op runs "on cuda".

Two pieces make a CPU-only torch behave like a one-GPU build up to the dispatcher:

* a device guard for the CUDA device type (``native/cuda_guard.cpp``, compiled once
  per torch version). torch's C++ opens one around indexing and tensor construction
  before dispatching anything; a CPU-only build has none and fails there.
* a Python fallback kernel at the CUDA dispatch key. Every op that reaches the CUDA
  backend lands in it: tensor-less factories (``torch.zeros(3, device="cuda")`` and
  the ``empty`` tensors C++ composites make from a cuda tensor's options) and the C++
  paths that exclude Python dispatch (``x[[0, 2]]`` builds its index tensor that way).
  Ops on RemoteTensors normally arrive earlier, through their ``__torch_dispatch__``;
  ``copy_`` is the one C++ applies to them with Python dispatch excluded.
  Unlike a dispatch mode, the fallback costs nothing for the app's CPU ops and is not
  per thread.

A build with CUDA (pip's default torch on x86, a Jetson's) has real kernels at that key,
and a fallback only serves ops without one: ``torch.arange(n, device="cuda")`` reached the
real kernel through ``empty`` and handed the app a real cuda tensor (or failed on a robot
with no GPU). There the tensor-less ops with a CUDA kernel of their own (``empty``,
``empty_strided``, ``eye``, ``randperm``...) are routed to the runtime too; composite
factories build on them. Its device guard is set aside as well (``native/cuda_guard.cpp``),
and cuDNN is switched off for the app: ``batch_norm`` picks ``cudnn_batch_norm`` for a cuda
input where torch has cuDNN, a backend-private op no server serves (it runs
``native_batch_norm``, which the server's GPU runs with its own kernels). So are the fused
attention kernels: ``scaled_dot_product_attention`` asks the robot's own GPU which one it
supports (an H100 robot picked ``_scaled_dot_product_efficient_attention``, which a CPU server
cannot run, nor an older GPU); it takes the math path instead, as on a build without CUDA.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

_SOURCE_NAME = "cuda_guard.cpp"
_guard_lib: ctypes.CDLL | None = None


def _source() -> Path | None:
    for folder in (Path(__file__).resolve().parents[2] / "native", Path(sys.prefix) / "share" / "rrto" / "native"):
        if (folder / _SOURCE_NAME).exists():
            return folder / _SOURCE_NAME
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rrto"


def build_guard() -> Path:
    """The compiled guard library for this torch, building it on first use (about a second)."""
    src = _source()
    if src is None:
        raise RuntimeError(f"the source {_SOURCE_NAME} is missing from this rrto installation")
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tag = hashlib.sha1(src.read_bytes() + f"{torch.__version__}{torch_dir}{abi}".encode()).hexdigest()[:16]
    out = _cache_dir() / f"cuda_guard-{tag}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{torch_dir / 'include'}", str(src), f"-L{torch_dir / 'lib'}", "-lc10",
           f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling {src} failed:\n{res.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def _load_guard() -> None:
    global _guard_lib
    if _guard_lib is None:
        _guard_lib = ctypes.CDLL(str(build_guard()))
    _guard_lib.rrto_register_cuda_guard()


def install(runtime) -> callable:
    """Route the CUDA backend to ``runtime``; returns the function that undoes it."""
    try:
        _load_guard()
    except (OSError, RuntimeError) as e:
        warnings.warn(f"rrto could not set up its cuda device guard ({e}); indexing cuda tensors "
                      "(x[0], x[mask]) will fail with 'PyTorch is not linked with support for cuda devices'.",
                      RuntimeWarning, stacklevel=3)

    def fallback(op, *args, **kwargs):
        return runtime.call(op, args, kwargs)

    def copy_(dst, src, non_blocking=False):
        return runtime.call(torch.ops.aten.copy_.default, (dst, src), {"non_blocking": non_blocking})

    libs = [torch.library.Library("_", "IMPL"), torch.library.Library("aten", "IMPL")]
    libs[0].fallback(fallback, "CUDA")
    # copy_ has a composite kernel, which wins over a fallback and would end in a missing
    # CUDA kernel; it is the op C++ uses on our tensors with Python dispatch excluded.
    libs[1].impl("copy_", copy_, "CUDA")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        for name, op in cuda_factories():
            libs[1].impl(name, _routed(runtime, op), "CUDA")
    # A GRU on a cuda tensor runs its cells as a CUDA-only fused op with no meta kernel; without
    # one the runtime could not size its outputs and would wait for the server at every step.
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_thnn_fused_gru_cell", "Meta"):
        libs[1].impl("_thnn_fused_gru_cell", _gru_cell_meta, "Meta")

    cudnn = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    fused_attention = _fused_attention(False)

    def uninstall() -> None:  # (a CUDA build's own kernels come back when the Library is destroyed)
        for lib in libs:
            lib._destroy()
        torch.backends.cudnn.enabled = cudnn
        _fused_attention(fused_attention)
        if _guard_lib is not None:
            _guard_lib.rrto_unregister_cuda_guard()

    return uninstall


def _fused_attention(on: bool | dict) -> dict:
    """Switch the fused attention backends (flash, memory-efficient, cuDNN) on or off, or back
    to ``on``'s settings; returns the settings before."""
    names = [n for n in ("flash", "mem_efficient", "cudnn") if hasattr(torch.backends.cuda, f"enable_{n}_sdp")]
    before = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names}
    for n in names:
        getattr(torch.backends.cuda, f"enable_{n}_sdp")(on[n] if isinstance(on, dict) else on)
    return before


@functools.cache  # (aten's ops are fixed once torch is imported; ~10 ms to list)
def cuda_factories() -> list[tuple[str, "torch._ops.OpOverload"]]:
    """(name, op) of each aten op that takes no tensor and has a kernel at the CUDA key: none
    in a CPU-only build, the factories (empty, empty_strided, eye, randperm...) in one with CUDA."""
    out = []
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith("aten::") or \
                not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"):
            continue
        name, _, overload = qualified[len("aten::"):].partition(".")
        try:
            schema = torch._C._get_schema(f"aten::{name}", overload)
            op = getattr(getattr(torch.ops.aten, name), overload or "default")
        except (RuntimeError, AttributeError):
            continue
        if not any("Tensor" in str(a.type) for a in schema.arguments):
            out.append((qualified[len("aten::"):], op))
    return out


def _gru_cell_meta(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    """(hy, workspace): hy like hx; the workspace holds five gate-sized blocks, as CUDA's does."""
    return hx.new_empty(hx.shape), hx.new_empty((hx.shape[0], 5 * hx.shape[1]))


def _routed(runtime, op):
    def kernel(*args, **kwargs):
        return runtime.call(op, args, kwargs)
    return kernel
