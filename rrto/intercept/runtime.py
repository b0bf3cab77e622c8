"""The robot's side of an offload: every aten op on the virtual cuda device comes here.

For each op the runtime needs the outputs' metadata without waiting for the server.
It runs the op's meta kernel on metadata-only tensors once per signature (shapes,
strides, dtypes and scalar arguments) and caches the resulting *plan*: which outputs
are new tensors with which metadata, which alias an input (in-place ops), or that
the op's outputs depend on data (``nonzero``, ``item()``), in which case the server
runs it and replies with what came out. Then the op goes to the eager streamer.

Faults: every op also leaves a recipe for its outputs' values (``lineage``). When
the server is lost (``LinkError``), the runtime warns once, runs every op on the
robot's CPU from those values, and reconnects in the background; at the next
inference boundary (an upload, a download, a synchronize) it offloads again, a new
session (``epoch``): tensors from before are re-uploaded when an op first needs them.
"""
from __future__ import annotations

import collections
import functools
import gc
import itertools
import math
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .. import codec
from ..config import Config
from ..errors import LinkError, RemoteError, RrtoError, UnsupportedOpError
from ..record import CONSTANT_BYTES, GET, MODEL_STATE, OP, PUT, RNG, SEED, SYNC, Event, name_key
from ..replay.replayer import Replayer, Shared, cpu_bytes
from ..replay.streamer import EagerStreamer
from ..stats import Stats
from ..transport import HOLD, Link
from . import lineage
from .generators import GeneratorRef
from .remote_tensor import RemoteTensor, TensorMeta, remote, set_meta

aten = torch.ops.aten
_META = torch.device("meta")
# Ops that accept CPU tensors of any size beside cuda ones, as real CUDA does.
_CPU_ARGS_OK = {aten.copy_.default, aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
_MAX_PLANS = 100_000
_NAMED_OUTPUTS = 256  # handle block for outputs only the server can size (see server MAX_NAMED_OUTPUTS)
RECONNECT_EVERY = 0.5  # seconds between reconnection attempts after a fault
# Threads with a replayer of their own (replay mode); more share one, as all threads did
# before (mostly eagerly: their calls interleave). The server keeps 16 programs per session.
MAX_THREAD_REPLAYERS = 8
_get_ident = threading.get_ident


def _one_thread_at_a_time(method):
    """``method`` of the Runtime, run holding its lock (see ``Runtime.__init__``)."""
    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with self._lock:
            if self._thread != _get_ident():
                self._enter_thread()
            if self._frees:
                self._free_dead()
            return method(self, *args, **kwargs)
    return serialized


class _OthersGoOn:
    """Held while an app thread waits for the server and other threads replay: rrto's lock is
    let go (all the way: the wait is inside a call), so their walks overlap this wait.

    Only a thread with a replayer of its own waits so: nothing another thread does touches
    that replayer meanwhile, except taking its run ahead back (``_keep_threads_in_order``),
    which waits for this wait to end."""
    __slots__ = ("rt", "rep", "saved")

    def __init__(self, rt: "Runtime", rep: Replayer):
        self.rt, self.rep = rt, rep

    def __enter__(self) -> None:
        rt = self.rt
        rt._aside.add(self.rep)
        self.saved = rt._lock._release_save()  # (what threading.Condition.wait does with an RLock)

    def __exit__(self, *exc) -> None:
        rt = self.rt
        rt._lock._acquire_restore(self.saved)
        rt._aside.discard(self.rep)
        rt._back.notify_all()
        if rt._thread != _get_ident():
            rt._enter_thread()


class Alias:
    """An op output that is one of its input tensors (in-place and out= ops).

    ``meta`` is set when the op changes that tensor's shape or strides (``resize_`` of
    an ``out=`` tensor, ``unsqueeze_``): the robot-side tensor then takes it on.
    """
    __slots__ = ("index", "meta")

    def __init__(self, index: int, meta: TensorMeta | None = None):
        self.index, self.meta = index, meta


@dataclass
class Plan:
    name: str  # wire name, e.g. "aten::add.Tensor"
    template: Any = None  # the result with TensorMeta / Alias leaves
    server_shapes: bool = False  # outputs depend on data: the server names and sizes them
    local: bool = False  # answered from metadata alone (template is the value)
    uploads: int = 0  # CPU tensors that travel inline with the op
    pattern: tuple | None = None  # per output: new tensor (True) or an input given back (False)
    nkey: int = 0  # the op log's level-1 key
    lin: Any = None  # lineage.Lin: how its outputs' values follow from its inputs' (made on first use)
    all_new: bool = False  # the result is a tuple of new tensors, nothing else
    key: Any = None  # the signature it is cached under: the one object every call with it records
    writes: bool = False  # the op writes one of its arguments in place


class Runtime:
    def __init__(self, config: Config, link: Link, server_info: dict, stats: Stats):
        # One app thread at a time inside: robot apps run models from several threads (ROS
        # callbacks); interleaved, two threads took the same replay step (one handle, two tensors).
        self._lock = threading.RLock()
        self._aside: set = set()  # replayers whose threads wait for the server without the lock
        self._back = threading.Condition(self._lock)  # one of them took the lock back
        self._frees: collections.deque = collections.deque()  # handles of dead RemoteTensors
        # ``release(handle)``: a RemoteTensor died (``__del__``: in any thread, at any allocation,
        # maybe inside the runtime). Its handle is freed at the runtime's next call, by whichever
        # thread makes it: a free rides on the next message anyway, and waiting for the lock here
        # could deadlock. (The deque's own append: no Python frame per dead tensor.)
        self.release = self._frees.append
        self.config, self.link, self.info, self.stats = config, link, server_info, stats
        self.allowed = frozenset(server_info.get("allowed", ()))
        self.streamer = EagerStreamer(link, _handle_of, wait_every_op=config.mode == "rpc")
        self.replayer: Replayer | None = None  # the replayer of the thread inside (self._thread)
        self._thread = _get_ident()
        self._replayers: dict[int, Replayer] | None = None  # replay mode: app thread -> its replayer
        self._replaying: tuple = ()  # the replayers that registered a program (they follow frees)
        self._several = False  # more than one thread has a replayer: their calls are kept in order
        self.copies: dict | None = None  # lop: handle -> the robot's CPU copy of what it uploaded
        self.lop = None
        if config.mode in ("lop", "partition"):
            self.copies = {}
        self._new_replayer(None)
        self._warned_register = False
        # faults: lost is True while ops run on the robot's CPU; epoch counts server sessions
        self.lost, self.epoch = False, 0
        self.reopen = None  # (dropped session token) -> (Link, hello reply): set by the launcher
        self._fresh: tuple | None = None  # a reconnected (link, info), taken at the next inference boundary
        self._reconnector: threading.Thread | None = None
        self._lost_at = 0.0
        self._deep: list = []  # weak refs to tensors whose recipe grew long: fetched at the next wait
        self._weights: weakref.WeakSet = weakref.WeakSet()  # storages of uploaded parameters
        self._handles = itertools.count(1)
        self._blocks = itertools.count(2**52, _NAMED_OUTPUTS)
        self._plans: dict = {}
        self._names: dict = {}
        # a replayed inference: when its input went up, and the robot's walk from there to the first wait
        self._walk_from, self._walk = 0.0, None
        self._inference_from = 0.0  # when its input went up (lop: the inference's latency ends at its last reply)
        self.closed = False
        self._last_sync = (time.perf_counter(), stats.messages_sent, stats.round_trips,
                           stats.bytes_sent, stats.bytes_received)
        # Exiting while this thread is inside torch's C++ aborts the process: close() joins it.
        self._warm_up = threading.Thread(target=_warm_up_meta_kernels, name="rrto-warm-up", daemon=True)
        self._warm_up.start()

    # -- the hot path ----------------------------------------------------------------

    def call(self, func, args: tuple, kwargs: dict, first: bool = False):
        """Run one aten op whose tensors (or device) are on the virtual cuda device.

        ``first``: the caller keeps the first output only and drops the others at once (batch
        norm's shortcut). A replayed op then makes no RemoteTensors for them: they come back
        as None and their handles are freed here, as their wrappers' deaths would.
        """
        lock, frees = self._lock, self._frees
        lock.acquire()
        try:
            if self._thread != _get_ident():
                self._enter_thread()
            while frees:
                self._release(frees.popleft())
            return self._call(func, args, kwargs, first)
        finally:
            lock.release()

    def _call(self, func, args: tuple, kwargs: dict, first: bool):
        if self.closed:
            raise RrtoError(f"{func}: this tensor belongs to an rrto session that has ended "
                            "(rrto.disable() was called); its data is gone with the server")
        self.stats.ops_intercepted += 1
        special = _SPECIAL.get(func)
        if special is not None:
            out = special(self, func, args, kwargs)
            if out is not NotImplemented:
                return out
        tensors: list = []
        kinds: list = []
        sig = key = (func, _sig(args, tensors, kinds), _sig(kwargs, tensors, kinds) if kwargs else None)
        if float in kinds or bool in kinds:  # 1, 1.0 and True are equal keys but promote differently
            key = (*sig, tuple(kinds))
        if self.epoch and not self.lost:
            self._revive(tensors)
        if self.lost:
            self.stats.local_ops += 1
            return lineage.run_here(self, func, sig, tensors)
        try:
            plan = self._plans.get(key)
        except TypeError:  # an unhashable argument: plan without caching
            key, plan = None, None
        if plan is None:
            self.stats.meta_cache_misses += 1
            plan = self._plan(func, args, kwargs, tensors)
            if key is not None:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
                plan.key = key
        else:
            self.stats.meta_cache_hits += 1
            # An equal key, and the very object the recorded steps hold: the replayer's check of
            # this call against its step is then an identity test, not a walk of two signatures.
            key = plan.key
        if plan.local:
            return self._materialize(plan.template, tensors, [], self._handles, [])
        if plan.uploads:
            self.stats.uploads += plan.uploads
        rep = self.replayer
        if self._several:
            flying = self._shared.flying
            if flying and (len(flying) > 1 or rep not in flying) and \
                    self._keep_threads_in_order(plan.writes, tensors):
                self.stats.ops_intercepted -= 1  # (it waited for another thread: look at the call afresh)
                return self._call(func, args, kwargs, first)
        if rep is not None and rep.program is not None:
            if plan.server_shapes:
                step = rep.match("shaped", key, tensors, None)
                if step is not None:
                    return self._run_server_shaped(func, plan, args, kwargs, tensors, key, sig, step)
            else:
                step = rep.match(OP, key, tensors, plan.pattern)
                if step is not None:  # no message: the server runs it with the next one
                    node = self._lineage(plan, func, sig, tensors)
                    tpl = plan.template
                    if type(tpl) is TensorMeta:  # one new tensor (most ops): no lists, no iterator
                        h = rep.base + step.out_offsets[0]
                        out = remote(tpl, h, self)
                        self._attach(node, tensors, (out,))
                        if rep.unstable:
                            rep.log_replayed(step, key, tensors, (h,))
                        return out
                    if first and plan.all_new:  # (two wrappers of three, made and freed, per batch norm)
                        base, offs = rep.base, step.out_offsets
                        out = remote(tpl[0], base + offs[0], self)
                        made = [None] * len(offs)
                        made[0] = out
                        self._attach(node, tensors, made)
                        if rep.unstable:
                            rep.log_replayed(step, key, tensors, [base + o for o in offs])
                        for o in offs[1:]:
                            self._release(base + o)
                        return made
                    base, handles, made = rep.base, [], []
                    fresh = iter([base + o for o in step.out_offsets if o is not None])
                    out = self._materialize(plan.template, tensors, handles, fresh, made)
                    self._attach(node, tensors, made)
                    if rep.unstable:
                        rep.log_replayed(step, key, tensors, handles)
                    return out
        if plan.server_shapes:
            return self._run_server_shaped(func, plan, args, kwargs, tensors, key, sig)
        handles, made = [], []
        node = self._lineage(plan, func, sig, tensors)
        out = self._materialize(plan.template, tensors, handles, self._handles, made)
        self._attach(node, tensors, made)
        try:
            self.streamer.op(plan.name, args, kwargs, handles)
        except LinkError as e:
            self._lose(e)  # the outputs' recipes are recorded: their values can be made here
            return out
        if self.copies is not None and func in _DERIVED and type(out) is RemoteTensor:
            self._derive_copy(func, args, kwargs, out)
        if rep is not None:
            rep.record(self._event(plan, key, tensors, handles))
        return out

    def _event(self, plan: Plan, key, tensors: list, outs, shaped: bool = False) -> Event:
        """The op log's entry for an op just sent."""
        cpu = tuple(cpu_bytes(t) for t in tensors if type(t) is not RemoteTensor)
        return Event(OP, plan.nkey, key, tuple(_handle_of(t) for t in tensors), cpu, tuple(outs),
                     self.streamer.last_header, tuple(b for b in cpu if b is not None), shaped)

    def _materialize(self, tpl, tensors: list, handles: list, fresh, made: list):
        """The op's result from its template; new tensors take their handles from ``fresh``.

        ``made`` collects the result's tensors in order (for their lineage).
        """
        t = type(tpl)
        if t is TensorMeta:
            h = next(fresh)
            handles.append(h)
            out = remote(tpl, h, self)
            made.append(out)
            return out
        if t is Alias:
            handles.append(None)
            out = tensors[tpl.index]
            if tpl.meta is not None:
                _set_meta(out, tpl.meta)
            made.append(out)
            return out
        if t is tuple or t is list:  # (a loop: no generator object per multi-output op)
            out = []
            for x in tpl:
                out.append(self._materialize(x, tensors, handles, fresh, made))
            return out if t is list else tuple(out)
        return tpl

    def _lineage(self, plan: Plan, func, sig, tensors: list) -> lineage.OpNode:
        """The op's recipe, from its inputs as they are before it runs."""
        lin = plan.lin
        if lin is None:
            lin = plan.lin = lineage.info(func, sig, plan.template, tensors, Alias)
        return lineage.node(lin, func, sig, tensors)

    def _attach(self, node: lineage.OpNode, tensors: list, made: list) -> None:
        if lineage.attach(node, tensors, made) > lineage.MAX_DEPTH:
            self._deep += [weakref.ref(t) for t in made if type(t) is RemoteTensor]

    def _run_server_shaped(self, func, plan: Plan, args, kwargs, tensors: list, key, sig, step=None):
        rep = self.replayer
        base = next(self._blocks) if step is None else rep.base + step.spec["ob"]
        try:
            reply = None if step is None else self._answered_ahead(f"{plan.name}'s outputs")
            if reply is None:
                reply = self.streamer.op(plan.name, args, kwargs, [], wait=True, out_base=base)
            else:
                reply = reply[0]
        except LinkError as e:
            self._lose(e)
            self.stats.local_ops += 1
            return lineage.run_here(self, func, sig, tensors)
        header = self.streamer.last_header
        outs, handles = [], []
        for i, m in enumerate(reply.get("m", [])):
            if isinstance(m, dict):
                outs.append(tensors[m["a"]])
                handles.append(None)
            else:
                meta = TensorMeta(tuple(m[0]), tuple(m[1]), m[2], codec.dtype_of(m[3]))
                out = remote(meta, base + i, self)
                outs.append(out)
                handles.append(base + i)
        lin = lineage.shaped_info(func, sig, outs, [h is not None for h in handles])
        lineage.record(lin, func, sig, tensors, outs)
        if step is not None:
            if len(handles) != len(step.out_offsets):
                raise RrtoError(f"rrto internal error: {plan.name} gave {len(handles)} outputs on the server "
                                f"where the recording had {len(step.out_offsets)}")
            if rep.unstable:
                rep.log_replayed(step, key, tensors, handles)
        elif rep is not None:
            self.streamer.last_header = header
            rep.record(self._event(plan, key, tensors, handles, shaped=True))
        return _shape_result(func, outs, codec.decode_result(reply.get("v")))

    # -- planning (once per signature) -------------------------------------------------

    def _plan(self, func, args, kwargs, tensors: list) -> Plan:
        name = self._wire_name(func)
        if self.allowed and name not in self.allowed:
            raise UnsupportedOpError(
                f"rrto: {name} is not supported on the virtual cuda device (it is not on the allowlist of "
                f"the rrto server, torch {self.info.get('torch')}). Run this step on the CPU "
                "(move its inputs with .cpu()), or ask for the op to be added to server/ops.py.")
        for t in tensors:
            if type(t) is not RemoteTensor and t.dim() > 0 and func not in _CPU_ARGS_OK:
                raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                                   f"devices, cuda:0 and {t.device}! (in {name})")
        if kwargs.get("generator") is not None:
            codec.generator_marker(kwargs["generator"])  # (a CPU one raises here, before any output is made)
        uploads = sum(type(t) is not RemoteTensor for t in tensors)
        metas: list = []
        margs = _to_meta(args, metas)
        mkwargs = {k: _to_meta(v, metas) for k, v in kwargs.items()}
        try:
            res = codec.cuda_layout(func, margs, func(*margs, **mkwargs))
        except Exception as e:  # noqa: BLE001
            if isinstance(e, NotImplementedError) or "meta" in str(e).lower():
                return Plan(name, server_shapes=True, uploads=uploads, nkey=name_key(OP, name),  # data decides
                            writes=func._schema.is_mutable)
            raise
        index = {id(m): i for i, m in enumerate(metas)}
        template = _template(res, index, tensors)
        # Metadata answers it: no message. (An op that returns nothing is a check, such as
        # linalg.inv's for a singular matrix: the server runs it, to raise where a GPU would.)
        if not func._schema.is_mutable and func._schema.returns and (_no_tensors(res) or type(template) is Alias):
            return Plan(name, template=template, local=True)
        return Plan(name, template=template, uploads=uploads, pattern=_pattern(template, []),
                    nkey=name_key(OP, name), writes=func._schema.is_mutable,
                    all_new=type(template) is tuple and all(type(x) is TensorMeta for x in template))

    def _wire_name(self, func) -> str:
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = f"{func._schema.name}.{func._overloadname}"
        return name

    def _derive_copy(self, func, args, kwargs, out) -> None:
        """lop: the robot's copy of ``out``, the same op run on the copies of its inputs."""
        missing = []

        def cpu(x):
            if type(x) is RemoteTensor:
                c = self.copies.get(x._h)
                if c is None:
                    missing.append(x)
                return c
            if isinstance(x, (list, tuple)):
                return type(x)(cpu(y) for y in x)
            return torch.device("cpu") if isinstance(x, torch.device) else x
        a, k = cpu(args), {key: cpu(v) for key, v in kwargs.items()}
        if not missing:
            self.copies[out._h] = func(*a, **k)

    # -- data in and out ---------------------------------------------------------------

    @_one_thread_at_a_time
    def upload(self, src: torch.Tensor, dtype=None, memory_format=None, non_blocking=False,
               model_state: bool = False) -> RemoteTensor:
        """A CPU tensor's copy on the virtual device (``x.cuda()``, ``x.to("cuda")``).

        ``model_state``: a model's parameter or buffer on its way (``model.cuda()``, a checkpoint
        loaded to cuda). Its signature says so, as a Parameter's does: it never stands for an
        inference's input, whose recorded upload matches any shape (a new resolution)."""
        self.stats.uploads += 1
        if self._fresh is not None:
            self._resume()  # an inference boundary: offload again
        weight = isinstance(src, torch.nn.Parameter)  # kept by reference: the app drops its CPU copy
        src = src.detach()
        if dtype is not None and dtype != src.dtype and dtype.itemsize <= src.dtype.itemsize:
            src, dtype = aten._to_copy.default(src, dtype=dtype), None  # narrowing: convert before sending
        if memory_format not in (None, torch.preserve_format):
            src = src.contiguous(memory_format=memory_format)
        desc, buf, private = codec.tensor_frame(src)
        meta = TensorMeta(tuple(desc["sh"]), tuple(desc["st"]), 0, src.dtype)
        flat = torch.frombuffer(buf, dtype=torch.uint8).view(src.dtype) if len(buf) else torch.empty(0, dtype=src.dtype)
        if not (private or weight):
            # The robot keeps a copy (the lineage's): sending that one, the app may change its
            # tensor at once, and the upload need not wait until zmq has pushed every byte.
            flat, private = flat.clone(), True
            buf = memoryview(flat.view(torch.uint8).numpy()) if len(buf) else buf
        storage = lineage.leaf(flat, meta, weight)
        if weight:
            self._weights.add(storage)
        if self.lost:
            out = self.local_tensor(meta)
            out._st = storage
            return out if dtype is None or dtype == out.dtype else self.call(aten._to_copy.default, (out,),
                                                                             {"dtype": dtype})
        rep, step = self.replayer, None
        key = (PUT, meta, MODEL_STATE) if weight or model_state else (PUT, meta)
        value = bytes(buf) if len(buf) <= CONSTANT_BYTES else None  # (it may be a constant of the program)
        if rep is not None and rep.program is not None:
            step = rep.match_upload(key, value)
        h = rep.base + step.out_offsets[0] if step is not None else next(self._handles)
        # an inference's input, measured for lop's planner (its round trip, the walk after it)
        first = self.lop is not None and step is not None and step is rep.program.steps[0] and step.kind == PUT
        try:
            if first:
                self.link.clock_next()
                took, now = None, time.perf_counter()
                if 0.0 < self._inference_from < self.link.replied_at:
                    took = self.link.replied_at - self._inference_from
                self._inference_from = now
                self.lop.observe(self.link.transfers, self._walk, took)
                self._walk = None
            if first and self.lop.upload(src, rep.base, self.streamer, rep):
                pass  # sent as bands
            elif step is not None and step.kind == OP:
                pass  # a constant of the program: the server makes it
            else:
                self.streamer.put(h, desc, buf, wait_sent=not (private or non_blocking), cache=weight)
            if first:
                self._walk_from = time.perf_counter()
        except LinkError as e:
            self._lose(e)
        if self.copies is not None and step is None:
            self.copies[h] = src
        if rep is not None and not self.lost:
            if step is None or rep.unstable:  # (a replayed upload too: with the bytes it has now)
                rep.record(Event(PUT, name_key(PUT), key, outs=(h,), wire=None if value is None else {"in": [desc]},
                                 frames=() if value is None else (value,)))
        out = remote(meta, h, self)
        out._st = storage
        if dtype is not None and dtype != out.dtype:
            out = self.call(aten._to_copy.default, (out,), {"dtype": dtype})
        return out

    @_one_thread_at_a_time
    def download(self, t: RemoteTensor) -> torch.Tensor:
        """The tensor's data as a new CPU tensor (``.cpu()``, ``print``, ``.tolist()``)."""
        if self.closed:
            raise RrtoError("this tensor belongs to an rrto session that has ended (rrto.disable() was called)")
        if self._several and self._shared.flying and not self.lost:
            while self._keep_threads_in_order(False, [t]):
                pass  # (it waited for another thread, which may have lost the server meanwhile)
        self.stats.downloads += 1
        if self.lost or t._ep != self.epoch:  # the value is (or can be made) here
            cpu = lineage.value(t).clone()
            if self._fresh is not None:
                self._resume()
            return cpu
        rep, step = self.replayer, None
        key = (GET, t._meta)
        if rep is not None and rep.program is not None:
            step = rep.match(GET, key, [t])
        what = f"the download of a {list(t.shape)} {t.dtype} tensor"
        try:
            ahead = None if step is None else self._answered_ahead(what)
            if ahead is None:
                desc, frame = self.streamer.get(t._h, what=what, aside=self._others_go_on())
            else:
                desc, frame = ahead[0]["d"], ahead[1][0]
        except LinkError as e:
            self._lose(e)
            return lineage.value(t).clone()
        if rep is not None:
            if step is None:
                rep.record(Event(GET, name_key(GET), key, handles=(t._h,)))
            elif rep.unstable:
                rep.log_replayed(step, key, [t], ())
        cpu = codec.frame_tensor(desc, frame, max_bytes=1 << 62)
        if tuple(cpu.shape) != tuple(t.shape) or cpu.dtype != t.dtype:
            raise RrtoError(f"rrto internal error: the server holds a {list(cpu.shape)} {cpu.dtype} tensor "
                            f"where the robot expected {list(t.shape)} {t.dtype}")
        if self._deep:
            self._cut_deep()
        return cpu

    def _free_dead(self) -> None:
        pop = self._frees.popleft
        while self._frees:
            self._release(pop())

    def _release(self, handle: int) -> None:
        if self.copies is not None:
            self.copies.pop(handle, None)
            if self.lop.hold(handle):
                return
        if not self.closed and not self.lost:
            self.streamer.free(handle)
            for rep in self._replaying:
                rep.note_free(handle)

    # -- torch.cuda answers --------------------------------------------------------------

    @_one_thread_at_a_time
    def synchronize(self) -> None:
        self.stats.syncs += 1
        if self.lost:
            if self._fresh is not None:
                self._resume()
            return
        rep, step = self.replayer, None
        if rep is not None and rep.program is not None:
            step = rep.match(SYNC, (SYNC,), [])
        try:
            if step is None or (self._answered_ahead("the synchronize reply") is None and not rep.sync_folded()):
                self.streamer.request("sync", aside=self._others_go_on())
        except LinkError as e:
            self._lose(e)
            return
        if self._deep:
            self._cut_deep()
        if rep is not None:
            if step is None:
                rep.record(Event(SYNC, name_key(SYNC), (SYNC,)))
            elif rep.unstable:
                rep.log_replayed(step, (SYNC,), [], ())
        if self.config.progress:
            self._print_progress()

    @_one_thread_at_a_time
    def seed(self, seed: int, generator: int = 0) -> None:
        """Seed the server's generator ``generator`` of this session (0: its default one)."""
        seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        if self.lost:
            return  # ops run here now, on the robot's own generator
        rep, step = self.replayer, None
        key = (SEED, seed, generator) if generator else (SEED, seed)
        if rep is not None and rep.program is not None:
            step = rep.match(SEED, key, [])
        try:
            self.streamer.notify("seed", seed=seed, **({"g": generator} if generator else {}))
        except LinkError as e:
            self._lose(e)
            return
        if rep is not None:
            if step is None:
                rep.record(Event(SEED, name_key(SEED), key))
            elif rep.unstable:
                rep.log_replayed(step, key, [], ())

    @_one_thread_at_a_time
    def generator_state(self, generator: int, new_state: torch.Tensor | None = None) -> torch.Tensor | None:
        """The state of the server's generator ``generator`` (a CPU uint8 tensor), or set it to
        ``new_state``; None while the server is lost (the robot's stand-in holds the state then).

        A message of its own at its place in the sequence, in a replayed frame too: the server
        does not run ahead past it, so the state is the one after the app's ops before it."""
        if self.lost:
            return None
        if self._several and self._shared.flying:
            while self._keep_threads_in_order(True, []):
                pass  # (it waited for another thread, which may have lost the server meanwhile)
        rep, step = self.replayer, None
        key = (RNG, generator, new_state is None)
        if rep is not None and rep.program is not None:
            step = rep.match(RNG, key, [])
        fields, frames = {"g": generator}, []
        if new_state is not None:
            desc, buf, _ = codec.tensor_frame(new_state.contiguous())
            fields["d"], frames = desc, [buf]
        try:
            reply, got = self.streamer.exchange("rng", frames, **fields)
        except LinkError as e:
            self._lose(e)
            return None
        if rep is not None:
            if step is None:
                rep.record(Event(RNG, name_key(RNG), key))
            elif rep.unstable:
                rep.log_replayed(step, key, [], ())
        if new_state is not None:
            return new_state
        return codec.frame_tensor(reply["d"], got[0], max_bytes=codec.MAX_GENERATOR_STATE)

    def _answered_ahead(self, what: str) -> tuple[dict, list] | None:
        """The server's answer to the wait just matched, if it ran ahead to it; None: ask for it."""
        rep = self.replayer
        seq = rep.answered_ahead()
        if seq is None:
            return None
        if self._walk_from:  # the first wait since the input went up: the robot's walk ends here
            self._walk, self._walk_from = time.perf_counter() - self._walk_from, 0.0
        with self._others_go_on():
            reply = self.link.await_reply(seq, what)
        stop = reply[0].get("stop")
        if stop is not None:  # it could not go on alone
            try:
                rep.ahead_stopped(int(stop))
            except (TypeError, ValueError) as e:
                raise RrtoError(f"rrto internal error: {e}") from None
            return None
        self.stats.answered_ahead += 1
        return reply

    def _new_replayer(self, handles_from: int | None) -> None:
        """A replayer (and lop's band robot) for the current session: recording starts afresh.

        In replay mode each app thread gets a replayer of its own when it first calls in
        (``_enter_thread``): two threads running two models (a ROS node's camera and lidar
        callbacks) interleave their calls, and one replayer saw neither sequence repeat.
        """
        config = self.config
        if config.mode not in ("replay", "lop", "partition"):
            return
        self._shared = Shared() if handles_from is None else Shared(handles_from)
        self._dropped_pids: list = []  # programs of threads that ended: dropped with the next registration
        self._overflow: Replayer | None = None  # the replayer threads past MAX_THREAD_REPLAYERS share
        if self.lop is not None:
            self.lop.close()  # the old session's planner stops watching
            self.lop = None
        self.replayer = self._make_replayer()
        self._replaying, self._several = (), False
        self._thread = _get_ident()
        self.streamer.pre_source = self.replayer.take_fields
        if config.mode == "replay":
            self._replayers = {self._thread: self.replayer}
        if config.mode in ("lop", "partition"):
            from ..lop.planning import LossPlanner, default_speedup
            from ..lop.robot import LopRobot
            planner = None  # RRTO_LOP_PLANNER=fixed: lop.robot.default_plan, a fixed rule (tests)
            if config.mode == "partition" or os.environ.get("RRTO_LOP_PLANNER", "loss") != "fixed":
                planner = LossPlanner(self.copies, self._probe_link, default_speedup(self.info.get("device", "")), self.stats,
                                      layers_only=config.mode == "partition", verbose=config.progress,
                                      step_times=self._server_step_times)
            # lop keeps a band plan only if it measured faster than whole uploads; the baseline
            # (partition) and the fixed rule of the tests run their plans as chosen
            trial = config.mode == "lop" and planner is not None
            self.lop = LopRobot(self.copies, self.stats, planner=planner, verbose=config.progress, trial=trial)
            self.replayer.on_diverge = lambda pos: self.lop.diverged(pos, self.replayer, self.streamer)
            self.replayer.expect_drops = False

    def _make_replayer(self) -> Replayer:
        config, more = self.config, {}
        if config.ahead:
            more.update(reply_numbers=lambda n: self.link.reserve(n), forget_replies=lambda qs: self.link.forget(qs))
        self.stats.replayers += 1
        return Replayer(self.stats, self._register, config.repeats, verbose=config.progress, shared=self._shared,
                        **more)

    def _enter_thread(self) -> None:
        """Another app thread came in (holding the lock): its replayer answers from now on."""
        ident = self._thread = _get_ident()
        reps = self._replayers
        if reps is None:
            return  # not replay mode, or lop: one replayer (its band robot is one)
        rep = reps.get(ident)
        if rep is None:
            rep = reps[ident] = self._replayer_for_new_thread()
            self._several = len({id(r) for r in reps.values()}) > 1
        self.replayer = rep
        self.streamer.pre_source = rep.take_fields

    def _replayer_for_new_thread(self) -> Replayer:
        """The replayer of a thread that ended (an app that starts a thread per request goes on
        replaying), else a new one; past MAX_THREAD_REPLAYERS, one all further threads share."""
        reps = self._replayers
        threading.current_thread()  # (registers a thread started outside Python: it is not taken for ended)
        alive = {t.ident for t in threading.enumerate()}
        ended = [reps.pop(i) for i in list(reps) if i not in alive]
        if ended:
            kept = {id(r) for r in reps.values()}
            for old in ended[1:]:
                if id(old) not in kept and old is not ended[0] and old.program is not None:
                    self._dropped_pids.append(old.program.pid)  # (with the next registration)
                    self._shared.flying.discard(old)
                    self._replaying = tuple(r for r in self._replaying if r is not old)
            return ended[0]
        if len({id(r) for r in reps.values()}) < MAX_THREAD_REPLAYERS:
            return self._make_replayer()
        if self._overflow is None:
            self._overflow = self._make_replayer()
        return self._overflow

    def _keep_threads_in_order(self, writes: bool, tensors: list) -> bool:
        """Another thread's run ahead did its iteration before its app got there. Before this
        call touches a tensor of that iteration, or writes one outside its own (a weight, a
        buffer the threads share), the server takes that run back to where its thread is:
        what the call reads or writes then happens in the order the app's threads made it.

        True: that thread was waiting for the server, and this one waited for it to be back
        (not taken back under a wait, a run's steps could run twice); the call looks afresh."""
        rep = self.replayer
        handles = [t._h for t in tensors if type(t) is RemoteTensor]
        if writes and not (rep is not None and rep.pos and all(rep.in_iteration(h) for h in handles)):
            others = [r for r in self._shared.flying if r is not rep]
        else:
            others = [r for r in self._shared.flying if r is not rep and any(r.in_iteration(h) for h in handles)]
        if self._aside and any(r in self._aside for r in others):
            self._back.wait()
            if self._thread != _get_ident():
                self._enter_thread()
            return True
        for other in others:
            other.recall_ahead()
        self.stats.runs_recalled += len(others)
        return False

    def _others_go_on(self):
        """What a wait for the server holds: with other app threads replaying, it lets go of
        rrto's lock (a thread sharing its replayer with others keeps it)."""
        rep = self.replayer
        if not self._several or rep is None or rep is self._overflow:
            return HOLD
        return _OthersGoOn(self, rep)

    def _probe_link(self, nbytes: int) -> float:
        """Seconds for one round trip carrying ``nbytes`` up (lop measures the link with these)."""
        t0 = time.perf_counter()
        if nbytes:
            h = next(self._handles)
            t = torch.zeros(nbytes, dtype=torch.uint8)
            desc, buf, _ = codec.tensor_frame(t)
            self.streamer.put(h, desc, buf, wait_sent=True)
            self.streamer.free(h)
        self.streamer.request("sync")
        return time.perf_counter() - t0

    def _server_step_times(self, pid: int) -> list | None:
        """Seconds each step of program ``pid`` took on the server (lop's planner); None: unknown."""
        try:
            return self.streamer.request("times", p=pid).get("s")
        except (LinkError, RemoteError):  # a lost link shows at the app's next request
            return None

    @_one_thread_at_a_time
    def memory_allocated(self) -> int:
        if not self.lost:
            try:
                return int(self.streamer.request("mem")["allocated"])
            except LinkError as e:
                self._lose(e)
        return 0

    def _register(self, program, drop: int | None) -> bool:
        """Send an adopted program to the server; False (and eager from then on) if it refuses."""
        header, frames = program.spec()
        drops = ([] if drop is None else [drop]) + self._dropped_pids
        if drops:
            header["drop"] = drops
            self._dropped_pids = []
        if not self._register_spec(header, frames):
            return False
        if self.replayer not in self._replaying:  # (the registering thread's)
            self._replaying += (self.replayer,)
        if self.lop is not None:
            self.replayer.reserve = self.lop.adopt(program, self._register_spec)
        return True

    def _register_spec(self, header: dict, frames: list) -> bool:
        try:
            self.streamer.register(header, frames)
        except LinkError as e:
            self._lose(e)
            return False
        except RemoteError as e:
            if not self._warned_register:
                self._warned_register = True
                print(f"rrto: the server did not accept a recorded sequence ({e}); running it eagerly",
                      file=sys.stderr, flush=True)
            return False
        return True

    def _print_progress(self) -> None:
        s = self.stats
        now = (time.perf_counter(), s.messages_sent, s.round_trips, s.bytes_sent, s.bytes_received)
        d = [b - a for a, b in zip(self._last_sync, now)]
        self._last_sync = now
        print(f"rrto: sync {s.syncs}: {d[0] * 1e3:.1f} ms, {d[1]} messages, {d[2]} round trips, "
              f"{d[3] / 1e3:.1f} kB up, {d[4] / 1e3:.1f} kB down", file=sys.stderr, flush=True)

    @_one_thread_at_a_time
    def close(self) -> None:
        if self.closed:
            return
        self._warm_up.join(timeout=30.0)
        try:
            if not self.lost:
                self.streamer.bye()  # no reply to wait for: Link.close lingers briefly to deliver it
        finally:
            self.closed = True
            if self.lop is not None:
                self.lop.close()
            if self._reconnector is not None:
                self._reconnector.join(timeout=self.config.fault_timeout + 2 * RECONNECT_EVERY)
            if self._fresh is not None:
                self._fresh[0].close(linger=0)

    # -- faults: lose the server, run here, reconnect, offload again ---------------------

    @_one_thread_at_a_time
    def local_tensor(self, meta: TensorMeta) -> RemoteTensor:
        """A tensor made on the robot while the server is lost (no server handle yet)."""
        out = RemoteTensor(meta, next(self._handles), self)
        out._ep = -1
        return out

    @_one_thread_at_a_time
    def reshape_in_place(self, t: RemoteTensor, meta: TensorMeta) -> None:
        _set_meta(t, meta)

    def _lose(self, err: Exception) -> None:
        if self.lost or self.closed:
            return
        self.lost = True
        self.stats.faults += 1
        self._lost_at = time.monotonic()
        link = self.link
        why = str(err).split(". ")[0].replace(f"rrto-server at {link.url}", "it").replace(link.url, "it")
        print(f"rrto: lost the server at {link.url} ({why}): running on this machine's CPU; will reconnect",
              file=sys.stderr, flush=True)
        dropped = link.session
        link.close(linger=0)
        self.streamer.reset()
        self._deep.clear()
        if self.reopen is not None:
            self._reconnector = threading.Thread(target=self._reconnect, args=(dropped,), name="rrto-reconnect",
                                                 daemon=True)
            self._reconnector.start()

    def _reconnect(self, dropped: str | None) -> None:
        """Background: open a new session with the same server until one answers."""
        while not self.closed:
            time.sleep(RECONNECT_EVERY)
            if self.closed:
                return
            try:
                link, info = self.reopen(dropped)
            except Exception:  # noqa: BLE001 - not back yet: try again
                continue
            if self.closed:
                link.close(linger=0)
            else:
                self._fresh = (link, info)
            return

    def _resume(self) -> None:
        """Offload again over the reconnected link (at an inference boundary, in the app's thread)."""
        link, info = self._fresh
        self._fresh, self._reconnector = None, None
        self.link = self.streamer.link = link
        self.info, self.allowed = info, frozenset(info.get("allowed", ()))
        self.epoch += 1
        self.lost = False
        if self.replayer is not None:  # record again: the new session knows no program
            self._new_replayer(self.replayer.handles_used)
        self.stats.reconnects += 1
        self._adopt_weights()
        print(f"rrto: reconnected to {link.url} after {time.monotonic() - self._lost_at:.1f} s: offloading again",
              file=sys.stderr, flush=True)

    def _adopt_weights(self) -> None:
        """Give the new session the weights, by content digest where the server's cache still has them.

        One round trip names them all; only those the cache lacks are uploaded again.
        """
        sts = [st for st in list(self._weights) if st.node.flat is not None and st.epoch != self.epoch]
        if not sts or self.lost:
            return
        items, bufs = [], []
        for st in sts:
            desc, buf, _ = codec.tensor_frame(st.node.flat)
            if st.digest is None or st.digest[0] is not st.node:
                st.digest = (st.node, codec.digest(buf))
            items.append([next(self._handles), desc, st.digest[1]])
            bufs.append(buf)
        try:
            missing = set(self.streamer.request("adopt", w=items)["missing"])
            for i, (st, item, buf) in enumerate(zip(sts, items, bufs)):
                if i in missing:
                    self.streamer.put(item[0], item[1], buf, wait_sent=True, cache=True)
                st.h, st.epoch = item[0], self.epoch
                weakref.finalize(st, self.release, item[0])
        except LinkError as e:
            self._lose(e)
            return
        self.stats.weights_adopted += len(items) - len(missing)

    def _revive(self, tensors: list) -> None:
        """Give tensors from before a reconnection a copy on the server (once each)."""
        ep = self.epoch
        try:
            for t in tensors:
                if type(t) is RemoteTensor and t._ep != ep:
                    self._revive_one(t)
        except LinkError as e:
            self._lose(e)

    def _revive_one(self, t: RemoteTensor) -> None:
        st, m = t._st, t._meta
        flat = lineage.flat_of(st.node)
        if st.epoch != self.epoch:  # the whole storage goes up once; its tensors are views of it
            hb = next(self._handles)
            desc, buf, _ = codec.tensor_frame(flat)
            self.streamer.put(hb, desc, buf, wait_sent=True, cache=st.weight)
            st.h, st.epoch = hb, self.epoch
            weakref.finalize(st, self.release, hb)
        base = RemoteTensor(TensorMeta((flat.numel(),), (1,), 0, flat.dtype), st.h, None)
        h = next(self._handles)
        self.streamer.op("aten::as_strided.default", (base, list(m.shape), list(m.stride), m.offset), {}, [h])
        t._h, t._ep = h, self.epoch

    def _cut_deep(self) -> None:
        """Fetch tensors whose recipe grew long (state never downloaded): it restarts from known bytes."""
        deep, self._deep = self._deep, []
        for ref in deep:
            t = ref()
            if t is None or t._ep != self.epoch:
                continue
            v = t._st.node
            if v.flat is not None or v.depth <= lineage.MAX_DEPTH or t._meta != v.base:
                continue
            try:
                desc, frame = self.streamer.get(t._h, what="a tensor's value kept for faults")
            except LinkError as e:
                self._lose(e)
                return
            cpu = codec.frame_tensor(desc, frame, max_bytes=1 << 62)
            t._st.node = lineage.Version(lineage.conform(cpu, v.base), base=v.base)
            self.stats.lineage_cuts += 1


# -- special ops: data crossing between the robot and the virtual device ----------------

# lop: tensors made from uploads by these ops get robot-side copies too (nn.Parameter(x) is a
# detach of the upload; a normalisation constant is often a view of one)
_DERIVED = frozenset((aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
                      aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
                      aten.permute.default, aten.t.default, aten.transpose.int, aten._to_copy.default))


def _to_copy(rt: Runtime, func, args, kwargs):
    src, device = args[0], kwargs.get("device")
    remote = type(src) is RemoteTensor
    if not remote and device is not None and device.type == "cuda":
        return rt.upload(src, kwargs.get("dtype"), kwargs.get("memory_format"), kwargs.get("non_blocking", False))
    if remote and device is not None and device.type == "cpu":
        dtype = kwargs.get("dtype")
        if dtype is not None and dtype != src.dtype and dtype.itemsize < src.dtype.itemsize:
            src = rt.call(aten._to_copy.default, (src,), {"dtype": dtype})  # narrowing: less to download
        cpu = rt.download(src)
        return cpu if dtype is None or dtype == cpu.dtype else aten._to_copy.default(cpu, dtype=dtype)
    if remote and device is not None and device.type == "meta":
        return aten._to_copy.default(_meta(src._meta), **kwargs)
    return NotImplemented


def _to(rt: Runtime, func, args, kwargs):
    """``aten::to`` overloads (seen instead of _to_copy under inference_mode)."""
    a = {**dict(zip([x.name for x in func._schema.arguments], args)), **kwargs}
    device = a["other"].device if "other" in a else a.get("device")
    if device is not None and device.type == "cpu":
        return _to_copy(rt, func, (args[0],), {"device": device, "dtype": a.get("dtype")})
    return NotImplemented


def _copy_(rt: Runtime, func, args, kwargs):
    dst, src = args[0], args[1]
    if type(dst) is not RemoteTensor:  # remote -> CPU tensor: download, then copy locally
        dst.copy_(rt.download(src))
        return dst
    return NotImplemented


def _shallow_copy_compatible(rt: Runtime, func, args, kwargs):
    return (type(args[0]) is RemoteTensor) == (type(args[1]) is RemoteTensor)


_SPECIAL = {aten._to_copy.default: _to_copy, aten.copy_.default: _copy_,
            **{getattr(aten.to, o): _to for o in ("dtype_layout", "device", "dtype", "other")},
            aten._has_compatible_shallow_copy_type.default: _shallow_copy_compatible}


# -- helpers -----------------------------------------------------------------------------

def _warm_up_meta_kernels() -> None:
    """Meta kernels written in Python import ~1 s of torch on first use: pay it while the app loads.

    Then freeze what exists (``gc.freeze``): torch's ~300k import-time objects would otherwise
    be walked at every full collection, and rrto's per-op allocations trigger one every ~100
    replayed frames, a 120-185 ms stall of the app's thread (keypoint net, one core; the
    slowest of 1,000 frames is 23-30 ms with the freeze, the median 20). What the app made
    so far is frozen too: a reference cycle among those objects that becomes garbage later
    is not collected (a cycle-free model replaced later is freed as always, by refcount)."""
    x, w, c = (torch.empty(s, device="meta") for s in ((1, 4, 8, 8), (4, 4, 3, 3), (4,)))
    aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    aten.native_batch_norm.default(x, c, c, c, c, False, 0.1, 1e-5)
    gc.collect()
    gc.freeze()


def _handle_of(t: torch.Tensor) -> int | None:
    return t._h if type(t) is RemoteTensor else None


def _pattern(tpl, out: list) -> tuple:
    t = type(tpl)
    if t is TensorMeta:
        out.append(True)
    elif t is Alias:
        out.append(False)
    elif t is tuple or t is list:
        for x in tpl:
            _pattern(x, out)
    return tuple(out)


_PLAIN = frozenset({int, float, bool, type(None), str, torch.dtype, torch.device, torch.memory_format,
                    torch.layout})
_NUMBERS = frozenset({int, float, bool})
_NEGATIVE_ZERO = "-0.0"  # in ``kinds`` after a float that is -0.0


def _sig(x, tensors: list, kinds: list):
    """Hashable signature of op arguments; collects their tensors in order, and the type of
    each number in ``kinds`` (``1 == 1.0 == True``, but an int tensor plus 1.0 is float; and
    ``0.0 == -0.0``, but ``1 / -0.0`` is ``-inf``)."""
    t = type(x)
    if t is RemoteTensor:
        tensors.append(x)
        return x._meta
    if t in _PLAIN:
        if t in _NUMBERS:
            kinds.append(t)
            if t is float and not x and math.copysign(1.0, x) < 0:
                kinds.append(_NEGATIVE_ZERO)
        return x
    if t is tuple or t is list:  # (its tensors and scalars without a call each: an op's args pass here)
        out = []
        for y in x:
            ty = type(y)
            if ty is RemoteTensor:
                tensors.append(y)
                out.append(y._meta)
            elif ty in _PLAIN:
                out.append(y)
                if ty in _NUMBERS:
                    kinds.append(ty)
                    if ty is float and not y and math.copysign(1.0, y) < 0:
                        kinds.append(_NEGATIVE_ZERO)
            else:
                out.append(_sig(y, tensors, kinds))
        return tuple(out)
    if t is dict:
        return tuple([(k, _sig(v, tensors, kinds)) for k, v in x.items()])
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return ("cpu", x.device, tuple(x.shape), x.stride(), x.storage_offset(), x.dtype)
    if isinstance(x, torch.Generator):
        return GeneratorRef(x)
    return x


def _meta(m: TensorMeta) -> torch.Tensor:
    """A metadata-only stand-in, its storage as large as the real one must be."""
    extent = m.offset + 1 + sum((n - 1) * s for n, s in zip(m.shape, m.stride)) if all(m.shape) else 0
    return aten.as_strided.default(aten.empty.memory_format([extent], dtype=m.dtype, device=_META),
                                   m.shape, m.stride, m.offset)


def _to_meta(x, metas: list):
    t = type(x)
    if t is RemoteTensor:
        m = _meta(x._meta)
        metas.append(m)
        return m
    if t is tuple or t is list:
        return t(_to_meta(y, metas) for y in x)
    if isinstance(x, torch.Tensor):
        m = _meta(TensorMeta(tuple(x.shape), x.stride(), x.storage_offset(), x.dtype))
        metas.append(m)
        return m
    if t is torch.device and x.type == "cuda":
        return _META
    return x


def _template(res, index: dict, tensors: list):
    if isinstance(res, torch.Tensor):
        meta = TensorMeta(tuple(res.shape), res.stride(), res.storage_offset(), res.dtype)
        i = index.get(id(res))
        if i is None:
            return meta
        before = tensors[i]
        changed = (meta.shape, meta.stride, meta.offset) != (tuple(before.shape), before.stride(),
                                                             before.storage_offset())
        return Alias(i, meta if changed else None)
    if isinstance(res, (tuple, list)):
        return type(res)(_template(r, index, tensors) for r in res)
    return res


def _set_meta(t: torch.Tensor, meta: TensorMeta) -> None:
    """Give a robot-side tensor new shape and strides in place, keeping the Python object."""
    if type(t) is not RemoteTensor:
        raise UnsupportedOpError("rrto: an op changed the shape of a CPU tensor given with cuda tensors")
    set_meta(t, meta)


def _no_tensors(res) -> bool:
    if isinstance(res, torch.Tensor):
        return False
    if isinstance(res, (tuple, list)):
        return all(_no_tensors(r) for r in res)
    return True


def _shape_result(func, outs: list, value):
    """Arrange a server-shaped op's outputs the way its schema returns them."""
    rets = func._schema.returns
    if not rets:
        return None
    it = iter(outs)
    shaped = []
    for r in rets:
        kind = str(r.type)
        if kind == "Tensor":
            shaped.append(next(it))
        elif kind == "Tensor[]":
            shaped.append(list(it))
        else:
            shaped.append(value)
    return shaped[0] if len(rets) == 1 else tuple(shaped)
