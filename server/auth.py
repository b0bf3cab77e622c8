"""Who may connect: CurveZMQ keys (``--keys DIR``), or loopback only without them.

With keys the ROUTER socket is a CurveZMQ server: every connection is encrypted, and a
ZAP handler (pyzmq's ThreadAuthenticator, in its own thread) admits only clients whose
public key has a file in ``DIR/authorized``. Without keys anyone who can reach the port
can run ops here, so the server then listens on loopback only unless told ``--insecure``.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("rrto.server")

ZAP_DOMAIN = "rrto"
_TCP = re.compile(r"tcp://(?:\[([^\]]+)\]|([^:/]+)):[0-9*]+")


def reachable_from_network(endpoint: str) -> bool:
    """True when a zmq bind endpoint accepts connections from other machines.

    Loopback tcp, ipc (guarded by file permissions) and inproc are local; a transport
    zmq does not know is left to fail at bind, with zmq's own message.
    """
    scheme = endpoint.partition("://")[0]
    if scheme != "tcp":
        return scheme in ("pgm", "epgm", "ws", "wss", "tipc", "vmci", "udp")
    m = _TCP.fullmatch(endpoint)
    if not m:
        return True
    host = m.group(1) or m.group(2)
    if host in ("localhost", "lo"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: reachable from the network
        return True


class CurveAuth:
    """Makes a ROUTER socket a CurveZMQ server that admits the keys in ``DIR/authorized``."""

    def __init__(self, ctx: zmq.Context, key_dir: str):
        d = Path(key_dir)
        secret_file, authorized = d / "server.key_secret", d / "authorized"
        if not secret_file.is_file():
            raise ValueError(f"{secret_file} is missing: make keys with `rrto keygen {key_dir}`")
        if not authorized.is_dir():
            raise ValueError(f"{authorized} is missing: it holds the public keys of the robots to admit")
        public, secret = zmq.auth.load_certificate(secret_file)
        if not secret:
            raise ValueError(f"{secret_file} holds no secret key")
        self.public, self.secret = public, secret
        self.robots = len(zmq.auth.load_certificates(authorized))
        if self.robots == 0:
            log.warning("no robot keys in %s: every robot will be refused", authorized)
        self.authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("rrto.server.auth"))
        self.authenticator.start()
        self.authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(authorized))

    def secure(self, sock: zmq.Socket) -> None:
        """Call before bind: the socket then speaks only CurveZMQ with admitted robots."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = ZAP_DOMAIN.encode()

    def stop(self) -> None:
        self.authenticator.stop()
