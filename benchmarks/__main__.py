"""``python -m benchmarks``: every mode, model and link side by side; a table, results.json and plots.

    python -m benchmarks --quick --out results/          # < 2 minutes: the smoke preset
    python -m benchmarks --models resnet18,keypoint:192x320 --links lan,indoor,fixed:93mbit,4ms \\
        --modes local,rpc,eager,direct --robot-cpu 0.5 --frames 10 --repeats 2 --out results/

Run it as root for real link emulation (network namespaces, veth, tbf); elsewhere it
falls back to a userspace shaping relay and says so. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .energy import PowerModel
from .harness import MODE_ORDER, Settings, run_benchmark
from .links import parse_link
from .report import report_text, write_all
from .workloads import parse_workload

QUICK = {"models": "mobilenet_v2:96", "links": "lan,fixed:100mbit,10ms", "modes": "local,eager,direct",
         "frames": 4, "warmup": 2, "repeats": 1}
DEFAULTS = {"models": "resnet18", "links": "lan,indoor,fixed:93mbit,4ms", "modes": ",".join(MODE_ORDER),
            "frames": 20, "warmup": 8, "repeats": 3}

EPILOG = """\
models: resnet18, resnet50, vgg11, mobilenet_v2 (camera_loop.py, optional :SIZE), keypoint[:HxW]
  (keypoint_loop.py), scene[:ZxYxX] (scene_completion.py)
links: lan (unshaped), indoor (trace, mean 93 Mbit/s, +4 ms RTT), outdoor (trace, mean 73 Mbit/s with
  deep drops, +8 ms RTT), fixed:RATE,RTT (e.g. fixed:93mbit,4ms), trace:PATH.csv,RTT
modes: local, rpc, eager, replay-confirmed, replay, direct, partition, lop; a mode the installed rrto
  does not have is reported as "not available". direct is the hand-written offload (benchmarks/direct.py);
  replay-confirmed is replay with RRTO_AHEAD=0 (the server runs only steps the robot confirmed)."""


def _list(given) -> list[str]:
    """Names from space- and comma-separated arguments; ``fixed:93mbit,4ms`` keeps its comma."""
    out: list[str] = []
    for arg in [given] if isinstance(given, str) else given:
        for piece in filter(None, (x.strip() for x in arg.split(","))):
            if out and piece[0].isdigit() and out[-1].startswith(("fixed:", "trace:")) and "," not in out[-1]:
                out[-1] += "," + piece
            else:
                out.append(piece)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help=f"space- or comma-separated (default {DEFAULTS['models']})")
    p.add_argument("--links", nargs="+", help=f"space- or comma-separated (default {DEFAULTS['links']})")
    p.add_argument("--modes", nargs="+", help="space- or comma-separated (default: all of them)")
    p.add_argument("--out", default="results", help="folder for results.json, the plots and logs (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke preset, < 2 min on 2 cores: {QUICK['models']}, {QUICK['links']}, {QUICK['modes']}, "
                        f"{QUICK['frames']} frames; explicit options still win")
    p.add_argument("--frames", type=int, help="measured frames per run (default 20)")
    p.add_argument("--warmup", type=int, help="frames run first and not measured (default 8: replay records, "
                   "registers and traces its program in its 4th-6th frames)")
    p.add_argument("--repeats", type=int, help="runs per mode, model and link, interleaved (default 3)")
    p.add_argument("--robot-cpu", type=float, default=1.0, metavar="CORES",
                   help="the robot process's CPU quota in cores, e.g. 0.5; 0: no limit (default %(default)s)")
    p.add_argument("--server-device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where rrto-server and the direct server run ops (default: cuda if present)")
    p.add_argument("--no-capture", action="store_true",
                   help="start rrto-server with --no-capture: programs run op by op, no traced graph or CUDA graph")
    p.add_argument("--server-threads", type=int, metavar="N",
                   help="torch threads of the servers (default: the cores the robot's quota leaves, at least 1)")
    p.add_argument("--shared-cores", action="store_true",
                   help="let robot and servers run on any core; by default the robot gets its own core(s) and the "
                        "servers the others, as two machines would")
    p.add_argument("--emulation", default="auto", choices=["auto", "netns", "userspace"],
                   help="link emulation: namespaces + tbf (root), the userspace relay, or auto (default)")
    p.add_argument("--power", default="", metavar="STATE=W,...",
                   help="robot power states, e.g. compute=13.35,transmit=4.25,both=13.35,idle=4.04 (Jetson Xavier "
                        "NX, the default)")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds one app run may take")
    return p.parse_args(argv)


def settings_from(ns: argparse.Namespace) -> Settings:
    preset = QUICK if ns.quick else DEFAULTS
    pick = lambda name: getattr(ns, name) if getattr(ns, name) is not None else preset[name]  # noqa: E731
    modes = _list(pick("modes"))
    unknown = [m for m in modes if m not in MODE_ORDER]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODE_ORDER)}")
    frames, warmup, repeats = pick("frames"), pick("warmup"), pick("repeats")
    if frames < 1 or warmup < 0 or repeats < 1:
        raise ValueError("--frames and --repeats must be at least 1, --warmup at least 0")
    return Settings(workloads=[parse_workload(m) for m in _list(pick("models"))],
                    links=[parse_link(x) for x in _list(pick("links"))], modes=modes, out=Path(ns.out),
                    frames=frames, warmup=warmup, repeats=repeats, robot_cpu=ns.robot_cpu or None,
                    server_device=ns.server_device,
                    server_capture=not ns.no_capture, server_threads=ns.server_threads, emulation=ns.emulation,
                    separate_cores=not ns.shared_cores, power=PowerModel.parse(ns.power),
                    run_timeout=ns.run_timeout)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        s = settings_from(ns)
    except ValueError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    try:
        results = run_benchmark(s)
    except KeyboardInterrupt:
        print("\nbenchmarks: interrupted; namespaces, cgroup and processes cleaned up", file=sys.stderr)
        return 130
    path = s.out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(report_text(results))
    for p in write_all(results, s.out):
        print(f"wrote {p}")
    print(f"wrote {path}")
    failed = [r for r in results["results"] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
