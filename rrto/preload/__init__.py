"""The LD_PRELOAD shim (``native/preload.c``): building it, and reading its CUDA driver counters.

``LD_PRELOAD=$(rrto preload-path) RRTO_SERVER=tcp://edge:5555 any-launcher`` offloads every
Python process the launcher starts (see ``bootstrap/sitecustomize.py`` for the rules).
The shim is compiled once per installation with cffi's compiler driver (the compiler and
flags this Python was built with) into the user's cache; ``./scripts/setup`` does it at
install time, and :func:`library_path` on first use otherwise.

This module must not import torch: the bootstrap and ``rrto run`` use it in processes that
never touch CUDA.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

LIBRARY_NAME = "librrto_preload.so"
SOURCE_NAME = "preload.c"
BOOTSTRAP_DIR = Path(__file__).resolve().parent / "bootstrap"

# The shim's functions for Python (cffi ABI mode: the shim has no Python in it, so it loads in
# any program).
CDEF = """
int rrto_trace_enabled(void);
int rrto_trace_count(void);
const char *rrto_trace_name(int i);
const char *rrto_trace_kind(int i);
unsigned long long rrto_trace_wrapped(void);
int rrto_trace_snapshot(unsigned long long *out, int n);
"""


def source() -> Path:
    for folder in (Path(__file__).resolve().parents[2] / "native", Path(sys.prefix) / "share" / "rrto" / "native"):
        if (folder / SOURCE_NAME).exists():
            return folder / SOURCE_NAME
    raise RuntimeError(f"the shim's source {SOURCE_NAME} is missing from this rrto installation; reinstall rrto")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rrto"


def library_path(build: bool = True) -> Path:
    """Where this installation's shim is; builds it first (about a second) when missing and ``build``."""
    src = source()
    # The bootstrap folder is compiled in, so one rrto checkout or venv gets its own shim.
    tag = hashlib.sha1(src.read_bytes() + f"{BOOTSTRAP_DIR}\0{platform.machine()}".encode()).hexdigest()[:16]
    out = _cache_dir() / f"preload-{tag}" / LIBRARY_NAME
    if not out.exists() and build:
        _build(src, out)
    return out


def _c_string(text: str) -> str:
    """A C string literal for any path: quotes, backslashes and non-ASCII bytes escaped in octal."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03o}"
                         for b in os.fsencode(text)) + '"'


def _build(src: Path, out: Path) -> None:
    try:
        from cffi import ffiplatform
        from setuptools import Extension
    except ImportError as e:
        raise RuntimeError(f"building the rrto preload shim needs cffi and setuptools ({e}); "
                           "pip install cffi setuptools") from e
    if shutil.which(os.environ.get("CC", "cc").split()[0]) is None and shutil.which("gcc") is None:
        raise RuntimeError("building the rrto preload shim needs a C compiler: install gcc (or set CC)")
    ext = Extension(
        "librrto_preload", sources=[str(src)], libraries=["dl"],
        define_macros=[("RRTO_BOOTSTRAP_DIR", _c_string(str(BOOTSTRAP_DIR)))],
        # -O2 makes dlsym's pass-through a tail jump, which RTLD_NEXT callers rely on (see preload.c).
        extra_compile_args=["-O2", "-foptimize-sibling-calls", "-fvisibility=hidden"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rrto-preload-build-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # setuptools reads a setup.cfg in the working directory: not the app's
        try:
            built = ffiplatform.compile(tmp, ext)
        except Exception as e:  # noqa: BLE001 - cffi wraps compiler failures in its own types
            raise RuntimeError(f"compiling {src} failed: {e}") from e
        finally:
            os.chdir(cwd)
        tmp_out = out.with_name(f"{LIBRARY_NAME}.{os.getpid()}.tmp")
        shutil.copyfile(built, tmp_out)
        os.replace(tmp_out, out)  # atomic: a process starting now sees the old file or the whole new one


class DriverCounters:
    """The shim's CUDA driver-call counters in this process (it must have been preloaded)."""

    def __init__(self):
        import cffi

        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        self.lib = self.ffi.dlopen(None)  # the process's global scope, where LD_PRELOAD put the shim
        try:
            n = self.lib.rrto_trace_count()
        except AttributeError:
            raise RuntimeError("the rrto preload shim is not loaded in this process "
                               "(start it with `rrto trace` or LD_PRELOAD=$(rrto preload-path))") from None
        self.names = [self.ffi.string(self.lib.rrto_trace_name(i)).decode() for i in range(n)]
        self.kinds = {name: self.ffi.string(self.lib.rrto_trace_kind(i)).decode() for i, name in enumerate(self.names)}
        self._buf = self.ffi.new("unsigned long long[]", n)

    @property
    def enabled(self) -> bool:
        """True when RRTO_TRACE_CUDA=1 made the shim wrap driver entry points."""
        return bool(self.lib.rrto_trace_enabled())

    def wrapped(self) -> int:
        """Driver entry points handed out wrapped so far; 0 means the process never reached libcuda."""
        return int(self.lib.rrto_trace_wrapped())

    def snapshot(self) -> dict[str, int]:
        """Calls so far, by driver function name (``_v2``/``_ptsz`` variants counted with their base name)."""
        n = self.lib.rrto_trace_snapshot(self._buf, len(self.names))
        return {self.names[i]: int(self._buf[i]) for i in range(n)}
