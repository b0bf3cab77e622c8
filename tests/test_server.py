"""The edge daemon against bad input, several robots, and signals; a real process each time."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from rrto import codec

from .conftest import ROOT, RawClient, ServerProcess


def put(raw: RawClient, handle: int, t: torch.Tensor) -> dict:
    desc, buf, _ = codec.tensor_frame(t)
    return raw.request({"t": "put", "h": handle, "d": desc}, [buf])


def get(raw: RawClient, handle: int) -> torch.Tensor:
    reply = raw.request({"t": "get", "h": handle})
    assert reply.get("t") != "err", reply
    return codec.frame_tensor(reply["d"], raw.frames[0], 1 << 30).clone()


def good_request_works(raw: RawClient, handle: int) -> None:
    """The proof that the server still serves this robot: an upload, an op and a download."""
    put(raw, handle, torch.arange(4.0))
    raw.request({"t": "op", "op": "aten::mul.Tensor", "a": [{"h": handle}, {"h": handle}], "o": [handle + 1]})
    assert get(raw, handle + 1).tolist() == [0.0, 1.0, 4.0, 9.0]


def test_unknown_op_is_refused_and_serving_goes_on(raw):
    r = raw.request({"t": "op", "op": "aten::definitely_not_an_op.default", "a": [], "o": [1]})
    assert r["t"] == "err" and r["kind"] == "unsupported" and "aten::definitely_not_an_op" in r["msg"]
    good_request_works(raw, 10)


@pytest.mark.parametrize("name", ["aten::from_file.default", "aten::set_.source_Storage", "aten::resize_.default",
                                  "aten::_pin_memory.default"])
def test_dangerous_ops_are_not_on_the_allowlist(raw, name):
    r = raw.request({"t": "op", "op": name, "a": ["/etc/passwd"], "o": [1]})
    assert r["t"] == "err" and r["kind"] == "unsupported", r
    good_request_works(raw, 20)


@pytest.mark.parametrize("name", ["os.system", "aten::add", "aten::add.Tensor; rm -rf /", 42, None])
def test_malformed_op_names(raw, name):
    r = raw.request({"t": "op", "op": name, "a": [], "o": []})
    assert r["t"] == "err" and r["kind"] in ("bad_request", "unsupported")
    good_request_works(raw, 30)


def test_wrong_handle(raw):
    r = raw.request({"t": "get", "h": 987654})
    assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]
    r = raw.request({"t": "op", "op": "aten::relu.default", "a": [{"h": 987654}], "o": [5]})
    assert r["t"] == "err" and "987654" in r["msg"]
    r = raw.request({"t": "op", "op": "aten::relu.default", "a": [{"h": "x"}], "o": [5]})
    assert r["t"] == "err"
    good_request_works(raw, 40)


@pytest.mark.parametrize("desc, payload", [
    ({"dt": "float32", "sh": [10], "st": [1]}, b"abc"),  # too few bytes
    ({"dt": "float32", "sh": [2, 2], "st": [1, 1]}, b"\0" * 16),  # overlapping layout
    ({"dt": "complex512", "sh": [1], "st": [1]}, b"\0" * 8),  # unknown dtype
    ({"dt": "float32", "sh": [-1], "st": [1]}, b""),  # negative size
    ("not a descriptor", b"\0" * 4),
])
def test_malformed_frames(raw, desc, payload):
    r = raw.request({"t": "put", "h": 50, "d": desc}, [payload])
    assert r["t"] == "err" and r["kind"] == "bad_request", r
    good_request_works(raw, 50)


def test_garbage_messages(raw):
    for frames in ([b"\xff\xfe not json"], [b"[1, 2, 3]"], [b"{" * 100_000], [b"x" * (2 << 20)], [b""]):
        raw.send_frames(frames)
        reply, _ = raw.recv()
        assert reply["t"] == "err" and reply["kind"] == "bad_request"
    raw.send_frames([b'{"t": "op", "op": "aten::relu.default", "q": 0}'])  # no session: refused, never run
    reply, _ = raw.recv()
    assert reply["t"] == "err" and reply["kind"] == "no_session"
    good_request_works(raw, 60)


def test_streamed_error_is_reported_at_the_next_request(raw):
    raw.send({"t": "op", "op": "aten::relu.default", "a": [{"h": 555}], "o": [556]})  # no reply wanted
    raw.send({"t": "op", "op": "aten::relu.default", "a": [{"h": 556}], "o": [557]})  # skipped after it
    r = raw.request({"t": "sync"})
    assert r["t"] == "err" and "555" in r["msg"] and "next request" in r["msg"]
    assert raw.request({"t": "sync"}).get("t") != "err"  # reported once, then cleared
    good_request_works(raw, 70)


def test_allocations_are_bounded(server):
    big = ServerProcess("--max-session-mb", "64", "--max-tensor-mb", "32")
    raw = RawClient(big.url)
    try:
        raw.hello()
        r = raw.request({"t": "op", "op": "aten::empty.memory_format", "a": [[2**40]],
                         "k": {"dtype": {"dt": "float32"}, "device": {"dev": "r"}}, "o": [1]})
        assert r["t"] == "err" and r["kind"] == "quota" and "limit" in r["msg"]
        # broadcasting two small tensors into a huge one is caught before it runs, too
        put(raw, 2, torch.zeros(100_000, 1))
        put(raw, 3, torch.zeros(1, 100_000))
        r = raw.request({"t": "op", "op": "aten::add.Tensor", "a": [{"h": 2}, {"h": 3}], "o": [4]})
        assert r["t"] == "err" and r["kind"] == "quota"
        # an out= tensor resized past the limit counts as the allocation it is
        put(raw, 5, torch.zeros(0))
        r = raw.request({"t": "op", "op": "aten::arange.start_out", "a": [0, 2**34, 1], "k": {"out": {"h": 5}}})
        assert r["t"] == "err" and r["kind"] == "quota"
        # the session limit adds up tensors that are each allowed
        for h in range(10, 13):
            r = put(raw, h, torch.zeros(6 * 2**20))  # 24 MiB each; 64 MiB per session
        assert r["t"] == "err" and r["kind"] == "quota"
        raw.request({"t": "free", "fr": [10, 11]})
        good_request_works(raw, 20)
        # a frame over the per-tensor limit is dropped by zmq before the server buffers it
        flood = RawClient(big.url, timeout_ms=2000)
        flood.hello()
        flood.send({"t": "put", "h": 1, "d": {"dt": "uint8", "sh": [40 << 20], "st": [1]}}, [b"\0" * (40 << 20)])
        with pytest.raises(AssertionError, match="no reply"):
            flood.recv()
        flood.close()
        good_request_works(raw, 30)
        assert big.alive()
    finally:
        raw.close()
        assert big.stop() == 0


def test_sessions_are_isolated(server):
    a, b = RawClient(server.url), RawClient(server.url)
    try:
        a.hello()
        b.hello()
        put(a, 1, torch.tensor([42.0, 43.0]))
        r = b.request({"t": "get", "h": 1})  # B's handle 1 is not A's handle 1
        assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]
        b.session = a.session  # a stolen token from another connection opens nothing
        r = b.request({"t": "get", "h": 1, "s": a.session})
        assert r["t"] == "err" and r["kind"] == "no_session"
        assert get(a, 1).tolist() == [42.0, 43.0]
    finally:
        a.close()
        b.close()


ROBOT = textwrap.dedent("""
    import sys, torch, rrto
    seed = int(sys.argv[2])
    rrto.enable(server=sys.argv[1])
    torch.manual_seed(seed)
    w = torch.randn(64, 64)
    x = torch.randn(8, 64)
    expected = x
    for _ in range(200):
        expected = torch.tanh(expected @ w)
    wc, y = w.cuda(), x.cuda()
    for _ in range(200):  # the same handle numbers in both robots, interleaved on one server
        y = torch.tanh(y @ wc)
    assert torch.equal(y.cpu(), expected), "wrong result"
    rrto.disable()
    print("robot", seed, "ok")
""")


def test_two_robots_at_once(server):
    robots = [subprocess.Popen([sys.executable, "-c", ROBOT, server.url, str(seed)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = [r.communicate(timeout=120) for r in robots]
    for r, (_, err) in zip(robots, outs):
        assert r.returncode == 0, err
    assert [o.strip() for o, _ in outs] == ["robot 1 ok", "robot 2 ok"]


def test_replies_from_many_workers_and_pongs_at_once_all_arrive_whole(server):
    """Session workers send their replies on the daemon's socket themselves, under its lock,
    while the main thread receives and answers pings on it. Six robots pipeline uploads and
    downloads and ping in between: every reply arrives, in order, with its own bytes.
    (Without the lock, replies were lost or mixed up and this waited in vain.)"""
    errors: list = []

    def robot(k: int) -> None:
        c = RawClient(server.url)
        try:
            c.hello()
            for i in range(150):
                t = torch.arange(64.0) + 1000 * k + i
                desc, buf, _ = codec.tensor_frame(t)
                c.seq += 2
                c.send({"t": "put", "h": 1 + i, "d": desc, "q": c.seq - 1}, [buf])
                c.send({"t": "ping", "s": c.session})  # answered by the main thread, in between
                c.send({"t": "get", "h": 1 + i, "q": c.seq, "fr": [i] if i else []})
                seen = []
                while len(seen) < 2:
                    reply, frames = c.recv()
                    if reply.get("t") == "pong":
                        assert not reply.get("gone"), reply
                        continue
                    assert reply.get("t") != "err", reply
                    seen.append(reply["q"])
                    if reply["q"] == c.seq:
                        assert torch.equal(codec.frame_tensor(reply["d"], frames[0], 1 << 20), t)
                assert seen == [c.seq - 1, c.seq], seen
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(f"robot {k}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=robot, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    raw = RawClient(server.url)
    raw.hello()
    good_request_works(raw, 1)
    raw.close()


def test_protocol_mismatch_and_full_server(server):
    small = ServerProcess("--max-sessions", "1")
    a, b = RawClient(small.url), RawClient(small.url)
    try:
        r = a.request({"t": "hello", "v": 999})
        assert r["t"] == "err" and "protocol mismatch" in r["msg"]
        a.hello()
        r = b.request({"t": "hello", "v": codec.PROTOCOL_VERSION})
        assert r["t"] == "err" and "full" in r["msg"]
        a.request({"t": "bye"})
        time.sleep(0.2)
        b.hello()  # the closed session made room
    finally:
        a.close()
        b.close()
        small.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_cleanly(sig):
    s = ServerProcess()
    raw = RawClient(s.url)
    raw.hello()
    put(raw, 1, torch.ones(3))
    raw.close()
    s.proc.send_signal(sig)
    assert s.proc.wait(15) == 0
    s.stop()


def test_server_cli_help_and_bad_device():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--listen" in out.stdout and "--device" in out.stdout
    out = subprocess.run([sys.executable, "-m", "server", "--device", "cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "use --device cpu" in out.stderr
    out = subprocess.run([sys.executable, "-m", "server", "--listen", "nonsense://x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot listen" in out.stderr


def test_results_match_torch_on_the_server_side(raw):
    """Ops run with real torch: a few results checked directly at the wire level."""
    a = torch.randn(5, 7)
    put(raw, 1, a)
    raw.request({"t": "op", "op": "aten::softmax.int", "a": [{"h": 1}, 1], "o": [2]})
    assert np.array_equal(get(raw, 2).numpy(), torch.softmax(a, 1).numpy())
    r = raw.request({"t": "op", "op": "aten::nonzero.default", "a": [{"h": 1}], "ob": 100})
    assert r["m"][0][0] == list(torch.nonzero(a).shape)
    r = raw.request({"t": "op", "op": "aten::_local_scalar_dense.default", "a": [{"h": 2}], "o": []})
    assert r["v"] == pytest.approx(torch.softmax(a, 1)[0, 0].item())


def test_a_grown_out_tensor_counts_against_the_session(raw):
    put(raw, 1, torch.zeros(0))
    before = raw.request({"t": "mem"})["allocated"]
    raw.request({"t": "op", "op": "aten::arange.start_out", "a": [0, 1000, 1], "k": {"out": {"h": 1}}})
    assert get(raw, 1).tolist() == list(map(float, range(1000)))
    assert raw.request({"t": "mem"})["allocated"] - before >= 1000 * 4
    raw.request({"t": "free", "fr": [1]})
    assert raw.request({"t": "mem"})["allocated"] == before


def test_frees_by_runs(raw):
    """An inference's dead tensors ride on the next message as (first, count) runs."""
    before = raw.request({"t": "mem"})["allocated"]
    for h in range(1, 9):
        put(raw, h, torch.ones(1000))
    raw.request({"t": "free", "fr": [8], "frr": [2, 3, 6, 1]})  # frees 2, 3, 4, 6 and 8
    assert raw.request({"t": "mem"})["allocated"] - before == 3 * 4000
    assert get(raw, 5).sum() == 1000
    for bad in ([2], [2, 0], [1, "3"], "1,2", [0, 2**21], [0, 2**19, 2**19, 2**19 + 1]):
        r = raw.request({"t": "free", "frr": bad})
        assert r["t"] == "err" and r["kind"] == "bad_request" and "frr" in r["msg"], (bad, r)
    assert raw.request({"t": "mem"})["allocated"] - before == 3 * 4000  # a refused message frees nothing
    good_request_works(raw, 20)


def test_a_clocked_message_measures_the_link_without_the_servers_time(remote):
    """lop's planner measures the link with real traffic: the server stamps a marked message
    on arrival and its next reply says how long it held it, so the robot's sample is the
    round trip minus the server's work, or its idling."""
    link = remote.runtime.link
    x = torch.randn(384, 384).to("cuda")
    torch.cuda.synchronize()

    def work() -> None:
        y = x
        for _ in range(30):  # tens of ms of matmuls on the server, sent without waiting
            y = (y @ x) / 384
        return y

    link.transfers.clear()
    link.clock_next()
    t0 = time.perf_counter()
    work()
    torch.cuda.synchronize()  # its reply carries the server's time since the first matmul arrived
    rt = time.perf_counter() - t0
    assert len(link.transfers) == 1, list(link.transfers)
    nbytes, seconds = link.transfers[0]
    assert nbytes > 0 and rt > 0.02, (nbytes, rt)
    assert 0 < seconds < 0.5 * rt, (seconds, rt)  # loopback: the round trip is the server's work
    link.transfers.clear()
    link.clock_next()
    t0 = time.perf_counter()
    work()
    time.sleep(0.5)  # the server idles until asked: held time too, not the link's
    torch.cuda.synchronize()
    rt = time.perf_counter() - t0
    assert len(link.transfers) == 1 and 0 < link.transfers[0][1] < 0.1 < 0.5 < rt, (list(link.transfers), rt)


def test_a_conformed_output_is_zero_filled_only_where_the_copy_leaves_gaps():
    dense = codec.is_dense  # what the server's conform asks before it skips the zero fill
    assert dense((2, 3), (3, 1)) and dense((2, 3), (1, 2)) and dense((1, 32, 4, 5), (640, 1, 160, 32))
    assert not dense((2, 3), (4, 1))  # a gap after each row: its bytes must not show old memory
    assert not dense((2, 2), (1, 1)) and not dense((3,), (2,))
