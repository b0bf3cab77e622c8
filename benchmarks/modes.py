"""Camera loop in each mode, side by side in one run: latency and messages per inference.

    python benchmarks/modes.py [--frames 20] [--arch resnet18] [--server URL]

Starts one rrto-server (unless --server is given) and runs the unmodified camera loop
through ``python -m rrto --progress`` in local, eager and rpc mode, alternating the
modes over several rounds so that machine noise spreads evenly. Per inference it
reads the app's own latency line and rrto's per-synchronize line (one per frame).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAME = re.compile(r"frame\s+(\d+):\s+([\d.]+) ms")
SYNC = re.compile(r"rrto: sync \d+: [\d.]+ ms, (\d+) messages, (\d+) round trips, ([\d.]+) kB up, ([\d.]+) kB down")


def run(mode: str, server: str, frames: int, arch: str) -> dict:
    cmd = [sys.executable, "-m", "rrto", "--mode", mode, "--progress", "--quiet"]
    if mode != "local":
        cmd += ["--server", server]
    cmd += ["examples/camera_loop.py", "--frames", str(frames), "--arch", arch]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-2000:]}")
    lat = [float(m.group(2)) for m in FRAME.finditer(res.stdout)][1:]  # the first frame plans every op
    syncs = [tuple(map(float, m.groups())) for m in SYNC.finditer(res.stderr)][1:]
    return {"latency": lat, "syncs": syncs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--server", help="use this rrto-server instead of starting one on loopback")
    args = p.parse_args()
    server, proc = args.server, None
    if server is None:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--listen", "tcp://127.0.0.1:0", "--device", "cpu",
                                 "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        server = re.search(r"listening on (\S+)", proc.stdout.readline()).group(1)
    modes = ["local", "eager", "rpc"]
    results = {m: {"latency": [], "syncs": []} for m in modes}
    try:
        for r in range(args.rounds):
            for m in modes:
                out = run(m, server, args.frames, args.arch)
                results[m]["latency"] += out["latency"]
                results[m]["syncs"] += out["syncs"]
                print(f"round {r + 1}/{args.rounds}: {m} done", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    base = statistics.median(results["local"]["latency"])
    print(f"\ncamera loop, {args.arch}, {args.frames} frames x {args.rounds} rounds, server {server}")
    print(f"{'mode':6} {'median ms':>10} {'vs local':>9} {'msgs/inf':>9} {'waits/inf':>10} {'kB up/inf':>10}")
    for m in modes:
        med = statistics.median(results[m]["latency"])
        s = results[m]["syncs"]
        per = [statistics.median(col) for col in zip(*s)] if s else [0, 0, 0, 0]
        print(f"{m:6} {med:10.1f} {med / base:9.2f} {per[0]:9.0f} {per[1]:10.0f} {per[2]:10.1f}")


if __name__ == "__main__":
    main()
