"""The benchmark run: every mode, model and link side by side, measured the same way.

For each repeat, link and model it runs the unmodified example app as the robot
(``python -m rrto --mode M``, or the ``direct`` client) inside the robot's namespace
and CPU quota, against servers in the server's namespace, with the modes' order
rotated between repeats so that machine noise spreads evenly. Per frame it reads the
app's ``--timings`` file (wall and CPU time) and rrto's per-synchronize progress line
(messages and bytes); warm-up frames are dropped.
"""
from __future__ import annotations

import atexit
import math
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .energy import PowerModel, robot_energy_j
from .links import LinkSpec, make_network, start_ready, stop
from .robot import CoreSplit, CpuLimit
from .workloads import ROOT, Workload

MODE_ORDER = ("local", "rpc", "eager", "replay-confirmed", "replay", "direct", "partition", "lop")
PLANNED = ("partition", "lop")  # modes that plan in the background on the robot's CPU
PLANNING_FRAMES = 40  # extra frames they run, so that their measured frames can start after the plan
HARNESS_MODES = ("direct", "replay-confirmed")  # implemented here, not by rrto
# an rrto mode run with settings of its own: replay where the server runs only what the robot confirmed
VARIANTS = {"replay-confirmed": ("replay", {"RRTO_AHEAD": "0"})}
SYNC = re.compile(r"rrto: sync \d+: [\d.]+ ms, (\d+) messages, (\d+) round trips, ([\d.]+) kB up, ([\d.]+) kB down")
FIRST_FRAME = re.compile(r"^\s*(frame|step)\s+0:")
ENERGY_SPLIT = ("compute_s", "transmit_s", "overlap_s")  # per-inference robot time split, where a mode reports it


@dataclass
class Settings:
    workloads: list[Workload]
    links: list[LinkSpec]
    modes: list[str]
    out: Path
    frames: int = 20
    warmup: int = 8
    repeats: int = 3
    robot_cpu: float | None = 1.0
    server_device: str = "auto"
    server_capture: bool = True  # False: rrto-server --no-capture (its programs run op by op)
    server_threads: int | None = None  # torch threads of the servers; None: the cores the robot leaves
    emulation: str = "auto"  # auto, netns or userspace
    separate_cores: bool = True  # robot and servers pinned to disjoint cores (CoreSplit)
    power: PowerModel = field(default_factory=PowerModel)
    run_timeout: float = 900.0
    check_bytes: int = 4_000_000


@dataclass
class Run:
    """One process run: its measured frames (warm-up dropped), its stats file, or why it failed."""
    frames: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    error: str | None = None
    unavailable: bool = False
    source: str = ""  # where the per-inference counts came from
    note: str | None = None  # something a reader of the figures must know (e.g. planning not ended)


class Cleanup:
    """Undo steps run in reverse order once: at the end, on an error, on Ctrl-C or SIGTERM, at exit."""

    def __init__(self):
        self.steps: list = []
        atexit.register(self.run)
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
        # Ctrl-C must unwind too, also where a shell started us with SIGINT ignored (a background job).
        self.old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_signal(self, signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally blocks

    def add(self, step) -> None:
        self.steps.append(step)

    def run(self) -> None:
        while self.steps:
            try:
                self.steps.pop()()
            except Exception as e:  # noqa: BLE001 - keep undoing the rest
                print(f"benchmarks: cleanup step failed: {e}", file=sys.stderr)
        for s, h in getattr(self, "old", {}).items():
            signal.signal(s, h)
        self.old = {}


class Progress:
    """A progress bar on stderr (a line per run where stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, label: str) -> None:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        eta = ""
        if self.done:
            left = (time.monotonic() - self.t0) / self.done * (self.total - self.done)
            eta = f"  ~{int(left // 60)}m{int(left % 60):02d}s left"
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}{eta}"
        if self.tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def available_modes() -> tuple[str, ...]:
    """The modes the installed rrto offers (``python -m rrto --mode``), plus the harness's own."""
    from rrto.config import MODES
    return tuple(MODES) + HARNESS_MODES


def run_benchmark(s: Settings) -> dict:
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "logs").mkdir(exist_ok=True)
    cleanup = Cleanup()
    try:
        return _run(s, cleanup)
    finally:
        cleanup.run()


def _run(s: Settings, cleanup: Cleanup) -> dict:
    have = available_modes()
    modes = {m: (m in have) for m in s.modes}
    prefix = f"rrto-bench-{os.getpid()}"
    net = make_network(s.emulation, prefix)
    cleanup.add(net.close)
    if net.kind == "userspace":
        print(f"benchmarks: link emulation: userspace relay ({net.reason})", file=sys.stderr)
    cpu = CpuLimit(s.robot_cpu, prefix)
    cleanup.add(cpu.close)
    cores = CoreSplit(s.robot_cpu, s.separate_cores)
    server_log = open(s.out / "logs" / "servers.log", "w")
    cleanup.add(server_log.close)
    py = sys.executable
    # Robot and server share this machine's cores: more server threads than the cores the robot leaves
    # free makes OpenMP spin against the robot, and a stream of small ops (eager, rpc) then takes seconds.
    server_threads = s.server_threads or (len(cores.server) if cores.server else
                                          max(1, (os.cpu_count() or 1) - math.ceil(s.robot_cpu or 0)))
    server_env = {**os.environ, "OMP_NUM_THREADS": str(server_threads)}

    def start_server(cmd: list[str], pattern: str):
        proc, (m,) = start_ready(net.server_cmd(cmd), pattern, stderr=server_log, env=server_env,
                                 preexec_fn=cores.pin("server"))
        cleanup.add(lambda: stop(proc))
        return proc, m

    targets: dict[str, tuple[str, int]] = {}
    server_info: dict = {}
    host = net.server_host
    if any(ok and m not in ("direct", "local") for m, ok in modes.items()):
        _, m = start_server([py, "-m", "server", "--listen", f"tcp://{host}:0", "--device", s.server_device,
                             "--log-level", "warning", "--exit-with-parent", "--heap-mmap-mb", "32",
                             *([] if s.server_capture else ["--no-capture"]),
                             *(["--insecure"] if host not in ("127.0.0.1", "localhost") else [])],
                            # the veth pair lives in namespaces of our own: no other machine reaches it
                            r"listening on tcp://([\d.]+):(\d+) \(device (\S+), torch ([^,)]+)[,)]")
        targets["rrto"] = (m.group(1), int(m.group(2)))
        server_info = {"device": m.group(3), "torch": m.group(4)}
    if modes.get("direct"):
        for w in s.workloads:
            _, m = start_server([py, "-m", "benchmarks.direct", "serve", "--model", w.name,
                                 "--listen", f"tcp://{host}:0", "--device", s.server_device],
                                r"listening on tcp://([\d.]+):(\d+) \(device (\S+), torch ([^,]+),")
            targets[f"direct {w.name}"] = (m.group(1), int(m.group(2)))
            server_info = server_info or {"device": m.group(3), "torch": m.group(4)}
    _, m = start_server([py, "-m", "benchmarks.netcheck", "sink", "--listen", f"{host}:0"], r"sink ([\d.]+):(\d+)")
    sink = (m.group(1), int(m.group(2)))

    links: dict[str, dict] = {}
    for link in s.links:
        links[link.name] = {**link.params(), "self_check": self_check(net, link, sink, s.check_bytes)}
        note = links[link.name]["self_check"].get("verdict", "")
        if note and note != "ok":
            print(f"benchmarks: link {link.name}: self-check: {note}", file=sys.stderr)

    plan = []
    for rep in range(s.repeats):
        order = [m for m in s.modes if modes[m]]
        order = order[rep % len(order):] + order[:rep % len(order)] if order else []
        for li, link in enumerate(s.links):
            for w in s.workloads:
                for mode in order:
                    if mode == "local" and li > 0:
                        continue  # no link involved: once per model and repeat
                    plan.append((rep, link, w, mode))
    runs: dict[tuple, list[Run]] = {}
    progress = Progress(len(plan))
    current_link = None
    try:
        for i, (rep, link, w, mode) in enumerate(plan):
            progress.show(f"{mode} {w.name} @ {link.name if mode != 'local' else '-'} (repeat {rep + 1}/{s.repeats})")
            if link is not current_link:
                robot_targets = net.apply(link, targets)
                current_link = link
            target = robot_targets.get("rrto" if mode != "direct" else f"direct {w.name}")
            run = run_once(s, net, cpu, cores, mode, w, target, s.out / "runs" / f"{i:03d}-{mode}-{_slug(w.name)}-{_slug(link.name)}")
            key = (mode, w.name, None if mode == "local" else link.name)
            runs.setdefault(key, []).append(run)
            if run.unavailable:
                modes[mode] = False
            progress.step(f"{mode} {w.name} done")
    finally:
        progress.close()
        net.release()

    return {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "machine": machine(),
        "torch": _torch_version(),
        "server": {**server_info, "threads": server_threads},
        "link_emulation": net.label if net.kind == "netns" else f"userspace relay ({net.reason})",
        "link_emulation_kind": net.kind,
        "relay_priority": net.relay_priority,  # "real-time" unless the relay could not get it
        "namespaces": [net.robot_ns, net.server_ns] if net.kind == "netns" else [],
        "robot": {**cpu.describe(), **cores.describe()},
        "settings": {"frames": s.frames, "warmup": s.warmup, "repeats": s.repeats, "server_device": s.server_device,
                     "server_capture": s.server_capture,
                     "models": [w.name for w in s.workloads], "modes": s.modes},
        "power_model": s.power.as_dict(),
        "links": links,
        "modes": {m: {"available": ok} for m, ok in modes.items()},
        "results": rows(s, runs, modes),
    }


def self_check(net, link: LinkSpec, sink: tuple[str, int], nbytes: int) -> dict:
    """Measure the link as configured: RTT and throughput each way (trace links at their mean rate)."""
    check = link if link.kind != "trace" else LinkSpec(link.name, "fixed", link.rate_mbit, link.rtt_ms)
    if check.rate_mbit:  # at most ~2 s per direction, at least 256 kB
        nbytes = int(min(nbytes, max(check.rate_mbit * 1e6 / 8 * 2, 256_000)))
    try:
        target = net.apply(check, {"sink": sink})["sink"]
        res = subprocess.run(net.robot_cmd([sys.executable, "-m", "benchmarks.netcheck", "probe",
                                            "--to", f"{target[0]}:{target[1]}", "--bytes", str(nbytes)]),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            return {"verdict": f"probe failed: {res.stderr.strip()[-300:]}"}
        out = json.loads(res.stdout)
    finally:
        net.release()
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    problems = []
    if link.rate_mbit:
        out["configured_mbit"] = link.rate_mbit
        for d in ("up", "down"):
            if abs(out[f"{d}_mbit"] / link.rate_mbit - 1) > 0.15:
                problems.append(f"{d} {out[f'{d}_mbit']:.1f} Mbit/s vs {link.rate_mbit:g} configured")
    out["configured_rtt_ms"] = link.rtt_ms
    if link.rtt_ms and not (0.9 * link.rtt_ms <= out["rtt_ms"] <= 1.5 * link.rtt_ms + 2):
        problems.append(f"RTT {out['rtt_ms']:.1f} ms vs {link.rtt_ms:g} configured")
    out["verdict"] = "ok" if not problems else "off by more than the tolerance: " + "; ".join(problems)
    return out


def run_once(s: Settings, net, cpu: CpuLimit, cores: CoreSplit, mode: str, w: Workload, target, folder: Path) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    timings, stats, errors = folder / "timings.json", folder / "stats.json", folder / "stderr.txt"
    n = s.warmup + s.frames + (PLANNING_FRAMES if mode in PLANNED else 0)
    settings: dict = {}
    if mode == "direct":
        cmd = [sys.executable, "-m", "benchmarks.direct", "robot", "--server", f"tcp://{target[0]}:{target[1]}",
               "--model", w.name, "--frames", str(n), "--timings", str(timings), "--stats", str(stats)]
    else:
        rrto_mode, settings = VARIANTS.get(mode, (mode, {}))
        cmd = [sys.executable, "-m", "rrto", "--mode", rrto_mode, "--stats", str(stats), "--progress", "--quiet"]
        if mode != "local":
            cmd += ["--server", f"tcp://{target[0]}:{target[1]}"]
        cmd += [*w.app_args(n), "--timings", str(timings)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RRTO_")}
    env.update(settings)
    env["OMP_NUM_THREADS"] = str(cpu.threads)
    with open(errors, "w") as err:
        proc = subprocess.Popen(cpu.wrap(net.robot_cmd(cmd)), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=cores.pin("robot"))

        def watch():  # the trace starts over when the first frame is done, so every mode meets the same link
            restarted = False
            for line in proc.stdout:
                if not restarted and FIRST_FRAME.match(line):
                    net.restart_trace()
                    restarted = True

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc.wait(timeout=s.run_timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            return Run(error=f"timed out after {s.run_timeout:g} s")
        finally:
            stop(proc)
            watcher.join(timeout=5)
    text = errors.read_text()
    if proc.returncode != 0:
        unavailable = "invalid choice" in text or "unknown rrto mode" in text
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
        return Run(error=last[0][:300], unavailable=unavailable)
    try:
        frames = json.loads(timings.read_text())["frames"]
        st = json.loads(stats.read_text())
    except (OSError, ValueError, KeyError) as e:
        return Run(error=f"no timings or stats file: {e}")
    counts, source = per_frame_counts(st, text, len(frames))
    for f, c in zip(frames, counts):
        f.update(c)
    start, note = s.warmup, None
    if st.get("mode") in PLANNED and st.get("sequence_found"):
        # planning runs in the background on the robot's CPU: measure the plan, not the planning
        planned = st.get("lop_planned_at_sync", -1)
        if 0 <= planned < len(frames) - 1:
            start = max(start, planned + 1)
        else:
            start = max(start, len(frames) - s.frames)
            note = "planning had not ended by the last frame: these frames ran replay beside the planner"
    measured = frames[start:start + s.frames]
    if not measured:
        return Run(error="no frames after the warm-up")
    if note is None and len(measured) < s.frames:  # the plan came late: its frames only, and say so
        note = f"only {len(measured)} of {s.frames} frames ran on the plan (planning ended late)"
    return Run(frames=measured, stats=st, source=source, note=note)


def per_frame_counts(stats: dict, stderr: str, n: int) -> tuple[list[dict], str]:
    """Messages and bytes of each frame: from the stats file's ``inferences`` list, or from rrto's
    per-synchronize progress lines (the apps synchronize once per frame), or else averaged."""
    keys = ("messages_sent", "round_trips", "bytes_sent", "bytes_received")
    if len(stats.get("inferences") or []) == n:  # may also carry a lop run's compute_s, transmit_s, overlap_s
        return [{**{k: f.get(k, 0) for k in keys}, **{k: f[k] for k in ENERGY_SPLIT if k in f}}
                for f in stats["inferences"]], "stats inferences"
    syncs = [m.groups() for m in SYNC.finditer(stderr)]
    if len(syncs) == n:
        return [{"messages_sent": int(a), "round_trips": int(b), "bytes_sent": float(c) * 1e3,
                 "bytes_received": float(d) * 1e3} for a, b, c, d in syncs], "progress lines"
    if stats.get("mode") == "local":
        return [{k: 0 for k in keys}] * n, "local"
    return [{k: stats.get(k, 0) / max(n, 1) for k in keys}] * n, "stats totals / frames (warm-up included)"


def rows(s: Settings, runs: dict[tuple, list[Run]], modes: dict[str, bool]) -> list[dict]:
    out = []
    link_by_name = {link.name: link for link in s.links}
    for w in s.workloads:
        for link in s.links:
            for mode in s.modes:
                if mode == "local" and link is not s.links[0]:
                    continue
                key = (mode, w.name, None if mode == "local" else link.name)
                row = {"mode": mode, "model": w.name, "link": key[2]}
                got = runs.get(key, [])
                frames = [f for r in got for f in r.frames]
                if not modes.get(mode) and not frames:
                    row.update(status="not available", error=f"this rrto has no --mode {mode}")
                elif not frames:
                    row.update(status="failed", error=next((r.error for r in got if r.error), "did not run"))
                else:
                    rate = link_by_name[key[2]].energy_rate_mbit if key[2] else None
                    row.update(summarize(frames, rate, s.power, s.robot_cpu))
                    row["runs"], row["failed_runs"] = len(got), sum(1 for r in got if r.error)
                    row["server_device"] = next((r.stats.get("server_device") for r in got if r.stats), None)
                    row["per_inference_source"] = next((r.source for r in got if r.source), "")
                    planned = [r.stats["lop_planned_at_sync"] + 1 for r in got if r.stats.get("lop_planned_at_sync", -1) >= 0]
                    if planned:  # the first frame of the plan (frames before ran while it was planned)
                        row["plan_from_frame"] = max(planned)
                        last = next(r.stats for r in reversed(got) if r.stats.get("lop_planned_at_sync", -1) >= 0)
                        # what the planner measured online at the end of the run, and how often it re-planned
                        row["lop_online"] = {k: last.get(f"lop_{k}") for k in
                                             ("link_mbit", "link_rtt_ms", "walk_ms", "robot_scale", "replans", "depth",
                                              "bands", "robot_bands", "kept_bands", "trial_bands_ms", "trial_whole_ms")}
                    note = next((r.note for r in got if r.note), None)
                    if note:
                        row["note"] = note
                    timeline = next((r.stats["timeline"] for r in reversed(got) if r.stats.get("timeline")), None)
                    if timeline:
                        row["timeline"] = timeline
                out.append(row)
    return out


def busy_s(cpu_s: float, wall_s: float, robot_cpu: float | None) -> float:
    """Seconds the emulated robot computes: host CPU seconds scaled by its quota (half a core
    spends 40 ms of host CPU in 80 ms of being busy), never more than the frame took."""
    return min(cpu_s / robot_cpu if robot_cpu else cpu_s, wall_s)


def summarize(frames: list[dict], rate_mbit: float | None, power: PowerModel, robot_cpu: float | None = None) -> dict:
    """Latency, per-inference counts and modelled energy of the measured frames (medians).

    Energy per frame: computing for ``busy_s``, transmitting for bytes sent / link rate, the
    two not overlapping unless their sum exceeds the frame, idle-waiting the rest."""
    lat = sorted(f["wall_s"] * 1e3 for f in frames)
    med = statistics.median

    def energy(f):
        if all(k in f for k in ENERGY_SPLIT):  # the mode knows its own split (lop's band schedule)
            return robot_energy_j(f["compute_s"], f["transmit_s"], f["overlap_s"], f["wall_s"], power)
        transmit = f["bytes_sent"] * 8 / (rate_mbit * 1e6) if rate_mbit else 0.0
        return robot_energy_j(busy_s(f["cpu_s"], f["wall_s"], robot_cpu), transmit, 0.0, f["wall_s"], power)

    return {
        "status": "ok",
        "frames": len(frames),
        "latency_ms": {"median": round(med(lat), 3), "p90": round(_percentile(lat, 90), 3),
                       "mean": round(statistics.fmean(lat), 3), "min": round(lat[0], 3), "max": round(lat[-1], 3)},
        "per_inference": {"messages": med(f["messages_sent"] for f in frames),
                          "round_trips": med(f["round_trips"] for f in frames),
                          "bytes_up": med(f["bytes_sent"] for f in frames),
                          "bytes_down": med(f["bytes_received"] for f in frames)},
        "robot_cpu_ms": round(med(f["cpu_s"] for f in frames) * 1e3, 3),
        "robot_busy_ms": round(med(busy_s(f["cpu_s"], f["wall_s"], robot_cpu) for f in frames) * 1e3, 3),
        "energy_j": round(med(energy(f) for f in frames), 5),
        "latencies_ms": [round(f["wall_s"] * 1e3, 3) for f in frames],
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _torch_version() -> str:
    import torch
    return torch.__version__


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text)
