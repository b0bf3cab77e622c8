"""Server-side validation and resource hygiene: what a broken or hostile robot cannot do."""
from __future__ import annotations

import json
import time

import pytest
import torch

from rrto import codec
from server import kernels
from server.ops import DENIED, OutputMeta, allowed_names, output_binding, to_meta

from .conftest import RawClient, ServerProcess
from .test_server import get, good_request_works, put


@pytest.fixture(scope="module")
def own_server():
    s = ServerProcess("--max-session-mb", "256", "--max-tensor-mb", "128")
    yield s
    assert s.alive()
    s.stop()
    assert not any("Traceback" in line for line in s.log), "".join(s.log)


@pytest.fixture
def client(own_server):
    c = RawClient(own_server.url)
    c.hello()
    yield c
    c.close()


def test_the_allowlist_never_holds_a_denied_op():
    allowed = allowed_names()
    assert not [n for n in allowed if DENIED.search(n[6:].split(".")[0])]
    assert all(n.startswith("aten::") for n in allowed)
    assert "aten::from_file.default" not in allowed and "aten::add.Tensor" in allowed


@pytest.mark.parametrize("name", [
    "aten::from_file.default", "aten::_nested_tensor_from_mask.default", "aten::_nested_view_from_buffer.default",
    "aten::_pin_memory.default", "aten::set_.source_Storage", "aten::resize_.default", "aten::_foreach_add.List",
    "aten::_copy_from.default", "aten::_assert_async.msg", "aten::_print.default", "aten::record_stream.default",
    "aten::quantize_per_tensor.default", "aten::_fused_adam_.default",
    "prims::add.default", "quantized::add.default", "c10d::allreduce_.default", "inductor::resize_storage_bytes_.default",
    "_c10d_functional::all_reduce.default", "profiler::_record_function_enter.default", "torch.ops.aten.add.Tensor",
])
def test_file_process_network_and_foreign_namespace_ops_are_refused(client, name):
    r = client.request({"t": "op", "op": name, "a": ["/etc/passwd", 0, 10], "o": [1]})
    assert r["t"] == "err" and r["kind"] in ("unsupported", "bad_request"), r
    assert "allowlist" in r["msg"] or "malformed op name" in r["msg"]
    good_request_works(client, 10)


def nested(depth: int):
    x: list = [{"h": 1}]
    for _ in range(depth - 1):
        x = [x]
    return x


def test_deep_nesting_is_refused_before_decoding(client):
    put(client, 1, torch.ones(2))
    for depth in (40, 900):
        r = client.request({"t": "op", "op": "aten::cat.default", "a": [nested(depth)], "o": [2]})
        assert r["t"] == "err" and r["kind"] == "bad_request" and "nests" in r["msg"], r
    # nesting a real op uses stays fine: cat of a list of handles
    r = client.request({"t": "op", "op": "aten::cat.default", "a": [[{"h": 1}, {"h": 1}]], "o": [3]})
    assert r.get("t") != "err" and get(client, 3).tolist() == [1.0] * 4
    good_request_works(client, 20)


def test_frame_counts_and_truncated_messages(client):
    client.seq += 1
    client.send({"t": "put", "h": 5, "d": {"dt": "uint8", "sh": [1], "st": [1]}, "q": client.seq}, [b"x"] * 2000)
    r, _ = client.recv()
    assert r["t"] == "err" and "frames" in r["msg"]
    r = client.request({"t": "put", "h": 5, "d": {"dt": "float32", "sh": [4], "st": [1]}})  # the frame is missing
    assert r["t"] == "err" and r["kind"] == "bad_request" and "frame" in r["msg"]
    r = client.request({"t": "op", "op": "aten::relu.default", "a": [{"i": 0}], "o": [6],
                        "in": [{"dt": "float32", "sh": [4], "st": [1]}]})  # descriptor without its frame
    assert r["t"] == "err" and r["kind"] == "bad_request"
    r = client.request({"t": "op", "op": "aten::relu.default", "a": [{"i": 0}], "o": [6],
                        "in": [{"dt": "float32", "sh": [4], "st": [1]}]}, [b"\0" * 15])  # a truncated frame
    assert r["t"] == "err" and r["kind"] == "bad_request" and "16" in r["msg"]
    full = codec.pack({"t": "op", "op": "aten::relu.default", "a": [{"h": 1}], "o": [7], "s": client.session,
                       "q": 999})[0]
    client.send_frames([full[: len(full) // 2]])  # a header cut in the middle
    r, _ = client.recv()
    assert r["t"] == "err" and r["kind"] == "bad_request" and "JSON" in r["msg"]
    good_request_works(client, 30)


def test_a_session_naming_another_sessions_handles_gets_errors(own_server):
    a, b = RawClient(own_server.url), RawClient(own_server.url)
    try:
        a.hello()
        b.hello()
        put(a, 1, torch.tensor([42.0, 43.0]))
        r = b.request({"t": "op", "op": "aten::neg.default", "a": [{"h": 1}], "o": [2]})
        assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]
        r = b.request({"t": "op", "op": "aten::add_.Tensor", "a": [{"h": 1}, 1.0], "o": [1]})
        assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]
        b.request({"t": "free", "fr": [1]})  # freeing a name B does not have touches nothing of A's
        r = b.request({"t": "get", "h": 1})
        assert r["t"] == "err"
        assert get(a, 1).tolist() == [42.0, 43.0]
    finally:
        a.close()
        b.close()


def test_quota_errors_say_what_to_do(client):
    put(client, 1, torch.zeros(24 << 20, dtype=torch.uint8))
    r = client.request({"t": "op", "op": "aten::zeros.default", "a": [[300 << 20]],
                        "k": {"dtype": {"dt": "uint8"}, "device": {"dev": "r"}}, "o": [2]})
    assert r["t"] == "err" and r["kind"] == "quota" and "limit" in r["msg"], r
    for h in range(3, 20):  # 24 MiB each: the 256 MiB session limit is reached on the way
        r = put(client, h, torch.zeros(24 << 20, dtype=torch.uint8))
        if r.get("t") == "err":
            break
    assert r["t"] == "err" and r["kind"] == "quota", r
    assert "session memory limit" in r["msg"] and "--max-session-mb" in r["msg"] and "free" in r["msg"]
    client.request({"t": "free", "fr": list(range(1, 20))})
    assert client.request({"t": "mem"})["allocated"] == 0
    good_request_works(client, 30)


def stats(c: RawClient) -> dict:
    r = c.request({"t": "stats"})
    assert r["t"] == "stats", r
    return r


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_silent_and_departed_sessions_are_freed():
    s = ServerProcess("--idle-timeout", "2")
    watcher, silent, leaving = RawClient(s.url), RawClient(s.url), RawClient(s.url)
    try:
        base_rss = s.settled_rss_mb()
        watcher.hello()
        silent.hello()
        put(silent, 1, torch.ones(96 << 20, dtype=torch.uint8))
        leaving.hello()
        put(leaving, 1, torch.ones(96 << 20, dtype=torch.uint8))
        st = stats(watcher)
        assert st["sessions"] == 3 and st["tensor_bytes"] >= 2 * (96 << 20)
        assert s.rss_mb() > base_rss + 150
        leaving.send({"t": "bye"})  # a robot that says goodbye is freed at once
        st = wait_for(lambda: (r := stats(watcher))["sessions"] == 2 and r["closing"] == 0 and r, 2, "the bye")
        assert (96 << 20) <= st["tensor_bytes"] < 2 * (96 << 20)
        # the silent one is closed after its 2 s lease (the watcher keeps talking, so it stays)
        st = wait_for(lambda: (r := stats(watcher))["sessions"] == 1 and r["closing"] == 0 and r, 8, "the lease")
        assert st["tensor_bytes"] == 0 and st["queued_bytes"] == 0
        rss = wait_for(lambda: (m := s.rss_mb()) < base_rss + 40 and m, 5, "the memory to be returned")
        print(f"server RSS: {base_rss:.0f} MiB idle, back to {rss:.0f} MiB after both sessions ended")
        r = silent.request({"t": "get", "h": 1})  # the silent robot's session is gone, and it is told so
        assert r["t"] == "err" and r["kind"] == "no_session"
        good_request_works(watcher, 10)
    finally:
        for c in (watcher, silent, leaving):
            c.close()
        assert s.stop() == 0
    assert not any("Traceback" in line for line in s.log), "".join(s.log)


def test_stats_needs_a_session(own_server):
    c = RawClient(own_server.url)
    try:
        c.send_frames([json.dumps({"t": "stats", "q": 1}).encode()])
        r, _ = c.recv()
        assert r["t"] == "err" and r["kind"] == "no_session"
    finally:
        c.close()


def _stand_in_cases():
    """(op, its stand-in meta kernel, arguments) for the meta kernels server/kernels.py adds."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7)
    flags = [False, False, True, True]  # benchmark, deterministic, cudnn_enabled, allow_tf32
    conv = torch.ops.aten._convolution.default
    yield conv, kernels._convolution_meta, [x, torch.randn(4, 3, 3, 3), torch.randn(4), [2, 1], [1, 0], [1, 2],
                                            False, [0, 0], 1, *flags]
    yield conv, kernels._convolution_meta, [x.contiguous(memory_format=torch.channels_last), torch.randn(6, 1, 3, 3),
                                            None, [1, 1], [1, 1], [1, 1], False, [0, 0], 3, *flags]
    yield conv, kernels._convolution_meta, [x, torch.randn(3, 2, 3, 3), torch.randn(2), [2, 2], [1, 1], [1, 1],
                                            True, [1, 0], 1, *flags]
    for norm_first, batch in ((False, (2, 5)), (True, (1, 7))):
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=norm_first).eval()
        a = layer.self_attn
        yield torch.ops.aten._transformer_encoder_layer_fwd.default, kernels._encoder_layer_meta, [
            torch.randn(*batch, 8), 8, 2, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
            False, norm_first, 1e-5, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
            layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias]


@torch.no_grad()
def test_meta_kernels_the_server_adds_size_outputs_as_the_ops_make_them():
    """torch 2.11 has no meta kernel for _convolution (TorchScript's conv) or the transformer
    encoder's fused eval path, so a GPU server refused them ("cannot be size-checked"). A
    kernel standing in must give each output the shape and dtype the op gives it, and strides
    the server can deliver; and where torch has a meta kernel of its own, exactly its output.
    With them installed, each op runs on meta tensors, whichever torch this is."""
    lib = kernels.install()
    try:
        for op, stand_in, args in _stand_in_cases():
            real, ours, torchs = op(*args), stand_in(*to_meta(args)), op(*to_meta(args))
            assert (ours.device.type, ours.shape, ours.dtype) == ("meta", real.shape, real.dtype), op
            promised = OutputMeta(tuple(ours.shape), ours.stride(), 0, ours.dtype, 0, False)
            # (a channels-last conv: the CPU kernel keeps that layout, meta kernels do not; the server copies)
            assert output_binding(real, promised, args, {}) in (None, "copy"), op
            assert (torchs.shape, torchs.stride(), torchs.dtype) == (ours.shape, ours.stride(), ours.dtype), op
    finally:
        if lib is not None:
            lib._destroy()


def test_generator_numbers_and_states_are_checked(client):
    """``{"g": n}`` names one of the session's generators, up to codec.MAX_GENERATORS; a state
    set must be a uint8 tensor of the size this server's generators take."""
    bad = [({"t": "seed", "seed": 1, "g": codec.MAX_GENERATORS}, [], "generator number"),
           ({"t": "seed", "seed": -1}, [], "seed must be"),
           ({"t": "rng", "g": "0"}, [], "generator number"),
           ({"t": "op", "op": "aten::randn.generator", "a": [[3]], "k": {"generator": {"g": 10 ** 6}}, "o": [1]}, [],
            "generator number")]
    state = torch.zeros(7, dtype=torch.uint8)
    desc, buf, _ = codec.tensor_frame(state)
    bad.append(({"t": "rng", "g": 1, "d": desc}, [buf], "does not take that state"))
    desc, buf, _ = codec.tensor_frame(torch.zeros(2, dtype=torch.float32))
    bad.append(({"t": "rng", "g": 1, "d": desc}, [buf], "1-D uint8"))
    for header, frames, words in bad:
        r = client.request(header, frames)
        assert r["t"] == "err" and words in r["msg"], (header, r)
        good_request_works(client, 10)
    # a generator's state read, set back, and the same numbers drawn again
    client.request({"t": "seed", "seed": 3, "g": 2})
    r = client.request({"t": "rng", "g": 2})
    saved = codec.frame_tensor(r["d"], client.frames[0], codec.MAX_GENERATOR_STATE).clone()
    draw = {"t": "op", "op": "aten::randn.generator", "a": [[4]], "k": {"generator": {"g": 2}}}
    client.request({**draw, "o": [20]})
    desc, buf, _ = codec.tensor_frame(saved)
    assert client.request({"t": "rng", "g": 2, "d": desc}, [buf]).get("t") != "err"
    client.request({**draw, "o": [21]})
    assert torch.equal(get(client, 20), get(client, 21))
