"""Random number generators of the virtual device: ``torch.Generator(device="cuda")``.

A cuda generator's state lives on the server, beside the tensors it draws into. The robot's
object stands for the session's generator number ``n`` there (0: the session's default one,
which ``torch.cuda.manual_seed`` seeds and random ops without a generator use). An op that
names it carries ``{"g": n}`` on the wire, and a replayed program draws from the same one.
Reading or setting its state is a message of its own, at its place in the app's sequence:
a server that ran a replayed frame ahead stops there, so the state read is the one the app
would see. The numbers are the server's generator's, as on a real GPU they are the GPU's.

An op reaches the robot's dispatch with a new Python object for the generator it names, the
C++ one the same: the stand-in's C++ part is a CPU generator whose seed names the number
(``codec.generator_number``). Ops the robot runs itself while the server is lost draw from
it (a stream of its own). In local mode it is the CPU generator cuda ops draw from.
"""
from __future__ import annotations

import random

import torch

from .. import codec
from .remote_tensor import CUDA0, is_cuda

_BaseGenerator = torch._C.Generator  # torch's own class (``torch.Generator`` while rrto is off)
_FRESH_SEED = 67280421310721  # what torch seeds a new cuda generator with


class _AnyGenerator(type(_BaseGenerator)):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _BaseGenerator)

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, _BaseGenerator)


class CudaGenerator(_BaseGenerator):
    """The robot's stand-in for the server's generator ``number`` of this session (``runtime``
    None: local mode, where it is the CPU generator cuda ops draw from)."""

    def __new__(cls, runtime, number: int, numbers: "GeneratorNumbers | None" = None) -> "CudaGenerator":
        g = _BaseGenerator.__new__(cls)
        g._rt, g.rrto_number, g._numbers, g._seed = runtime, number, numbers, _FRESH_SEED
        if runtime is not None:  # the C++ part's seed names it (codec.generator_number)
            _BaseGenerator.manual_seed(g, codec.GENERATOR_TAG + number)
        return g

    def __init__(self, *args, **kwargs) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return CUDA0

    def manual_seed(self, seed) -> "CudaGenerator":
        if self._rt is None:
            _BaseGenerator.manual_seed(self, seed)
            return self
        seed = int(seed)
        if not -(1 << 63) <= seed < 1 << 64:
            raise RuntimeError(f"Overflow when unpacking long long: seed must be within the range of "
                               f"[-0x8000_0000_0000_0000, 0xffff_ffff_ffff_ffff], not {seed}")
        self._seed = seed & 0xFFFF_FFFF_FFFF_FFFF
        self._rt.seed(self._seed, self.rrto_number)
        return self

    def initial_seed(self) -> int:
        return _BaseGenerator.initial_seed(self) if self._rt is None else self._seed

    def seed(self) -> int:
        if self._rt is None:
            return _BaseGenerator.seed(self)
        seed = random.getrandbits(64)  # non-deterministic, as torch picks it
        self.manual_seed(seed)
        return seed

    def get_state(self) -> torch.Tensor:
        state = None if self._rt is None else self._rt.generator_state(self.rrto_number)
        return _BaseGenerator.get_state(self) if state is None else state  # None: local, or the server is lost

    def set_state(self, new_state: torch.Tensor) -> "CudaGenerator":
        if not isinstance(new_state, torch.Tensor) or new_state.dtype != torch.uint8 or new_state.device.type != "cpu":
            got = f"{new_state.dtype} on {new_state.device}" if isinstance(new_state, torch.Tensor) else \
                type(new_state).__name__
            raise TypeError(f"expected a torch.ByteTensor on the CPU as the new state, but got {got}")
        if self._rt is None or self._rt.generator_state(self.rrto_number, new_state) is None:
            _BaseGenerator.set_state(self, new_state)
        return self

    def graphsafe_get_state(self, *args):
        raise RuntimeError("rrto: CUDA graph generator states are not supported on the virtual device; "
                           "use get_state() and set_state()")

    graphsafe_set_state = clone_state = graphsafe_get_state

    def __repr__(self) -> str:
        return f"<torch.Generator on cuda:0 (rrto: the server's generator {self.rrto_number})>"

    def __del__(self) -> None:
        numbers = self.__dict__.get("_numbers")
        if numbers is not None:
            numbers.free.append(self.rrto_number)


class GeneratorRef:
    """A generator in an op's signature: equal when it names the same generator of the server,
    so a frame that makes its generator afresh (``torch.Generator("cuda").manual_seed(0)``)
    repeats, and replays. ``generator``: the object the op got (it draws on the robot's CPU
    while the server is lost)."""
    __slots__ = ("generator", "number")

    def __init__(self, generator: torch.Generator):
        self.generator, self.number = generator, codec.generator_number(generator)

    def __eq__(self, other) -> bool:
        return type(other) is GeneratorRef and other.number == self.number

    def __hash__(self) -> int:
        return hash((GeneratorRef, self.number))


class GeneratorNumbers:
    """The session's generator numbers in use: one that the app let go of is used again (a
    generator made each frame takes the same number, so its frames repeat)."""

    def __init__(self, runtime):
        self.runtime, self.free, self.next = runtime, [], 1

    def new(self) -> CudaGenerator:
        if self.free:
            number = self.free.pop()
        elif self.next < codec.MAX_GENERATORS:
            number, self.next = self.next, self.next + 1
        else:
            raise RuntimeError(f"rrto: at most {codec.MAX_GENERATORS - 1} cuda generators can be alive at once")
        g = CudaGenerator(self.runtime, number, self)
        if self.runtime is not None:
            g.manual_seed(_FRESH_SEED)  # as torch seeds a new one (a number used before starts afresh)
        return g


def replacements(runtime) -> list:
    """``(owner, name, value)`` for ``device_calls.replace_attributes``: ``torch.Generator``, and
    the ``torch.cuda`` functions that read and set the default generator's state.
    ``runtime`` None: local mode (a cuda generator is a CPU one; cuda ops draw from torch's own)."""
    numbers = GeneratorNumbers(runtime)
    default = CudaGenerator(runtime, 0) if runtime is not None else torch.default_generator

    class Generator(_BaseGenerator, metaclass=_AnyGenerator):
        """``torch.Generator`` while rrto is enabled: a cuda one is the server's."""

        def __new__(cls, device="cpu"):
            if is_cuda(device):
                return numbers.new()
            return _BaseGenerator(device)

    Generator.__module__, Generator.__qualname__ = "torch", "Generator"

    def get_rng_state(device="cuda") -> torch.Tensor:
        return default.get_state()

    def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
        default.set_state(new_state)

    def get_rng_state_all() -> list:
        return [default.get_state()]

    def set_rng_state_all(new_states) -> None:
        for state in new_states:
            default.set_state(state)

    cuda_random = torch.cuda.random
    funcs = {"get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
             "get_rng_state_all": get_rng_state_all, "set_rng_state_all": set_rng_state_all}
    return [(torch, "Generator", Generator), (torch.cuda, "default_generators", (default,)),
            *[(owner, name, fn) for owner in (torch.cuda, cuda_random) for name, fn in funcs.items()]]
