"""A TCP relay that delays every chunk by a fixed time each way, and can shape throughput.

    python -m benchmarks.relay --map 127.0.0.1:0=10.77.0.2:5555 --rtt-ms 4 [--rate-mbit 93 | --trace T.csv]

tbf (the kernel shaper the harness uses) adds no delay and netem is not available, so
the extra round-trip time of a Wi-Fi link comes from here: each chunk read from one
side is held for RTT/2 before it is written to the other. Both sockets are real TCP,
so the hop behind the relay still sees tbf's rate limit and back-pressure. The delay
is added per chunk in user space: TCP's own RTT on the shaped hop stays short, so the
window effects of a long-RTT path are not modelled (Wi-Fi RTTs are a few ms anyway).

Where network namespaces are not available the relay also shapes (a token bucket per
direction, its rate set live from a trace): that is the userspace fallback.

With ``--realtime`` the relay asks for real-time scheduling (SCHED_FIFO, root only). A delay
that stands for the air between robot and server must not stretch when the robot's core is
busy: at normal priority, a robot walking its replay (or computing lop's bands) right after
sending held the relay off its core, and 49.5 kB uploads arrived after 5.4-6.0 ms instead of
3.8 on a 93 Mbit/s, 4 ms link, while ``direct``, idle after sending, always got 3.8.

Prints one line per mapping, ``relay 127.0.0.1:41234 -> 10.77.0.2:5555 (real-time)`` (or
``(normal priority)``), once it listens.
SIGUSR1 restarts the trace from its start; SIGTERM stops the relay.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
REALTIME_PRIORITY = 50  # SCHED_FIFO: above every normal process, level with the kernel's threaded IRQs
PIECE = 16 * 1024  # shaped writes go out in pieces no larger than this, so pacing stays smooth


class Shaper:
    """A token bucket shared by every connection of one direction; its rate can change live."""

    def __init__(self, rate_bps: float, burst_bytes: int = 32 * 1024):
        self.rate_bps, self.burst_bytes = float(rate_bps), burst_bytes
        self._free_at = 0.0  # when the link finishes sending everything granted so far
        self._lock = threading.Lock()

    def set_rate(self, rate_bps: float) -> None:
        self.rate_bps = max(float(rate_bps), 1e3)

    def grant(self, nbytes: int) -> None:
        """Block until ``nbytes`` may go out at the current rate (a burst may go at once)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes * 8 / self.rate_bps
            wait = self._free_at - self.burst_bytes * 8 / self.rate_bps - now
        if wait > 0:
            time.sleep(wait)


class Pipe:
    """One direction of one connection: read chunks, hold each ``delay_s``, write them on."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, shaper: Shaper | None,
                 done: callable):
        self.src, self.dst, self.delay_s, self.shaper, self.done = src, dst, delay_s, shaper, done
        self.queue: collections.deque = collections.deque()
        self.ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(CHUNK)
            except OSError:
                data = b""
            with self.ready:
                self.queue.append((time.monotonic() + self.delay_s, data))
                self.ready.notify()
            if not data:
                return

    def _write(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.queue:
                        self.ready.wait()
                    due, data = self.queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                if self.shaper is None:
                    self.dst.sendall(data)
                    continue
                for i in range(0, len(data), PIECE):
                    piece = data[i:i + PIECE]
                    self.shaper.grant(len(piece))
                    self.dst.sendall(piece)
        except OSError:
            pass
        finally:
            self.done()


class Relay:
    """Accepts on ``listen`` and relays each connection to ``target``, both (host, port)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float = 0.0,
                 up: Shaper | None = None, down: Shaper | None = None):
        self.target, self.delay_s, self.up, self.down = target, delay_s, up, down
        self.sock = socket.create_server(listen, reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            left = [2]
            lock = threading.Lock()

            def done(client=client, server=server, left=left, lock=lock):
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        client.close()
                        server.close()

            Pipe(client, server, self.delay_s, self.up, done)  # robot -> server: the uplink
            Pipe(server, client, self.delay_s, self.down, done)

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def read_trace(path: str) -> list[tuple[float, float]]:
    """(time_s, rate_mbit) rows of a trace CSV with a header line."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) == 2 and parts[0] and parts[0][0].isdigit():
                rows.append((float(parts[0]), float(parts[1])))
    if len(rows) < 2:
        raise ValueError(f"trace {path} has fewer than two rows of time_s,rate_mbit")
    return rows


class TraceClock:
    """Which row of a looping trace is current; ``restart()`` goes back to its first row."""

    def __init__(self, trace: list[tuple[float, float]]):
        self.trace = trace
        self.step = trace[1][0] - trace[0][0]
        self.length = trace[-1][0] + self.step
        self.restart()

    def restart(self) -> None:
        self.t0 = time.monotonic()

    def rate_mbit(self) -> tuple[float, float]:
        """(current rate, seconds until the next row)."""
        t = (time.monotonic() - self.t0) % self.length
        i = min(int(t / self.step), len(self.trace) - 1)
        return self.trace[i][1], self.step - (t - i * self.step)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay", description=__doc__.split("\n")[0])
    p.add_argument("--map", action="append", required=True, metavar="LISTEN=TARGET",
                   help="host:port to listen on (port 0: any) = host:port to relay to; repeatable")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="extra round-trip time (half each way)")
    p.add_argument("--rate-mbit", type=float, help="shape both directions to this rate (userspace fallback)")
    p.add_argument("--trace", help="shape both directions from this time_s,rate_mbit trace, looping")
    p.add_argument("--realtime", action="store_true",
                   help="run at real-time priority (root), so that a busy robot core does not stretch the delay")
    args = p.parse_args(argv)
    priority = "normal priority"
    if args.realtime:  # before any thread starts: they inherit it
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
            priority = "real-time"
        except (OSError, AttributeError) as e:
            print(f"relay: no real-time priority ({e}); its delays may stretch while the robot computes",
                  file=sys.stderr, flush=True)
    shaper = clock = None
    if args.trace:
        clock = TraceClock(read_trace(args.trace))
        shaper = Shaper(clock.rate_mbit()[0] * 1e6)
    elif args.rate_mbit:
        shaper = Shaper(args.rate_mbit * 1e6)
    up = shaper
    down = Shaper(shaper.rate_bps) if shaper else None
    relays = []
    for m in args.map:
        listen, _, target = m.partition("=")
        r = Relay(_address(listen), _address(target), args.rtt_ms / 2e3, up, down)
        relays.append(r)
        print(f"relay {r.address[0]}:{r.address[1]} -> {target} ({priority})", flush=True)
    stop, wake = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        if signum != signal.SIGUSR1:
            stop.set()
        elif clock is not None:
            clock.restart()
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:  # die with the harness, even a killed one
        wait = 0.5
        if clock is not None:
            rate, wait = clock.rate_mbit()
            up.set_rate(rate * 1e6)
            down.set_rate(rate * 1e6)
        wake.wait(min(wait, 0.5))
        wake.clear()
    for r in relays:
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
