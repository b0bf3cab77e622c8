"""rrto: run an unmodified CUDA PyTorch app's operators on an edge GPU server.

    python -m rrto [--server tcp://EDGE:5555] app.py args...

or, from Python::

    import rrto
    with rrto.offload(server="tcp://EDGE:5555"):
        ...  # "cuda" tensors live on the server
"""
from .errors import LinkError, RemoteError, RrtoError, UnsupportedOpError
from .intercept.launch import current, disable, enable, offload

__version__ = "0.1.0"
__all__ = ["enable", "disable", "offload", "current", "RrtoError", "LinkError", "RemoteError",
           "UnsupportedOpError", "__version__"]
