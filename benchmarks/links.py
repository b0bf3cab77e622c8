"""Emulated robot links: what a link is (``lan``, ``indoor``, ``fixed:93mbit,4ms``...) and how it is made.

``NetnsNetwork`` puts the robot and the server in two network namespaces joined by a veth
pair, shapes each side's egress with ``tbf`` (rates changed live from a trace), and adds
the extra round-trip time with the delay relay (``relay.py``) in the robot's namespace:
the robot connects to the relay on its loopback, the relay forwards over the shaped veth.
``UserspaceNetwork`` is the fallback where namespaces cannot be made (not root, no ``ip``):
everything on loopback, the relay both delays and shapes (a token bucket in Python).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .relay import read_trace
from .workloads import ROOT

TRACES = Path(__file__).resolve().parent / "traces"
NAMED = {"indoor": (TRACES / "indoor.csv", 4.0), "outdoor": (TRACES / "outdoor.csv", 8.0)}
LAN_ASSUMED_MBIT = 1000.0  # an unshaped link's rate, for the energy model's transmit time only
TBF_LATENCY_MS = 200  # tbf queue: as many bytes as this many ms at the current rate
# A link's rate means TCP goodput (what iperf on the robot would report, and what the traces
# hold); tbf meters whole Ethernet frames: 1514 bytes on the wire per 1448 bytes of payload.
WIRE_PER_PAYLOAD = 1514 / 1448


@dataclass(frozen=True)
class LinkSpec:
    name: str
    kind: str  # "lan", "fixed" or "trace"
    rate_mbit: float | None = None  # fixed rate, or the trace's mean
    rtt_ms: float = 0.0  # extra round-trip time added by the delay relay
    trace: str | None = None

    @property
    def shaped(self) -> bool:
        return self.kind != "lan"

    @property
    def energy_rate_mbit(self) -> float:
        return self.rate_mbit or LAN_ASSUMED_MBIT

    def params(self) -> dict:
        d = {"kind": self.kind, "rate_mbit": self.rate_mbit, "rtt_ms": self.rtt_ms}
        if self.kind == "lan":
            d["note"] = f"unshaped veth (or loopback); the energy model assumes {LAN_ASSUMED_MBIT:g} Mbit/s"
        if self.trace:
            d["trace"] = os.path.relpath(self.trace, ROOT)
            d["trace_stats"] = trace_stats(self.trace)
        return d


def parse_rate_mbit(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*(gbit|mbit|kbit)?", text.strip().lower())
    if not m:
        raise ValueError(f"rate {text!r}: write it like 93mbit, 1gbit or 500kbit")
    return float(m.group(1)) * {"gbit": 1e3, "mbit": 1.0, "kbit": 1e-3, None: 1.0}[m.group(2)]


def parse_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*(ms|s)?", text.strip().lower())
    if not m:
        raise ValueError(f"time {text!r}: write it like 4ms")
    return float(m.group(1)) * (1e3 if m.group(2) == "s" else 1.0)


def parse_link(spec: str) -> LinkSpec:
    """``lan``, ``indoor``, ``outdoor``, ``fixed:RATE,RTT`` or ``trace:PATH.csv,RTT``."""
    kind, _, rest = spec.partition(":")
    if spec == "lan":
        return LinkSpec("lan", "lan")
    if spec in NAMED:
        path, rtt = NAMED[spec]
        return LinkSpec(spec, "trace", _trace_mean(str(path)), rtt, str(path))
    if kind in ("fixed", "trace") and rest:
        first, _, rtt = rest.partition(",")
        rtt_ms = parse_ms(rtt) if rtt else 0.0
        if kind == "fixed":
            rate = parse_rate_mbit(first)
            if rate <= 0:
                raise ValueError(f"link {spec!r}: the rate must be positive")
            return LinkSpec(spec, "fixed", rate, rtt_ms)
        if not os.path.exists(first):
            raise ValueError(f"link {spec!r}: no trace file {first}")
        return LinkSpec(spec, "trace", _trace_mean(first), rtt_ms, os.path.abspath(first))
    raise ValueError(f"unknown link {spec!r}; use lan, indoor, outdoor, fixed:RATE,RTT (e.g. fixed:93mbit,4ms) "
                     "or trace:PATH.csv,RTT")


def _trace_mean(path: str) -> float:
    return round(float(np.mean([r for _, r in read_trace(path)])), 2)


def trace_stats(path: str) -> dict:
    rates = np.array([r for _, r in read_trace(path)])
    return {"mean": round(float(rates.mean()), 2), "p10": round(float(np.percentile(rates, 10)), 2),
            "p90": round(float(np.percentile(rates, 90)), 2), "min": float(rates.min()),
            "below_5mbit": round(float((rates < 5).mean()), 3), "step_s": read_trace(path)[1][0]}


# -- processes on either side ----------------------------------------------------------------

def start_ready(cmd: list[str], pattern: str, count: int = 1, timeout: float = 120.0,
                stderr=None, env: dict | None = None, preexec_fn=None) -> tuple[subprocess.Popen, list]:
    """Start ``cmd`` and wait for ``count`` stdout lines matching ``pattern``; returns their matches."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env,
                            text=True, preexec_fn=preexec_fn)
    found: list = []

    def read():
        for line in proc.stdout:
            m = re.search(pattern, line)
            if m and len(found) < count:
                found.append(m)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while len(found) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(found) < count:
        stop(proc)
        raise RuntimeError(f"{' '.join(cmd[-8:])} did not start (exit code {proc.returncode}); see its messages")
    return proc, found


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_relay(prefix: list[str], targets: dict[str, tuple[str, int]], rtt_ms: float,
                rate_mbit: float | None = None, trace: str | None = None) -> tuple[subprocess.Popen, dict, str]:
    """A relay process (run under ``prefix``), at real-time priority where allowed, with one
    loopback port per target; returns it, where the robot reaches each target, and its priority."""
    cmd = [*prefix, sys.executable, "-m", "benchmarks.relay", "--rtt-ms", str(rtt_ms), "--realtime"]
    if trace:
        cmd += ["--trace", trace]
    elif rate_mbit:
        cmd += ["--rate-mbit", str(rate_mbit)]
    names = list(targets)
    for n in names:
        cmd += ["--map", f"127.0.0.1:0={targets[n][0]}:{targets[n][1]}"]
    proc, found = start_ready(cmd, r"relay ([\d.]+):(\d+) -> \S+ \((.*)\)", len(names), timeout=30)
    return proc, {n: (m.group(1), int(m.group(2))) for n, m in zip(names, found)}, found[0].group(3)


# -- the two ways to emulate the link ----------------------------------------------------------

class NetnsNetwork:
    kind = "netns"
    label = "network namespaces + veth + tbf, extra RTT by a userspace delay relay"
    ROBOT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"
    server_host = SERVER_IP

    def __init__(self, prefix: str):
        self.robot_ns, self.server_ns = f"{prefix}-robot", f"{prefix}-server"
        tag = prefix.rsplit("-", 1)[-1][-9:]
        self.robot_dev, self.server_dev = f"rb{tag}r", f"rb{tag}s"  # interface names: 15 characters at most
        self.relay: subprocess.Popen | None = None
        self.relay_priority: str | None = None  # the delay relay's scheduling, once one ran
        self.player: TracePlayer | None = None
        self.created: list[str] = []
        try:
            for ns in (self.robot_ns, self.server_ns):
                _ip("netns", "add", ns)
                self.created.append(ns)
            _ip("link", "add", self.robot_dev, "netns", self.robot_ns, "type", "veth",
                "peer", "name", self.server_dev, "netns", self.server_ns)
            for ns, dev, addr in ((self.robot_ns, self.robot_dev, self.ROBOT_IP),
                                  (self.server_ns, self.server_dev, self.SERVER_IP)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def server_cmd(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.server_ns, *cmd]

    def robot_cmd(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.robot_ns, *cmd]

    def apply(self, link: LinkSpec, targets: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
        """Shape the veth for ``link``; returns where the robot reaches each target."""
        self.release()
        if link.kind == "lan":
            for ns, dev in self._sides():
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
        else:
            rate = link.rate_mbit if link.kind == "fixed" else read_trace(link.trace)[0][1]
            self.set_rate(rate, "replace")
            if link.kind == "trace":
                self.player = TracePlayer(link.trace, self.set_rate)
        if link.rtt_ms > 0:
            self.relay, targets, self.relay_priority = start_relay(["ip", "netns", "exec", self.robot_ns], targets,
                                                                   link.rtt_ms)
        return targets

    def set_rate(self, rate_mbit: float, verb: str = "change") -> None:
        rate_mbit = max(rate_mbit, 0.05) * WIRE_PER_PAYLOAD
        # A few packets, or 0.25 ms at the rate: a link that idled lets no more than that through
        # unpaced. 32 kB was 2.4 ms of 93 Mbit/s free to every whole upload after a gap, which
        # bands sent back to back never got, and it made lop's link estimate read 127-135 Mbit/s.
        burst = max(3 * 1514, int(rate_mbit * 1e6 / 8 * 0.00025))
        for ns, dev in self._sides():
            subprocess.run(["tc", "-n", ns, "qdisc", verb, "dev", dev, "root", "tbf", "rate", f"{rate_mbit:.3f}mbit",
                            "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"], check=True, capture_output=True)

    def restart_trace(self) -> None:
        if self.player is not None:
            self.player.restart()

    def _sides(self):
        return ((self.robot_ns, self.robot_dev), (self.server_ns, self.server_dev))

    def release(self) -> None:
        """Undo ``apply``: stop the trace player and the relay."""
        if self.player is not None:
            self.player.stop()
            self.player = None
        stop(self.relay)
        self.relay = None

    def close(self) -> None:
        self.release()
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []


class UserspaceNetwork:
    kind = "userspace"
    label = "userspace relay (token bucket + delay in Python, on loopback: no network namespaces here)"
    server_host = "127.0.0.1"

    def __init__(self, reason: str):
        self.reason = reason
        self.relay: subprocess.Popen | None = None
        self.relay_priority: str | None = None

    def server_cmd(self, cmd: list[str]) -> list[str]:
        return cmd

    robot_cmd = server_cmd

    def apply(self, link: LinkSpec, targets: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
        self.release()
        if link.kind == "lan":
            return targets
        self.relay, targets, self.relay_priority = start_relay(
            [], targets, link.rtt_ms, link.rate_mbit if link.kind == "fixed" else None, link.trace)
        return targets

    def restart_trace(self) -> None:
        if self.relay is not None and self.relay.poll() is None:
            self.relay.send_signal(signal.SIGUSR1)

    def release(self) -> None:
        stop(self.relay)
        self.relay = None

    close = release


class TracePlayer:
    """Sets the link's rate from a looping trace, row by row, in a background thread."""

    def __init__(self, path: str, set_rate):
        from .relay import TraceClock

        self.clock, self.set_rate = TraceClock(read_trace(path)), set_rate
        self.stopped, self.wake = threading.Event(), threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="rrto-bench-trace", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last = None
        while not self.stopped.is_set():
            rate, wait = self.clock.rate_mbit()
            if rate != last:
                try:
                    self.set_rate(rate)
                    last = rate
                except subprocess.CalledProcessError:
                    self.errors += 1
            self.wake.wait(wait)
            self.wake.clear()

    def restart(self) -> None:
        self.clock.restart()
        self.wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        self.thread.join(timeout=5)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {res.stderr.strip() or 'failed'}")


def remove_stale_namespaces(prefix: str = "rrto-bench-") -> list[str]:
    """Delete namespaces a killed harness left behind (their pid no longer runs)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    removed = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(prefix) + r"(\d+)-(robot|server)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def make_network(emulation: str, prefix: str):
    """``auto``: namespaces where they can be made, else the userspace relay."""
    if emulation == "userspace":
        return UserspaceNetwork("asked for with --emulation userspace")
    try:
        if os.geteuid() != 0:
            raise OSError("network namespaces need root")
        remove_stale_namespaces()
        return NetnsNetwork(prefix)
    except (OSError, subprocess.SubprocessError) as e:
        if emulation == "netns":
            raise
        return UserspaceNetwork(f"network namespaces unavailable: {e}")
