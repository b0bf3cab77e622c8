"""Turning the virtual cuda device on and off: ``rrto.enable()``, ``rrto.disable()``, ``rrto.offload()``.

Enabling connects to the server (or starts an embedded one on a free loopback port),
patches ``torch.cuda``, routes the CUDA backend and the calls that name the device
(``.cuda()``, ``.to("cuda")``, ``torch.tensor(..., device="cuda")``) to the runtime. All
of that is process-wide: a ROS executor or a camera thread sees the same virtual device
as the main thread. Local mode pushes a torch function mode instead, which is per thread:
threads started while rrto is enabled get it too.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import warnings

import torch

from ..config import Config
from ..errors import RrtoError
from ..keys import curve_keys
from ..stats import Stats
from ..transport import Link
from . import cuda_backend, cuda_shim
from .embedded import EmbeddedServer
from .device_calls import LocalDeviceMode
from .device_calls import install as install_device_calls
from .device_calls import install_local as install_local_calls
from .runtime import Runtime

_active: "Offload | None" = None
_enable_lock = threading.Lock()
_original_bootstrap = threading.Thread._bootstrap_inner


class Offload:
    """One enabled period: its settings, counters, connection and what it patched."""

    def __init__(self, config: Config):
        self.config = config
        self.stats = Stats(mode=config.mode, robot_torch=torch.__version__)
        self.embedded: EmbeddedServer | None = None
        self.link: Link | None = None
        self.runtime: Runtime | None = None
        self.restore_cuda = self.restore_backend = self.restore_calls = lambda: None
        self.mode: LocalDeviceMode | None = None
        try:
            info: dict = {"device_name": "rrto local (robot cpu)", "total_memory": _memory_bytes(),
                          "multi_processor_count": os.cpu_count() or 1}
            if config.mode != "local":
                info = self._connect()
                self.runtime = Runtime(config, self.link, info, self.stats)
                url = self.link.url
                self.runtime.reopen = lambda drop: self._open_link(url, drop)
                self.restore_backend = cuda_backend.install(self.runtime)
                self.restore_calls = install_device_calls(self.runtime)
            self.restore_cuda = cuda_shim.install(self.runtime, info)
            self.thread = threading.get_ident()
            if self.runtime is None:
                self.restore_calls = install_local_calls()
                self.mode = self.push_mode()
        except BaseException:
            self.restore_calls()
            self.restore_cuda()
            self.restore_backend()
            if self.runtime is not None:
                with contextlib.suppress(RrtoError):
                    self.runtime.close()  # joins its warm-up thread: exiting inside torch's C++ aborts
            self._close_link()
            raise

    def _connect(self) -> dict:
        url = self.config.server
        if url is None:
            self.embedded = EmbeddedServer()
            url = self.embedded.url
        self.stats.server, self.stats.embedded_server = url, self.embedded is not None
        self.link, info = self._open_link(url)
        self.stats.server_torch, self.stats.server_device = info.get("torch", ""), info.get("device", "")
        return info

    def _open_link(self, url: str, drop: str | None = None) -> tuple[Link, dict]:
        """A link with an open session; ``drop``: the session it replaces (after a fault)."""
        c = self.config
        curve = curve_keys(c.server_key, c.robot_key)  # none for the embedded server
        link = Link(url, c.timeout, self.stats, curve=curve, fault_timeout=c.fault_timeout)
        hello = {"torch": torch.__version__, "mode": c.mode, "python": sys.version.split()[0]}
        try:
            if drop is None:
                return link, link.hello(hello)
            return link, link.hello({**hello, "drop": drop}, timeout=c.fault_timeout)
        except BaseException:
            link.close(linger=0)
            raise

    def push_mode(self) -> LocalDeviceMode:
        """Local mode: push the function mode on the calling thread (modes are per thread)."""
        mode = LocalDeviceMode()
        mode.__enter__()
        return mode

    def close(self) -> None:
        try:
            if self.mode is not None:
                if threading.get_ident() == self.thread:
                    self.mode.__exit__(None, None, None)
                else:
                    warnings.warn("rrto.disable() called from another thread than rrto.enable(); "
                                  "the enabling thread keeps its torch modes", RuntimeWarning, stacklevel=3)
            self.restore_calls()
            self.restore_cuda()
            self.restore_backend()
            if self.runtime is not None:
                try:
                    self.runtime.close()
                except RrtoError as e:
                    print(f"rrto: could not close the session cleanly: {e}", file=sys.stderr)
        finally:
            self._close_link()
            if self.config.stats:
                self.stats.write(self.config.stats)

    def _close_link(self) -> None:
        if self.runtime is not None and self.runtime.link is not self.link:  # it reconnected after a fault
            self.runtime.link.close()
        if self.link is not None:
            self.link.close()
        if self.embedded is not None:
            self.embedded.stop()


def _bootstrap_inner(thread):
    offload = _active
    if offload is None:
        return _original_bootstrap(thread)
    mode = offload.push_mode()
    try:
        return _original_bootstrap(thread)
    finally:
        mode.__exit__(None, None, None)


def enable(server: str | None = None, mode: str | None = None, *, stats: str | None = None,
           timeout: float | None = None, progress: bool | None = None, repeats: int | None = None,
           server_key: str | None = None, robot_key: str | None = None, fault_timeout: float | None = None) -> None:
    """Make "cuda" mean rrto's virtual device in this process.

    ``server``: ``tcp://host:port`` of an ``rrto-server``; None starts an embedded one.
    ``mode``: ``replay`` (default), ``eager``, ``rpc`` or ``local``. ``repeats``: replay
    adopts a sequence after it repeated this many times (default 2). ``server_key`` (the
    server's public key file) and ``robot_key`` (this robot's ``.key_secret`` file) make the
    link CurveZMQ-encrypted, for a server started with ``--keys``. ``fault_timeout`` (default
    2): seconds of server silence after which the app goes on on the robot's CPU while rrto
    reconnects in the background. Unset arguments fall back to the ``RRTO_SERVER``,
    ``RRTO_MODE``, ``RRTO_STATS``, ``RRTO_TIMEOUT``, ``RRTO_FAULT_TIMEOUT``, ``RRTO_REPEATS``,
    ``RRTO_SERVER_KEY``, ``RRTO_ROBOT_KEY`` variables.
    """
    global _active
    with _enable_lock:
        if _active is not None:
            raise RrtoError("rrto is already enabled; call rrto.disable() first")
        config = Config.resolve(server=server, mode=mode, stats=stats, timeout=timeout,
                                fault_timeout=fault_timeout, progress=progress,
                                repeats=repeats, server_key=server_key, robot_key=robot_key)
        _active = Offload(config)
        if _active.mode is not None:  # local mode's function mode, for the threads started from now on
            threading.Thread._bootstrap_inner = _bootstrap_inner


def disable() -> None:
    """Undo ``enable()``: close the session, stop an embedded server, write the stats file."""
    global _active
    with _enable_lock:
        offload, _active = _active, None
        if offload is None:
            return
        threading.Thread._bootstrap_inner = _original_bootstrap
        offload.close()


@contextlib.contextmanager
def offload(server: str | None = None, mode: str | None = None, **kwargs):
    """``with rrto.offload(...):`` enables rrto for the block and disables it after."""
    enable(server, mode, **kwargs)
    try:
        yield current()
    finally:
        disable()


def current() -> Offload | None:
    """The enabled offload, if any (its ``stats`` and ``config``)."""
    return _active


atexit.register(disable)


def _memory_bytes() -> int:
    """The robot's memory: local mode's "GPU" memory (DataParallel divides by it)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 30
