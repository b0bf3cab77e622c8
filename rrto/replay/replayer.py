"""The replayer: answers the app's calls from a recorded Program.

While no program is known, every call goes to the eager streamer and into the op
log; each time the robot waits for the server, the Operator Sequence Search looks
for the repeating sequence. Once one is adopted (registered with the server), the
replayer checks each call the app makes against the next step:

* an ``op`` step costs no message: the robot names its outputs ``base + offset``
  and the step joins the pending run;
* an upload, a download, a synchronize or a data-dependent op is sent when the app
  reaches it, carrying the pending run (``"pre"``): the server first runs the
  confirmed steps, then the message. One upload and one download per inference.

The server only ever runs steps the robot has confirmed, so a divergence (a call
that differs from the step: another branch, a new scalar, other weights) is always
safe: the steps before it are sent with the next message, that call and what
follows go eager, and recording restarts. A call that does not match the first
step simply runs eagerly (work between inferences) and the program stays armed.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ..record import CPU, EXT, IN, PERSIST, SHAPED, Event, OpLog, Program, SequenceSearch, Step, erase
from ..stats import Stats

_REPLAY_HANDLES = 2**51  # handle range of replayed iterations (eager: from 1; server-named: 2**52)


class Replayer:
    def __init__(self, stats: Stats, register, repeats: int = 2, verbose: bool = False,
                 handles_from: int = _REPLAY_HANDLES):
        """``register(program)`` sends a program to the server; it returns False if refused.

        ``handles_from``: the first handle of replayed iterations (a replayer that takes over
        after a reconnection starts past its predecessor's, so no handle names two tensors).
        """
        self.stats, self._register, self.verbose = stats, register, verbose
        self.log = OpLog()
        self.search = SequenceSearch(repeats)
        self.program: Program | None = None
        self._pids = 0
        self.pos = 0  # next step; 0: armed, waiting for the first step of an iteration
        self.base = 0
        self._next_base = handles_from
        self._pending: list[list] = []  # runs the server has not been sent yet: [pid, base, a, b, slots]
        self._run: list | None = None
        self._shaped: dict[int, tuple] = {}  # step -> output handles of this iteration's data-dependent op
        self._messages_at_start = 0
        self._last = 0
        self.refused: set = set()  # fingerprints of programs the server would not take
        # After a divergence the replayed steps are logged too, so that the sequence the app
        # runs now (another scalar, another model) can be found while the old one still half-matches.
        self.unstable = False
        self._folded: frozenset = frozenset()  # sync steps the program's next wait (a get) stands in for
        # lop (--mode lop): steps [1, skip_to) of this iteration ran as bands, not on the server;
        # ``reserve`` handles per iteration (band temporaries); ``on_diverge(pos)`` when the app
        # leaves the program before skip_to, to make the skipped steps real.
        self.skip_to = 0
        self.reserve = 0
        self.on_diverge = None

    @property
    def handles_used(self) -> int:
        """Handles below this one may name this replayer's tensors."""
        return self._next_base

    @property
    def replaying(self) -> bool:
        return self.pos > 0

    # -- matching the app's calls against the program ---------------------------------

    def match(self, kind: str, key: Any, tensors: list, pattern: tuple | None = ()) -> Step | None:
        """The step this call is, with the robot committed to it; None: run it eagerly."""
        prog = self.program
        step = prog.steps[self.pos]
        if step.kind != kind or (pattern is not None and step.pattern != pattern) or \
                (key != step.key and erase(key) != step.ekey):
            return self._diverge(step)
        base = self.base if self.pos else self._next_base
        slots = []
        for t, r in zip(tensors, step.roles):
            h = getattr(t, "_h", None)
            role = r[0]
            if role == IN:
                if h != base + r[1]:
                    return self._diverge(step)
            elif role == PERSIST:
                if h != r[1]:
                    return self._diverge(step)
            elif role == EXT:
                if h is None:
                    return self._diverge(step)
                slots += (r[1], h)
            elif role == SHAPED:
                hs = self._shaped.get(r[1])
                if hs is None or r[2] >= len(hs) or h != hs[r[2]]:
                    return self._diverge(step)
                slots += (r[3], h)
            elif role == CPU:
                if h is not None or cpu_bytes(t) != r[1]:
                    return self._diverge(step)
        if self.pos == 0:
            self._begin()
        pos = self.pos
        if kind == "op" and pos >= self.skip_to:
            run = self._run
            if run is None or run[3] != pos:
                run = self._run = [prog.pid, self.base, pos, pos, []]
                self._pending.append(run)
            run[3] = pos + 1
            run[4] += slots
        self._last = pos
        self.pos = pos + 1
        if self.pos == len(prog.steps):
            self._end()
        return step

    def sync_folded(self) -> bool:
        """True if the sync just matched needs no message of its own.

        A synchronize whose next wait in the program is a download (``x.cpu()``) is met by
        that download's reply: the server runs a session's requests in order, so an error
        or the work's end shows there. One round trip per inference instead of two.
        """
        return self._last in self._folded

    def shaped_outputs(self, handles: tuple) -> None:
        """The handles the server gave the data-dependent op just matched, for later steps' checks."""
        self._shaped[self._last] = handles

    def log_replayed(self, step: Step, key: Any, tensors: list, outs) -> None:
        """Log a replayed step as the event it stands for (only while the program is unstable)."""
        ev = step.event
        self.record(Event(ev.kind, ev.nkey, key, tuple(getattr(t, "_h", None) for t in tensors), ev.cpu,
                          tuple(outs), ev.wire, ev.frames, ev.shaped))

    def add_run(self, pid: int, base: int, a: int, b: int) -> list:
        """Queue a run of steps [a, b) of program ``pid`` (lop: the band program's)."""
        run = [pid, base, a, b, []]
        self._pending.append(run)
        self._run = None
        return run

    def drop_run(self, run: list) -> None:
        self._pending = [r for r in self._pending if r is not run]

    def take_pre(self) -> list | None:
        """The pending runs, for the message about to leave (the streamer asks before every send)."""
        if not self._pending:
            return None
        pre, self._pending, self._run = self._pending, [], None
        return pre

    def _begin(self) -> None:
        self.base = self._next_base
        self._next_base += max(self.program.n_handles, self.reserve, 1)
        self._shaped.clear()
        self._messages_at_start = self.stats.messages_sent
        if len(self.log) and not self.unstable:
            self.log.clear()  # replayed iterations are not logged: the log must stay contiguous

    def _end(self) -> None:
        self.pos = 0
        self._run = None
        self.skip_to = 0
        self.stats.replayed_inferences += 1
        # the last step, if it is not a deferred op, is a message about to leave
        last_sends = self.program.steps[-1].kind != "op"
        self.stats.replay_messages += self.stats.messages_sent - self._messages_at_start + last_sends

    def _diverge(self, step: Step) -> None:
        if self.pos:
            self.stats.replay_divergences += 1
            if self.verbose:
                print(f"rrto: replay diverged at step {self.pos} of {len(self.program.steps)} "
                      f"({step.name or step.kind} expected); running eagerly and recording again",
                      file=sys.stderr, flush=True)
            if self.pos <= self.skip_to and self.on_diverge is not None:
                self.on_diverge(self.pos)
            self.skip_to = 0
            self.pos = 0
            self._run = None
            if not self.unstable:
                self.unstable = True
                self.log.clear()  # recording restarts here
        return None

    # -- recording ------------------------------------------------------------------------

    def record(self, event) -> None:
        self.log.append(event)
        if event.waits:
            self._search()

    def _search(self) -> None:
        prog = self.search.find(self.log)
        if prog is None:
            return
        fp = prog.fingerprint
        if self.program is not None and fp == self.program.fingerprint:
            self.unstable = False
            self.log.clear()
            return  # the armed program again (after a divergence): keep it
        if fp in self.refused:
            return
        self._pids += 1
        prog.pid = self._pids
        old = self.program
        if not self._register(prog, old.pid if old is not None else None):
            self.refused.add(fp)
            return
        self.program = prog
        self._folded = folded_syncs(prog)
        self.pos = 0
        self._run = None
        self.unstable = False
        self.log.clear()
        s = self.stats
        s.sequence_found = True
        s.sequence_length = len(prog)
        s.sequence_waits = prog.sync_points
        s.sequence_uploads = prog.uploads
        s.recorded_inferences += self.search.repeats
        if self.verbose:
            print(f"rrto: replaying a recorded sequence of {prog.describe()}", file=sys.stderr, flush=True)


def folded_syncs(prog: Program) -> frozenset:
    """Sync steps whose next waiting step, in the same iteration, is a get or a shaped op."""
    folded, later = set(), None  # the kind of the next waiting step after position i
    for i in range(len(prog.steps) - 1, -1, -1):
        kind = prog.steps[i].kind
        if kind == "sync" and later in ("get", "shaped"):
            folded.add(i)
        if kind in ("get", "shaped", "sync"):
            later = kind
    return frozenset(folded)


def cpu_bytes(t, limit: int = 256) -> bytes | None:
    """A small CPU tensor's bytes (it is compared as a constant); None when larger than ``limit``."""
    n = t.numel() * t.element_size()
    if n > limit:
        return None
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if n else b""
