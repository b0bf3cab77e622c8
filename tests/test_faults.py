"""Faults: the server killed, restarted, stopped, or the link blocked, under a running app.

The app (tests/apps/fault_robot.py) is a plain CUDA app run with ``python -m rrto``
against a real server process. After a fault it must go on on this machine's CPU with
outputs equal to local ones, say so in one line (no traceback), and offload again once
the server is back.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time


from .conftest import ROOT, ServerProcess

APP = str(ROOT / "tests" / "apps" / "fault_robot.py")
FAULT_TIMEOUT = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Robot:
    """The app under ``python -m rrto``; its ``iter I`` lines are read as they come."""

    def __init__(self, url: str, *args: str, fault_timeout: float = FAULT_TIMEOUT, mode: str = "replay"):
        cmd = [sys.executable, "-m", "rrto", "--quiet", "--server", url, "--fault-timeout", str(fault_timeout),
               "--mode", mode, APP, *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.seen: dict[int, float] = {}  # iteration -> when its line came
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("iter "):
                self.seen[int(line.split()[1])] = time.monotonic()

    def wait_iter(self, i: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while i not in self.seen:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"the app did not reach iteration {i}: {self.proc.stderr.read()[-3000:]}")
            time.sleep(0.01)

    def result(self, timeout: float = 120) -> tuple[dict, str]:
        self.proc.wait(timeout)
        self._reader.join(5)
        err = self.proc.stderr.read()
        assert self.proc.returncode == 0, err[-3000:]
        return json.loads(self.lines[-1]), err


def fault_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("rrto: ")]


def check_recovered(res: dict, err: str, n: int, replay: bool = True) -> None:
    """All outputs right, one line per event and no traceback, offloading again at the end."""
    assert res["n"] == n + 1 and res["wrong"] == 0, res["max_diff"]
    assert "Traceback" not in err, err
    lines = fault_lines(err)
    assert len(lines) == 2, err
    assert "lost the server at tcp://" in lines[0] and "running on this machine's CPU; will reconnect" in lines[0]
    assert "reconnected to tcp://" in lines[1] and "offloading again" in lines[1]
    log = res["log"]
    lost = [e["i"] for e in log if e["lost"]]
    assert lost, "the app never ran locally"
    after = [e for e in log if e["i"] > lost[-1]]
    assert len(after) >= 3 and not any(e["lost"] for e in after), log
    assert after[-1]["sent"] > after[0]["sent"], "no messages after the reconnection"
    if replay:
        assert after[-1]["replayed"] > after[0]["replayed"], "replay did not engage again"


def run_through_a_kill(n: int, *args: str, mode: str = "replay") -> tuple[Robot, dict, str, float]:
    """The app over ``n`` frames; at frame 8 the server is killed (-9) and restarted on the
    same port. Returns the robot, its result, its messages and when the kill was."""
    url = f"tcp://127.0.0.1:{free_port()}"
    server = ServerProcess("--listen", url)
    robot = Robot(url, str(n), *args, mode=mode)
    try:
        robot.wait_iter(8)
        killed = time.monotonic()
        server.proc.send_signal(signal.SIGKILL)
        server.stop()
        server = ServerProcess("--listen", url)  # the same port; it takes seconds to start
        res, err = robot.result()
    finally:
        robot.proc.kill()
        server.stop()
    return robot, res, err, killed


def test_kill_and_restart_the_server():
    """kill -9 mid-loop: 50 outputs equal local; restarted on the same port: offloading resumes."""
    n = 50
    robot, res, err, killed = run_through_a_kill(n, "--pause", "0.15")
    check_recovered(res, err, n)
    assert res["stats"]["faults"] == 1 and res["stats"]["reconnects"] == 1, res["stats"]
    assert res["stats"]["weights_adopted"] == 0  # a fresh server has an empty cache: the bytes went again
    # no frame waited much longer than the fault timeout (the one that found the server gone)
    assert max(res["walls"][11:]) < FAULT_TIMEOUT + 1.5, max(res["walls"][11:])
    assert robot.seen[12] - killed < FAULT_TIMEOUT + 4 * 0.15 + 3


def test_kill_and_restart_under_two_threads():
    """Two threads run the net at once, each replaying its own frames, when the server dies.
    Both go on here (one lock, one lineage), both offload and replay again afterwards."""
    n = 40
    _, res, err, _ = run_through_a_kill(n, "--threads", "2", "--pause", "0.1")
    check_recovered(res, err, n)
    assert res["checked"] == 2 * (n + 1), res["checked"]
    assert res["stats"]["faults"] == 1 and res["stats"]["reconnects"] == 1, res["stats"]
    # before the kill and after the reconnection, both threads replayed (a replayer each)
    assert res["stats"]["replayers"] >= 2 + 2 and res["stats"]["replayed_inferences"] >= 2 * 12, res["stats"]


def test_recurrent_state_survives_a_kill():
    """State kept on the device across frames (written in place, through views) comes through right.

    In eager mode (the kill test above runs replay): the ops streamed to the dead server
    before the loss was noticed are recomputed here from their recipes.
    """
    n = 40
    _, res, err, _ = run_through_a_kill(n, "--recurrent", "--pause", "0.15", mode="eager")
    check_recovered(res, err, n, replay=False)


class Relay:
    """A TCP relay between the robot and the server that can stop forwarding (a stalled link)."""

    def __init__(self, upstream_port: int):
        self.up = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.blocked = threading.Event()
        self.stopping = False
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.setblocking(False)
        while not self.stopping:
            socks = [self.listener] + [s for p in self.pairs for s in p]
            ready, _, _ = select.select(socks, [], [], 0.02)
            if self.listener in ready:
                try:
                    c, _ = self.listener.accept()
                    self.pairs.append((c, socket.create_connection(("127.0.0.1", self.up))))
                except OSError:
                    pass
            if self.blocked.is_set():
                time.sleep(0.02)  # read nothing, forward nothing: both sides see silence
                continue
            for a, b in list(self.pairs):
                for src, dst in ((a, b), (b, a)):
                    if src in ready:
                        try:
                            data = src.recv(1 << 16)
                            if data:
                                dst.sendall(data)
                                continue
                        except OSError:
                            pass
                        self._drop((a, b))
                        break

    def _drop(self, pair) -> None:
        if pair in self.pairs:
            self.pairs.remove(pair)
            for s in pair:
                s.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for p in list(self.pairs):
            self._drop(p)
        self.listener.close()


def test_blocked_link():
    """The link stalls for a few seconds: outputs equal local, offloading resumes after."""
    server = ServerProcess()
    relay = Relay(int(server.url.rsplit(":", 1)[1]))
    n = 50
    robot = Robot(f"tcp://127.0.0.1:{relay.port}", str(n), "--pause", "0.15")
    try:
        robot.wait_iter(10)
        relay.blocked.set()
        robot.wait_iter(18)
        relay.blocked.clear()
        res, err = robot.result()
    finally:
        robot.proc.kill()
        relay.close()
        server.stop()
    check_recovered(res, err, n)
    assert max(res["walls"][11:]) < FAULT_TIMEOUT + 1.5
    # the server kept running: its weight cache gave the new session the weights by digest
    assert res["stats"]["weights_adopted"] == 12, res["stats"]  # all the parameters of Net and Cell


def test_detection_time_of_a_stopped_server():
    """A server that stops answering (SIGSTOP) is reported lost within the default 2 s timeout, plus margin."""
    server = ServerProcess()
    robot = Robot(server.url, "30", "--pause", "0.05", fault_timeout=2.0)
    try:
        robot.wait_iter(8)
        stopped = time.monotonic()
        os.kill(server.proc.pid, signal.SIGSTOP)
        robot.wait_iter(12)
        os.kill(server.proc.pid, signal.SIGCONT)
        res, err = robot.result()
    finally:
        robot.proc.kill()
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert res["wrong"] == 0
    first_local = min(e["i"] for e in res["log"] if e["lost"])
    detected = robot.seen[first_local] - stopped
    assert detected < 2.0 + 1.0, detected
    assert "Traceback" not in err
    assert "lost the server" in fault_lines(err)[0]


def test_ping_is_answered_without_a_session(raw):
    """The server's main thread answers pings at once, even for a robot with no session."""
    raw.send({"t": "ping"})
    reply, _ = raw.recv()
    assert reply == {"t": "pong"}


def test_weight_cache_by_digest(server):
    """A weight uploaded once is adopted by digest in another session; unknown digests are not."""
    import numpy as np
    from rrto import codec

    from .conftest import RawClient
    w = np.arange(24, dtype=np.float32) / 7
    buf = w.tobytes()
    a, b = RawClient(server.url), RawClient(server.url)
    try:
        a.hello()
        b.hello()
        desc = {"dt": "float32", "sh": [4, 6], "st": [6, 1]}
        a.request({"t": "put", "h": 1, "d": desc, "c": 1}, [buf])
        a.request({"t": "put", "h": 2, "d": desc}, [(w + 1).tobytes()])  # not a weight: not cached
        items = [[5, {"dt": "float32", "sh": [6, 4], "st": [1, 6]}, codec.digest(buf)],
                 [6, desc, codec.digest((w + 1).tobytes())],
                 [7, desc, "0" * 32],
                 [8, {"dt": "int32", "sh": [4, 6], "st": [6, 1]}, codec.digest(buf)]]
        assert b.request({"t": "adopt", "w": items})["missing"] == [1, 2, 3]
        b.request({"t": "get", "h": 5})
        got = np.frombuffer(b.frames[0], dtype=np.float32).reshape(6, 4, order="F")
        assert np.array_equal(got, w.reshape(4, 6).T)
        b.request({"t": "op", "op": "aten::add_.Tensor", "a": [{"h": 5}, 1.0]})  # b's copy, not the cache's
        c = RawClient(server.url)
        c.hello()
        assert c.request({"t": "adopt", "w": [[9, desc, codec.digest(buf)]]})["missing"] == []
        c.request({"t": "get", "h": 9})
        assert np.frombuffer(c.frames[0], dtype=np.float32).tobytes() == buf
        c.close()
        bad = b.request({"t": "adopt", "w": [[10, desc]]})
        assert bad["t"] == "err"
    finally:
        a.close()
        b.close()


def test_values_after_a_loss_follow_views_and_in_place_writes():
    """Tensors made on the server before it died are recomputed here from their recipes, views included."""
    import torch

    import rrto
    server = ServerProcess()
    rrto.enable(server=server.url, mode="eager", fault_timeout=0.5)
    try:
        g = torch.Generator().manual_seed(3)
        a_cpu, b_cpu = torch.randn(4, 6, generator=g), torch.randn(6, 3, generator=g)

        def work(dev):
            a, b = a_cpu.to(dev), b_cpu.to(dev)
            state = torch.zeros(2, 8, device=dev)
            v = state[:, 2:6]  # a view, written through below
            out = {}
            for i in range(3):
                m = (a @ b).relu_()
                v.add_(m[:2, :3].sum(1, keepdim=True))
                state[1].mul_(0.5)
                t = torch.cat([m.t(), b.t()], 1)
                t.index_put_((torch.tensor([0, 2], device=dev),), torch.ones(2, 10, device=dev) * i)
                out[f"t{i}"] = t
            out["state"], out["v"] = state, v
            out["flat"] = state.view(-1)[3:11]  # a view made before the writes below
            torch.add(a[:, :3], 1, out=out.setdefault("o", torch.empty(0, device=dev)))
            state.clamp_(max=0.7)
            out["mean"] = a.mean(0)
            out["i8"] = (a * 10).to(torch.int8)
            return out

        expected = work("cpu")
        got = work("cuda")
        server.proc.send_signal(signal.SIGKILL)
        server.stop()
        for k, e in expected.items():  # the first download finds the server gone; the rest are made here
            assert torch.equal(got[k].cpu(), e), k
        assert rrto.current().runtime.lost
        assert torch.equal((got["state"] * 2).cpu(), expected["state"] * 2)  # and ops go on here
        again = work("cuda")  # all of it on this machine now: views, in-place writes, out= resizing
        for k, e in expected.items():
            assert again[k].device.type == "cuda" and torch.equal(again[k].cpu(), e), k
        assert rrto.current().stats.local_ops > 20
    finally:
        rrto.disable()
