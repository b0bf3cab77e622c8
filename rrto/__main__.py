"""``python -m rrto [options] app.py [args]``: run an unmodified CUDA app with its ops offloaded."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback

from .config import MODE_HELP, MODES
from .preload.cli import SUBCOMMANDS, parse_app_arguments

EPILOG = """\
environment: RRTO_SERVER, RRTO_MODE, RRTO_STATS, RRTO_TIMEOUT, RRTO_PROGRESS, RRTO_REPEATS,
RRTO_SERVER_KEY, RRTO_ROBOT_KEY set the same options; command-line options win.

modes:
""" + "\n".join(f"  {m:6} {MODE_HELP[m]}" for m in MODES) + """

other commands (each has --help):
  rrto run [options] -- COMMAND ARGS   run any command (shell script, launcher) with every Python
                                       process under it offloaded, through an LD_PRELOAD shim
  rrto preload-path                    print the shim's path, for LD_PRELOAD in launch files
  rrto trace app.py ARGS               count the CUDA driver calls per inference on a local GPU

examples:
  python -m rrto examples/camera_loop.py            # embedded local server
  python -m rrto --server tcp://edge:5555 app.py --fps 30
  python -m rrto --mode rpc --stats rpc.json app.py
  python -m rrto --server tcp://edge:5555 --server-key keys/server.key --robot-key keys/robot.key_secret app.py

keys: `python -m rrto keygen DIR` (or `rrto keygen DIR`) makes them; see `rrto keygen --help`."""

KEYGEN_HELP = """\
writes CurveZMQ key pairs into DIR (made if missing):
  DIR/server.key            the server's public key: copy it to every robot (--server-key)
  DIR/server.key_secret     the server's key pair: stays on the server (rrto-server --keys DIR)
  DIR/NAME.key              the robot's public key
  DIR/NAME.key_secret       the robot's key pair: copy it to the robot (--robot-key), keep it private
  DIR/authorized/NAME.key   the robot keys the server admits: one file per robot
The server key pair is made once; run again with --robot NAME to add a robot. To revoke a
robot, delete its file from DIR/authorized and restart the server."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m rrto", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run a PyTorch app written for CUDA with its operators executed on an rrto-server. "
                    "The app is not modified and does not import rrto.")
    p.add_argument("--server", metavar="URL",
                   help="rrto-server to use, e.g. tcp://edge:5555 (default: start an embedded local server)")
    p.add_argument("--mode", choices=MODES, help="how ops reach the server (default: replay)")
    p.add_argument("--stats", metavar="PATH", help="write counters as JSON to PATH when the app exits")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for any server reply (default 30)")
    p.add_argument("--fault-timeout", type=float, metavar="S",
                   help="seconds without any sign of life from the server (a reply, or the answer to a ping "
                   "sent while waiting) after which it counts as lost: the app goes on on this machine's CPU "
                   "and rrto reconnects in the background (default 2; RRTO_FAULT_TIMEOUT)")
    p.add_argument("--server-key", metavar="PATH",
                   help="the server's public key file (server.key): encrypt the link with CurveZMQ")
    p.add_argument("--robot-key", metavar="PATH",
                   help="this robot's key pair file (NAME.key_secret), authorised on the server")
    p.add_argument("--progress", action="store_true", default=None,
                   help="print messages and bytes per torch.cuda.synchronize() call")
    p.add_argument("--repeats", type=int, metavar="K",
                   help="replay: adopt the per-inference op sequence once it repeated K times (default 2)")
    p.add_argument("--quiet", action="store_true", help="no summary line at exit")
    return parse_app_arguments(p, argv, "name the app to run, e.g. python -m rrto app.py")


def keygen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rrto keygen", description="Make CurveZMQ keys for rrto-server --keys.",
                                epilog=KEYGEN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="the key folder")
    p.add_argument("--robot", default="robot", metavar="NAME", help="name of the robot key pair (default: robot)")
    ns = p.parse_args(argv)
    from .keys import keygen

    try:
        for path in keygen(ns.dir, ns.robot):
            print(path)
    except (OSError, ValueError) as e:
        print(f"rrto keygen: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"] and not os.path.exists("keygen"):  # an app file named keygen still runs
        return keygen_main(argv[1:])
    # A subcommand unless it names a file: `python -m rrto run` still runs a script called "run".
    if argv and argv[0] in SUBCOMMANDS and not os.path.exists(argv[0]):
        from .preload.cli import main as subcommand

        return subcommand(argv)
    ns = parse_args(argv)
    if ns.script and not os.path.exists(ns.script):
        print(f"rrto: no such file: {ns.script}", file=sys.stderr)
        return 2
    import rrto  # after argument errors, so --help stays fast

    try:
        rrto.enable(ns.server, ns.mode, stats=ns.stats, timeout=ns.timeout, fault_timeout=ns.fault_timeout,
                    progress=ns.progress,
                    repeats=ns.repeats, server_key=ns.server_key, robot_key=ns.robot_key)
    except (rrto.RrtoError, ValueError) as e:
        print(f"rrto: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    offload = rrto.current()
    code = 0
    try:
        if ns.module:
            sys.argv = [ns.module, *ns.args]
            runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [ns.script, *ns.args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
            runpy.run_path(ns.script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 - report like python would, without our frames
        tb = e.__traceback__
        while tb is not None and not _is_app_frame(tb):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        code = 1
    finally:
        stats = offload.stats
        rrto.disable()
        if not ns.quiet:
            print(summary(stats.snapshot()), file=sys.stderr)
    return code


def _is_app_frame(tb) -> bool:
    f = tb.tb_frame.f_code.co_filename
    return not (f.endswith("runpy.py") or f == __file__)


def summary(s: dict) -> str:
    if s["mode"] == "local":
        return "rrto: local mode (no offload)"
    where = f"{s['server']}" + (" (embedded)" if s["embedded_server"] else "")
    return (f"rrto: {s['mode']} mode via {where}, server {s['server_device']} torch {s['server_torch']}: "
            f"{s['ops_intercepted']} ops, {s['messages_sent']} messages, {s['round_trips']} round trips, "
            f"{s['bytes_sent'] / 1e6:.1f} MB up, {s['bytes_received'] / 1e6:.1f} MB down, "
            f"{s['wall_s']:.1f} s" + _replay_summary(s))


def _replay_summary(s: dict) -> str:
    if s["mode"] not in ("replay", "lop", "partition"):
        return ""
    if not s["sequence_found"]:
        return "; no repeating op sequence found (ran eagerly)"
    lop = (f"; {s['lop_inferences']} in {s['lop_bands']} bands ({s['lop_robot_bands']} on the robot, "
           f"cut at step {s['lop_depth']})" if s["mode"] in ("lop", "partition") else "")
    return (f"; replayed {s['replayed_inferences']} inferences of {s['sequence_length']} ops "
            f"({s['messages_per_replayed_inference']} messages each), {s['replay_divergences']} divergences" + lop)


if __name__ == "__main__":
    sys.exit(main())
