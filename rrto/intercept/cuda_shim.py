"""``torch.cuda.*`` answers for the virtual device, as a real single-GPU machine gives them.

The functions are replaced on the ``torch.cuda`` module while rrto is enabled and
restored afterwards. Replacing ``torch.cuda._lazy_init`` matters most: torch's C++
calls it before creating any cuda tensor, and on a CPU-only build the original raises.
Streams and events are host-side: the server runs a session's ops in order on one
stream, so waiting on a stream or an event is a ``synchronize()``.
"""
from __future__ import annotations

import contextlib
import random
import time
from types import SimpleNamespace

import torch

from . import generators
from .device_calls import replace_attributes


class DeviceProperties(SimpleNamespace):
    def __repr__(self) -> str:
        return (f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
                f"total_memory={self.total_memory // 2**20}MB, multi_processor_count={self.multi_processor_count})")


def install(runtime, info: dict) -> callable:
    """Patch torch.cuda; ``runtime`` is None in local mode. Returns the function that undoes it."""
    sync = runtime.synchronize if runtime is not None else (lambda: None)

    class Event:
        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
            self.enable_timing, self._time = enable_timing, None

        def record(self, stream=None) -> None:
            sync()  # the host clock only means something once the server has caught up
            self._time = time.perf_counter()

        def synchronize(self) -> None:
            sync()

        def wait(self, stream=None) -> None:
            pass

        def query(self) -> bool:
            return True

        def elapsed_time(self, end: "Event") -> float:
            if self._time is None or end._time is None:
                raise RuntimeError("Both events must be recorded before calculating elapsed time.")
            return (end._time - self._time) * 1000.0

    class Stream:
        def __init__(self, device=None, priority: int = 0, **kwargs):
            self.device, self.priority = torch.device("cuda", 0), priority

        def synchronize(self) -> None:
            sync()

        def query(self) -> bool:
            return True

        def wait_stream(self, stream) -> None:
            pass

        def wait_event(self, event) -> None:
            pass

        def record_event(self, event=None):
            event = event or Event()
            event.record(self)
            return event

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    default_stream = Stream()

    class device:  # noqa: N801 - mirrors torch.cuda.device
        def __init__(self, device=None):
            self.idx = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    props = DeviceProperties(name=info.get("device_name", "rrto"), major=info.get("capability", [0, 0])[0],
                             minor=info.get("capability", [0, 0])[1], total_memory=info.get("total_memory", 0),
                             multi_processor_count=info.get("multi_processor_count", 1))
    allocated = runtime.memory_allocated if runtime is not None else (lambda: 0)
    seed = runtime.seed if runtime is not None else (lambda s: None)
    seeds = {"initial": 67280421310721}

    def manual_seed(s) -> None:
        seeds["initial"] = int(s)
        seed(int(s))

    def random_seed() -> None:
        manual_seed(random.getrandbits(63))

    patches = {
        "_lazy_init": lambda: None,
        "init": lambda: None,
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda device: None,
        "get_device_name": lambda device=None: props.name,
        "get_device_capability": lambda device=None: (props.major, props.minor),
        "get_device_properties": lambda device=None: props,
        "synchronize": lambda device=None: sync(),
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "seed": random_seed,
        "seed_all": random_seed,
        "initial_seed": lambda: seeds["initial"],
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: allocated(),
        "max_memory_allocated": lambda device=None: allocated(),
        "memory_reserved": lambda device=None: allocated(),
        "max_memory_reserved": lambda device=None: allocated(),
        "reset_peak_memory_stats": lambda device=None: None,
        "mem_get_info": lambda device=None: (max(props.total_memory - allocated(), 0), props.total_memory),
        "Event": Event,
        "Stream": Stream,
        "current_stream": lambda device=None: default_stream,
        "default_stream": lambda device=None: default_stream,
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        "device": device,
    }
    return replace_attributes([(torch.cuda, name, fn) for name, fn in patches.items()] + generators.replacements(runtime))
