"""The exceptions a robot app can see from rrto, each saying what to do next."""


class RrtoError(RuntimeError):
    """Base class of every rrto error."""


class LinkError(RrtoError):
    """The edge server could not be reached, or did not answer in time."""


class LinkLost(LinkError):
    """The server stopped answering (killed, restarted, unreachable, or the link stalled)."""


class RemoteError(RrtoError):
    """The edge server refused or failed a request; the message says why."""


class UnsupportedOpError(RrtoError, NotImplementedError):
    """An operator the virtual cuda device (or the server's allowlist) does not support yet."""


# no_session: the server restarted (or closed the session) since: as good as lost, reconnect
_KINDS = {"unsupported": UnsupportedOpError, "no_session": LinkLost}


def remote_error(kind: str, message: str) -> RrtoError:
    """The exception for an error reply of the given kind."""
    return _KINDS.get(kind, RemoteError)(message)
