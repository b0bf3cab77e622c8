"""Program: one recorded inference, the data structure every executor interprets.

A Program is a list of Steps, in the order the app issues them. Each step says what
the app will call (its full signature ``key``, and ``ekey`` with tensor shapes
erased), where each tensor argument comes from (its *role*), and which handles its
outputs get. The robot's replayer checks the app's calls against the steps; the
server runs the deferred ``op`` steps from ``spec()``, a pre-resolved op list.

Roles of a tensor argument:
  (IN, off)         output of an earlier step of this iteration: handle ``base + off``
  (PERSIST, h)      the same tensor every iteration (a parameter): handle ``h``
  (EXT, slot)       a tensor from outside this iteration that differs each time: the
                    robot sends its handle in slot ``slot``
  (CPU, bytes)      a small CPU tensor given with the op: a constant of the program

Step kinds: ``op`` (deferred: the server runs it when the robot next sends anything;
a small upload whose bytes were the same in every recorded iteration, ``torch.tensor([],
device="cuda")`` or a normalisation constant made each frame, is one too: the server
makes it from the program's copy, and the robot checks the bytes against ``value``),
``shaped`` (an op whose output shapes only the server knows: the robot waits for them;
its outputs are named ``base + ob + j`` all the same), ``put``, ``get``, ``sync``, ``seed``,
``rng`` (a generator's state read or set) (their own messages, sent when the app reaches
them, unless the server ran ahead; a run ahead stops before the holes: put, seed, rng).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import codec
from .log import HOLES

IN, PERSIST, EXT, CPU = range(4)
_T = "T"  # an erased tensor in a key


@dataclass(eq=False)
class Step:
    kind: str
    key: Any
    ekey: Any
    roles: tuple
    pattern: tuple  # per output: True for a new tensor, False for an input given back (in place)
    out_offsets: tuple  # per output: handle offset from the iteration's base, or None
    name: str = ""
    spec: dict = field(default_factory=dict)  # how the server runs it (op steps)
    event: Any = None  # the recorded event it was made from (the robot logs replayed steps like it)
    value: bytes | None = None  # an upload the program holds as a constant: its bytes


@dataclass(eq=False)
class Program:
    steps: list[Step]
    n_handles: int  # handle offsets one iteration uses
    n_slots: int
    frames: list = field(default_factory=list)  # inline CPU constants, referenced by {"i": n}
    descs: list = field(default_factory=list)
    pid: int = 0
    # slot -> the output offset, in the previous iteration, of the tensor the app passes there
    # each time (recurrent state): the robot can name it before the app does, at the upload
    carried: dict = field(default_factory=dict)
    # persistent handles the app made shortly before (not weights): perhaps this frame's input
    # read by several calls of one model, whose whole frame has not repeated yet (oss.find)
    young: frozenset = frozenset()
    _spans: dict = field(default_factory=dict, repr=False)
    _answered: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.steps)

    def ahead_span(self, a: int) -> tuple[int, list[int]]:
        """``(b, waits)``: a run ahead from step ``a`` stops at the next hole (upload, seed, rng), ``b``;
        ``waits`` are the steps in ``[a, b)`` the robot waits at. Asked at every inference's
        upload: two scans of the steps were a third of the robot's time before its upload left."""
        span = self._spans.get(a)
        if span is None:
            steps = self.steps
            b = next((i for i in range(a, len(steps)) if steps[i].kind in HOLES), len(steps))
            answered = self.answered
            span = self._spans[a] = (b, [i for i in range(a, b) if answered[i]])
        return span

    @property
    def answered(self) -> tuple[bool, ...]:
        """Per step: whether a run ahead replies to it (``codec.answered``)."""
        if self._answered is None:
            self._answered = codec.answered([s.kind for s in self.steps])
        return self._answered

    @property
    def sync_points(self) -> int:
        """Steps where the robot waits for the server (not a sync right after a download: ``answered``)."""
        return sum(self.answered)

    @property
    def persistent(self) -> frozenset:
        """Handles the program reads every iteration (its ``PERSIST`` roles: parameters, buffers).
        When one is freed the server drops the program (server/session.py)."""
        return frozenset(r[1] for s in self.steps for r in s.roles if r[0] == PERSIST)

    @property
    def uploads(self) -> int:
        """Uploads that travel each inference (not those the program holds as constants)."""
        return sum(s.kind == "put" for s in self.steps)

    @property
    def fingerprint(self) -> tuple:
        """Equal for programs the replayer cannot tell apart (it compares keys with shapes erased)."""
        return tuple((s.kind, s.ekey, s.roles, s.value) for s in self.steps)

    def spec(self) -> tuple[dict, list]:
        """The registration message (header fields, frames) for the server."""
        steps = [s.spec or {"t": s.kind} for s in self.steps]
        return {"p": self.pid, "steps": steps, "in": self.descs}, list(self.frames)

    def describe(self) -> str:
        names = [s.name or s.kind for s in self.steps]
        head = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return (f"{len(self.steps)} steps ({head}), {self.uploads} upload(s), "
                f"{self.sync_points} wait(s) per inference")


def erase(key: Any) -> Any:
    """``key`` with every tensor's shape, strides and offset replaced by its dtype alone.

    Replay accepts a call whose shapes differ from the recording (a new input size, a
    data-dependent count): the server runs it on the real tensors and the robot takes
    the outputs' metadata from the meta kernels, so only op, scalars and roles must agree.
    """
    t = type(key)
    if t is tuple or t is list:
        if len(key) == 6 and key[0] == "cpu":
            return ("cpu", key[5])
        return tuple(erase(x) for x in key)
    if hasattr(key, "_fields") and hasattr(key, "dtype") and hasattr(key, "shape"):
        return (_T, key.dtype)
    return key


def pattern_of(outs: tuple) -> tuple:
    return tuple(h is not None for h in outs)
