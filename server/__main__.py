"""``rrto-server``: serve robots' offloaded operators from this machine's GPU (or CPU)."""
from __future__ import annotations

import argparse
import logging
import sys

from .auth import reachable_from_network

EPILOG = """\
examples:
  rrto-server                                  # loopback only, cuda if present else cpu
  rrto keygen keys/                            # once: server and robot key pairs, robot authorised
  rrto-server --keys keys/ --listen tcp://0.0.0.0:5555   # encrypted; only authorised robots
  python -m rrto --server tcp://EDGE:5555 --server-key server.key --robot-key robot.key_secret app.py

--keys DIR reads DIR/server.key_secret and admits the robots whose public keys are files
in DIR/authorized/ (read at start: restart to add or remove one). Without --keys, a
non-loopback --listen is refused unless --insecure says the network is trusted.

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
    p.add_argument("--weight-cache-mb", type=int, default=512,
                   help="content-addressed cache of robots' weights, shared by all sessions, MiB: a robot that "
                   "reconnects sends digests instead of the bytes (default: %(default)s)")
    p.add_argument("--heap-mmap-mb", type=int, default=1, metavar="MB",
                   help="allocations this big get their own memory mappings, returned on free: 1 keeps a "
                   "long-running server's memory flat under any traffic; a CPU server running big "
                   "convolutions is up to 2x faster with 32, at the cost of heap memory kept after "
                   "hostile traffic (no effect on GPU tensors) (default: %(default)s)")
    p.add_argument("--no-capture", action="store_true",
                   help="run replayed programs op by op only; by default a CPU server traces each program's "
                        "stretches of static steps into one graph call each (same kernels, less Python per op)")
    p.add_argument("--idle-timeout", type=float, default=1800.0,
                   help="close a session silent this many seconds (default: %(default)s)")
    p.add_argument("--keys", metavar="DIR",
                   help="CurveZMQ: encrypt the link, admit only robots whose keys are in DIR/authorized")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without --keys: anyone who reaches the port may run ops")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started this one exits (used for embedded servers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.keys and not args.insecure and reachable_from_network(args.listen):
        print(f"rrto-server: refusing to listen on {args.listen} without keys: any machine that reaches it could "
              "run ops here and read the traffic. Make keys with `rrto keygen DIR` and pass --keys DIR "
              "(robots then need --server-key and --robot-key), or pass --insecure on a network you trust.",
              file=sys.stderr)
        return 2
    import torch  # after the cheap checks: importing it takes seconds

    from . import capture
    from .daemon import Daemon
    from .session import Limits

    capture.ENABLED = not args.no_capture

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rrto-server: --device cuda, but torch sees no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    limits = Limits(max_session_bytes=args.max_session_mb << 20, max_tensor_bytes=args.max_tensor_mb << 20,
                    weight_cache_bytes=args.weight_cache_mb << 20)
    try:
        daemon = Daemon(args.listen, device, limits, max_sessions=args.max_sessions, heap_mmap_mb=args.heap_mmap_mb,
                        idle_timeout=args.idle_timeout, exit_with_parent=args.exit_with_parent, keys=args.keys)
    except ValueError as e:  # the key folder
        print(f"rrto-server: --keys {args.keys}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - bad endpoint, port in use: say so plainly
        print(f"rrto-server: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 2
    security = f"curve, {daemon.auth.robots} robot keys" if daemon.auth else "no keys"
    daemon.stop_on_signals()
    print(f"rrto-server listening on {daemon.endpoint} (device {device}, torch {torch.__version__}, {security})",
          flush=True)
    daemon.serve()
    logging.getLogger("rrto.server").info("rrto-server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
