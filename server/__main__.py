"""``rrto-server``: serve robots' offloaded operators from this machine's GPU (or CPU)."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from .daemon import Daemon
from .session import Limits

EPILOG = """\
examples:
  rrto-server                                  # loopback only, cuda if present else cpu
  rrto-server --listen tcp://0.0.0.0:5555      # accept robots on every interface
  python -m rrto --server tcp://EDGE:5555 app.py   # on the robot

The server prints one line, 'rrto-server listening on URL ...', once it is ready.
Ctrl-C or SIGTERM stop it cleanly."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rrto-server", description="Edge daemon of rrto: runs the operators that robots offload to it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="tcp://127.0.0.1:5555",
                   help="zmq endpoint to bind; port 0 picks a free one (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where ops run; auto is cuda when this machine has one, else cpu")
    p.add_argument("--max-sessions", type=int, default=64, help="robots served at once (default: %(default)s)")
    p.add_argument("--max-session-mb", type=int, default=8192,
                   help="memory one robot's tensors may hold, MiB (default: %(default)s)")
    p.add_argument("--max-tensor-mb", type=int, default=4096,
                   help="largest single tensor, MiB (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=1800.0,
                   help="close a session silent this many seconds (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started this one exits (used for embedded servers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rrto-server: --device cuda, but torch sees no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    limits = Limits(max_session_bytes=args.max_session_mb << 20, max_tensor_bytes=args.max_tensor_mb << 20)
    try:
        daemon = Daemon(args.listen, device, limits, max_sessions=args.max_sessions,
                        idle_timeout=args.idle_timeout, exit_with_parent=args.exit_with_parent)
    except Exception as e:  # noqa: BLE001 - bad endpoint, port in use: say so plainly
        print(f"rrto-server: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 2
    print(f"rrto-server listening on {daemon.endpoint} (device {device}, torch {torch.__version__})", flush=True)
    daemon.serve()
    logging.getLogger("rrto.server").info("rrto-server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
