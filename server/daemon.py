"""The edge daemon: one ROUTER socket, one worker thread per robot session.

The main thread receives: it opens sessions (hello) and routes every other message
to its session's worker by the session token (checked against the zmq peer that
opened it). Workers send their replies on the same socket themselves, under a lock
(``Daemon.send``): a reply leaves the moment it is made, without waiting for the
main thread to be scheduled and to take the GIL back from a busy worker (it used to
hop through an inproc socket and the main thread: ~0.1-0.3 ms per reply on a busy
core). zmq sockets are not thread-safe, so every use of the ROUTER holds the lock,
and the main thread waits on the socket's file descriptor, not on the socket.
"""
from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import threading
import time

import torch
import zmq

from rrto import codec

from . import capture, kernels
from .auth import CurveAuth
from .cache import WeightCache
from .ops import OpTable, SizeCheck, warm_up
from .session import Limits, Session

log = logging.getLogger("rrto.server")
_PONG = codec.pack({"t": "pong"})[0]
_PONG_GONE = codec.pack({"t": "pong", "gone": True})[0]  # to a ping naming a session this server does not hold
MAX_FRAMES = 1024  # tensor frames in one message: far more inline tensors than any op takes


class Daemon:
    def __init__(self, listen: str, device: torch.device, limits: Limits, max_sessions: int = 64,
                 idle_timeout: float = 1800.0, exit_with_parent: bool = False, keys: str | None = None,
                 heap_mmap_mb: int = 1):
        self.device, self.limits, self.max_sessions = device, limits, max_sessions
        self.idle_timeout = idle_timeout
        bound_heap_growth(heap_mmap_mb)
        self.parent = os.getppid() if exit_with_parent else None
        self._kernels = kernels.install()  # (before the allowlist: it lists ops with kernels)
        self.ops = OpTable()
        self.sizes = SizeCheck(limits.max_tensor_bytes)
        self.sessions: dict[str, Session] = {}
        self.cache = WeightCache(limits.weight_cache_bytes)
        self._quiet = True  # no message since the last housekeeping
        self._trims_left = 0  # quiet housekeepings that trim the heaps again after a session ended
        self.closing: list[Session] = []  # ended sessions whose worker has not let go of its tensors yet
        self.stopping = False
        self.ctx = zmq.Context()
        self.auth: CurveAuth | None = None
        try:
            self.auth = CurveAuth(self.ctx, keys) if keys else None
            self.router = self._bind(listen, limits)
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            raise
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._router_lock = threading.Lock()  # every use of the ROUTER, from any thread
        # The ROUTER's descriptor signals edge-wise: a worker whose send took in the signal of
        # a message that arrived says so here (see send).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._hello_info = self._describe()
        # Exiting while this thread is inside torch's C++ aborts the process: close() joins it.
        self._warm_up = threading.Thread(target=warm_up, name="rrto-warm-up", daemon=True)
        self._warm_up.start()

    def _bind(self, listen: str, limits: Limits) -> zmq.Socket:
        router = self.ctx.socket(zmq.ROUTER)
        if self.auth is not None:
            self.auth.secure(router)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        # zmq drops a peer that sends a frame larger than this, before buffering it.
        router.setsockopt(zmq.MAXMSGSIZE, limits.max_tensor_bytes + codec.MAX_HEADER_BYTES)
        if listen.endswith(":0"):
            listen = listen[:-2] + ":*"
        router.bind(listen)
        return router

    def _describe(self) -> dict:
        d = self.device
        info = {"v": codec.PROTOCOL_VERSION, "torch": torch.__version__, "device": str(d),
                "device_name": f"rrto remote cpu ({os.cpu_count()} cores)", "capability": [0, 0],
                "total_memory": self.limits.max_session_bytes, "multi_processor_count": os.cpu_count() or 1}
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            info.update(device_name=p.name, capability=[p.major, p.minor], multi_processor_count=p.multi_processor_count,
                        total_memory=min(p.total_memory, self.limits.max_session_bytes))
        info["allowed"] = sorted(self.ops.allowed)
        return info

    # -- main loop ---------------------------------------------------------------------

    def stop_on_signals(self) -> None:
        """Ctrl-C and SIGTERM stop the server cleanly (before it says it is ready: a supervisor
        may stop it the moment it reads that line)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def serve(self) -> None:
        if signal.getsignal(signal.SIGTERM) != self._on_signal:
            self.stop_on_signals()
        poller = zmq.Poller()
        poller.register(self.router.getsockopt(zmq.FD), zmq.POLLIN)  # the descriptor: polling it touches no socket
        poller.register(self._wake_r, zmq.POLLIN)
        last_housekeeping = time.monotonic()
        while not self.stopping:
            self._receive_all()  # until zmq has none: only then does the descriptor signal the next
            try:
                poller.poll(250)
            except zmq.ZMQError:
                continue
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now - last_housekeeping > 1.0:
                last_housekeeping = now
                self._housekeeping(now)
        self.close()

    def _receive_all(self) -> None:
        while True:
            with self._router_lock:
                try:
                    msg = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
            self._quiet = False
            try:
                self._route(msg)
            except Exception:  # noqa: BLE001 - a bug for one message must not stop the others
                log.exception("rrto-server: failed to route a message; serving on")

    def send(self, frames: list) -> None:
        """Send one message (``[identity, *codec frames]``) to a robot, from any thread."""
        with self._router_lock:
            if self.router.closed:  # a worker finishing after close(): its robot is gone anyway
                return
            self.router.send_multipart(frames, copy=False)
            if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                # The send took in zmq's signal that a message came: the descriptor will not
                # signal it again, so the main thread is woken to receive it.
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:  # the pipe is full: the main thread is due to wake anyway
                    pass

    def _on_signal(self, signum, _frame) -> None:
        log.info("rrto-server: %s received, shutting down", signal.Signals(signum).name)
        self.stopping = True

    def _housekeeping(self, now: float) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            log.info("rrto-server: parent process exited, shutting down")
            self.stopping = True
        for token, s in list(self.sessions.items()):
            if now - s.last_seen > self.idle_timeout:
                log.info("session %s idle for %.0f s, closing it", token[:8], now - s.last_seen)
                self._end(token)
        still = [s for s in self.closing if s.thread.is_alive()]
        ended = len(still) < len(self.closing)
        self.closing = still  # the ended sessions go now: what they held is free before the trim
        if ended:
            release_freed_memory()
            self._trims_left = 3
        elif self._trims_left and self._quiet:
            # Some of a session's memory is let go of later (zmq's buffers, the last replies),
            # so the heaps are trimmed again on the next quiet seconds.
            release_freed_memory()
            self._trims_left -= 1
        self._quiet = True

    def _route(self, msg: list) -> None:
        identity = msg[0].bytes
        if len(msg) > MAX_FRAMES + 2:
            self._error(identity, None, "bad_request", f"message of {len(msg) - 1} frames; at most "
                        f"{MAX_FRAMES + 1} are accepted")
            return
        try:
            header, frames = codec.unpack(msg[1:])
        except codec.CodecError as e:
            self._error(identity, e.q, "bad_request", f"malformed message: {e}")
            return
        q, t = header.get("q"), header.get("t")
        if t == "ping":  # answered here, never queued behind a session's work: the robot's sign of life
            # A robot whose server was restarted on the same address would take the new one's
            # pongs for its own and wait out its request timeout for a reply that never comes.
            s = header.get("s")
            gone = isinstance(s, str) and s not in self.sessions
            self.send([identity, _PONG_GONE if gone else _PONG])
            return
        if t == "hello":
            self._hello(identity, header, msg[0])
            return
        session = self.sessions.get(header.get("s")) if isinstance(header.get("s"), str) else None
        if session is None or session.identity != identity:
            if q is not None or t is None:
                self._error(identity, q, "no_session",
                            "unknown session: the server may have restarted or closed it after being idle. "
                            "Restart the app to open a new one.")
            return
        if t == "stats":
            session.last_seen = time.monotonic()
            self._stats(identity, q)
            return
        nbytes = sum(len(f) for f in frames)
        if not session.submit(header, frames, nbytes):
            self._error(identity, q, "quota",
                        f"this session has {session.pending_bytes / 2**20:.0f} MiB of requests waiting to run, "
                        "the most it may queue; wait for replies before sending more")
            return
        if t == "bye":
            self.closing.append(self.sessions.pop(session.token))
            log.info("session %s closed by the robot (%d ops run)", session.token[:8], session.ops_run)

    def _hello(self, identity: bytes, header: dict, frame) -> None:
        q = header.get("q")
        if header.get("v") != codec.PROTOCOL_VERSION:
            self._error(identity, q, "protocol",
                        f"protocol mismatch: the robot speaks rrto protocol {header.get('v')}, this server "
                        f"speaks {codec.PROTOCOL_VERSION}. Install the same rrto version on both.")
            return
        if len(self.sessions) >= self.max_sessions:
            self._error(identity, q, "busy", f"server is full ({self.max_sessions} sessions); try again later")
            return
        drop = header.get("drop")
        if isinstance(drop, str) and drop in self.sessions:  # knowing the token proves it was this robot's
            log.info("session %s replaced by the robot that held it (it reconnected)", drop[:8])
            self._end(drop)
        token = secrets.token_hex(16)
        s = Session(token, identity, self.device, self.limits, self.ops, self.sizes, self.send, self.cache)
        self.sessions[token] = s
        s.start()
        try:
            peer = frame.get("Peer-Address")
            if self.auth is not None:  # the ZAP handler's user id is the robot's public key
                peer += f" key {frame.get('User-Id')[:8]}..."
        except zmq.ZMQError:
            peer = "?"
        log.info("session %s opened by %s (robot torch %s, mode %s)", token[:8], peer,
                 str(header.get("torch"))[:20], str(header.get("mode"))[:10])
        self.send([identity, *codec.pack({**self._hello_info, "q": q, "session": token})])

    def _stats(self, identity: bytes, q) -> None:
        """What the server holds now, for any session to ask: sessions open and their bytes.

        Sessions that were closed but whose worker still runs count as closing, with their
        tensors: memory is released when the worker has dropped them, not before.
        """
        live = [s for s in self.closing if s.thread.is_alive()]
        held = [*self.sessions.values(), *live]
        reply = {"t": "stats", "q": q, "sessions": len(self.sessions), "closing": len(live),
                 "tensor_bytes": sum(s.live_bytes for s in held), "queued_bytes": sum(s.pending_bytes for s in held),
                 "captured_steps": capture.steps_run, "outputs_left_out": capture.outputs_left_out,
                 "cuda_graphs": capture.graphs_captured,
                 # objects a full collection walks, and those frozen after the warm-up (ops.warm_up)
                 "gc_tracked_objects": len(gc.get_objects()), "gc_frozen_objects": gc.get_freeze_count()}
        self.send([identity, *codec.pack(reply)])

    def _error(self, identity: bytes, q, kind: str, msg: str) -> None:
        log.warning("refused a request: %s", msg)
        self.send([identity, *codec.pack({"t": "err", "q": q, "kind": kind, "msg": msg})])

    def _end(self, token: str) -> None:
        s = self.sessions.pop(token, None)
        if s is not None:
            s.stop()
            self.closing.append(s)

    def close(self) -> None:
        ending = list(self.sessions.values())
        for token in list(self.sessions):
            self._end(token)
        for s in ending:
            s.thread.join(timeout=5.0)
        self._warm_up.join(timeout=30.0)
        if self.auth is not None:
            self.auth.stop()
        with self._router_lock:
            self.router.close(linger=0)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.ctx.destroy(linger=0)


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: its allocator gives memory back by itself
        return None


_glibc = _libc()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)


def bound_heap_growth(mmap_mb: int = 1) -> None:
    """Serve allocations of ``mmap_mb`` MiB or more from their own mappings, returned on free.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which
    tensors come from heaps that keep their peak: one robot sending big uploads would
    leave the edge box that much poorer for good. A fixed threshold stops that. 1 MiB
    (the default) keeps memory flat even under the fuzz test, but on a CPU server every
    activation and convolution workspace of a real model is then a fresh mapping,
    zero-filled page by page at each op: the 3-D completion net ran 98 ms per frame
    against 52 ms at 32 MiB, where heaps kept up to ~200 MiB after the fuzz test. On a
    CUDA server tensors live in GPU memory and this only concerns message buffers.

    A fixed mmap threshold also turns off glibc's matching trim threshold, leaving the
    128 KiB default: every op that frees its workspace gave the top of the heap back to
    the system and faulted it in again zeroed at the next op (the 3-D net at 32 MiB:
    86 ms per frame against 63 ms with the trim threshold glibc would have set, twice
    the mmap one). Ended sessions still return it all (``release_freed_memory``).

    Every session thread allocates from one arena, the main heap. Each thread used to get
    an arena of its own, made of 64 MiB heaps, and a new session's thread inherited a
    finished one's: a server that had served other models ran the 3-D net's frame in
    45-46 ms against 36-37 on a fresh server (likely its 28 MiB im2col buffers landing in
    fresh heaps: slow runs were seen with up to 17k page faults). With one arena: 36 ms
    after the same history. The shared arena's lock is taken a few times per op, for
    microseconds: robots served at once on a CPU server wait on their kernels, not on it.
    """
    if _glibc is not None:
        threshold = max(1, mmap_mb) << 20
        _glibc.mallopt(M_MMAP_THRESHOLD, threshold)
        _glibc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)
        _glibc.mallopt(M_ARENA_MAX, 1)


def release_freed_memory() -> None:
    """Give freed heap memory back to the system when a session has ended."""
    if _glibc is not None:
        _glibc.malloc_trim(0)
