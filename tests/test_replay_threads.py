"""Replay in an app that runs its models from several threads (a ROS node's callbacks).

Each app thread gets a replayer of its own; the server keeps a run ahead per program. The
outputs are compared with local ones (same kernels: bit-equal), and the stats must show
that replay engaged, so a thread that fell back to eager would fail.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

import torch
from torch import nn

import rrto

from .conftest import ServerProcess
from .test_faults import free_port
from .test_replay import TinyNet, assert_same, frames_of


class Pooler(nn.Module):
    """A second, different model: another op sequence than TinyNet's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 6, 5, stride=2, padding=2)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        y = torch.nn.functional.adaptive_max_pool2d(torch.sigmoid(self.conv(x)), 4)
        return self.fc(y.flatten(1)).softmax(-1)


class TwoModels:
    """TinyNet (thread A) and Pooler (thread B), each over frames of its own, with the
    outputs each should give (computed locally) and those it gave."""

    def __init__(self, n: int, seeds: tuple[int, int]):
        self.nets = [TinyNet().eval(), Pooler().eval()]
        self.frames = [frames_of(16, n, seed=s) for s in seeds]
        with torch.no_grad():
            self.expected = [[self.forward(k, x) for x in self.frames[k]] for k in range(2)]
        self.results: list = [[], []]

    def forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        y = self.nets[k](x)
        return self.nets[0].head(y) if k == 0 else y

    def worker(self, k: int, before=None, after=None):
        """Thread k's loop; ``before(i)`` and ``after(i)`` run around its frame i."""
        def run():
            with torch.no_grad():
                for i, x in enumerate(self.frames[k]):
                    if before is not None:
                        before(i)
                    self.results[k].append(self.forward(k, x.cuda()).cpu())
                    if after is not None:
                        after(i)
        return run

    def check(self) -> None:
        for k in range(2):
            assert_same(self.expected[k], self.results[k])

    def run_hooking_a_downloads(self, url: str, on_a_download, b_before=None, b_after=None,
                                **enable) -> tuple[list, dict]:
        """Threads A and B at once, B in rrto first (so each has a replayer of its own); each
        wait of A's for a download first calls ``on_a_download()``. Returns (errors, stats)."""
        b_in, a = threading.Event(), []

        def thread_a():
            a.append(threading.get_ident())
            assert b_in.wait(30)
            self.worker(0)()

        def thread_b():
            torch.zeros(1).cuda()
            b_in.set()
            self.worker(1, b_before, b_after)()

        rrto.enable(server=url, mode="replay", timeout=20, **enable)
        try:
            for net in self.nets:
                net.cuda()
            link = rrto.current().runtime.link
            plain = link.await_reply

            def hooked(seq, what="a reply"):
                if a and threading.get_ident() == a[0] and what.startswith("the download"):
                    on_a_download()
                return plain(seq, what)
            link.await_reply = hooked
            return run_threads([thread_a, thread_b]), rrto.current().stats.snapshot()
        finally:
            rrto.disable()


def run_threads(workers: list, switch: float | None = None) -> list:
    """Start a thread per worker, join them all; the errors they raised."""
    errors: list = []

    def guarded(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
    old = sys.getswitchinterval()
    if switch is not None:
        sys.setswitchinterval(switch)
    try:
        threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a worker thread hung"
    finally:
        sys.setswitchinterval(old)
    return errors


def test_two_threads_running_two_models_both_replay(server):
    """A camera callback and a second sensor's callback, each with its own model, their calls
    interleaved: with one replayer for both, neither sequence repeated and both ran eagerly."""
    two = TwoModels(30, (3, 4))
    rrto.enable(server=server.url, mode="replay", timeout=20)
    try:
        for net in two.nets:
            net.cuda()
        errors = run_threads([two.worker(0), two.worker(1)], switch=1e-5)
        s = rrto.current().stats.snapshot()
    finally:
        rrto.disable()
    assert not errors, errors
    two.check()
    assert s["replayed_inferences"] >= 2 * 24, s  # each thread: recorded by its 5th frame
    assert s["messages_per_replayed_inference"] <= 1.2, s


def test_a_write_from_another_thread_reaches_a_frame_the_server_ran_ahead(server):
    """Thread A's frame waits half-way for thread B, which changes a tensor A reads next.
    The server ran A's frame ahead at its upload, with the old value; B's write takes that
    run back to where A is, and A's rest runs after the write, as the app ordered it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh()).eval()
    xs = [torch.randn(1, 16 // 2) for _ in range(16)]
    mid = [threading.Event() for _ in xs]
    go = [threading.Event() for _ in xs]

    def frame_a(dev, gain):
        out = []
        with torch.no_grad():
            for i, x in enumerate(xs):
                f = net(x.to(dev))
                mid[i].set()
                go[i].wait(30)
                out.append((f * gain).sum(1).cpu())
        return out

    def frame_b(gain):
        for i in range(len(xs)):
            mid[i].wait(30)
            gain.add_(1.0)  # in place, on the device: B's call, between A's two halves
            go[i].set()

    gain = torch.linspace(0.5, 2.0, 16)
    out_local: list = []
    errors = run_threads([lambda: out_local.extend(frame_a("cpu", gain)), lambda: frame_b(gain)])
    assert not errors, errors
    for e in mid + go:
        e.clear()

    rrto.enable(server=server.url, mode="replay", timeout=20)
    try:
        net.cuda()
        gain = torch.linspace(0.5, 2.0, 16).cuda()
        out_remote: list = []
        errors = run_threads([lambda: out_remote.extend(frame_a("cuda", gain)), lambda: frame_b(gain)])
        s = rrto.current().stats.snapshot()
    finally:
        rrto.disable()
    assert not errors, errors
    assert_same(out_local, out_remote)
    assert s["replayed_inferences"] >= 10, s
    assert s["runs_recalled"] >= 10, s


def test_a_thread_per_request_goes_on_replaying(server):
    """An app that starts a thread for each request: a new thread takes over the replayer of
    one that ended, so replay goes on from the first thread's recording."""
    net = TinyNet().eval()
    xs = frames_of(16, 40, seed=6)
    with torch.no_grad():
        expected = [net.head(net(x)) for x in xs]
    results: list = []

    def request(batch):
        def run():
            with torch.no_grad():
                for x in batch:
                    results.append(net.head(net(x.cuda())).cpu())
        return run

    rrto.enable(server=server.url, mode="replay", timeout=20)
    try:
        net.cuda()
        for r in range(10):  # one after another, 4 frames each
            assert not run_threads([request(xs[4 * r:4 * r + 4])])
        s = rrto.current().stats.snapshot()
    finally:
        rrto.disable()
    assert_same(expected, results)
    assert s["replayed_inferences"] >= 40 - 4, s
    assert s["replayers"] <= 2, s  # the enabling thread's, and the one the requests pass on


def one_model_in_threads(server, threads: int, frames: int, switch: float) -> dict:
    """TinyNet run by ``threads`` threads at once over frames of their own; every output
    must equal the local one. Returns the stats."""
    net = TinyNet().eval()
    inputs = [frames_of(16, frames, seed=10 + k) for k in range(threads)]
    with torch.no_grad():
        expected = [[net.head(net(x)) for x in xs] for xs in inputs]
    results: list = [[] for _ in inputs]

    def worker(k):
        def run():
            with torch.no_grad():
                for x in inputs[k]:
                    results[k].append(net.head(net(x.cuda())).cpu())
        return run

    rrto.enable(server=server.url, mode="replay", timeout=20)
    try:
        net.cuda()
        errors = run_threads([worker(k) for k in range(threads)], switch=switch)
        s = rrto.current().stats.snapshot()
    finally:
        rrto.disable()
    assert not errors, errors
    for k in range(threads):
        assert_same(expected[k], results[k])
    return s


def test_more_threads_than_replayers_share_one_and_stay_correct(server):
    """Twelve threads at once, past the eight with a replayer of their own: the rest share
    one (mostly eager, their calls interleave); every output is still its thread's own."""
    s = one_model_in_threads(server, 12, 10, switch=1e-5)
    assert s["replayers"] <= 9, s  # the enabling thread's, at most 7 more of their own, one shared
    assert s["replayed_inferences"] >= 7 * 6, s


def test_threads_running_one_model_at_once_each_get_their_own_answers(server):
    """Callbacks in three threads run the same model. Their calls interleave at every bytecode
    here (switch interval 1 us); each thread's outputs must be its own, and each replays."""
    s = one_model_in_threads(server, 3, 30, switch=1e-6)
    assert s["replayed_inferences"] >= 3 * 24, s


def test_a_thread_waiting_for_the_server_lets_the_others_go_on(server):
    """While one thread waits for its result (on its way over a slow link), another walks a
    frame of its own and gets its result: rrto lets go of its lock for the wait. Here each of
    the first thread's downloads is held open until the second thread has run a whole frame.
    Holding the lock through the wait, the second could not even start: the hold times out."""
    two = TwoModels(12, (7, 8))
    a_waits, b_done, overlapped = threading.Event(), threading.Event(), []

    def hold_open():
        if len(overlapped) < len(two.frames[1]) and all(overlapped):
            a_waits.set()
            overlapped.append(b_done.wait(5))  # B's whole frame, while A is in this wait
            b_done.clear()

    def after_a_waits(i):
        assert a_waits.wait(30), "thread A never waited"
        a_waits.clear()
    errors, s = two.run_hooking_a_downloads(server.url, hold_open, b_before=after_a_waits,
                                            b_after=lambda i: b_done.set())
    assert overlapped == [True] * len(two.frames[1]), overlapped
    assert not errors, errors
    two.check()
    assert s["replayed_inferences"] >= 2 * 6, s


def test_the_server_lost_while_two_threads_wait():
    """The server dies (kill -9) with two replaying threads at once: one waits in its frame
    while the other runs one. Whichever finds the server gone closes the link under the
    other's wait; both go on on this machine, outputs equal to local, and neither hangs."""
    url = f"tcp://127.0.0.1:{free_port()}"
    srv = ServerProcess("--listen", url)
    two = TwoModels(12, (9, 10))
    killed, downloads = threading.Event(), [0]

    def kill_at_the_8th():
        downloads[0] += 1
        if downloads[0] == 8:
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(10)
            killed.set()

    def after_the_kill(i):
        if i == 8:  # B's wait starts after A's: A finds the server gone, and closes the link under it
            assert killed.wait(30), "thread A never reached its 8th download"
            time.sleep(0.4)
    try:
        errors, s = two.run_hooking_a_downloads(url, kill_at_the_8th, b_before=after_the_kill, fault_timeout=1.0)
    finally:
        srv.stop()
    assert not errors, errors
    two.check()
    assert s["faults"] == 1, s
