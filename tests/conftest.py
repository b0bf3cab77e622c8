"""Fixtures: a real rrto-server process on loopback, rrto enabled against it, a raw client."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

import rrto
from rrto import codec

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """``python -m server`` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, *extra: str):
        cmd = [sys.executable, "-m", "server", "--listen", "tcp://127.0.0.1:0", "--device", "cpu",
               "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = m.group(1)
        # Drained as it comes: a server logging many refusals would block on a full pipe.
        self.log: list[str] = []
        self._drain = threading.Thread(target=self.log.extend, args=(self.proc.stderr,), daemon=True)
        self._drain.start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the server process now, MiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def settled_rss_mb(self, timeout: float = 15.0) -> float:
        """RSS once it stops moving (the server warms up its meta kernels in the background)."""
        last = self.rss_mb()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.rss_mb()
            if abs(now - last) < 2:
                return now
            last = now
        return last

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    s = ServerProcess()
    yield s
    assert s.alive(), "the shared server died during the tests"
    s.stop()


@pytest.fixture
def remote(server):
    """rrto enabled (eager mode) against the shared server for one test."""
    rrto.enable(server=server.url, mode="eager", timeout=20)
    try:
        yield rrto.current()
    finally:
        rrto.disable()


class RawClient:
    """A hand-driven robot: sends exactly the frames a test writes, for malformed requests."""

    def __init__(self, url: str, timeout_ms: int = 10_000):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.timeout_ms = timeout_ms
        self.session = None
        self.seq = 0

    def hello(self) -> dict:
        reply = self.request({"t": "hello", "v": codec.PROTOCOL_VERSION, "torch": "test"})
        self.session = reply["session"]
        return reply

    def send_frames(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def send(self, header: dict, frames: list = ()) -> None:
        if self.session:
            header.setdefault("s", self.session)
        self.send_frames(codec.pack(header, list(frames)))

    def recv(self) -> tuple[dict, list]:
        assert self.sock.poll(self.timeout_ms), "no reply from the server"
        return codec.unpack(self.sock.recv_multipart())

    def request(self, header: dict, frames: list = ()) -> dict:
        self.seq += 1
        header["q"] = self.seq
        self.send(header, frames)
        reply, self.frames = self.recv()
        assert reply.get("q") == self.seq
        return reply

    def close(self) -> None:
        """Say goodbye (the shared server holds at most 64 sessions) and close."""
        if self.session:
            self.send({"t": "bye"})
        self.sock.close(linger=500)
        self.ctx.term()


@pytest.fixture
def raw(server):
    c = RawClient(server.url)
    try:
        c.hello()
        yield c
    finally:
        c.close()


def run_rrto(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m rrto ARGS`` in a fresh process, from the repository root."""
    return subprocess.run([sys.executable, "-m", "rrto", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
