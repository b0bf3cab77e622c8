"""8 robots x 200 replayed inferences against one server, at the same time."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from .conftest import ROOT, ServerProcess

ROBOTS, INFERENCES = 8, 200


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_files(d, prefix: str, procs, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while sum((d / f"{prefix}{r}").exists() for r in range(ROBOTS)) < ROBOTS:
        assert time.time() < deadline, f"robots did not all reach '{prefix}'"
        for p in procs:
            assert p.poll() is None or p.returncode == 0, p.stderr.read()
        time.sleep(0.05)


def test_eight_robots_replaying_at_once(tmp_path):
    server = ServerProcess()
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "tests/apps/load_robot.py", str(r), server.url, str(tmp_path),
                                   str(INFERENCES)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for r in range(ROBOTS)]
        wait_files(tmp_path, "half", procs)
        time.sleep(0.5)
        half = rss_mb(server.proc.pid)
        (tmp_path / "go").touch()
        wait_files(tmp_path, "done", procs)
        time.sleep(0.5)
        end = rss_mb(server.proc.pid)
        (tmp_path / "end").touch()
        for p in procs:
            assert p.wait(60) == 0, p.stderr.read()[-2000:]
        results = [json.loads((tmp_path / f"done{r}").read_text()) for r in range(ROBOTS)]
        assert all(r["wrong"] == 0 for r in results), [r["wrong"] for r in results]
        for r in results:
            s = r["stats"]
            assert s["replayed_inferences"] >= INFERENCES - 5 and s["replay_divergences"] == 0, s
        throughput = ROBOTS * INFERENCES / max(r["elapsed"] for r in results)
        print(f"\n{ROBOTS} robots x {INFERENCES} inferences: {throughput:.0f} inferences/s in all; "
              f"server RSS {half:.0f} MB at half time, {end:.0f} MB at the end")
        assert end - half < 32, f"server memory grew from {half:.0f} MB to {end:.0f} MB"
        assert server.alive()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
