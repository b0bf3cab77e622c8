"""Robot emulation: the robot process gets only a share of one CPU core (a cgroup CPU quota).

On this kind of machine the server and the robot are the same CPU; a quota makes the
robot's own compute Jetson-class slow relative to the server. cgroup v1 (``cpu`` controller:
``cpu.cfs_quota_us``) and v2 (``cpu.max``) both work; the group is removed at the end.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# A short period spreads the share over each inference, as a slower CPU would: with
# 100 ms a half-core robot ran any inference under 50 ms at full speed and then stalled.
PERIOD_US = 10_000


class CpuLimit:
    """``share`` of one core (0.5: half a core); None or 0: no limit."""

    def __init__(self, share: float | None, name: str):
        self.share = share or None
        self.path: Path | None = None
        self.how = "no limit"
        if self.share is None:
            return
        quota = max(int(self.share * PERIOD_US), 1000)
        if (CGROUP / "cpu" / "cpu.cfs_quota_us").exists():  # v1 (also a hybrid host's v1 cpu hierarchy)
            self.path = CGROUP / "cpu" / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            self.how = f"cgroup v1 cpu quota {quota}/{PERIOD_US} us"
        elif "cpu" in _read(CGROUP / "cgroup.controllers").split():
            if "cpu" not in _read(CGROUP / "cgroup.subtree_control").split():
                (CGROUP / "cgroup.subtree_control").write_text("+cpu")
            self.path = CGROUP / name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            self.how = f"cgroup v2 cpu.max {quota} {PERIOD_US}"
        else:
            raise OSError("no cgroup cpu controller under /sys/fs/cgroup; run with --robot-cpu 0 (no limit)")

    @property
    def threads(self) -> int:
        """Torch threads for the robot: as many as its share of cores, so they don't thrash the quota."""
        return max(1, math.ceil(self.share)) if self.share else (os.cpu_count() or 1)

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside the group (it moves itself in before exec, so all of it counts)."""
        if self.path is None:
            return cmd
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def describe(self) -> dict:
        return {"cpu_share": self.share, "limit": self.how, "torch_threads": self.threads,
                "cgroup": str(self.path) if self.path else None}

    def close(self) -> None:
        if self.path is None:
            return
        for _ in range(50):  # the group can go only once its processes have exited
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        self.path = None


class CoreSplit:
    """Robot and servers on disjoint cores, as if they were two machines sharing this one.

    With shared cores a robot that works while the server computes (replay walking its recording,
    lop computing its bands) steals the server's core, while ``direct``'s idle robot steals nothing:
    the comparison would measure this host, not the modes. ``robot`` gets the first ceil(share)
    physical cores, one hardware thread of each, and the servers the other physical cores: on
    an SMT host the robot's siblings stay idle, since a hyperthread busy with the server runs
    on the robot's core. Where sysfs shows no siblings (this sandbox, the lent H100 host) each
    logical CPU is a core; with too few cores nothing is pinned."""

    def __init__(self, share: float | None, enabled: bool = True, cores: list[int] | None = None,
                 siblings: dict[int, frozenset[int]] | None = None):
        cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
        siblings = _siblings(cores) if siblings is None else siblings
        need = max(1, math.ceil(share or 0))
        self.robot: list[int] | None = None
        self.server: list[int] | None = None
        self.idle: list[int] = []
        by_core: dict[frozenset, list[int]] = {}  # physical core -> its usable hardware threads, in order
        for c in cores:
            by_core.setdefault(siblings.get(c, frozenset((c,))), []).append(c)
        physical = list(by_core.values())
        if not enabled or not share:
            return
        if len(physical) > need:
            self.robot = [threads[0] for threads in physical[:need]]
            self.idle = [c for threads in physical[:need] for c in threads[1:]]
            self.server = [c for threads in physical[need:] for c in threads]
        elif len(cores) > need:  # (one physical core: siblings are all there is)
            self.robot, self.server = cores[:need], cores[need:]

    def pin(self, which: str):
        """A ``preexec_fn`` putting a child on ``which`` ("robot" or "server") cores (None: not pinned)."""
        cores = self.robot if which == "robot" else self.server
        return None if cores is None else (lambda: os.sched_setaffinity(0, cores))

    def describe(self) -> dict:
        return {"robot_cores": self.robot, "server_cores": self.server, "idle_siblings": self.idle}


def _siblings(cores: list[int]) -> dict[int, frozenset[int]]:
    """Each core's hardware threads (itself and its SMT siblings), from sysfs; {} where unknown."""
    out = {}
    for c in cores:
        text = _read(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")).strip()
        try:
            out[c] = frozenset(_cpu_list(text))
        except ValueError:
            continue
    return out


def _cpu_list(text: str) -> list[int]:
    """``"0-1,8"`` -> [0, 1, 8] (the kernel's CPU list format)."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
