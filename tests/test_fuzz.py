"""Fuzzing the edge daemon: thousands of random and mutated messages, then a well-behaved robot.

The mutations start from the messages a real robot sent (captured while a small conv
net ran offloaded): fields replaced by random JSON or by the wrong type, ops swapped for
other allowed or forbidden ones, bogus handles and dtypes, huge declared sizes, deep
nesting, frames dropped, added, truncated or garbled, headers cut in half. The server is
a process of its own here, so its memory can be measured: afterwards it must still give
a well-behaved robot results equal to local ones, hold no more memory than it did after
the same robot's warm-up (plus a margin for allocator caches), and have logged no
traceback.

RRTO_FUZZ_EXAMPLES sets the number of examples (each a burst of 1-6 messages);
RRTO_FUZZ_RANDOM=1 draws new cases instead of the fixed, reproducible ones CI runs.
"""
from __future__ import annotations

import collections
import json
import os
import random
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import rrto
from rrto import codec

from .conftest import RawClient, ServerProcess

EXAMPLES = int(os.environ.get("RRTO_FUZZ_EXAMPLES", "1500"))
RSS_MARGIN_MB = 64  # allocator caches (glibc arenas per session thread) may keep this much
PROBE_Q = 1 << 40  # the fuzzer's own requests use sequence numbers from here up


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def well_behaved_robot(url: str, capture: list | None = None) -> None:
    """A small conv net offloaded to ``url``: its outputs must equal local ones.

    With ``capture``, every message the robot sends is appended to it (as bytes frames).
    """
    net, x = small_net(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = [net(x * (i + 1)) for i in range(3)]
    original_pack = codec.pack

    def recording_pack(header, frames=()):
        msg = original_pack(header, frames)
        capture.append([bytes(f) for f in msg])
        return msg

    if capture is not None:
        codec.pack = recording_pack
    try:
        rrto.enable(server=url, mode="eager", timeout=30)
        try:
            with torch.no_grad():
                remote = net.cuda()
                got = [remote(x.cuda() * (i + 1)).cpu() for i in range(3)]
        finally:
            rrto.disable()
    finally:
        codec.pack = original_pack
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# -- strategies ------------------------------------------------------------------------------

ODD_INTS = st.sampled_from([0, -1, 1, 7, 2**31 - 1, 2**31, 2**53, 2**63 - 1, 2**63, -2**63, 2**64, 10**40])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | ODD_INTS | st.floats()
           | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=12)
MARKERS = st.one_of(
    st.builds(lambda h: {"h": h}, st.integers(-5, 3000) | ODD_INTS | st.text(max_size=3)),
    st.builds(lambda i: {"i": i}, st.integers(-2, 4) | ODD_INTS),
    st.builds(lambda d: {"dt": d}, st.sampled_from([*codec.DTYPES, "float128", "object", ""]) | JSON),
    st.just({"dev": "r"}), st.builds(lambda v: {"dev": v}, JSON),
    st.builds(lambda v: {"mf": v}, st.sampled_from([*codec.MEMORY_FORMATS, "nchw"])),
    st.builds(lambda v: {"c": v}, JSON), st.just({"ly": "sparse_coo"}))
VALUES = st.one_of(JSON, MARKERS, st.lists(MARKERS | SCALARS, max_size=5))
KEYS = ["t", "s", "q", "op", "a", "k", "o", "ob", "in", "h", "d", "fr", "frr", "seed", "v", "pre", "ah", "aq", "cf"]
TYPES = ["op", "put", "get", "sync", "seed", "mem", "times", "free", "bye", "hello", "stats", "nope", ""]
DANGEROUS = ["aten::from_file.default", "aten::_nested_tensor_from_mask.default", "aten::set_.source_Storage",
             "aten::resize_.default", "prims::add.default", "os.system", "aten::_pin_memory.default"]
DESCS = st.fixed_dictionaries({
    "dt": st.sampled_from([*codec.DTYPES, "float128", "bogus"]) | JSON,
    "sh": st.lists(st.integers(-2, 40) | ODD_INTS, max_size=5) | JSON,
    "st": st.lists(st.integers(-2, 40) | ODD_INTS, max_size=5) | JSON})


DEEP = "<deeply nested list>"


@st.composite
def mutated(draw, captured: list, allowed: list) -> list:
    """A real request, changed in a few places."""
    frames = list(draw(st.sampled_from(captured)))
    header, depth = json.loads(frames[0]), 0
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.integers(0, 14))
        if what == 0:  # a field of any key set to any value
            header[draw(st.sampled_from(KEYS) | st.text(max_size=3))] = draw(VALUES)
        elif what == 1 and header:  # a field dropped
            header.pop(draw(st.sampled_from(sorted(header))))
        elif what == 2:  # another op: allowed (with these arguments) or forbidden
            header["op"] = draw(st.sampled_from(allowed) | st.sampled_from(DANGEROUS))
        elif what == 3 and isinstance(header.get("a"), list) and header["a"]:  # one argument changed
            args = header["a"]
            args[draw(st.integers(0, len(args) - 1))] = draw(VALUES)
        elif what == 4:  # bogus handles everywhere handles go
            header[draw(st.sampled_from(["h", "o", "fr", "frr", "ob"]))] = draw(
                st.lists(st.integers(-3, 5000) | ODD_INTS, max_size=4) | st.integers(-3, 5000) | ODD_INTS)
        elif what == 5:  # a tensor descriptor lying about dtype, shape or strides
            desc = draw(DESCS)
            if "in" in header and isinstance(header["in"], list) and header["in"]:
                header["in"][0] = desc
            else:
                header["d"] = desc
        elif what == 6:  # deep nesting where arguments go (spliced in below: json.dumps would recurse)
            header[draw(st.sampled_from(["a", "k", "in", "o"]))] = DEEP
            depth = draw(st.integers(10, 5000))
        elif what == 7 and len(frames) > 1:  # a frame dropped
            frames.pop(draw(st.integers(1, len(frames) - 1)))
        elif what == 8:  # frames added
            frames += draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
        elif what == 9 and len(frames) > 1:  # a frame truncated or garbled
            i = draw(st.integers(1, len(frames) - 1))
            # garbage from a drawn seed: hypothesis drawing a frame-sized binary (24 KiB) can take minutes
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))] if draw(st.booleans()) else \
                random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(len(frames[i]))
        elif what == 10:  # the type changed
            header["t"] = draw(st.sampled_from(TYPES) | JSON)
        elif what == 11:  # a huge declared size with a small frame
            header["d"] = {"dt": "float32", "sh": [draw(st.sampled_from([2**20, 2**40, 2**62]))], "st": [1]}
        elif what == 12:  # plausible but wrong: numbers in the arguments nudged, handles swapped for others
            header["a"] = nudged(draw, header.get("a"))
        else:  # valid and big: server memory that must be given back when the session ends
            n, h = draw(st.integers(1 << 20, 16 << 20)), draw(st.integers(1000, 1100))
            if draw(st.booleans()):
                header = {"t": "put", "h": h, "d": {"dt": "uint8", "sh": [n], "st": [1]}, "s": header.get("s")}
                frames = [b"", b"\x01" * n]
            else:
                header = {"t": "op", "op": "aten::ones.default", "a": [[n]], "o": [h], "s": header.get("s"),
                          "k": {"dtype": {"dt": "uint8"}, "device": {"dev": "r"}}}
                frames = [b""]
    head = json.dumps(header).encode()
    if DEEP in header.values():
        head = head.replace(json.dumps(DEEP).encode(), b"[" * depth + b'{"h": 1}' + b"]" * depth, 1)
    if draw(st.integers(0, 15)) == 0:  # the header cut short
        head = head[: draw(st.integers(0, len(head)))]
    return [head, *frames[1:]]


def nudged(draw, x):
    """``x`` with its integers changed a little and its handles pointing at other tensors."""
    if type(x) is int:
        return draw(st.sampled_from([x, -x, x + 1, x - 1, 0, x * 1000]))
    if type(x) is list:
        return [nudged(draw, y) for y in x]
    if type(x) is dict and type(x.get("h")) is int:
        return {"h": draw(st.integers(1, 80))}
    return x


@st.composite
def random_message(draw) -> list:
    """A message made from nothing: random JSON or bytes, with random frames."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        head = json.dumps(draw(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), VALUES,
                                               max_size=6))).encode()
    elif kind == 1:
        head = json.dumps(draw(JSON)).encode()
    else:
        head = draw(st.binary(max_size=80))
    return [head, *draw(st.lists(st.binary(max_size=256), max_size=3))]


# -- the fuzzer's client -----------------------------------------------------------------------

class Fuzzer(RawClient):
    """Sends fuzzed messages into one session, re-opening it when a message closed it."""

    def __init__(self, url: str, uploads: list, robot_tokens: set):
        super().__init__(url, timeout_ms=30_000)
        self.uploads, self.robot_tokens, self.sent, self.probes = uploads, robot_tokens, 0, 0
        self.recent: collections.deque = collections.deque(maxlen=8)
        self.open()

    def open(self) -> None:
        self.session = None
        self.session = self.call({"t": "hello", "v": codec.PROTOCOL_VERSION, "torch": "fuzz"})["session"]
        for frames in self.uploads:  # the robot's weights, so mutated ops find real tensors
            self.send_frames(self.with_session(frames))

    def with_session(self, frames: list) -> list:
        """The message addressed to this session, unless a mutation changed its session token."""
        try:
            header = json.loads(frames[0])
        except (ValueError, RecursionError):
            return frames
        if isinstance(header, dict) and isinstance(header.get("s"), str) and header["s"] in self.robot_tokens:
            header["s"] = self.session
            return [json.dumps(header).encode(), *frames[1:]]
        return frames

    def burst(self, messages: list) -> None:
        for frames in messages:
            frames = self.with_session(frames)
            self.recent.append([f[:300] for f in frames])
            self.sock.send_multipart(frames)
            self.sent += 1
        self.probe()

    def probe(self) -> None:
        """A request of our own: the server must answer it, whatever came before."""
        if self.call({"t": "sync", "s": self.session}).get("kind") == "no_session":  # a fuzzed goodbye
            self.open()

    def call(self, header: dict) -> dict:
        """Send a request and wait for its reply; replies to fuzzed requests may come in between."""
        self.probes += 1
        header["q"] = q = PROBE_Q + self.probes
        self.sock.send_multipart(codec.pack(header))
        while True:
            if not self.sock.poll(self.timeout_ms):
                raise AssertionError(f"the server stopped answering after these messages: {list(self.recent)}")
            reply, _ = codec.unpack(self.sock.recv_multipart())
            if reply.get("q") == q:
                return reply
            if isinstance(reply.get("session"), str):  # a fuzzed hello opened a session: close it
                self.sock.send_multipart(codec.pack({"t": "bye", "s": reply["session"]}))


@pytest.fixture(scope="module")
def fuzz_server():
    s = ServerProcess("--max-session-mb", "256", "--max-tensor-mb", "64", "--max-sessions", "16")
    yield s
    s.stop()


def test_fuzzed_messages_leave_the_server_serving_correctly(fuzz_server):
    captured: list = []
    well_behaved_robot(fuzz_server.url, captured)  # warm-up, and the messages to mutate
    well_behaved_robot(fuzz_server.url)
    baseline = fuzz_server.settled_rss_mb()
    captured = [m for m in captured if len(m[0]) < 4096]
    uploads = [m for m in captured if json.loads(m[0]).get("t") == "put"]
    probe = RawClient(fuzz_server.url)
    allowed = probe.hello()["allowed"]
    probe.request({"t": "bye"})
    probe.close()
    tokens = {json.loads(m[0]).get("s") for m in captured} - {None}
    fuzzer = Fuzzer(fuzz_server.url, uploads, tokens)
    fuzzer.probe()  # the uploads have run
    before = fuzzer.call({"t": "stats", "s": fuzzer.session})
    assert before["sessions"] == 1 and before["tensor_bytes"] > 0, before  # the robot's sessions have ended
    message = st.one_of(*[mutated(captured, allowed)] * 3, random_message())

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              derandomize=not os.environ.get("RRTO_FUZZ_RANDOM"),
              suppress_health_check=list(HealthCheck))
    @given(st.lists(message, min_size=1, max_size=6))
    def fuzz(messages):
        fuzzer.burst(messages)

    t0 = time.monotonic()
    try:
        fuzz()
        elapsed = time.monotonic() - t0
        fuzzer.probe()
        time.sleep(0.5)
        fuzzer.probe()  # late replies to fuzzed hellos have been seen: their sessions are closed
        assert fuzzer.call({"t": "stats", "s": fuzzer.session}).get("tensor_bytes", 0) > 0
        fuzzer.call({"t": "bye", "s": fuzzer.session})
    finally:
        fuzzer.close()
    assert fuzz_server.alive(), "".join(fuzz_server.log[-50:])
    print(f"fuzz: {fuzzer.sent} messages in {elapsed:.1f} s ({fuzzer.sent / elapsed:.0f}/s), "
          f"{fuzzer.probes} probes answered")
    assert fuzzer.sent >= 2 * EXAMPLES

    watcher = RawClient(fuzz_server.url)
    watcher.hello()
    deadline = time.monotonic() + 10
    while (held := watcher.request({"t": "stats"}))["closing"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the fuzzer's session thread may still be finishing its last requests
    watcher.close()
    assert held["sessions"] == 1 and held["closing"] == 0 and held["tensor_bytes"] == 0, held
    well_behaved_robot(fuzz_server.url)  # still correct after all that
    rss = fuzz_server.settled_rss_mb()
    print(f"server RSS: {baseline:.0f} MiB after warm-up, {rss:.0f} MiB after fuzzing and a clean run")
    assert rss < baseline + RSS_MARGIN_MB, f"server memory grew from {baseline:.0f} to {rss:.0f} MiB"
    assert fuzz_server.stop() == 0
    bad = [line for line in fuzz_server.log if "Traceback" in line or "Exception in thread" in line]
    assert not bad, "".join(fuzz_server.log[-80:])
