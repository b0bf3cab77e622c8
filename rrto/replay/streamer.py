"""The eager interpreter: each intercepted op becomes one message to the server.

``eager`` mode sends and moves on (zmq queues the message, the server runs it in
order); ``rpc`` mode waits for the server's reply to every op, the per-call cost
of classic API remoting. Handles freed by the robot's garbage collector ride along
with the next message instead of costing their own.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch

from .. import codec
from ..transport import HOLD, Link


class EagerStreamer:
    def __init__(self, link: Link, handle_of: Callable[[torch.Tensor], int | None], wait_every_op: bool):
        self.link, self._handle_of, self.wait_every_op = link, handle_of, wait_every_op
        self._frees: deque[int] = deque()
        self.pre_source: Callable[[str], dict | None] | None = None  # replay: fields riding on each message
        self.last_header: dict | None = None  # the op message sent last (the op log keeps it)

    def op(self, name: str, args: tuple, kwargs: dict, outs: list, wait: bool = False,
           out_base: int | None = None) -> dict | None:
        """Run ``name`` on the server, binding its new output tensors to the handles ``outs``.

        With ``out_base`` the server names the outputs itself (base, base+1, ...) and
        replies with their metadata: for ops whose output shapes depend on data.
        """
        frames, descs, aliased = [], [], []

        def tensor(t: torch.Tensor) -> dict:
            h = self._handle_of(t)
            if h is not None:
                return {"h": h}
            desc, buf, private = codec.tensor_frame(t)  # a CPU tensor travelling with the op
            descs.append(desc)
            frames.append(buf)
            aliased.append(not private)
            return {"i": len(frames) - 1}

        header: dict[str, Any] = {"t": "op", "op": name, "a": codec.encode_value(args, tensor)}
        if kwargs:
            header["k"] = {k: codec.encode_value(v, tensor) for k, v in kwargs.items()}
        if any(h is not None for h in outs):
            header["o"] = outs
        if out_base is not None:
            header["ob"] = out_base
        if descs:
            header["in"] = descs
        self.last_header = header
        self._attach_frees(header)
        if wait or self.wait_every_op:
            return self.link.request(header, frames, what=name)[0]
        self.link.send(header, frames, wait_sent=any(aliased))
        return None

    def put(self, handle: int, desc: dict, buf: memoryview, wait_sent: bool, cache: bool = False) -> None:
        """Upload one tensor's bytes as the server tensor ``handle``.

        ``cache``: a weight; the server keeps it in its content-addressed cache, so that after a
        reconnection (or for another robot) a digest can stand in for the bytes.
        """
        header = {"t": "put", "h": handle, "d": desc}
        if cache:
            header["c"] = 1
        self._attach_frees(header)
        if self.wait_every_op:
            self.link.request(header, [buf], what="an upload")
        else:
            self.link.send(header, [buf], wait_sent=wait_sent)

    def get(self, handle: int, what: str, aside=HOLD) -> tuple[dict, Any]:
        """Download the server tensor ``handle``: (descriptor, frame). ``aside``: see ``Link.request``."""
        header = {"t": "get", "h": handle}
        self._attach_frees(header)
        reply, frames = self.link.request(header, what=what, aside=aside)
        return reply["d"], frames[0]

    def request(self, kind: str, aside=HOLD, **fields) -> dict:
        """A small request the robot waits for (``sync``, ``mem``, ``bye``)."""
        return self.exchange(kind, [], aside, **fields)[0]

    def exchange(self, kind: str, frames: list, aside=HOLD, **fields) -> tuple[dict, list]:
        """A request with frames, whose reply has frames too (``rng``): (reply, frames)."""
        header = {"t": kind, **fields}
        self._attach_frees(header)
        return self.link.request(header, frames, what=f"the '{kind}' reply", aside=aside)

    def notify(self, kind: str, **fields) -> None:
        """A small message that needs no reply (``seed``)."""
        header = {"t": kind, **fields}
        self._attach_frees(header)
        if self.wait_every_op:
            self.link.request(header, what=f"the '{kind}' reply")
        else:
            self.link.send(header)

    def register(self, spec: dict, frames: list) -> None:
        """Register a recorded program with the server (waits: the server may refuse it)."""
        header = {"t": "prog", **spec}
        self._attach_frees(header)
        self.link.request(header, frames, what="the program registration")

    def bye(self) -> None:
        """End the session without waiting: the server frees everything this robot held."""
        self.link.send({"t": "bye"})

    def reset(self) -> None:
        """Forget what was queued for a session that is gone (the server was lost)."""
        self._frees.clear()
        self.last_header = None

    def free(self, handle: int) -> None:
        """Forget a server tensor; safe from any thread and from ``__del__``."""
        self._frees.append(handle)

    def _attach_frees(self, header: dict) -> None:
        """Frees and the replayer's fields (runs to do first, a run ahead) ride on the next message."""
        if self.pre_source is not None:
            fields = self.pre_source(header["t"])
            if fields:
                header.update(fields)
        if self._frees:
            fr, pop = [], self._frees.popleft
            try:
                while True:
                    fr.append(pop())
            except IndexError:
                pass
            singles, runs = _as_runs(fr)
            if singles:
                header["fr"] = singles
            if runs:
                header["frr"] = runs


def _as_runs(handles: list) -> tuple[list, list]:
    """Frees as single handles and a flat list of (first, count) runs.

    An inference's dead intermediates are mostly consecutive handles: as runs, a keypoint
    net's ~330 frees take 20 bytes of the next upload instead of 6 kB."""
    handles.sort()
    singles: list = []
    runs: list = []
    i, n = 0, len(handles)
    while i < n:
        j = i + 1
        while j < n and handles[j] == handles[j - 1] + 1:
            j += 1
        if j - i >= 3:
            runs += (handles[i], j - i)
        else:
            singles += handles[i:j]
        i = j
    return singles, runs
