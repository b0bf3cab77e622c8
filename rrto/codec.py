"""The one wire format of rrto: a JSON header plus raw tensor frames.

A message is a list of zmq frames: ``[header, frame0, frame1, ...]``. The header is
a small JSON object (type ``"t"``, session ``"s"``, op name, arguments); tensors
never go through JSON, they travel as raw bytes in their own frames and the header
describes them (``{"dt": "float32", "sh": [...], "st": [...]}``). Nothing here can
execute code: decoding only ever builds numbers, strings, lists and tensors.

Values inside op arguments are JSON, except these one-key markers:

=================  =========================================================
``{"h": 7}``       the session's remote tensor with handle 7
``{"i": 0}``       tensor carried inline in frame 0 of this message
``{"dt": "f32"}``  a ``torch.dtype`` (by name, e.g. ``"float32"``)
``{"dev": "r"}``   the remote device (the server's cuda or cpu)
``{"mf": name}``   a ``torch.memory_format``
``{"ly": name}``   a ``torch.layout``
``{"c": [re,im]}`` a complex number
=================  =========================================================
"""
from __future__ import annotations

import json
from typing import Any, Callable

import torch
import xxhash

PROTOCOL_VERSION = 4  # 4: a sync right after a download is answered on the robot (answered)
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 32
MAX_DEPTH = 32  # nesting of lists and objects in a header; real ones reach about 5


def answered(kinds: list[str]) -> tuple[bool, ...]:
    """Per step of a recorded program (by kind): whether a run ahead sends a reply for it.

    Downloads, data-dependent ops and syncs are waited for, except a sync right after a
    download or a data-dependent op: the robot has just had that reply, which says that
    the work up to it is done. Both ends count reply numbers ('aq') with this rule.
    """
    return tuple(k in ("get", "shaped") or k == "sync" and not (i and kinds[i - 1] in ("get", "shaped"))
                 for i, k in enumerate(kinds))


_DTYPE_NAMES = [
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "bool",
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
]
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}
DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
MEMORY_FORMAT_NAMES = {v: k for k, v in MEMORY_FORMATS.items()}
LAYOUTS = {"strided": torch.strided}
LAYOUT_NAMES = {v: k for k, v in LAYOUTS.items()}
REMOTE_DEVICE = {"dev": "r"}


class CodecError(ValueError):
    """A message that does not follow the wire format; ``q`` is its sequence number when readable."""

    def __init__(self, message: str, q: int | None = None):
        super().__init__(message)
        self.q = q


# -- headers -------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def pack(header: dict, frames: list = ()) -> list:
    """The frames of one message: the encoded header first, then the raw frames."""
    return [_dumps(header).encode(), *frames]


def unpack(frames: list) -> tuple[dict, list]:
    """Split a received message into its header (a dict) and its tensor frames."""
    if not frames:
        raise CodecError("empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else bytes(raw)
    if len(raw) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(raw)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CodecError(f"header is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    # Decoders recurse: bound them before they see it (few brackets cannot nest deep: skip the walk).
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_over(header, MAX_DEPTH):
        q = header.get("q")
        raise CodecError(f"header nests lists or objects more than {MAX_DEPTH} deep", q if type(q) is int else None)
    return header, list(frames[1:])


def _depth_over(x: Any, limit: int) -> bool:
    todo = [(x, 1)]
    while todo:
        v, depth = todo.pop()
        if depth > limit:
            return True
        for w in (v.values() if type(v) is dict else v):
            if type(w) is dict or type(w) is list:
                todo.append((w, depth + 1))
    return False


# -- the layout both ends promise ------------------------------------------------

_CONVOLUTIONS = frozenset(("aten::convolution", "aten::_convolution"))


def cuda_layout(op, args, out):
    """An op's output (from its meta kernel) in the memory format a CUDA device gives it.

    Robot and server size every output with meta kernels, and the server makes each output
    the layout the robot was promised. For a meta input torch's convolution answers
    contiguous; cudnn (and the CPU's oneDNN) gives channels_last when the input or the
    weight suggests it (``cudnn_conv_suggest_memory_format``). Promising that keeps a
    channels_last model channels_last on the server, instead of a copy to contiguous after
    every convolution.
    """
    if op._schema.name not in _CONVOLUTIONS or not isinstance(out, torch.Tensor):
        return out
    weight = args[1]
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(weight.dim())
    if fmt is None or out.dim() != weight.dim() or torch.float64 in (args[0].dtype, weight.dtype) \
            or out.is_contiguous(memory_format=fmt):
        return out
    # (An input's size-1 dims take no part: their strides address nothing, and meta kernels
    # may give them other strides than a device's kernels, on which the suggestion turns.
    # A batch of one made channels_last by a permute is one: torch suggests contiguous there.)
    if _suggested_format(weight) == fmt or 1 not in args[0].shape and _suggested_format(args[0]) == fmt:
        return out.contiguous(memory_format=fmt)
    return out


def _suggested_format(t: torch.Tensor):
    """``Tensor::suggest_memory_format`` (torch's C++ rule; Python has it only privately)."""
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


# -- tensors as frames ---------------------------------------------------------

def contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return strides[::-1]


def digest(buf) -> str:
    """The content digest of some bytes (xxh3-128): the server's weight cache is keyed by it."""
    return xxhash.xxh3_128(buf).hexdigest()


def dense_desc(shape, stride, numel: int) -> bool:
    """True for a valid descriptor of a dense tensor of ``numel`` elements (a weight adopted by digest)."""
    if not (_int_list(shape) and _int_list(stride) and len(shape) == len(stride) <= MAX_DIMS):
        return False
    if any(n < 0 for n in shape) or any(x < 0 for x in stride) or not is_dense(shape, stride):
        return False
    n = 1
    for d in shape:
        n *= d
    return n == numel


def is_dense(shape, stride) -> bool:
    """True when the elements fill one gap-free block of memory (any dim order)."""
    acc = 1
    for n, s in sorted(((n, s) for n, s in zip(shape, stride) if n != 1), key=lambda p: p[1]):
        if s != acc:
            return False
        acc *= n
    return True


def tensor_frame(t: torch.Tensor) -> tuple[dict, memoryview, bool]:
    """(descriptor, bytes, private) for a CPU tensor, without copying when it is dense.

    ``private`` says the bytes are a fresh copy nobody else can modify; when False the
    buffer aliases the caller's tensor, which must not change until the frame is sent.
    """
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    shape, n = list(t.shape), t.numel()
    private = False
    if is_dense(shape, t.stride()):
        stride = list(t.stride())
        flat = t.as_strided((n,), (1,), t.storage_offset())
    else:
        t = t.contiguous()
        stride, flat, private = contiguous_strides(shape), t.view(-1), True
    buf = memoryview(flat.view(torch.uint8).numpy()) if n else memoryview(b"")
    return {"dt": DTYPE_NAMES[t.dtype], "sh": shape, "st": stride}, buf, private


def frame_tensor(desc: Any, frame: Any, max_bytes: int) -> torch.Tensor:
    """The CPU tensor a frame carries, validated against its descriptor (zero-copy)."""
    if not isinstance(desc, dict):
        raise CodecError("tensor descriptor is not an object")
    dtype, shape, stride = dtype_of(desc.get("dt")), desc.get("sh"), desc.get("st")
    if stride is None and isinstance(shape, list):
        stride = contiguous_strides(shape)
    if not (_int_list(shape) and _int_list(stride) and len(shape) == len(stride) <= MAX_DIMS):
        raise CodecError("tensor descriptor needs integer lists 'sh' and 'st' of equal length")
    if any(n < 0 for n in shape) or any(s < 0 for s in stride) or not is_dense(shape, stride):
        raise CodecError(f"tensor layout sh={shape} st={stride} is not a dense layout")
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    if nbytes > max_bytes:
        raise CodecError(f"tensor of {nbytes} bytes is over the {max_bytes}-byte limit")
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if buf.readonly:  # torch tensors must own writable memory
        buf = memoryview(bytearray(buf))
    if buf.nbytes != nbytes:
        raise CodecError(f"frame has {buf.nbytes} bytes but a {dtype_name(dtype)} tensor of shape {shape} needs {nbytes}")
    if numel == 0:
        return torch.empty_strided(shape, stride, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).as_strided(shape, stride)


def _int_list(x) -> bool:
    return isinstance(x, list) and all(type(i) is int for i in x)


def dtype_of(name: Any) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown dtype {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel over the wire") from None


# -- op arguments --------------------------------------------------------------

MAX_GENERATORS = 256  # cuda generators a session may hold (``{"g": n}``, n below this; 0: its default one)
MAX_GENERATOR_STATE = 1 << 16  # bytes of a generator's state (a CPU one's is 5056, a CUDA one's 16)
# An op reaches the robot's dispatch with a new Python object for the generator it names (the
# C++ one is the same): the robot's stand-in for the server's generator n is seeded with this
# plus n, which names it there.
GENERATOR_TAG = 0x7272_746F << 32  # b"rrto"


def generator_number(g) -> int | None:
    """The number of the server's generator that ``g`` stands for; None: a generator of the CPU."""
    n = g.initial_seed() - GENERATOR_TAG
    return n if 0 <= n < MAX_GENERATORS else None


def generator_marker(g) -> dict:
    """``{"g": n}`` for a cuda generator; a CPU one given to a cuda op gets torch's own error."""
    number = generator_number(g)
    if number is None:
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{g.device.type}' "
                           "(rrto: make the generator with torch.Generator(device='cuda'))")
    return {"g": number}


def encode_value(x: Any, tensor: Callable[[torch.Tensor], dict]) -> Any:
    """JSON form of an op argument; ``tensor`` turns each tensor into its marker."""
    if x is None or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, torch.Tensor):
        return tensor(x)
    if isinstance(x, (list, tuple)):
        return [encode_value(y, tensor) for y in x]
    if isinstance(x, torch.dtype):
        return {"dt": dtype_name(x)}
    if isinstance(x, torch.device):
        if x.type in ("cuda", "meta"):
            return REMOTE_DEVICE
        raise CodecError(f"device {x} cannot be named in a remote op")
    if isinstance(x, torch.memory_format):
        return {"mf": MEMORY_FORMAT_NAMES[x]}
    if isinstance(x, torch.layout):
        if x in LAYOUT_NAMES:
            return {"ly": LAYOUT_NAMES[x]}
        raise CodecError(f"layout {x} is not supported by rrto")
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    if isinstance(x, torch.Generator):
        return generator_marker(x)
    if isinstance(x, bool):
        return bool(x)
    if isinstance(x, int):  # int subclasses such as IntEnum or numpy ints
        return int(x)
    if isinstance(x, float):
        return float(x)
    raise CodecError(f"an argument of type {type(x).__name__} cannot travel over the wire")


def decode_value(x: Any, handle: Callable[[int], Any], inline: Callable[[int], Any], device: Any,
                 ref: Callable[[str, int], Any] | None = None, generator: Callable[[int], Any] | None = None) -> Any:
    """Python value of an encoded op argument, resolving markers through the callbacks.

    ``ref`` resolves the markers of recorded programs: ``{"s": n}`` (the output of an
    earlier step of the iteration) and ``{"x": n}`` (a tensor named at each run);
    ``generator`` the session's generators, ``{"g": n}``.
    """
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [decode_value(y, handle, inline, device, ref, generator) for y in x]
    if type(x) is dict and len(x) == 1:
        (k, v), = x.items()
        if k == "h" and type(v) is int:
            return handle(v)
        if k == "i" and type(v) is int:
            return inline(v)
        if k == "dt":
            return dtype_of(v)
        if k == "dev" and v == "r":
            return device
        if k == "mf" and v in MEMORY_FORMATS:
            return MEMORY_FORMATS[v]
        if k == "ly" and v in LAYOUTS:
            return LAYOUTS[v]
        if k == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
            return complex(v[0], v[1])
        if ref is not None and k in ("s", "x") and type(v) is int:
            return ref(k, v)
        if generator is not None and k == "g" and type(v) is int:
            return generator(v)
    raise CodecError(f"malformed argument {json.dumps(x)[:80]}")


def encode_result(x: Any) -> Any:
    """JSON form of a non-tensor op result (``item()``, ``equal``...)."""
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    if isinstance(x, (list, tuple)):
        return [encode_result(y) for y in x]
    return x


def decode_result(x: Any) -> Any:
    if type(x) is dict and "c" in x:
        return complex(*x["c"])
    if type(x) is list:
        return [decode_result(y) for y in x]
    return x
