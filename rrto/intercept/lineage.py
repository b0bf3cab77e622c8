"""Every remote tensor's value, computable on the robot: what lets an app outlive its server.

While the server is up, each op leaves a small recipe here (the op, its argument
signature, and which *version* of each input's memory it read) that holds no server
handle. Uploads keep their CPU bytes (weights: the very memory the app had before
``.cuda()``). If the server is lost, a tensor's value is cooked from its recipe with
plain CPU torch ops, once (memoised), and from then on the runtime runs ops here.

Values live per *storage*, as versions: a tensor and its views share one
``Storage``, whose ``node`` is its current ``Version``; a tensor is
``version.flat.as_strided(shape, stride, offset)``. An in-place op gives its target's
storage a new version (computed on a copy of the old one), so views see the write and
recipes that read the old version still get the old bytes. Recipes that nobody can
reach any more die with their tensors; a chain that grows without end (recurrent state
never downloaded) is cut by fetching its value (``MAX_DEPTH``).
"""
from __future__ import annotations

import torch

from .generators import GeneratorRef
from .remote_tensor import RemoteTensor, TensorMeta

MAX_DEPTH = 256  # ops between a tensor and known values before its value is fetched (memory stays flat)
_CPU = torch.device("cpu")


class Version:
    """One version of a storage's bytes: known (``flat``) or output ``k`` of ``op`` (not run yet)."""
    __slots__ = ("flat", "op", "k", "depth", "base")

    def __init__(self, flat, op=None, k=0, depth=0, base: TensorMeta | None = None):
        self.flat, self.op, self.k, self.depth, self.base = flat, op, k, depth, base


class Storage:
    """The memory a tensor and its views share. ``h``/``epoch``: its copy on the server, if revived."""
    __slots__ = ("node", "h", "epoch", "weight", "digest", "__weakref__")

    def __init__(self, node: Version, weight: bool = False):
        self.node, self.h, self.epoch, self.weight, self.digest = node, None, -1, weight, None


class Lin:
    """Per op signature: which outputs are new memory, which are views of which input, what is written."""
    __slots__ = ("news", "views", "writes")

    def __init__(self, news: tuple, views: tuple, writes: tuple):
        self.news, self.views, self.writes = news, views, writes


class OpNode:
    __slots__ = ("func", "sig", "refs", "lin", "out")

    def __init__(self, func, sig, refs, lin):
        self.func, self.sig, self.refs, self.lin, self.out = func, sig, refs, lin, None

    def run(self) -> None:
        """Run the op on CPU values (its inputs' versions are known by now)."""
        vals, cow = [], {}
        writes = self.lin.writes
        for i, r in enumerate(self.refs):
            if type(r) is tuple:
                v, m = r
                flat = v.flat
                if i in writes:  # in-place: on a copy, the old version stays what it was
                    c = cow.get(id(v))
                    if c is None:
                        c = cow[id(v)] = flat.clone()
                    flat = c
                vals.append(flat.as_strided(m.shape, m.stride, m.offset))
            else:
                vals.append(r)
        args, kwargs = rebuild(self.sig, vals)
        res = self.func(*args, **kwargs)
        outs = _flat_tensors(res, [])
        out = {k: conform(outs[k], m) for k, m in self.lin.news}
        for i in writes:
            out[-1 - i] = storage_flat(vals[i])
        self.out, self.refs, self.sig = out, None, None


# -- recording (the hot path while the server is up) -----------------------------------

def info(func, sig, template, tensors: list, alias_type: type) -> Lin:
    """What an op's outputs are, from its schema and the template its meta kernel gave (once per plan)."""
    schema = func._schema
    arg_of = _args_of_tensors(schema, sig)
    writes = tuple(i for i, a in enumerate(arg_of) if a.alias_info is not None and a.alias_info.is_write)
    rets = template if len(schema.returns) > 1 else (template,)
    news, views, k = [], [], 0
    for r, tpl in zip(schema.returns, rets):
        for leaf in _leaves(tpl, alias_type, []):
            if type(leaf) is TensorMeta:
                src = _viewed(r, arg_of, tensors, leaf)
                if src is None:
                    news.append((k, leaf))
                else:
                    views.append((k, src))
            k += 1
    return Lin(tuple(news), tuple(views), writes)


def shaped_info(func, sig, made: list, new: list) -> Lin:
    """The same for an op whose outputs only the server could size (``new[k]``: not an input given back)."""
    arg_of = _args_of_tensors(func._schema, sig)
    writes = tuple(i for i, a in enumerate(arg_of) if a.alias_info is not None and a.alias_info.is_write)
    return Lin(tuple((k, t._meta) for k, t in enumerate(made) if new[k]), (), writes)


def record(lin: Lin, func, sig, tensors: list, made: list) -> int:
    """Give the op's outputs (``made``, flat) their recipe; returns its depth."""
    return attach(node(lin, func, sig, tensors), tensors, made)


def node(lin: Lin, func, sig, tensors: list) -> OpNode:
    """The recipe of one op, made before its outputs (an in-place op may change an input's shape)."""
    refs, depth = [], 0
    for t in tensors:
        if type(t) is RemoteTensor:
            v = t._st.node
            if v.depth > depth:
                depth = v.depth
            refs.append((v, t._meta))
        else:
            refs.append(t)
    n = OpNode(func, sig, refs, lin)
    n.out = depth + 1  # its depth, until it runs
    return n


def attach(node: OpNode, tensors: list, made: list) -> int:
    """Give the op's outputs (``made``, flat) and the inputs it writes their new versions; returns the depth."""
    lin, depth = node.lin, node.out
    node.out = None
    for k, m in lin.news:
        t = made[k]
        if t is not None:  # (None: an output the caller drops unmade, see Runtime.call)
            t._st = Storage(Version(None, node, k, depth, m))
    for k, i in lin.views:
        t = made[k]
        if t is not None:
            t._st = tensors[i]._st
    for i in lin.writes:
        st = tensors[i]._st
        st.node = Version(None, node, -1 - i, depth, st.node.base)
    return depth


def leaf(flat: torch.Tensor, meta: TensorMeta, weight: bool = False) -> Storage:
    """A storage whose bytes the robot holds (an upload, a download, a value computed here)."""
    return Storage(Version(flat, base=meta), weight)


# -- evaluating -------------------------------------------------------------------------

def flat_of(v: Version) -> torch.Tensor:
    """The bytes of one version, running the recipes it needs (no recursion: chains may be long)."""
    if v.flat is not None:
        return v.flat
    stack = [v]
    with torch.inference_mode():
        while stack:
            top = stack[-1]
            if top.flat is not None:
                stack.pop()
                continue
            op = top.op
            if op.out is None:
                need = [r[0] for r in op.refs if type(r) is tuple and r[0].flat is None]
                if need:
                    stack.extend(need)
                    continue
                op.run()
            top.flat, top.op, top.depth = op.out[top.k], None, 0
            stack.pop()
    return v.flat


def value(t: RemoteTensor) -> torch.Tensor:
    """The tensor's value as a CPU tensor (a view into its storage's bytes)."""
    m = t._meta
    return flat_of(t._st.node).as_strided(m.shape, m.stride, m.offset)


def run_here(runtime, func, sig, tensors: list):
    """Run an op on the robot's CPU: the server is lost. Outputs stay RemoteTensors (cuda:0 to the app)."""
    vals, cow = [], {}
    schema = func._schema
    writes = {i for i, a in enumerate(_args_of_tensors(schema, sig))
              if a.alias_info is not None and a.alias_info.is_write} if schema.is_mutable else ()
    for i, t in enumerate(tensors):
        if type(t) is RemoteTensor:
            v = value(t)
            if i in writes:
                st = t._st
                c = cow.get(id(st))
                if c is None:
                    c = cow[id(st)] = flat_of(st.node).clone()
                v = c.as_strided(v.shape, v.stride(), v.storage_offset())
            vals.append(v)
        else:
            vals.append(t)
    args, kwargs = rebuild(sig, vals)
    with torch.inference_mode():
        res = func(*args, **kwargs)
    for i in writes:
        st = tensors[i]._st
        st.node = Version(storage_flat(vals[i]), base=st.node.base)
    by_id = {id(v): i for i, v in enumerate(vals)}
    by_storage = {v.untyped_storage()._cdata: i for i, v in enumerate(vals) if type(tensors[i]) is RemoteTensor}
    return _wrap(runtime, res, tensors, by_id, by_storage)


def _wrap(runtime, r, tensors, by_id, by_storage):
    if isinstance(r, torch.Tensor):
        i = by_id.get(id(r))
        meta = TensorMeta(tuple(r.shape), r.stride(), r.storage_offset(), r.dtype)
        if i is not None:
            t = tensors[i]
            if type(t) is RemoteTensor and meta != t._meta:
                runtime.reshape_in_place(t, meta)  # resize_, unsqueeze_: the same tensor, new shape
            return t
        out = runtime.local_tensor(meta)
        i = by_storage.get(r.untyped_storage()._cdata)
        out._st = tensors[i]._st if i is not None else leaf(storage_flat(r), meta)
        return out
    if isinstance(r, (tuple, list)):
        return type(r)(_wrap(runtime, x, tensors, by_id, by_storage) for x in r)
    return r


# -- helpers ------------------------------------------------------------------------------

def storage_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over the whole storage of ``t`` (offsets in it are absolute)."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=t.dtype).set_(st, 0, (st.nbytes() // t.element_size(),), (1,))


def conform(r: torch.Tensor, m: TensorMeta) -> torch.Tensor:
    """Bytes laid out as the meta kernel promised the robot (the server conforms the same way)."""
    if r.dtype != m.dtype:
        r = r.to(m.dtype)
    if tuple(r.shape) == m.shape and (r.stride() == m.stride or r.numel() <= 1) and r.storage_offset() == m.offset:
        return storage_flat(r)
    out = torch.zeros(extent(m), dtype=m.dtype)
    if tuple(r.shape) == m.shape:
        out.as_strided(m.shape, m.stride, m.offset).copy_(r)
    return out


def extent(m: TensorMeta) -> int:
    return m.offset + 1 + sum((n - 1) * s for n, s in zip(m.shape, m.stride)) if all(m.shape) else m.offset


def rebuild(sig, vals: list):
    """The op's (args, kwargs) from its signature, with ``vals`` where its tensors were; cuda means cpu."""
    it = iter(vals)
    _, sargs, skw = sig
    args = [_fill(x, it) for x in sargs]
    kwargs = {k: _fill(v, it) for k, v in skw} if skw else {}
    return args, kwargs


def _fill(x, it):
    t = type(x)
    if t is TensorMeta:
        return next(it)
    if t is tuple:
        if len(x) == 6 and type(x[1]) is torch.device and x[0] == "cpu":  # a CPU tensor's signature
            return next(it)
        return [_fill(y, it) for y in x]
    if t is torch.device and x.type == "cuda":
        return _CPU
    if t is GeneratorRef:
        return x.generator
    return x


def _is_tensor_sig(x) -> bool:
    return type(x) is TensorMeta or (type(x) is tuple and len(x) == 6 and type(x[1]) is torch.device
                                     and x[0] == "cpu")


def _count(x) -> int:
    if _is_tensor_sig(x):
        return 1
    if type(x) is tuple:
        return sum(_count(y) for y in x)
    return 0


def _args_of_tensors(schema, sig) -> list:
    """The schema argument each of the op's tensors (in ``_sig`` order) was passed as."""
    _, sargs, skw = sig
    arg_of = []
    for a, x in zip(schema.arguments, sargs):
        arg_of += [a] * _count(x)
    if skw:
        by_name = {a.name: a for a in schema.arguments}
        for k, x in skw:
            arg_of += [by_name[k]] * _count(x)
    return arg_of


def _viewed(ret, arg_of: list, tensors: list, leaf: TensorMeta) -> int | None:
    """The input a view output shares memory with (same dtype, on the device), else None."""
    ai = ret.alias_info
    if ai is None or ai.is_write or not ai.before_set:
        return None
    for i, a in enumerate(arg_of):
        if a.alias_info is not None and a.alias_info.before_set & ai.before_set:
            t = tensors[i]
            if type(t) is RemoteTensor and t.dtype == leaf.dtype:
                return i
            return None
    return None


def _leaves(tpl, alias_type: type, out: list) -> list:
    """The template's tensor leaves, in the order of the op result's tensors."""
    if type(tpl) in (tuple, list):
        for x in tpl:
            _leaves(x, alias_type, out)
    elif type(tpl) is TensorMeta or type(tpl) is alias_type:
        out.append(tpl)
    return out


def _flat_tensors(x, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _flat_tensors(y, out)
    return out
