"""``rrto run``, ``rrto trace`` and ``rrto preload-path``: the preload shim from the command line."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

from ..config import MODES, normalize_url
from . import library_path

SUBCOMMANDS = ("run", "trace", "preload-path")

RUN_EPILOG = """\
Every Python process under COMMAND that imports torch is offloaded, each with its own
session: shell scripts, launchers, subprocess.run([sys.executable, "worker.py"]),
multiprocessing with the spawn start method. Other programs (bash, pip, C++ nodes) run
as they are. Without --server (or RRTO_SERVER) one embedded server runs for the whole
tree. --stats PATH gets one file per process: PATH with {pid} replaced by the process id,
or with .PID put before its extension. Programs named in RRTO_EXCLUDE (comma-separated
script or module names) are not offloaded.

The same without rrto run, e.g. in a roslaunch file or a systemd unit:
  LD_PRELOAD=$(rrto preload-path) RRTO_SERVER=tcp://edge:5555 roslaunch robot bringup.launch

examples:
  rrto run -- ./start_robot.sh
  rrto run --server tcp://edge:5555 --stats /tmp/rrto-{pid}.json -- python3 app.py --fps 30"""

TRACE_EPILOG = """\
Runs the app on this machine's own GPU (no offload) with the shim counting the CUDA driver
calls the framework makes: kernel and graph launches, copies, memsets, allocations, frees,
synchronisations and event calls, also those whose entry points PyTorch's statically linked
CUDA runtime gets from cuGetProcAddress. Each torch.cuda.synchronize() ends an inference.
A CUDA-API remoting system pays a message per driver call; rrto's record/replay pays 2 per
inference. The same counting under any launcher: RRTO_TRACE_CUDA=1 with the shim preloaded
prints this report per process at exit.

example:
  rrto trace examples/camera_loop.py --frames 20"""



def parse_app_arguments(p: argparse.ArgumentParser, argv: list[str] | None, missing: str) -> argparse.Namespace:
    """Parse ``p``'s options followed by the app: ``app.py ARGS...`` or ``-m MODULE ARGS...``.

    ``missing``: the error when no app is named."""
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module as a script (like python -m)")
    p.add_argument("script", nargs="?", help="the app to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the app's own arguments")
    ns = p.parse_args(argv)
    if ns.module and ns.script:
        ns.args, ns.script = [ns.script, *ns.args], None
    if not ns.module and not ns.script:
        p.error(missing)
    return ns

def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    return {"run": run, "trace": trace, "preload-path": preload_path}[command](rest)


def _shim() -> str:
    try:
        return str(library_path())
    except RuntimeError as e:
        print(f"rrto: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _preload_env(env: dict) -> dict:
    shim = _shim()
    current = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    env = dict(env)
    env["LD_PRELOAD"] = ":".join([shim] + [p for p in current if p != shim])
    return env


def preload_path(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="rrto preload-path", description="Print the path of rrto's LD_PRELOAD shim, building it first "
        "if this installation has none yet (needs a C compiler, about a second).",
        epilog="example:\n  LD_PRELOAD=$(rrto preload-path) RRTO_SERVER=tcp://edge:5555 ./start_robot.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-build", action="store_true", help="print where it would be, without building it")
    ns = p.parse_args(argv)
    if ns.no_build:
        print(library_path(build=False))
        return 0
    print(_shim())
    return 0


def _command(p: argparse.ArgumentParser, words: list[str]) -> list[str]:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        p.error("name the command to run after --")
    return words


def _wait(proc: subprocess.Popen) -> int:
    """Wait like a shell: the child gets Ctrl-C from the terminal itself; a SIGTERM or SIGHUP
    sent to us (systemd stopping the unit) is passed on. Returns the shell's exit status."""
    forwarded = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    old = {s: signal.signal(s, lambda sig, _frame: proc.send_signal(sig)) for s in forwarded}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def _start(cmd: list[str], env: dict) -> subprocess.Popen | int:
    try:
        return subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        print(f"rrto: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"rrto: permission denied: {cmd[0]}", file=sys.stderr)
        return 126


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="rrto run", usage="rrto run [options] -- COMMAND [ARGS...]",
        description="Run any command with its Python processes offloaded (LD_PRELOAD shim); "
                    "exits with the command's exit status.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", metavar="URL", help="rrto-server to use (default: RRTO_SERVER, else one embedded "
                   "local server for the whole command)")
    p.add_argument("--mode", choices=MODES, help="how ops reach the server (default: RRTO_MODE, else replay)")
    p.add_argument("--stats", metavar="PATH", help="write each process's counters as JSON (see below)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds to wait for any server reply")
    p.add_argument("--fault-timeout", type=float, metavar="S",
                   help="seconds of server silence after which the app goes on on this machine's CPU (default 2)")
    p.add_argument("--repeats", type=int, metavar="K", help="replay: adopt a sequence once it repeated K times")
    p.add_argument("--server-key", metavar="PATH", help="the server's public key file (CurveZMQ)")
    p.add_argument("--robot-key", metavar="PATH", help="this robot's key pair file (NAME.key_secret)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    ns = p.parse_args(argv)
    cmd = _command(p, ns.command)
    env = _preload_env(os.environ)
    for name, value in (("SERVER", ns.server), ("MODE", ns.mode), ("STATS", ns.stats), ("TIMEOUT", ns.timeout),
                        ("FAULT_TIMEOUT", ns.fault_timeout),
                        ("REPEATS", ns.repeats), ("SERVER_KEY", ns.server_key), ("ROBOT_KEY", ns.robot_key)):
        if value is not None:
            env["RRTO_" + name] = str(value)
    try:
        if env.get("RRTO_SERVER"):
            env["RRTO_SERVER"] = normalize_url(env["RRTO_SERVER"])
    except ValueError as e:
        p.error(str(e))
    embedded = None
    if not env.get("RRTO_SERVER") and env.get("RRTO_MODE", "replay") != "local":
        from ..errors import LinkError
        from ..intercept.embedded import EmbeddedServer

        try:
            embedded = EmbeddedServer()
        except LinkError as e:
            print(f"rrto: {e}", file=sys.stderr)
            return 2
        env["RRTO_SERVER"] = embedded.url
    try:
        proc = _start(cmd, env)
        return proc if isinstance(proc, int) else _wait(proc)
    finally:
        if embedded is not None:
            embedded.stop()


def trace(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="rrto trace", usage="rrto trace [options] (app.py | -m MODULE) [ARGS...]",
        description="Count the CUDA driver calls an app makes per inference on this machine's GPU.",
        epilog=TRACE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--syncs-per-inference", type=int, default=1, metavar="K",
                   help="torch.cuda.synchronize() calls the app makes per inference (default 1)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="inferences left out of the per-inference median (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ns = parse_app_arguments(p, argv, "name the app to trace, e.g. rrto trace app.py")
    if ns.syncs_per_inference < 1 or ns.warmup < 0:
        p.error("--syncs-per-inference must be at least 1 and --warmup at least 0")
    if ns.script and not os.path.exists(ns.script):
        print(f"rrto: no such file: {ns.script}", file=sys.stderr)
        return 2
    from .trace import analyse, format_report

    cmd = [sys.executable, *(["-m", ns.module] if ns.module else [ns.script]), *ns.args]
    with tempfile.TemporaryDirectory(prefix="rrto-trace-") as out:
        env = {**_preload_env(os.environ), "RRTO_TRACE_CUDA": "1", "RRTO_TRACE_OUT": out}
        proc = _start(cmd, env)
        code = proc if isinstance(proc, int) else _wait(proc)
        reports = []
        for name in sorted(os.listdir(out), key=lambda n: int(n.split(".")[0])):
            if name.endswith(".json"):
                with open(os.path.join(out, name)) as f:
                    reports.append(analyse(json.load(f), ns.syncs_per_inference, ns.warmup))
    if not reports:
        print("rrto trace: the app wrote no trace (it never imported torch, or exited with os._exit); "
              "no CUDA driver calls were seen", file=sys.stderr)
    for a in reports:
        print(format_report(a))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"exit_code": code, "processes": reports}, f, indent=2)
            f.write("\n")
    return code
