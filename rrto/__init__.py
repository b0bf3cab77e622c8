"""rrto: run an unmodified CUDA PyTorch app's operators on an edge GPU server.

    python -m rrto [--server tcp://EDGE:5555] app.py args...

or, from Python::

    import rrto
    with rrto.offload(server="tcp://EDGE:5555"):
        ...  # "cuda" tensors live on the server
"""
from .errors import LinkError, RemoteError, RrtoError, UnsupportedOpError

_LAUNCH_NAMES = ("enable", "disable", "offload", "current")


def __getattr__(name: str):
    # Imported on first use, not with rrto: `rrto preload-path`, `rrto run` and the preload
    # bootstrap run in processes that must not pay for importing torch.
    if name in _LAUNCH_NAMES:
        from .intercept import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'rrto' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["enable", "disable", "offload", "current", "RrtoError", "LinkError", "RemoteError",
           "UnsupportedOpError", "__version__"]
