"""CurveZMQ keys of the robot-edge link: ``rrto keygen DIR`` and loading the files it writes.

A key directory holds ZeroMQ certificate files (text, Z85-encoded keys)::

    DIR/server.key            the server's public key: give it to every robot (--server-key)
    DIR/server.key_secret     the server's key pair: stays on the server (rrto-server --keys DIR)
    DIR/robot.key             a robot's public key
    DIR/robot.key_secret      that robot's key pair: copy it to the robot (--robot-key)
    DIR/authorized/robot.key  public keys of the robots the server accepts, one file each

Secret files are written readable by their owner only.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CurveKeys(NamedTuple):
    """What a robot's socket needs for an encrypted, authenticated link (Z85 bytes)."""
    server_public: bytes
    public: bytes
    secret: bytes


def keygen(folder: str | os.PathLike, robot: str = "robot") -> list[Path]:
    """Write a server key pair (unless DIR has one) and a new robot key pair, authorised.

    Returns the files written. An existing robot key of that name is never overwritten.
    """
    if not _NAME.fullmatch(robot) or robot == "server":
        raise ValueError(f"robot name {robot!r} must be letters, digits, '_', '.', '-' (and not 'server')")
    d = Path(folder)
    authorized = d / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    if (d / f"{robot}.key").exists() or (d / f"{robot}.key_secret").exists():
        raise FileExistsError(f"{d / robot}.key already exists; pick another name with --robot NAME")
    written: list[Path] = []
    names = [robot] if (d / "server.key_secret").exists() else ["server", robot]
    for name in names:
        public, secret = (Path(p) for p in zmq.auth.create_certificates(d, name))
        secret.chmod(0o600)
        written += [public, secret]
    shutil.copyfile(d / f"{robot}.key", authorized / f"{robot}.key")
    written.append(authorized / f"{robot}.key")
    return written


def load_public(path: str | os.PathLike) -> bytes:
    """The public key in a .key (or .key_secret) file."""
    public, _ = _load(path)
    return public


def load_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a .key_secret file; a .key path finds its .key_secret beside it."""
    p = Path(path)
    if p.suffix == ".key" and Path(str(p) + "_secret").exists():
        p = Path(str(p) + "_secret")
    public, secret = _load(p)
    if not secret:
        raise ValueError(f"{p} holds no secret key: pass the .key_secret file written by `rrto keygen`")
    return public, secret


def curve_keys(server_key: str | None, robot_key: str | None) -> CurveKeys | None:
    """The robot's curve settings from the two paths; None when neither is given."""
    if server_key is None and robot_key is None:
        return None
    if server_key is None or robot_key is None:
        raise ValueError("an encrypted link needs both the server's public key (--server-key / RRTO_SERVER_KEY) "
                         "and this robot's key pair (--robot-key / RRTO_ROBOT_KEY)")
    if not zmq.has("curve"):
        raise ValueError("this pyzmq's libzmq was built without CURVE support; install pyzmq from its wheels")
    public, secret = load_pair(robot_key)
    return CurveKeys(load_public(server_key), public, secret)


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a key from {path}: {e}; make keys with `rrto keygen DIR`") from None
    if not public or len(public) != 40:
        raise ValueError(f"{path} is not a key file written by `rrto keygen`")
    return public, secret
