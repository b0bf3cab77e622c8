"""A robot's recorded program, resolved once so that replaying it is a tight loop.

Registration decodes every op step against the allowlist, looks up the persistent
tensors (parameters) it names, and notes where each run fills in a tensor: ``{"s": off}``
is the output of an earlier step of this iteration (handle ``base + off``), ``{"x": n}``
a tensor the robot names in slot n of the run. Other steps (uploads, downloads,
syncs, data-dependent ops) arrive as their own messages: here they are holes.

The robot only ever asks to run steps it has confirmed the app reached, so a run
never executes an op the app did not call.
"""
from __future__ import annotations

from typing import Any

from rrto import codec

from .ops import OpError, OpInfo

MAX_STEPS = 100_000
MAX_PROGRAMS = 16


class _Fill:
    """A hole in a step's arguments, filled at each run."""
    __slots__ = ("kind", "n")

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n


class ProgramStep:
    __slots__ = ("info", "args", "kwargs", "fills", "outs", "last_of")

    def __init__(self, info: OpInfo, args: list, kwargs: dict, fills: list, outs: list):
        self.info, self.args, self.kwargs, self.fills, self.outs = info, args, kwargs, fills, outs
        self.last_of: list[int] = []  # offsets whose last reader in the program is this step


class Program:
    def __init__(self, pid: int, steps: list, persistent: set):
        self.pid, self.steps, self.persistent = pid, steps, persistent

    @classmethod
    def decode(cls, header: dict, frames: list, session) -> "Program":
        pid, specs, descs = header.get("p"), header.get("steps"), header.get("in") or []
        if type(pid) is not int or not isinstance(specs, list) or not isinstance(descs, list):
            raise OpError("a program needs an integer id 'p' and a list of 'steps'")
        if not 0 < len(specs) <= MAX_STEPS:
            raise OpError(f"a program has 1 to {MAX_STEPS} steps, not {len(specs)}")
        if len(descs) != len(frames):
            raise OpError("program constants do not match the frames sent")
        consts = [session.to_device(codec.frame_tensor(d, f, 1 << 16)) for d, f in zip(descs, frames)]
        persistent: set = set()
        steps: list = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise OpError(f"program step {i} is not an object")
            if spec.get("t") != "op":
                if spec.get("t") not in ("put", "get", "sync", "seed", "shaped"):
                    raise OpError(f"program step {i} has unknown kind {str(spec.get('t'))[:20]!r}")
                steps.append(None)
                continue
            steps.append(_decode_step(i, spec, session, consts, persistent))
        last: dict[int, int] = {}
        for i, st in enumerate(steps):
            if st is not None:
                for _, _, f in st.fills:
                    if f.kind == "s":
                        last[f.n] = i
        for off, i in last.items():
            steps[i].last_of.append(off)
        return cls(pid, steps, persistent)

    def run(self, session, base: int, a: int, b: int, slots: dict, dead: frozenset = frozenset()) -> None:
        """Run steps ``a`` to ``b - 1`` of the iteration whose handles start at ``base``.

        ``dead``: handles the robot has already dropped (the frees riding on this message).
        Their tensors are never bound to a handle: they live in ``local`` only until their
        last reader in this run, so a replayed inference holds no more than eager would.
        """
        tensor, steps = session.tensor, self.steps
        local: dict[int, Any] = {}
        try:
            for i in range(a, b):
                st = steps[i]
                if st is None:
                    continue
                fills = st.fills
                try:
                    for box, where, f in fills:
                        if f.kind == "s":
                            t = local.get(f.n)
                            box[where] = t if t is not None else tensor(base + f.n)
                        else:
                            h = slots.get(f.n)
                            if h is None:
                                raise OpError(f"program {self.pid} step {i}: tensor slot {f.n} was not given")
                            box[where] = tensor(h)
                    outs = [None if o is None or base + o in dead else base + o for o in st.outs]
                    _, made, _ = session.execute(st.info, st.args, st.kwargs, outs)
                    for o, h, t in zip(st.outs, outs, made):
                        if o is not None and h is None and not isinstance(t, str):
                            local[o] = t
                finally:
                    for box, where, f in fills:  # hold no tensor between runs: the robot may free it
                        box[where] = f
                for off in st.last_of:
                    local.pop(off, None)
        finally:
            local.clear()


def _decode_step(i: int, spec: dict, session, consts: list, persistent: set) -> ProgramStep:
    info = session.ops.resolve(spec.get("op"))
    a, k, outs = spec.get("a", []), spec.get("k", {}), spec.get("o", [])
    if not isinstance(a, list) or not isinstance(k, dict) or not isinstance(outs, list):
        raise OpError(f"program step {i}: arguments must be a list 'a', an object 'k' and outputs 'o'")
    if not all(o is None or (type(o) is int and 0 <= o < MAX_STEPS * 64) for o in outs):
        raise OpError(f"program step {i}: bad output offsets")

    def handle(h):
        persistent.add(h)
        return session.tensor(h)

    def const(n):
        if not 0 <= n < len(consts):
            raise OpError(f"program step {i}: constant {n} was not sent")
        return consts[n]

    def ref(kind, n):
        if not 0 <= n < MAX_STEPS * 64:
            raise OpError(f"program step {i}: bad tensor reference")
        return _Fill(kind, n)

    args = codec.decode_value(a, handle, const, session.device, ref)
    kwargs = {key: codec.decode_value(v, handle, const, session.device, ref) for key, v in k.items()}
    fills: list = []
    _find_fills(args, fills)
    _find_fills(kwargs, fills)
    return ProgramStep(info, args, kwargs, fills, outs)


def _find_fills(box: Any, fills: list) -> None:
    items = box.items() if isinstance(box, dict) else enumerate(box)
    for where, v in items:
        if type(v) is _Fill:
            fills.append((box, where, v))
        elif type(v) is list:
            _find_fills(v, fills)
