"""Settings of one offload: explicit arguments first, then RRTO_* environment variables."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

MODES = ("replay", "lop", "partition", "eager", "rpc", "local")
MODE_HELP = {
    "replay": "record the per-inference op sequence, then replay it: one upload, one download per inference",
    "lop": "replay, the input sent in row bands: the robot computes some bands of the first layers "
           "while the others travel (local operator parallelism)",
    "partition": "replay with the best single layer cut (Neurosurgeon-style baseline): the robot "
                 "runs the first layers, the server the rest",
    "local": "no offload: 'cuda' is the robot's own CPU (for comparison)",
    "eager": "every op streams to the server; the robot waits only for data it needs",
    "rpc": "every op waits for the server's reply (the classic per-call remoting baseline)",
}


@dataclass
class Config:
    server: str | None = None  # None: start an embedded local server
    mode: str = "replay"
    stats: str | None = None  # path of the JSON stats file written at exit
    timeout: float = 30.0  # seconds to wait for any reply before raising LinkError
    # seconds of silence (no reply, no answer to a ping) after which the server counts as lost:
    # the app then runs on the robot's CPU and rrto reconnects in the background
    fault_timeout: float = 2.0
    progress: bool = False  # print a line per torch.cuda.synchronize()
    repeats: int = 2  # replay: adopt a sequence after it repeated this many times
    # replay: the upload lets the server run the rest of the inference at once and send every
    # answer unasked (one message per inference); off (RRTO_AHEAD=0): it runs what the robot confirmed
    ahead: bool = True
    server_key: str | None = None  # the server's public key file: encrypt and authenticate the link
    robot_key: str | None = None  # this robot's .key_secret file (its key pair)

    @classmethod
    def resolve(cls, **given) -> "Config":
        """Config from the given values, falling back to RRTO_<NAME> variables, then defaults."""
        values = {}
        for f in fields(cls):
            v = given.get(f.name)
            if v is None:
                v = os.environ.get("RRTO_" + f.name.upper()) or None
                if v is not None and f.name in ("timeout", "fault_timeout"):
                    v = float(v)
                if v is not None and f.name == "repeats":
                    v = int(v)
                if v is not None and f.name in ("progress", "ahead"):
                    v = v.lower() not in ("0", "false", "no", "")
            if v is not None:
                values[f.name] = v
        cfg = cls(**values)
        if cfg.mode not in MODES:
            raise ValueError(f"unknown rrto mode {cfg.mode!r}; choose one of: {', '.join(MODES)}")
        if cfg.server is not None:
            cfg.server = normalize_url(cfg.server)
        if cfg.repeats < 2:
            raise ValueError(f"rrto repeats must be 2 or more (a sequence is known once it repeated), not {cfg.repeats}")
        if (cfg.server_key or cfg.robot_key) and cfg.server is None and cfg.mode != "local":
            raise ValueError("--server-key/--robot-key (RRTO_SERVER_KEY/RRTO_ROBOT_KEY) are for a remote "
                             "rrto-server: give its address with --server URL too")
        if not cfg.timeout > 0:
            raise ValueError(f"rrto timeout must be a positive number of seconds, not {cfg.timeout!r}")
        if not cfg.fault_timeout > 0:
            raise ValueError(f"rrto fault timeout must be a positive number of seconds, not {cfg.fault_timeout!r}")
        return cfg


def normalize_url(url: str) -> str:
    """'host:port' and 'tcp://host:port' both name a TCP endpoint; ipc:// passes through."""
    if "://" not in url:
        if ":" not in url:
            raise ValueError(f"server address {url!r} needs a port, e.g. tcp://{url}:5555")
        url = "tcp://" + url
    if not url.startswith(("tcp://", "ipc://")):
        raise ValueError(f"server address {url!r} must start with tcp:// or ipc://")
    return url
