"""The replayer: answers the app's calls from a recorded Program.

While no program is known, every call goes to the eager streamer and into the op
log; each time the robot waits for the server, the Operator Sequence Search looks
for the repeating sequence. Once one is adopted (registered with the server), the
replayer checks each call the app makes against the next step:

* an ``op`` step costs no message: the robot names its outputs ``base + offset``
  and the step joins the pending run;
* an upload, a download, a synchronize or a data-dependent op is sent when the app
  reaches it, carrying the pending run (``"pre"``): the server first runs the
  confirmed steps, then the message (``RRTO_AHEAD=0``: a message per wait).

The upload (lop: the message after its bands) asks the server to run ahead (``"ah"``): it runs
the rest of the iteration at once and answers every later wait with a message of its
own (numbers reserved in ``"aq"``), so the robot's walk through the app overlaps the
server's work and each wait finds its answer there: one message and no round trip
per inference. The robot settles each run ahead with its next message (``"cf"``: how
far the app came). A divergence (a call that differs from the step: another branch,
a new scalar, other weights) is then safe either way: steps the server ran past it
are undone (server/program.py), steps it had not run yet (it stops where it may not
go on alone) are run first; that call and what follows go eager, recording restarts.
A call that does not match the first step simply runs eagerly (work between
inferences) and the program stays armed.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ..record import CONSTANT_BYTES, CPU, EXT, HOLES, IN, PERSIST, RNG, SEED, Event, OpLog, Program, SequenceSearch, Step, erase
from ..stats import Stats

_STEP_MESSAGES = frozenset(("put", "get", "sync", "op", "free"))  # ("free": lop's message after its bands)
PROVISIONAL_ITERATIONS = 8  # a program with young handles is replayed this long while the log goes on
_REPLAY_HANDLES = 2**51  # handle range of replayed iterations (eager: from 1; server-named: 2**52)


class Shared:
    """What the replayers of one session share (one replayer per app thread that calls ops).

    Handles and program numbers are drawn from here, so that no two replayers name the same
    server tensor or program. Confirmed runs and settlements wait here in the order the app's
    threads reached them, and every message carries all of them: one thread's ops may read
    what another's made.
    """

    def __init__(self, handles_from: int = _REPLAY_HANDLES):
        self.next_base = handles_from
        self.pids = 0
        self.pending: list[list] = []  # runs the server has not been sent yet: [pid, base, a, b, slots]
        self.run: list | None = None  # the last of them, while an op step may still extend it
        self.settling: list = []  # replayers whose run ahead is settled, not yet said ('cf')
        self.flying: set = set()  # replayers whose run ahead the server did and the app has not caught up with


class Replayer:
    def __init__(self, stats: Stats, register, repeats: int = 2, verbose: bool = False,
                 shared: Shared | None = None, reply_numbers=None, forget_replies=None):
        """``register(program)`` sends a program to the server; it returns False if refused.

        ``shared``: the handles, program numbers and pending runs this replayer shares with
        the others of its session (a replayer that takes over after a reconnection starts past
        its predecessor's handles, so no handle names two tensors).
        ``reply_numbers(n)`` reserves numbers for replies sent unasked and ``forget_replies``
        gives them up (the link's): with them, uploads ask the server to run ahead.
        """
        self.stats, self._register, self.verbose = stats, register, verbose
        self.log = OpLog()
        self.search = SequenceSearch(repeats)
        self.program: Program | None = None
        self.shared = shared if shared is not None else Shared()
        self.pos = 0  # next step; 0: armed, waiting for the first step of an iteration
        self.base = 0
        self.sent = 0  # messages this replayer's thread sent (take_fields is asked before each)
        self._slots: list = []  # this iteration's (slot, handle) pairs, flat
        self._predicted: dict = {}  # slot -> the handle named for it at the iteration's start
        self._completed = False  # the last iteration was replayed to its end (its handles are base + offset)
        self._reply_numbers, self._forget = reply_numbers, forget_replies
        self._ask: int | None = None  # the step whose message is about to leave: it asks to run ahead
        self._ahead: tuple[int, int] = (0, 0)  # steps [a, b) the server runs ahead in this iteration
        self._answers: dict[int, int] = {}  # wait step -> number of the reply the server sends for it
        self._no_ahead = False  # the server stopped short once in this iteration: do not ask again
        self._settle: list | None = None  # 'cf' for the next message: how far the app came
        self._sent_at_start = 0
        self._last = 0
        self.refused: set = set()  # fingerprints of programs the server would not take
        # After a divergence the replayed steps are logged too, so that the sequence the app
        # runs now (another scalar, another model) can be found while the old one still half-matches.
        self.unstable = False
        self._provisional = 0  # iterations left to a program with young handles (_search)
        self._folded: frozenset = frozenset()  # sync steps the program's next wait (a get) stands in for
        # lop (--mode lop): steps [1, skip_to) of this iteration ran as bands, not on the server;
        # ``reserve`` handles per iteration (band temporaries); ``on_diverge(pos)`` when the app
        # leaves the program before skip_to, to make the skipped steps real.
        self.skip_to = 0
        self.reserve = 0
        self.on_diverge = None
        # Outputs the app let go of before an iteration ended (the first replayed one; fewer after
        # one it held on to): a run ahead says so ("ad"), and the server's captured segments do
        # not keep them. Those the app still holds when a run is settled go with 'cf': the server
        # makes them again. lop turns it off (its bands name tensors of their own).
        self.expect_drops = True
        self._drops: frozenset | None = None
        self._drops_said = True
        self._step_of: dict = {}  # output offset of an op step -> that step
        self._persistent: frozenset = frozenset()  # the program's persistent handles (freed: it is gone)
        self._freed = bytearray()  # per offset of this iteration: the app let go of it
        self._held = 0  # expected drops of this iteration not let go of yet

    @property
    def handles_used(self) -> int:
        """Handles below this one may name this replayer's tensors."""
        return self.shared.next_base

    @property
    def replaying(self) -> bool:
        return self.pos > 0

    # -- matching the app's calls against the program ---------------------------------

    def match(self, kind: str, key: Any, tensors: list, pattern: tuple | None = ()) -> Step | None:
        """The step this call is, with the robot committed to it; None: run it eagerly."""
        prog = self.program
        step = prog.steps[self.pos]
        self._ask = None
        # (a key that is the step's very object, as the runtime's plan cache makes it, is equal)
        if step.kind != kind or (pattern is not None and step.pattern != pattern) or \
                (key is not step.key and key != step.key and erase(key) != step.ekey):
            return self._diverge(step)
        base = self.base if self.pos else self.shared.next_base
        slots = None
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
                if h is None or self._predicted and self._predicted.get(r[1], h) != h:
                    return self._diverge(step)
                if slots is None:
                    slots = [r[1], h]
                else:
                    slots += (r[1], h)
            elif role == CPU:
                if h is not None or cpu_bytes(t) != r[1]:
                    return self._diverge(step)
        if self.pos == 0:
            self._begin()
        pos = self.pos
        if slots:
            self._slots += slots
        a, b = self._ahead
        if a <= pos < b:
            pass  # the server ran it ahead
        elif kind == "op":
            if pos >= self.skip_to:
                shared = self.shared
                run = shared.run  # (an iteration's base is its own: another thread's run is not this one's)
                if run is None or run[3] != pos or run[1] != self.base:
                    run = shared.run = [prog.pid, self.base, pos, pos, []]
                    shared.pending.append(run)
                run[3] = pos + 1
                if slots:
                    run[4] += slots
        elif self._reply_numbers is not None and not self._no_ahead and kind not in (SEED, RNG):
            self._ask = pos
        self._last = pos
        self.pos = pos + 1
        if self.pos == len(prog.steps):
            self._end()
        return step

    def match_upload(self, key: Any, value: bytes | None) -> Step | None:
        """``match`` for an upload (``value``: its bytes, if small). A step the program holds
        as a constant matches if the bytes are the same, and is an ``op`` step: no message."""
        step = self.program.steps[self.pos]
        if step.value is None:
            return self.match("put", key, [], (True,))
        if value != step.value or key != step.key:  # (an exact key: two empty tensors' bytes are equal)
            if self.pos and key == step.key:  # the constant changed: never again one for this signature
                varying = self.search.varying
                if len(varying) < 256:
                    varying.add(key)
            return self._diverge(step)
        return self.match("op", key, [], (True,))

    def sync_folded(self) -> bool:
        """True if the sync just matched needs no message of its own.

        A synchronize whose next wait in the program is a download (``x.cpu()``) is met by
        that download's reply: the server runs a session's requests in order, so an error
        or the work's end shows there. One round trip per inference instead of two.
        """
        return self._last in self._folded

    def answered_ahead(self) -> int | None:
        """The number of the reply the server sends unasked for the wait just matched, or None."""
        return self._answers.pop(self._last, None)

    def ahead_stopped(self, stop: int) -> None:
        """The server stopped before step ``stop``, short of the wait just matched: that wait is
        asked for the usual way, its message carrying the steps from ``stop`` up to it."""
        if not 0 <= stop <= self._last:
            raise ValueError(f"the server stopped its run ahead at step {stop}, past the wait at {self._last}")
        self._settle_ahead(stop)  # (already settled if that wait ended the iteration,
        if self.pos == 0:         # whose count of messages did not expect this one)
            self.stats.replay_messages += 1
        if self._settle is not None:
            self._settle[2] = stop
        self._answers.clear()
        self._no_ahead = True
        if stop < self._last:
            self.shared.pending.append([self.program.pid, self.base, stop, self._last, list(self._slots)])
            self.shared.run = None

    def in_iteration(self, handle: int) -> bool:
        """Whether ``handle`` names a tensor of this replayer's current (or last) iteration."""
        return 0 <= handle - self.base < len(self._freed)

    def recall_ahead(self) -> None:
        """Another thread is about to touch what this iteration's run ahead may have touched
        before the app reached it (or to write what it read): the server takes back the steps
        past where this thread is, and the rest of the iteration runs in the app's order."""
        if self._ahead[1] and self.pos:
            self._settle_ahead(self.pos)
            self._no_ahead = True

    def _settle_ahead(self, reached: int) -> None:
        """The app came as far as step ``reached``: say so with the next message; replies for
        waits from there on will not be asked for (the one for the wait just matched still is)."""
        if self._ahead[1]:
            if self._settle is None:
                self.shared.settling.append(self)
            # (past the end of the run ahead, a hole: the robot sent the steps after it in runs of its own)
            self._settle = [self.program.pid, self.base, min(reached, self._ahead[1]), list(self._slots)]
            self.shared.flying.discard(self)
            held = self._still_held(reached)
            if held:
                self._settle.append(held)
            gone = [q for i, q in self._answers.items() if i >= reached]
            if gone:
                self._forget(gone)
            self._answers = {i: q for i, q in self._answers.items() if i < reached}
            self._ahead = (0, 0)

    def log_replayed(self, step: Step, key: Any, tensors: list, outs) -> None:
        """Log a replayed step as the event it stands for (only while the program is unstable)."""
        ev = step.event
        self.record(Event(ev.kind, ev.nkey, key, tuple(getattr(t, "_h", None) for t in tensors), ev.cpu,
                          tuple(outs), ev.wire, ev.frames, ev.shaped))

    def add_run(self, pid: int, base: int, a: int, b: int) -> list:
        """Queue a run of steps [a, b) of program ``pid`` (lop: the band program's)."""
        run = [pid, base, a, b, []]
        self.shared.pending.append(run)
        self.shared.run = None
        return run

    def drop_run(self, run: list) -> None:
        self.shared.pending = [r for r in self.shared.pending if r is not run]

    def take_fields(self, kind: str) -> dict | None:
        """What rides on the message of type ``kind`` about to leave (the streamer asks before
        every send): the pending runs, the last run ahead's settlement, and the run ahead that
        the step just matched asks for, if this message is that step's."""
        self.sent += 1
        ask = self._ask is not None and kind in _STEP_MESSAGES
        shared = self.shared
        if not (shared.pending or shared.settling or ask):
            return None
        fields = {}
        if shared.settling:
            cf = [r._settle for r in shared.settling]
            for r in shared.settling:
                r._settle = None
            fields["cf"], shared.settling = cf[0] if len(cf) == 1 else cf, []
        if shared.pending:
            fields["pre"], shared.pending, shared.run = shared.pending, [], None
        if ask:
            self._ask_ahead(self._ask + 1, fields)
            self._ask = None
        return fields

    def ahead_from(self, a: int) -> bool:
        """Ask, with the next message, that the server run steps from ``a`` on ahead (lop: the
        steps after its bands). False if this replayer does not run ahead."""
        if self._reply_numbers is None:
            return False
        self._ask = a - 1
        return True

    def cancel_ask(self) -> None:
        """The step just matched will not be one message (lop sends its input in bands)."""
        self._ask = None

    def _ask_ahead(self, a: int, fields: dict) -> None:
        b, waits = self.program.ahead_span(a)
        if b <= a:
            return
        numbers = self._reply_numbers(len(waits))
        self._ahead, self._answers = (a, b), dict(zip(waits, numbers))
        self.shared.flying.add(self)
        fields["ah"] = [self.program.pid, self.base, a, b, list(self._slots)]
        fields["aq"] = numbers
        if not self._drops_said and self.expect_drops:
            fields["ad"] = as_runs(self._drops)
            self._drops_said = True

    def _begin(self) -> None:
        prev, freed = self.base if self._completed else None, self._freed
        shared = self.shared
        self.base = shared.next_base
        shared.next_base += max(self.program.n_handles, self.reserve, 1)
        self._freed = bytearray(self.program.n_handles)
        self._held = len(self._drops) if self._drops else 0
        # Recurrent state: the slots the app filled with the previous iteration's outputs, named
        # now, so that the run ahead need not stop where the state comes in. Outputs the app let
        # go of are not (the server may have freed them); a wrong guess is a divergence in match.
        self._predicted = {} if prev is None else \
            {n: prev + off for n, off in self.program.carried.items() if off < len(freed) and not freed[off]}
        self._slots = [x for n, h in self._predicted.items() for x in (n, h)]
        self._completed = False
        self._no_ahead = False
        self._sent_at_start = self.sent
        if len(self.log) and not self.unstable:
            self.log.clear()  # replayed iterations are not logged: the log must stay contiguous

    def _end(self) -> None:
        self.pos = 0
        self.skip_to = 0
        self._completed = True
        if self._provisional:
            self._provisional -= 1
            self.unstable = self._provisional > 0  # (the log is cleared as the next iteration begins)
        self.stats.replayed_inferences += 1
        # the last step, if it is not a deferred op or answered ahead, is a message about to leave
        last = len(self.program.steps) - 1
        last_sends = self.program.steps[-1].kind != "op" and not self._ahead[0] <= last < self._ahead[1]
        self.stats.replay_messages += self.sent - self._sent_at_start + last_sends
        self._settle_ahead(last + 1)
        if self.expect_drops and (self._drops is None or self._held):
            held = self._still_held(last + 1)
            self._drops = frozenset(o for o in self._step_of if self._freed[o]) if self._drops is None \
                else self._drops.difference(held)
            self._drops_said = False

    def note_free(self, handle: int) -> None:
        """The app let go of tensor ``handle`` (its free rides on the next message)."""
        o = handle - self.base
        freed = self._freed
        if 0 <= o < len(freed):
            if not freed[o]:
                freed[o] = 1
                if self._drops and o in self._drops:
                    self._held -= 1
        elif handle in self._persistent:
            self._forget_program()

    def _forget_program(self) -> None:
        """A tensor the program reads every iteration is gone (the app dropped its model): the
        server drops the program with that free, so the robot does too, and records afresh.
        (Runs already queued go first: the server frees after a message's runs.)"""
        prog = self.program
        if self.pos:
            self._diverge(prog.steps[self.pos])
        if self.verbose:
            print("rrto: a tensor the replayed sequence reads was freed; recording again", file=sys.stderr, flush=True)
        self.program, self._persistent, self.pos = None, frozenset(), 0
        self.unstable, self._provisional = False, 0  # (the log goes on: what it holds was the app's)

    def _still_held(self, reached: int) -> list:
        """Outputs of steps before ``reached`` the app was expected to drop and still holds."""
        if not self._held:
            return []
        freed, step_of = self._freed, self._step_of
        return [o for o in self._drops if step_of[o] < reached and not freed[o]]

    def _diverge(self, step: Step) -> None:
        if self.pos:
            self.stats.replay_divergences += 1
            if self.verbose:
                print(f"rrto: replay diverged at step {self.pos} of {len(self.program.steps)} "
                      f"({step.name or step.kind} expected); running eagerly and recording again",
                      file=sys.stderr, flush=True)
            self._settle_ahead(self.pos)
            if self.pos <= self.skip_to and self.on_diverge is not None:
                self.on_diverge(self.pos)
            self.skip_to = 0
            self.pos = 0
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
            if not self._provisional:
                self.unstable = False
                self.log.clear()
            return  # the armed program again (after a divergence): keep it
        if fp in self.refused or self._provisional and self.pos:
            return  # (a provisional program is replaced between its iterations, not inside one)
        self.shared.pids += 1
        prog.pid = self.shared.pids
        old = self.program
        if not self._register(prog, old.pid if old is not None else None):
            self.refused.add(fp)
            return
        self.program = prog
        self._persistent = prog.persistent
        self._folded = folded_syncs(prog)
        # (a program with more than one run ahead per iteration leaves nothing out: each run
        # is settled only by the next, which the server cannot make outputs of the last again from)
        one_run = sum(st.kind in HOLES for st in prog.steps) == 1
        self._step_of = {o: i for i, st in enumerate(prog.steps) if st.kind == "op" and one_run
                         for o in st.out_offsets if o is not None}
        self._drops, self._drops_said, self._freed, self._held = None, True, bytearray(), 0
        self._completed = False
        self.pos = 0
        # Young persistent tensors (oss.find): perhaps this frame's input read by several calls,
        # the frame not repeated yet. The log is kept and replayed steps go on being logged, so
        # the frame is found once it repeats; for a few iterations, then a constant it was.
        self._provisional = PROVISIONAL_ITERATIONS if prog.young else 0
        self.unstable = bool(prog.young)
        if not prog.young:
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
    """Sync steps answered without a message of their own: those whose next waiting step, in
    the same iteration, is a get or a shaped op (its reply stands in), and those right after
    one (its reply just came: ``codec.answered``)."""
    folded, later = set(), None  # the kind of the next waiting step after position i
    answered = prog.answered
    for i in range(len(prog.steps) - 1, -1, -1):
        kind = prog.steps[i].kind
        if kind == "sync" and (later in ("get", "shaped") or not answered[i]):
            folded.add(i)
        if kind in ("get", "shaped", "sync"):
            later = kind
    return frozenset(folded)


def as_runs(offsets) -> list:
    """Offsets as a flat list of (first, count) runs."""
    out: list = []
    for o in sorted(offsets):
        if out and out[-2] + out[-1] == o:
            out[-1] += 1
        else:
            out += (o, 1)
    return out


def cpu_bytes(t, limit: int = CONSTANT_BYTES) -> bytes | None:
    """A small CPU tensor's bytes (it is compared as a constant); None when larger than ``limit``."""
    n = t.numel() * t.element_size()
    if n > limit:
        return None
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if n else b""
