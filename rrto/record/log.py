"""The op log: what the robot sent the server, one Event per message-producing call.

An event keeps what the Operator Sequence Search compares (a cheap name key and the
full signature) and what a Program step needs later (the op as it went on the wire,
which handles it read and which it created). Handles are never reused, so "who made
handle h" is a fixed fact, kept in ``producer`` for the events still in the window.
"""
from __future__ import annotations

from typing import Any

import xxhash

OP, PUT, GET, SYNC, SEED, RNG = "op", "put", "get", "sync", "seed", "rng"  # RNG: a generator's state read or set
HOLES = frozenset((PUT, SEED, RNG))  # a program step that is a message of its own: a run ahead stops before it
CONSTANT_BYTES = 256  # uploads up to this size may become constants of a program (and CPU tensors op arguments)
SYNC_KINDS = frozenset((GET, SYNC))  # the robot waits for the server here (so do server-shaped ops)
MODEL_STATE = "model state"  # ends an upload's key: a parameter or buffer, not an inference's input
_name_keys: dict[str, int] = {}


def name_key(kind: str, name: str = "") -> int:
    """Level-1 key of an event: xxhash of its kind and op name (cached)."""
    text = f"{kind}:{name}"
    k = _name_keys.get(text)
    if k is None:
        k = _name_keys[text] = xxhash.xxh64_intdigest(text.encode())
    return k


class Event:
    """One call the robot sent to the server.

    ``key``: full signature (op, argument structure, tensor metadata, scalars).
    ``handles``: the handle of each tensor argument in signature order (None: a CPU tensor).
    ``cpu``: the bytes of those CPU tensors (None where too large to compare).
    ``outs``: handles this event created (None for an output that is an input, in place).
    ``wire``: the op as sent (``op``, ``a``, ``k``, ``in``), tensors as ``{"h"}``/``{"i"}`` markers.
    ``shaped``: the server sized the outputs (data-dependent shapes): the robot waited.
    A small upload (``put``, at most ``CONSTANT_BYTES``) keeps its bytes in ``frames`` and
    its descriptor in ``wire["in"]``: if they repeat, the program holds it as a constant.
    """
    __slots__ = ("kind", "nkey", "key", "handles", "cpu", "outs", "wire", "frames", "shaped", "waits")

    def __init__(self, kind: str, nkey: int, key: Any, handles: tuple = (), cpu: tuple = (), outs: tuple = (),
                 wire: dict | None = None, frames: tuple = (), shaped: bool = False):
        self.kind, self.nkey, self.key, self.handles, self.cpu = kind, nkey, key, handles, cpu
        self.outs, self.wire, self.frames, self.shaped = outs, wire, frames, shaped
        self.waits = shaped or kind in SYNC_KINDS

    def __repr__(self) -> str:
        name = self.wire["op"] if self.wire else self.kind
        return f"Event({name}, args={self.handles}, outs={self.outs})"


class OpLog:
    """The most recent events (at most ``2 * window``), indexed globally from the first ever."""

    def __init__(self, window: int = 8192):
        self.window = window
        self.events: list[Event] = []
        self.nkeys: list[int] = []
        self.first = 0  # global index of events[0]
        self.producer: dict[int, tuple[int, int]] = {}  # handle -> (global event index, output index)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def end(self) -> int:
        return self.first + len(self.events)

    def append(self, ev: Event) -> int:
        i = self.first + len(self.events)
        self.events.append(ev)
        self.nkeys.append(ev.nkey)
        for j, h in enumerate(ev.outs):
            if h is not None:
                self.producer[h] = (i, j)
        if len(self.events) > 2 * self.window:
            self._trim(len(self.events) - self.window)
        return i

    def at(self, i: int) -> Event:
        """The event with global index ``i``."""
        return self.events[i - self.first]

    def clear(self) -> None:
        self.first += len(self.events)
        self.events.clear()
        self.nkeys.clear()
        self.producer.clear()

    def _trim(self, n: int) -> None:
        for ev in self.events[:n]:
            for h in ev.outs:
                if h is not None:
                    self.producer.pop(h, None)
        del self.events[:n]
        del self.nkeys[:n]
        self.first += n
