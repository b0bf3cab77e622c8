"""Operator Sequence Search: find the per-inference sequence in the op log.

Called whenever the robot had to wait for the server (a download, a synchronize, a
data-dependent op): inference loops end on such a wait. The log's tail is then
searched for a period L that repeated K times:

* level 1 compares the cheap name keys: the candidate periods are the distances
  back to earlier events with the same key as the last one, and a candidate holds
  when the last K*L keys repeat with period L;
* level 2 confirms it with full signatures (shapes, dtypes, scalars) and the data
  flow: each tensor argument must be the output of the same earlier step in every
  period, or the same outside tensor (a parameter), or consistently an outside
  tensor that changes each time (recurrent state, pre-processing outside the loop).

A small upload whose bytes were the same in all K periods (a constant the app makes
each frame) becomes a constant of the program, unless the replayer saw an upload of
that signature change before (``varying``). A persistent tensor the app made inside the
log (not a model's weights) may be this frame's input, read by each of several calls of
a model: the longer period that makes it is preferred (``young``). Anything before the
last K periods (weight uploads, warm-up, one-off calls) is never looked at. The adopted Program
starts at the period's first upload that is not a constant, the natural start of an
inference, when there is one.
"""
from __future__ import annotations

from .log import MODEL_STATE, PUT, OpLog
from .program import CPU, EXT, IN, PERSIST, Program, Step, erase, pattern_of

_IN, _OUT = "in", "ext"
_CONSTANT_OP = "aten::clone.default"


class SequenceSearch:
    def __init__(self, repeats: int = 2, max_period: int = 4096):
        if repeats < 2:
            raise ValueError("a sequence must repeat at least twice to be recognised")
        self.repeats, self.max_period = repeats, max_period
        self.varying: set = set()  # keys of small uploads seen to change: never constants

    def find(self, log: OpLog) -> Program | None:
        """The program whose last ``repeats`` iterations end the log, or None.

        A period that reads the same tensor each time, one the app made inside the log (not a
        model's weights), may be one of several calls of a model on this frame's input: the
        longer period in which that tensor is made, if it repeated too, is the inference. Without
        one the short period is given, its ``young`` handles named (a constant made just before
        the loop, a prompt, or the frame not repeated yet: the replayer keeps recording).
        """
        keys, k = log.nkeys, self.repeats
        n = len(keys)
        if n < 2 * k:
            return None
        last = keys[-1]
        longest = min(self.max_period, n // k)
        short = None
        L = 1
        while L <= longest:
            if keys[n - 1 - L] != last or keys[n - k * L:n - L] != keys[n - (k - 1) * L:n]:  # level 1
                L += 1
                continue
            confirmed = self._confirm(log, L)  # level 2
            if confirmed is None or not any(log.at(log.end - L + o).kind == "op" for o in range(L)):
                L += 1
                continue
            young = _young(log, confirmed[0])
            if not young:
                return _build(log, L, *confirmed)
            if short is None:
                short = _build(log, L, *confirmed)
                short.young = frozenset(young)
            L = max(L + 1, log.end - min(young.values()))  # a period that holds their making
        return short

    def _confirm(self, log: OpLog, L: int) -> tuple[list, set, dict] | None:
        """(per step: the roles of its tensor arguments; the steps that are constant uploads;
        ``(step, argument) -> (step, output)`` for a tensor from outside the period that each
        period took from the same output of the period before: recurrent state)."""
        starts = [log.end - (p + 1) * L for p in range(self.repeats)]
        roles, constants, carried = [], set(), {}
        dynamic: set[int] = set()  # steps whose outputs' shapes depend on data
        for o in range(L):
            evs = [log.at(s + o) for s in starts]
            e0 = evs[0]
            pat = pattern_of(e0.outs)
            if any(c is None for c in e0.cpu):
                return None  # a large CPU tensor travels with this op: it is data, not a constant
            step = []
            for t, h in enumerate(e0.handles):
                if h is None:
                    step.append((CPU,))
                    continue
                rs = [_origin(log, e.handles[t], s, s + o) for e, s in zip(evs, starts)]
                if rs[0][0] == _IN:
                    if any(r != rs[0] for r in rs):
                        return None
                    step.append(rs[0])
                elif any(r[0] != _OUT for r in rs):
                    return None
                elif all(r[1] == h for r in rs):
                    step.append((PERSIST, h))
                else:
                    step.append((EXT,))
                    made = {_made_in_the_period_before(log, e.handles[t], s, L) for e, s in zip(evs, starts)}
                    if len(made) == 1 and None not in made:
                        carried[(o, t)] = made.pop()
            # Shapes must repeat exactly, except downstream of a data-dependent op (a count of
            # detections): there only op, scalars and data flow must, as replay checks them.
            dyn = any(r[0] == _IN and r[1] in dynamic for r in step)
            for e in evs[1:]:
                if e.cpu != e0.cpu or e.shaped != e0.shaped or pattern_of(e.outs) != pat:
                    return None
                if e.key != e0.key and not (dyn and erase(e.key) == erase(e0.key)):
                    return None
            if dyn or e0.shaped:
                dynamic.add(o)
            if e0.kind == PUT and e0.frames and e0.key not in self.varying and \
                    all(e.frames == e0.frames for e in evs[1:]):
                constants.add(o)
            roles.append(step)
        return roles, constants, carried


def _young(log: OpLog, roles: list) -> dict:
    """``handle -> index of the event that made it`` for the period's persistent tensors made
    inside the log from what the app made, not only from a model's upload (``.cuda()``, a
    checkpoint: moving a model detaches and converts its tensors)."""
    return {r[1]: log.producer[r[1]][0] for step in roles for r in step
            if r[0] == PERSIST and _made_by_the_app(log, r[1])}


def _made_by_the_app(log: OpLog, h: int) -> bool:
    """Whether ``h`` comes, through the log's ops, from an upload or factory of the app's own."""
    todo, seen = [h], set()
    while todo:
        a = todo.pop()
        p = log.producer.get(a)
        if p is None or a in seen:
            continue  # (made before the log: old enough)
        seen.add(a)
        ev = log.at(p[0])
        if ev.kind == PUT:
            if ev.key[-1] != MODEL_STATE:
                return True
            continue
        made = [b for b in ev.handles if b is not None and b in log.producer]
        if not made:
            return True  # a factory (torch.zeros(..., device="cuda")), or from old tensors
        todo += made
    return False


def _made_in_the_period_before(log: OpLog, h: int, start: int, L: int) -> tuple | None:
    """(step, output) of the period before ``start`` that made handle ``h``, or None."""
    p = log.producer.get(h)
    if p is not None and start - L <= p[0] < start:
        return (p[0] - start + L, p[1])
    return None


def _origin(log: OpLog, h: int, start: int, i: int) -> tuple:
    p = log.producer.get(h)
    if p is not None and start <= p[0] < i:
        return (_IN, p[0] - start, p[1])
    return (_OUT, h)


def _build(log: OpLog, L: int, roles: list, constants: set, carried: dict) -> Program:
    """The last period as a Program, rotated to start at its first upload that is not a constant."""
    start = log.end - L
    events = [log.at(start + o) for o in range(L)]
    puts = [o for o, e in enumerate(events) if e.kind == PUT]
    r0 = next((o for o in puts if o not in constants), puts[0] if puts else 0)  # the input, not a constant
    order = list(range(r0, L)) + list(range(r0))
    pos_of = {o: p for p, o in enumerate(order)}
    offsets: list[tuple] = []  # per step: handle offset of each output
    n_handles = n_slots = 0
    steps, frames, descs = [], [], []
    before: list = []  # (slot, step, output): a slot filled with that output of the previous iteration
    for pos, o in enumerate(order):
        ev = events[o]
        step_roles = []
        for t, (h, role) in enumerate(zip(ev.handles, roles[o])):
            kind = role[0]
            if kind == _IN:
                q, j = role[1], role[2]
                if (o >= r0) != (q >= r0):  # made by the previous iteration: changes every time
                    before.append((n_slots, q, j))
                    step_roles.append((EXT, n_slots))
                    n_slots += 1
                else:  # a data-dependent op's outputs too: the robot names them base + ob + j
                    step_roles.append((IN, offsets[pos_of[q]][j]))
            elif kind == EXT:
                q, j = carried.get((o, t), (None, 0))
                # made by the period before: in the previous iteration if both ends are on the same
                # side of the rotation (a step made before the input's upload is two iterations back)
                if q is not None and (o >= r0) == (q >= r0):
                    before.append((n_slots, q, j))
                step_roles.append((EXT, n_slots))
                n_slots += 1
            elif kind == CPU:
                step_roles.append((CPU,))
            else:
                step_roles.append(role)
        cpu_roles = [i for i, r in enumerate(step_roles) if r[0] == CPU]
        for i, b in zip(cpu_roles, ev.cpu):
            step_roles[i] = (CPU, b)
        outs = []
        if ev.shaped:  # the server names output j (an input given back, too) base + ob + j
            outs = list(range(n_handles, n_handles + len(ev.outs)))
            n_handles += len(ev.outs)
        for h in () if ev.shaped else ev.outs:
            if h is None:
                outs.append(None)
            else:
                outs.append(n_handles)
                n_handles += 1
        offsets.append(tuple(outs))
        kind = "shaped" if ev.shaped else ev.kind
        name = ev.wire["op"] if ev.wire and "op" in ev.wire else ""
        spec, value = {}, None
        if o in constants:  # the server makes it: a copy of the program's constant, which stays as sent
            kind, name, value = "op", _CONSTANT_OP, ev.frames[0]
            spec = {"t": "op", "op": _CONSTANT_OP, "a": [{"i": len(frames)}], "o": list(outs)}
            frames.append(value)
            descs.append(ev.wire["in"][0])
        elif kind == "op":
            spec = _op_spec(ev, step_roles, tuple(outs), frames, descs)
        elif kind == "shaped":
            spec = _op_spec(ev, step_roles, (), frames, descs)
            del spec["o"]
            spec["t"], spec["ob"] = "shaped", outs[0] if outs else n_handles
        elif kind == "get":
            spec = {"t": "get", "a": [_marker(step_roles[0], None, 0)]}
        elif kind == "put":  # the server checks the layouts of what arrives at these offsets
            spec = {"t": "put", "o": [o for o in outs if o is not None]}
        key = ev.key
        steps.append(Step(kind, key, erase(key), tuple(step_roles), pattern_of(ev.outs), tuple(outs), name, spec,
                          ev, value))
    carried_offsets = {}
    for n, q, j in before:
        outs = offsets[pos_of[q]]
        if j < len(outs) and outs[j] is not None:  # (None: an input given back, in place)
            carried_offsets[n] = outs[j]
    return Program(steps, n_handles, n_slots, frames, descs, carried=carried_offsets)


def _op_spec(ev, roles: list, outs: tuple, frames: list, descs: list) -> dict:
    """The op as the server will run it: tensor markers replaced by role markers."""
    it = iter(roles)
    base = len(frames)
    frames.extend(ev.frames)
    descs.extend(ev.wire.get("in", ()))

    def walk(x):
        if type(x) is list:
            return [walk(y) for y in x]
        if type(x) is dict and len(x) == 1 and ("h" in x or "i" in x):
            return _marker(next(it), x, base)
        return x

    spec = {"t": "op", "op": ev.wire["op"], "a": walk(ev.wire["a"])}
    if "k" in ev.wire:
        spec["k"] = {k: walk(v) for k, v in ev.wire["k"].items()}
    spec["o"] = list(outs)
    return spec


def _marker(role: tuple, wire: dict | None, base: int) -> dict:
    """How a program names a tensor argument with this role (``wire``: its marker as sent)."""
    if role[0] == IN:
        return {"s": role[1]}
    if role[0] == PERSIST:
        return {"h": role[1]}
    if role[0] == CPU:
        return {"i": base + wire["i"]}
    return {"x": role[-1]}
