"""One robot's session: its handle table and the worker that runs its requests in order.

Handles are the robot's names for its tensors here; they are looked up only in this
session's table, so one robot can never name, read or free another's tensors.

Requests that carry a sequence number ``q`` get a reply; the rest are streamed. When a
streamed request fails, the session remembers the first error and skips what follows
(those ops would only fail on the missing results) until the robot's next request,
which gets that error as its reply, the way CUDA reports an asynchronous error at the
next synchronisation.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from rrto import codec

from .cache import WeightCache
from .ops import OpError, OpInfo, OpTable, OutputMeta, SizeCheck, flat_tensors, output_binding, short_error
from .program import ITERATION_HANDLES, MAX_PROGRAMS, AheadRun, Program

log = logging.getLogger("rrto.server")
CUDA_DEFAULT_SEED = 67280421310721  # what torch seeds a fresh cuda generator with
MAX_HANDLE = 2**53
MAX_NAMED_OUTPUTS = 256  # outputs of one op whose shapes only the server knows
MAX_FREES = 1 << 20  # handles one message may free by runs (a run is counted out one handle at a time)


@dataclass
class Limits:
    max_session_bytes: int = 8 << 30
    max_tensor_bytes: int = 4 << 30
    max_handles: int = 1_000_000
    weight_cache_bytes: int = 512 << 20  # the content-addressed weight cache, shared by all sessions


class Session:
    def __init__(self, token: str, identity: bytes, device: torch.device, limits: Limits,
                 ops: OpTable, sizes: SizeCheck, send: Callable[[list], None], cache: WeightCache | None = None):
        self.token, self.identity, self.device, self.limits = token, identity, device, limits
        self.cache = cache
        self.ops, self.sizes, self._send_frames = ops, sizes, send  # the daemon's: a whole zmq message to a robot
        self.handles: dict[int, torch.Tensor] = {}
        self.unusable: dict[int, str] = {}  # handles whose op output could not be given to the robot
        self._storages: dict[int, list] = {}  # storage address -> [nbytes, handles using it]
        self.live_bytes = 0
        self.error: tuple[str, str] | None = None
        self.last_seen = time.monotonic()
        self.generator = torch.Generator(device=device)  # the session's default one: ops that name none draw here
        self.generator.manual_seed(CUDA_DEFAULT_SEED)
        self.generators: dict[int, torch.Generator] = {0: self.generator}  # the robot's torch.Generator("cuda")s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending_bytes = 0
        self._pending_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"rrto-session-{token[:8]}", daemon=True)
        self.ops_run = 0
        # counts ops that may have changed a tensor's layout in place: a program step's fixed
        # arguments (parameters) are checked against it instead of one by one (ProgramStep.sized)
        self.layout_generation = 0
        self.programs: dict[int, Program] = {}
        self.programs_run = 0
        self._ahead_job: tuple | None = None  # (program, base, from, to, slots, seqs): run after the reply
        # per program, its last run ahead until the robot settles it (one program per app thread)
        self._ahead_runs: dict[int, AheadRun] = {}
        # A robot measures its link with real inferences: a message it marks 'clk': n is stamped
        # on arrival, and the next reply carries 'sv': [n, seconds spent here since] (lop's planner
        # subtracts it from the round trip it saw; nothing is compared across the two clocks).
        self._clocked: tuple | None = None

    # -- worker ------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, header: dict, frames: list, nbytes: int) -> bool:
        """Queue a request for the worker; False when the session's queue holds too much already."""
        self.last_seen = time.monotonic()
        with self._pending_lock:  # frames wait in memory until they run: bounded like tensors
            if self.pending_bytes + nbytes > self.limits.max_session_bytes:
                return False
            self.pending_bytes += nbytes
        if "clk" in header:  # stamped here, on arrival: time queued behind other work is the server's
            header["clk"] = (header["clk"], time.perf_counter())
        self.inbox.put((header, frames, nbytes))
        return True

    def stop(self) -> None:
        self.inbox.put(None)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    item = self.inbox.get()
                    if item is None:
                        break
                    header, frames, nbytes = item
                    clk = header.get("clk")
                    if clk is not None and type(clk[0]) is int:
                        self._clocked = clk
                    reply = self.handle(header, frames)
                    with self._pending_lock:
                        self.pending_bytes -= nbytes
                    if reply is not None:
                        self._send(*reply)
                    if "aq" in header:
                        self._answer_ahead(header)
                    if header.get("t") == "bye":
                        break
        finally:
            self.handles.clear()
            self._storages.clear()
            self.programs.clear()
            self._ahead_runs.clear()
            self._ahead_job = None
            while not self.inbox.empty():  # requests sent after the goodbye: their frames go too
                self.inbox.get_nowait()

    # -- requests ----------------------------------------------------------------

    def handle(self, header: dict, frames: list) -> tuple[dict, list] | None:
        """Run one request; returns (reply header, reply frames) when the robot waits for one."""
        q = header.get("q")
        try:
            if "frr" in header:
                header["fr"] = _frees(header)
            if self.error is not None and header.get("t") != "bye":
                if q is None:
                    return None
                kind, msg = self.error
                self.error = None
                return {"t": "err", "q": q, "kind": kind, "msg": msg}, []
            reply, rframes = self._dispatch(header, frames)
        except OpError as e:
            return self._fail(q, e.kind, str(e))
        except codec.CodecError as e:
            return self._fail(q, "bad_request", f"malformed request: {e}")
        except Exception as e:  # noqa: BLE001 - a failing op must never take the server down
            what = header.get("op") if header.get("t") == "op" else f"'{header.get('t')}' request"
            return self._fail(q, "op_failed", f"{what} failed on the server: {short_error(e)}")
        finally:
            self._free(header.get("fr"))
        if q is None:
            return None
        reply["q"] = q
        return reply, rframes

    def _fail(self, q, kind: str, msg: str):
        log.debug("session %s: %s", self.token[:8], msg)
        if q is not None:
            return {"t": "err", "q": q, "kind": kind, "msg": msg}, []
        if self.error is None:
            self.error = (kind, msg + " (reported at the next request; ops after it were skipped)")
        return None

    def fail_later(self, kind: str, msg: str) -> None:
        """An error found after the replies went out: the robot's next request reports it."""
        log.debug("session %s: %s", self.token[:8], msg)
        if self.error is None:  # (nothing was skipped: the run's replies had all gone out)
            self.error = (kind, msg + " (found after the run's replies; reported at the next request)")

    def _dispatch(self, h: dict, frames: list) -> tuple[dict, list]:
        t = h.get("t")
        cf = h.get("cf")
        if type(cf) is list and cf and type(cf[0]) is list:  # several threads' runs ahead
            if len(cf) > MAX_PROGRAMS:
                raise OpError(f"'cf' settles at most {MAX_PROGRAMS} runs ahead")
            for one in cf:
                self._settle(one)
        elif cf is not None:
            self._settle(cf)
        pre = h.get("pre")
        if pre is not None:
            fr = h.get("fr")
            self._run_programs(pre, frozenset(x for x in fr if type(x) is int) if type(fr) is list else frozenset())
        if "ah" in h:
            self._free(h.pop("fr", None))  # last iteration's tensors go before this one's run ahead
            try:
                self._ahead_job = self._check_ahead(h.get("ah"), h.get("aq"), h.get("ad"))
            except OpError as e:  # the message itself still runs; its waits are answered "stop"
                log.debug("session %s: no run ahead: %s", self.token[:8], e)
        if t == "op":
            return self._op(h, frames)
        if t == "put":
            frame = _frame(frames, 0)
            src = codec.frame_tensor(h.get("d"), frame, self.limits.max_tensor_bytes)
            self._reserve(src.numel() * src.element_size())
            dev = self.to_device(src)
            self._bind(h.get("h"), dev)
            if h.get("c") == 1 and self.cache is not None:  # a weight: kept by content for reconnections
                self.cache.add(h["d"]["dt"], frame.buffer if hasattr(frame, "buffer") else frame, dev)
            return {}, []
        if t == "adopt":
            return self._adopt(h.get("w")), []
        if t == "get":
            return self.download(self.tensor(h.get("h")))
        if t == "sync":
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return {}, []
        if t == "seed":
            seed = h.get("seed")
            if type(seed) is not int or not 0 <= seed < 1 << 64:
                raise OpError("seed must be an integer in [0, 2**64)")
            self.generator_of(h.get("g", 0)).manual_seed(seed)
            return {}, []
        if t == "rng":
            return self._generator_state(h, frames)
        if t == "mem":
            return {"allocated": self.live_bytes, "limit": self.limits.max_session_bytes}, []
        if t == "times":
            return self._step_times(h.get("p")), []
        if t == "prog":
            return self._register(h, frames)
        if t in ("free", "bye"):
            return {}, []
        raise OpError(f"unknown request type {str(t)[:40]!r}")

    def _step_times(self, pid) -> dict:
        """Seconds each op step of a program took here (the fastest run seen; 0: not run yet),
        for lop's planner. A CUDA server's host clock sees launches, not kernels: no figures."""
        prog = self.programs.get(pid) if type(pid) is int else None
        if prog is None:
            raise OpError(f"no program {str(pid)[:20]} in this session")
        if self.device.type != "cpu":
            return {"s": None, "runs": prog.timed_runs}
        return {"s": [round(x, 7) for x in prog.seconds], "runs": prog.timed_runs}

    def _adopt(self, items) -> dict:
        """Bind weights the robot names by digest from the cache: [[handle, descriptor, digest], ...].

        Replies with the positions the cache does not hold: the robot uploads those.
        """
        if type(items) is not list or len(items) > 100_000:
            raise OpError("'w' must be a list of [handle, descriptor, digest]")
        missing = []
        for i, item in enumerate(items):
            if type(item) is not list or len(item) != 3 or type(item[1]) is not dict or type(item[2]) is not str:
                raise OpError("an adopted weight is [handle, descriptor, digest]")
            hd, desc, dg = item
            shape, stride = desc.get("sh"), desc.get("st")
            flat = self.cache.get(desc.get("dt"), dg) if self.cache is not None else None
            if flat is None or not codec.dense_desc(shape, stride, flat.numel()):
                missing.append(i)
                continue
            self._reserve(flat.numel() * flat.element_size())
            self._bind(hd, flat.clone().as_strided(shape, stride, 0))
        return {"missing": missing}

    def _op(self, h: dict, frames: list) -> tuple[dict, list]:
        info = self.ops.resolve(h.get("op"))
        descs = h.get("in") or []
        if not isinstance(descs, list) or len(descs) != len(frames):
            raise OpError("inline tensor descriptors do not match the frames sent")

        def inline(i):
            if not 0 <= i < len(frames):
                raise OpError(f"inline tensor {i} was not sent")
            return self.to_device(codec.frame_tensor(descs[i], frames[i], self.limits.max_tensor_bytes))

        a, k = h.get("a", []), h.get("k", {})
        if not isinstance(a, list) or not isinstance(k, dict):
            raise OpError("op arguments must be a list 'a' and an object 'k'")
        args = codec.decode_value(a, self.tensor, inline, self.device, None, self.generator_of)
        kwargs = {key: codec.decode_value(v, self.tensor, inline, self.device, None, self.generator_of)
                  for key, v in k.items()}
        result, outs, inputs = self.execute(info, args, kwargs, h.get("o", []), h.get("ob"))
        if "q" not in h:
            return {}, []
        if "ob" in h:  # tell the robot what came out
            return self.named_outputs_reply(result, outs, inputs), []
        return ({} if isinstance(result, (torch.Tensor, list, tuple)) else {"v": codec.encode_result(result)}), []

    @staticmethod
    def named_outputs_reply(result, outs: list, inputs: dict) -> dict:
        """The reply to an op whose outputs the server named: each output's metadata, or the input it is."""
        reply: dict = {"m": [{"a": inputs[id(t)]} if id(t) in inputs else
                             [list(t.shape), list(t.stride()), t.storage_offset(), codec.dtype_name(t.dtype)]
                             for t in outs]}
        if not isinstance(result, (torch.Tensor, list, tuple)):
            reply["v"] = codec.encode_result(result)
        return reply

    def execute(self, info: OpInfo, args: list, kwargs: dict, handles, named_base=None):
        """Run one op and bind its outputs to ``handles`` (or to ``named_base + i``).

        Returns (result, output tensors, input positions by id when outputs were named here).
        """
        if info.writes:
            self.layout_generation += 1
        return self.execute_sized(info, args, kwargs, handles, self.sizes.outputs(info, args, kwargs), named_base)

    def _defined(self, result: tuple, metas: list) -> tuple:
        """An output a kernel left undefined (None) where its meta kernel, which the robot sized
        it with, gives an empty tensor (``_native_multi_head_attention``'s weights when none
        were asked for): that empty tensor, so robot and server agree on the outputs."""
        return tuple(torch.empty(m.shape, dtype=m.dtype, device=self.device) if r is None and 0 in m.shape else r
                     for r, m in zip(result, metas))

    def execute_sized(self, info: OpInfo, args: list, kwargs: dict, handles, metas, named_base=None):
        """``execute`` with the op's output metadata already checked (``self.sizes.outputs``):
        a program step checks again only when its inputs' layouts change."""
        if metas is not None:
            self._reserve(sum(m.new_bytes for m in metas))
        if info.generator_arg and kwargs.get(info.generator_arg) is None:
            self._inject_generator(info, args, kwargs)
        result = info.op(*args, **kwargs)
        self.ops_run += 1
        if type(result) is tuple and metas is not None and len(metas) == len(result) and \
                any(r is None for r in result):
            result = self._defined(result, metas)
        outs = [result] if type(result) is torch.Tensor else flat_tensors(result, [])
        inputs = None
        if named_base is not None:  # the robot could not predict the outputs: name them base, base+1, ...
            inputs = {id(t): i for i, t in enumerate(flat_tensors([args, list(kwargs.values())], []))}
            if type(named_base) is not int or len(outs) > MAX_NAMED_OUTPUTS:
                raise OpError("bad output handle base")
            handles = [None if id(t) in inputs else named_base + i for i, t in enumerate(outs)]
        elif not isinstance(handles, list) or (handles and len(handles) != len(outs)):
            raise OpError(f"{info.op.name()} returns {len(outs)} tensors but {len(handles)} handles were given")
        self.bind_outputs(info, outs, handles, None if named_base is not None else metas, args, kwargs)
        return result, outs, inputs

    def bind_outputs(self, info: OpInfo, outs: list, handles: list, metas: list | None, args, kwargs,
                     zeroed: bool = False) -> None:
        """Bind an op's output tensors to ``handles``, each first made to the layout ``metas``
        promised the robot (``outs`` updated in place); ``args``/``kwargs``: the op's arguments.
        ``zeroed``: uninitialised outputs were zeroed where they were made (a captured segment,
        whose later steps may have written them since)."""
        if metas is not None:  # the robot predicted these outputs: hold it to that
            for j, (t, m) in enumerate(zip(outs, metas)):
                if t.dtype != m.dtype or t.shape != m.shape or t.stride() != m.stride or m.grows_input:
                    outs[j] = t = self._conform(info, t, m, args, kwargs)
                    if m.grows_input and not isinstance(t, str):
                        self._regrow(t)
        for hd, t in zip(handles, outs):
            if hd is None:
                continue
            if isinstance(t, str):
                self._unusable(hd, t)
            else:
                if info.uninitialised and not zeroed:
                    t.untyped_storage().fill_(0)  # all of it: strides with gaps leave bytes unseen
                self._bind(hd, t)

    # -- recorded programs ---------------------------------------------------------------

    def _register(self, h: dict, frames: list) -> tuple[dict, list]:
        drop = h.get("drop")
        if type(drop) is int:
            drop = [drop]
        if drop is not None and (type(drop) is not list or len(drop) > MAX_PROGRAMS):
            raise OpError("'drop' names the programs to drop: a program number or a short list of them")
        for pid in drop or ():
            dropped = self.programs.pop(pid, None) if type(pid) is int else None
            if dropped is not None:
                dropped.release(self)
                run = self._ahead_runs.pop(pid, None)
                if run is not None:
                    run.release(self)
        if len(self.programs) >= MAX_PROGRAMS:
            raise OpError(f"this session holds {MAX_PROGRAMS} programs, the most it may; drop one first", kind="quota")
        prog = Program.decode(h, frames, self)
        self.programs[prog.pid] = prog
        log.info("session %s: program %d registered (%d steps)", self.token[:8], prog.pid, len(prog.steps))
        return {}, []

    def _run_programs(self, runs, dead: frozenset) -> None:
        """Run the confirmed steps a message carries in ``pre``: [[program, base, from, to, slots], ...]."""
        if type(runs) is not list or len(runs) > 64:
            raise OpError("'pre' must be a short list of program runs")
        for run in runs:
            prog, base, a, b, slots = self._program_run(run)
            prog.run(self, base, a, b, slots, dead)
            self.programs_run += 1

    def _program_run(self, run) -> tuple:
        """A run [program, base, from, to, [slot, handle, ...]], checked: (program, base, from, to, slots)."""
        if type(run) is not list or len(run) != 5 or not all(type(v) is int for v in run[:4]) \
                or type(run[4]) is not list:
            raise OpError("a program run is [program, base, from, to, [slot, handle, ...]]")
        pid, base, a, b, flat = run
        prog = self.programs.get(pid)
        if prog is None:
            raise OpError(f"program {pid} is not registered in this session (dropped, or its tensors freed)")
        if not 0 <= a <= b <= len(prog.steps) or not 0 < base < MAX_HANDLE:
            raise OpError(f"bad run of program {pid}: steps {a}..{b}, base {base}")
        if len(flat) % 2:
            raise OpError("run slots must come in (slot, handle) pairs")
        return prog, base, a, b, dict(zip(flat[::2], flat[1::2]))

    def _check_ahead(self, ah, aq, ad=None) -> tuple:
        """Validate a run-ahead request: 'ah' a program run, 'aq' a reply number per wait in it,
        'ad' (when it changed) the outputs the robot expects to drop within each iteration, as
        (first, count) runs of offsets (``Program.expect_dropped``)."""
        prog, base, a, b, slots = self._program_run(ah)
        unsettled = self._ahead_runs.pop(prog.pid, None)
        if unsettled is not None:  # never settled (the robot moved on): keep what it did
            unsettled.release(self)
        if ad is not None:  # (first: the robot counts on it from now on, run ahead or not)
            prog.expect_dropped(self, _offsets(ad, prog.outputs))
        if type(aq) is not list or not all(type(q) is int for q in aq) \
                or len(aq) != sum(prog.answered[a:b]):
            raise OpError("a run ahead needs one reply number in 'aq' per wait in its steps")
        return prog, base, a, b, slots, aq

    def _send(self, reply: dict, frames: list) -> None:
        if self._clocked is not None:
            n, arrived = self._clocked
            self._clocked = None
            reply["sv"] = [n, round(time.perf_counter() - arrived, 6)]
        self._send_frames([self.identity, *codec.pack(reply, frames)])

    def _answer_ahead(self, header: dict) -> None:
        """Run ahead what the message asked for; every number in 'aq' gets exactly one reply."""
        job, self._ahead_job = self._ahead_job, None
        aq = header["aq"]
        if job is not None:
            prog, base, a, b, slots, seqs = job
            self._ahead_runs[prog.pid] = prog.ahead(self, base, a, b, slots, seqs, self._send)
            self.programs_run += 1
            return
        if type(aq) is not list:
            return
        # Not run (the message failed, the program is gone): the robot confirms from where
        # it asked and asks for each wait itself. An error of the message shows there.
        ah = header.get("ah")
        start = ah[2] if type(ah) is list and len(ah) > 2 and type(ah[2]) is int else 0
        for q in aq[:100_000]:
            if type(q) is int:
                self._send({"q": q, "stop": start}, [])

    def _settle(self, cf) -> None:
        """The robot's word on the last run ahead: 'cf' [program, base, steps reached, [slot, handle, ...]]."""
        if type(cf) is not list or len(cf) not in (4, 5) or not all(type(v) is int for v in cf[:3]) \
                or type(cf[3]) is not list or len(cf[3]) % 2 or len(cf) == 5 and type(cf[4]) is not list:
            raise OpError("a confirmation is 'cf': [program, base, steps reached, [slot, handle, ...]"
                          "(, [offset, ...] of outputs the robot expected to drop and holds)]")
        run = self._ahead_runs.pop(cf[0], None)
        if run is None or run.base != cf[1]:
            if run is not None:
                run.release(self)
            return  # nothing ran ahead for it (refused, or the program was dropped)
        if not 0 <= cf[2] <= len(run.program.steps):
            run.release(self)
            raise OpError(f"bad confirmation: step {cf[2]} of program {cf[0]}")
        try:
            held = frozenset(o for o in cf[4] if type(o) is int) & run.program.outputs if len(cf) == 5 else frozenset()
            run.settle(self, cf[2], dict(zip(cf[3][::2], cf[3][1::2])), held)
        except Exception as e:  # noqa: BLE001 - confirmed steps failing: like a deferred op failing
            self.error = ("op_failed", f"a step of program {cf[0]} failed on the server: {short_error(e)}"
                          " (reported at the next request; ops after it were skipped)")

    def born_in_iteration(self, t: torch.Tensor, base: int) -> bool:
        """Whether ``t``'s storage was first bound to a handle of the iteration starting at ``base``."""
        entry = self._storages.get(t.untyped_storage()._cdata)
        return entry is not None and base <= entry[2] < base + ITERATION_HANDLES

    def reserve(self, nbytes: int) -> None:
        """Refuse (OpError "quota") if ``nbytes`` more would take the session over its memory limit."""
        self._reserve(nbytes)

    def hold(self, nbytes: int) -> None:
        """Count (or, negative, stop counting) bytes the session keeps outside its handles."""
        if nbytes > 0:
            self._reserve(nbytes)
        self.live_bytes += nbytes

    def free_handles(self, handles: list) -> None:
        self._free(handles)

    def generator_of(self, number) -> torch.Generator:
        """The session's generator ``number`` (made, seeded as torch seeds a new one, when first named)."""
        if type(number) is not int or not 0 <= number < codec.MAX_GENERATORS:
            raise OpError(f"a generator number is an integer in [0, {codec.MAX_GENERATORS}), not {str(number)[:20]}")
        g = self.generators.get(number)
        if g is None:
            g = self.generators[number] = torch.Generator(device=self.device)
            g.manual_seed(CUDA_DEFAULT_SEED)
        return g

    def _generator_state(self, h: dict, frames: list) -> tuple[dict, list]:
        """``rng``: a generator's state as a uint8 tensor, or (``d`` and one frame) set it."""
        g = self.generator_of(h.get("g"))
        if "d" not in h:
            return self.download(g.get_state(), private=True)
        if len(frames) != 1:
            raise OpError("a generator's new state comes as one frame")
        state = codec.frame_tensor(h["d"], frames[0], codec.MAX_GENERATOR_STATE)
        if state.dtype != torch.uint8 or state.dim() != 1:
            raise OpError(f"a generator's state is a 1-D uint8 tensor, not {list(state.shape)} {state.dtype}")
        try:
            g.set_state(state)
        except RuntimeError as e:  # (the wrong size for this server's kind of generator)
            raise OpError(f"this server's generator does not take that state: {e}") from None
        return {}, []

    def _inject_generator(self, info: OpInfo, args: list, kwargs: dict) -> None:
        for i, a in enumerate(info.op._schema.arguments):
            if a.name == info.generator_arg:
                if not a.kwarg_only and i < len(args):
                    args[i] = self.generator
                else:
                    kwargs[a.name] = self.generator

    def _conform(self, info: OpInfo, t: torch.Tensor, meta: OutputMeta, args, kwargs) -> torch.Tensor | str:
        """The output in the layout its meta kernel promised the robot.

        Where a kernel disagrees with its meta kernel on shape or dtype (CPU batch norm in
        eval returns empty statistics), the output becomes a reason string: the handle is
        then unusable rather than wrong.
        """
        shape, stride, dtype = meta.shape, meta.stride, meta.dtype
        how = output_binding(t, meta, args, kwargs)
        if how is None:
            return t
        if how == "unusable":
            key = (info.op.name(), tuple(t.shape), t.dtype, shape, dtype)  # every run of a program step
            reason = _REASONS.get(key)
            if reason is None:
                if len(_REASONS) >= 1024:  # (shapes are the robots' to choose: the cache stays small)
                    _REASONS.clear()
                reason = _REASONS[key] = (
                    f"{key[0]} produced a {list(t.shape)} {t.dtype} tensor here where its meta kernel "
                    f"promised {list(shape)} {dtype}, so rrto cannot use this output")
            return reason
        if how == "view":
            # (A copy here cost the keypoint net two: the input's and the first convolution's,
            # whose kernel read the stray stride as channels-last.)
            return t.as_strided(shape, stride, t.storage_offset())
        if how == "refused":
            raise OpError(f"{info.op.name()} returned a view whose layout differs from its meta kernel's")
        out = torch.empty_strided(shape, stride, dtype=dtype, device=t.device)
        if not codec.is_dense(shape, stride):  # else the copy writes every byte
            out.untyped_storage().fill_(0)
        out.copy_(t)
        return out

    def download(self, t: torch.Tensor, private: bool = False) -> tuple[dict, list]:
        """A tensor's reply; ``private``: a copy, for a reply that leaves while later steps may
        write the tensor in place (a run ahead goes on while zmq still sends)."""
        if t.device.type != "cpu":
            t = t.to("cpu")
        elif private:
            t = t.clone()
        desc, buf, _ = codec.tensor_frame(t)
        return {"d": desc}, [buf]

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t.clone(memory_format=torch.preserve_format)
        return t.to(self.device, non_blocking=False)

    # -- the handle table ------------------------------------------------------------

    def tensor(self, h) -> torch.Tensor:
        try:
            return self.handles[h]
        except (KeyError, TypeError):
            if h in self.unusable:
                raise OpError(self.unusable[h]) from None
            raise OpError(f"tensor handle {str(h)[:20]} is not one of this session's tensors "
                          "(never created here, already freed, or its producing op failed)") from None

    def _reserve(self, nbytes: int) -> None:
        if self.live_bytes + nbytes > self.limits.max_session_bytes:
            raise OpError(f"session memory limit reached: {self.live_bytes / 2**20:.1f} MiB held, "
                          f"{nbytes / 2**20:.1f} MiB more asked, limit "
                          f"{self.limits.max_session_bytes / 2**20:.0f} MiB: free tensors the app no longer needs, "
                          "or ask for a server started with a larger --max-session-mb", kind="quota")

    def _check_new(self, h) -> None:
        if type(h) is not int or not 0 < h < MAX_HANDLE:
            raise OpError(f"bad tensor handle {str(h)[:20]}")
        if h in self.handles or h in self.unusable:
            raise OpError(f"tensor handle {h} is already in use in this session")
        if len(self.handles) + len(self.unusable) >= self.limits.max_handles:
            raise OpError(f"session holds {len(self.handles)} tensors, the most this server allows", kind="quota")

    def _bind(self, h, t: torch.Tensor) -> None:
        self._check_new(h)
        self.handles[h] = t
        st = t.untyped_storage()
        entry = self._storages.get(st._cdata)
        if entry is None:
            self._storages[st._cdata] = [st.nbytes(), 1, h]
            self.live_bytes += st.nbytes()
        else:
            entry[1] += 1

    def _unusable(self, h, reason: str) -> None:
        self._check_new(h)
        self.unusable[h] = reason

    def _regrow(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        entry = self._storages.get(st._cdata)
        if entry is not None and entry[0] != st.nbytes():
            self.live_bytes += st.nbytes() - entry[0]
            entry[0] = st.nbytes()

    def _free(self, handles) -> None:
        if not handles or type(handles) is not list:
            return
        if self.programs:
            freed = {h for h in handles if type(h) is int}
            for pid in [p.pid for p in self.programs.values() if not p.persistent.isdisjoint(freed)]:
                del self.programs[pid]  # it names a tensor that is gone
        for h in handles:
            t = self.handles.pop(h, None) if type(h) is int else None
            if t is None:
                if type(h) is int:
                    self.unusable.pop(h, None)
                continue
            key = t.untyped_storage()._cdata
            entry = self._storages[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._storages[key]
                self.live_bytes -= entry[0]


_REASONS: dict = {}  # why an output is unusable, formatted once per kind of disagreement


def _frees(header: dict) -> list:
    """The handles a message frees: ``fr`` (single handles) and ``frr`` (first, count, first,
    count, ...), the runs bounded so that a message cannot make the server count for long."""
    fr, runs = header.get("fr"), header.get("frr")
    out = [h for h in fr if type(h) is int] if type(fr) is list else []
    if type(runs) is not list or len(runs) % 2 or not all(type(v) is int for v in runs):
        raise OpError("'frr' must be a list of (first handle, count) pairs of integers")
    total = 0
    for first, count in zip(runs[::2], runs[1::2]):
        total += count
        if count < 1 or total > MAX_FREES:
            raise OpError(f"'frr' frees 1 to {MAX_FREES} handles a message, in runs of at least one")
        out += range(first, first + count)
    return out


def _offsets(runs, outputs: frozenset) -> frozenset:
    """A program's output offsets from (first, count) runs, bounded by the program's own count."""
    if type(runs) is not list or len(runs) % 2 or not all(type(v) is int for v in runs):
        raise OpError("'ad' must be a list of (first offset, count) pairs of integers")
    counts = runs[1::2]
    if any(c < 1 for c in counts) or sum(counts) > len(outputs):
        raise OpError(f"'ad' names 1 to {len(outputs)} outputs of the program, in runs of at least one")
    return frozenset(o for first, count in zip(runs[::2], counts) for o in range(first, first + count)) & outputs


def _frame(frames: list, i: int):
    if i >= len(frames):
        raise OpError(f"request needs tensor frame {i} but carries {len(frames)}")
    return frames[i]
