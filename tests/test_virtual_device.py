"""The virtual cuda device, one test per promise, each against a real server process."""
from __future__ import annotations

import copy
import gc
import io
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import rrto
from rrto.intercept.remote_tensor import RemoteTensor


def test_cuda_is_available_only_while_offloading(server):
    before = torch.cuda.is_available()
    with rrto.offload(server=server.url):
        assert torch.cuda.is_available() is True
    assert torch.cuda.is_available() == before  # restored
    assert before is (torch.backends.cuda.is_built() and torch._C._cuda_getDeviceCount() > 0)


def test_device_queries(remote):
    assert torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    assert "rrto remote cpu" in torch.cuda.get_device_name()
    assert torch.cuda.get_device_name(0) == torch.cuda.get_device_properties(0).name
    assert torch.cuda.is_initialized()


def test_synchronize_waits_for_the_server(remote):
    x = torch.ones(100, device="cuda")
    for _ in range(10):
        x.add_(1)
    rt_before = remote.stats.round_trips
    torch.cuda.synchronize()
    assert remote.stats.round_trips == rt_before + 1
    assert remote.stats.syncs == 1
    assert x[0].item() == 11.0


def test_torch_device_cuda(remote):
    dev = torch.device("cuda")
    x = torch.arange(4.0).to(dev)
    assert x.device == torch.device("cuda", 0)
    assert x.device.type == "cuda"


def test_model_cuda_and_to_cuda(remote):
    torch.manual_seed(0)
    for move in (lambda m: m.cuda(), lambda m: m.to("cuda")):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 6 * 6, 5)).eval()
        x = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            expected = model(x)
            moved = move(model)
            assert moved is model
            assert all(isinstance(p, RemoteTensor) and p.is_cuda for p in model.parameters())
            assert all(isinstance(p, nn.Parameter) for p in model.parameters())
            assert all(b.is_cuda for b in model.buffers())
            out = model(x.cuda())
        assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.double()],
                         ids=["half", "to-float16", "double"])
def test_a_model_on_the_device_changes_dtype_on_the_server(remote, convert):
    """``model.cuda().half()``: each parameter's ``.data`` is set to its converted copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = convert(copy.deepcopy(model))
        expected = ref(x.to(next(ref.parameters()).dtype))
        params = list(model.cuda().parameters())
        convert(model)
        assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)  # the same objects
        out = model(x.cuda().to(expected.dtype))
    assert out.dtype == expected.dtype and torch.equal(out.cpu(), expected)


def test_setting_data_shares_the_other_tensors_memory(remote):
    p, q = torch.zeros(3).cuda(), torch.arange(3.0).cuda()
    p.data = q
    assert torch.equal(p.cpu(), torch.arange(3.0))
    q.add_(1)  # one memory: p sees the write, as on a GPU
    assert torch.equal(p.cpu(), torch.arange(1.0, 4.0))
    del q
    gc.collect()
    torch.cuda.synchronize()
    assert torch.equal(p.cpu(), torch.arange(1.0, 4.0))  # q's death freed its handle, not the memory
    p.data = torch.ones(2, 2, dtype=torch.int64).cuda()
    assert p.shape == (2, 2) and p.dtype == torch.int64 and torch.equal(p.cpu(), torch.ones(2, 2, dtype=torch.int64))


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2)).eval()


def _checkpoint(obj, saved_on: str = "cpu", monkeypatch=None) -> io.BytesIO:
    """``torch.save(obj)``; ``saved_on="cuda:0"`` tags its storages as a GPU machine's save would."""
    buf = io.BytesIO()
    if saved_on != "cpu":
        monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: saved_on)
    torch.save(obj, buf)
    if saved_on != "cpu":
        monkeypatch.undo()
    buf.seek(0)
    return buf


@pytest.mark.parametrize("saved_on, map_location, device", [
    ("cpu", "cuda", "cuda"), ("cpu", "cuda:0", "cuda"), ("cpu", torch.device("cuda"), "cuda"),
    ("cpu", {"cpu": "cuda:0"}, "cuda"), ("cuda:0", None, "cuda"), ("cuda:0", "cpu", "cpu"),
    ("cuda:0", lambda storage, location: storage, "cpu"),
], ids=["cuda", "cuda:0", "device", "dict", "saved-on-gpu", "saved-on-gpu-to-cpu", "function"])
def test_torch_load_puts_a_checkpoint_where_it_says(remote, monkeypatch, saved_on, map_location, device):
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    state = torch.load(_checkpoint(model.state_dict(), saved_on, monkeypatch), map_location=map_location)
    assert {t.device.type for t in state.values()} == {device}
    fresh = _small_model().cuda()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x.cuda()).cpu(), model(x))


def test_torch_load_of_a_whole_model_saved_on_a_gpu(remote, monkeypatch):
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    loaded = torch.load(_checkpoint(model, "cuda:0", monkeypatch), weights_only=False)
    assert all(isinstance(p, RemoteTensor) and isinstance(p, nn.Parameter) for p in loaded.parameters())
    assert all(b.is_cuda for b in loaded.buffers())
    with torch.no_grad():
        assert torch.equal(loaded(x.cuda()).cpu(), model(x))


def test_torch_load_to_cuda_in_local_mode(monkeypatch):
    model = _small_model()
    with rrto.offload(mode="local"):
        state = torch.load(_checkpoint(model.state_dict()), map_location="cuda")
        gpu_saved = torch.load(_checkpoint(model.state_dict(), "cuda:0", monkeypatch))
    for loaded in (state, gpu_saved):
        assert all(type(t) is torch.Tensor and torch.equal(t, model.state_dict()[k]) for k, t in loaded.items())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_model_scripted_while_offloading_runs_on_the_device(remote):
    """torch.jit.script compiles F.conv2d and F.batch_norm, which rrto replaces with shortcuts."""
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    scripted = torch.jit.script(copy.deepcopy(model)).cuda()

    @torch.jit.script
    def head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, w, padding=1).relu()

    w = torch.randn(2, 3, 3, 3)
    with torch.no_grad():
        assert torch.equal(scripted(x.cuda()).cpu(), model(x))
        assert torch.equal(head(x.cuda(), w.cuda()).cpu(), torch.nn.functional.conv2d(x, w, padding=1).relu())


_SCRIPT_CALL, _SCRIPT_METHOD_CALL = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__  # torch's own


@torch.jit.ignore
def _tolerant(x):  # (no annotations: TorchScript takes Tensor, and cannot read them as strings)
    try:
        return x + torch.ones(3, 3)  # a CPU tensor beside a cuda one: rrto raises, this catches
    except RuntimeError:
        return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch 2.13 deprecates TorchScript)
def test_an_error_inside_torchscript_reaches_the_app_with_its_message(remote):
    """TorchScript's interpreter empties the message of an exception raised in
    ``__torch_dispatch__`` ("RuntimeError: " and nothing): the app gets rrto's error instead."""
    @torch.jit.script
    def mixed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y

    @torch.jit.script
    def inverse_total(x: torch.Tensor) -> float:
        return torch.linalg.inv(x).sum().item()  # the server's error comes back at the wait, inside

    class Mixed(nn.Module):
        def forward(self, x, y):
            return x * y

    @torch.jit.script
    def checked(x: torch.Tensor) -> torch.Tensor:
        y = _tolerant(x)
        if bool(y.sum() > -1.0):
            raise ValueError("frame rejected")
        return y

    module = torch.jit.load(_torchscript(Mixed()))
    x, cpu = torch.zeros(3, 3).cuda(), torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device") as caught:
        mixed(x, cpu)
    assert any("TorchScript" in note and "x + y" in note for note in caught.value.__notes__)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        module(x, cpu)
    with pytest.raises(rrto.RemoteError, match="singular"):
        inverse_total(x)
    # an error an ignored Python function caught is not the cause of the script's own
    with pytest.raises(torch.jit.Error, match="frame rejected"):
        checked(x)
    assert torch.equal(mixed(x, x).cpu(), torch.zeros(3, 3))  # the session goes on
    assert torch._C.ScriptFunction.__call__ is not _SCRIPT_CALL


def test_scripted_calls_are_torchs_own_after_disable(server):
    with rrto.offload(server=server.url):
        assert torch._C.ScriptMethod.__call__ is not _SCRIPT_METHOD_CALL
    assert torch._C.ScriptFunction.__call__ is _SCRIPT_CALL
    assert torch._C.ScriptMethod.__call__ is _SCRIPT_METHOD_CALL


def _torchscript(model: nn.Module, saved_on_gpu: bool = False) -> io.BytesIO:
    """``torch.jit.save(torch.jit.script(model))``; ``saved_on_gpu``: its tensors tagged "cuda:0"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    if not saved_on_gpu:
        return buf
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):  # the location of each storage, a pickled string
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(item, data)
    out.seek(0)
    return out


@pytest.mark.parametrize("load, device", [
    (lambda f: torch.jit.load(f, map_location="cuda"), "cuda"),
    (lambda f: torch.jit.load(f).cuda(), "cuda"),
    (lambda f: torch.jit.load(f, map_location="cpu").to("cuda"), "cuda"),
    (lambda f: torch.jit.load(_torchscript(_small_model(), saved_on_gpu=True)), "cuda"),
    (lambda f: torch.jit.load(_torchscript(_small_model(), saved_on_gpu=True), map_location="cpu"), "cpu"),
], ids=["map_location", "cuda()", "to()", "saved-on-gpu", "saved-on-gpu-to-cpu"])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_a_torchscript_model_loads_and_runs_on_the_device(remote, load, device):
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    torch.manual_seed(0)  # (the GPU-saved cases script a model of their own: the same weights)
    loaded = load(_torchscript(model))
    assert {t.device.type for t in (*loaded.parameters(), *loaded.buffers())} == {device}
    with torch.no_grad():
        out = loaded(x.to(device))
    assert out.device.type == device and torch.equal(out.cpu(), model(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch 2.13 deprecates TorchScript)
def test_jit_trace_on_the_device_says_what_to_do_and_on_the_cpu_works(remote):
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    with pytest.raises(rrto.UnsupportedOpError, match="Trace on the CPU"):
        torch.jit.trace(copy.deepcopy(model).cuda(), x.cuda())
    archive = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, x), archive)  # on the CPU, while rrto is on
    archive.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(archive, map_location="cuda")(x.cuda()).cpu(), model(x))


def test_a_check_that_returns_nothing_runs_on_the_server(remote):
    """linalg.inv ends in _linalg_check_errors, which returns nothing: it must still run, to
    raise for a singular matrix as torch does instead of handing back infinities."""
    assert torch.equal(torch.linalg.inv(torch.eye(3).cuda() * 2).cpu(), torch.eye(3) / 2)
    with pytest.raises(RuntimeError, match="singular"):
        torch.linalg.inv(torch.zeros(3, 3).cuda()).cpu()
    assert torch.equal(torch.ones(2).cuda().cpu(), torch.ones(2))  # and the session goes on


def test_data_parallel_on_the_one_device(remote):
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(2, 3, 4, 4)
    parallel = nn.DataParallel(copy.deepcopy(model)).cuda()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(parallel(x.cuda()).cpu(), expected)
        assert torch.equal(parallel(x).cpu(), expected)  # a CPU input goes to the device, as torch does


def test_data_parallel_in_local_mode():
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(2, 3, 4, 4)
    with rrto.offload(mode="local"), torch.no_grad():
        out = nn.DataParallel(copy.deepcopy(model)).cuda()(x.cuda())
        assert torch.equal(out, model(x))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.LSTM(8, 16, 2, batch_first=True), (2, 5, 8)),
    (lambda: nn.GRU(8, 16, batch_first=True), (2, 5, 8)),
    (lambda: nn.LSTMCell(8, 16), (2, 8)),
    (lambda: nn.GRUCell(8, 16), (2, 8)),
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                   enable_nested_tensor=False), (2, 5, 16)),
    (lambda: nn.EmbeddingBag(10, 4), None),
], ids=["LSTM", "GRU", "LSTMCell", "GRUCell", "TransformerEncoder", "EmbeddingBag"])
def test_modules_whose_cuda_path_differs_from_the_cpus(remote, make, shape):
    """On a cuda tensor, RNN cells run as CUDA-only fused ops (the server runs them as the ops
    they fuse when it has no GPU) and an encoder layer in eval takes torch's fused fast path."""
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randint(0, 10, (2, 3)) if shape is None else torch.randn(*shape)
    with torch.no_grad():
        expected = module(x)
        out = copy.deepcopy(module).cuda()(x.cuda())
    flat = lambda o: [t for t in (o if isinstance(o, tuple) else (o,)) for t in (t if isinstance(t, tuple) else (t,))]
    for a, b in zip(flat(out), flat(expected), strict=True):
        assert a.is_cuda and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)  # (fused gates: another order of sums)


def test_a_full_transformer_in_eval_takes_the_fused_attention_path(remote):
    torch.manual_seed(0)
    model = nn.Transformer(16, 4, 1, 1, 32, batch_first=True).eval()
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = model(src, tgt)
        out = copy.deepcopy(model).cuda()(src.cuda(), tgt.cuda())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)


def test_attention_takes_the_math_path_whatever_the_robots_build(server):
    """A CUDA build on a robot with a GPU let scaled_dot_product_attention ask that GPU for a
    fused kernel (an H100 robot sent _scaled_dot_product_efficient_attention, which the CPU
    test server cannot run). While rrto is on, the fused backends are off, as cuDNN is; the
    app's own settings come back after."""
    cuda = torch.backends.cuda
    backends = [n for n in ("flash", "mem_efficient", "cudnn") if hasattr(cuda, f"enable_{n}_sdp")]
    cuda.enable_flash_sdp(False)  # the app's choice before rrto: it must survive
    try:
        with rrto.offload(server.url, mode="eager"):
            assert not any(getattr(cuda, f"{n}_sdp_enabled")() for n in backends)
            assert cuda.math_sdp_enabled()
            q = torch.randn(2, 4, 5, 8)
            out = torch.nn.functional.scaled_dot_product_attention(q.cuda(), q.cuda(), q.cuda())
            torch.testing.assert_close(out.cpu(), torch.nn.functional.scaled_dot_product_attention(q, q, q))
        assert [getattr(cuda, f"{n}_sdp_enabled")() for n in backends] == [n != "flash" for n in backends]
    finally:
        cuda.enable_flash_sdp(True)


def test_torch_compile_runs_the_model_as_written(remote):
    torch.manual_seed(0)
    model, x = _small_model(), torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)
    model.cuda()
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        compiled = torch.compile(model)

    @torch.compile
    def plain(x):
        return model(x)

    @torch.compile(mode="max-autotune", fullgraph=True)
    def with_options(x):
        return model(x)

    model.compile()
    with torch.no_grad():
        for run in (compiled, plain, with_options, model):
            assert torch.equal(run(x.cuda()).cpu(), expected)


def test_tensor_cuda_and_to_non_blocking(remote):
    x = torch.randn(3, 4)
    a, b = x.cuda(), x.to("cuda", non_blocking=True)
    c, d = x.cuda(0), x.to(torch.device("cuda:0"), torch.float64)
    assert all(t.is_cuda for t in (a, b, c, d))
    assert d.dtype == torch.float64
    assert torch.equal(a.cpu(), x) and torch.equal(b.cpu(), x) and torch.equal(c.cpu(), x)
    assert torch.equal(d.cpu(), x.double())
    assert a.cuda() is a and a.to("cuda") is a  # already there: no copy, as on a GPU
    e = a.to("cuda", copy=True)
    assert e is not a and torch.equal(e.cpu(), x)
    f = a.to("cuda", torch.float16)
    assert f.dtype == torch.float16 and torch.equal(f.cpu(), x.half())
    assert remote.stats.uploads >= 4


def test_upload_copies_the_data_at_call_time(remote):
    buf = torch.zeros(1000)
    x = buf.cuda()  # blocking copy: later writes to buf must not show up on the device
    buf.fill_(7)
    assert torch.equal(x.cpu(), torch.zeros(1000))


def test_channels_last_layout_survives_upload(remote):
    x = torch.randn(1, 3, 4, 5).to(memory_format=torch.channels_last)
    y = x.cuda()
    assert y.stride() == x.stride()
    assert torch.equal(y.cpu(), x)


@pytest.mark.parametrize("make, check", [
    (lambda: torch.zeros(2, 3, device="cuda"), lambda t: torch.equal(t.cpu(), torch.zeros(2, 3))),
    (lambda: torch.ones(4, dtype=torch.int64, device="cuda"), lambda t: t.cpu().tolist() == [1, 1, 1, 1]),
    (lambda: torch.empty(5, device="cuda"), lambda t: t.shape == (5,) and t.is_cuda),
    (lambda: torch.arange(2, 11, 3, device="cuda"), lambda t: t.cpu().tolist() == [2, 5, 8]),
    (lambda: torch.tensor([[1.5, 2.0]], device="cuda"), lambda t: t.cpu().tolist() == [[1.5, 2.0]]),
    (lambda: torch.full((2,), 3.25, device="cuda"), lambda t: t.cpu().tolist() == [3.25, 3.25]),
    (lambda: torch.linspace(0, 1, 5, device="cuda"), lambda t: torch.equal(t.cpu(), torch.linspace(0, 1, 5))),
    (lambda: torch.eye(3, device="cuda"), lambda t: torch.equal(t.cpu(), torch.eye(3))),
])
def test_factories_on_the_device(remote, make, check):
    t = make()
    assert t.device.type == "cuda"
    assert check(t)


def test_like_factories(remote):
    base = torch.randn(2, 3).cuda()
    cpu = torch.randn(4)
    for t, value in [(torch.zeros_like(base), 0.0), (torch.ones_like(base), 1.0), (torch.full_like(base, 2.5), 2.5)]:
        assert t.is_cuda and t.shape == base.shape
        assert torch.equal(t.cpu(), torch.full((2, 3), value))
    assert torch.empty_like(base).shape == (2, 3)
    r = torch.randn_like(base)
    assert r.is_cuda and r.shape == (2, 3) and r.cpu().std() > 0
    z = torch.zeros_like(cpu, device="cuda")
    assert z.is_cuda and torch.equal(z.cpu(), torch.zeros(4))
    n = base.new_zeros(3)
    assert n.is_cuda and n.cpu().tolist() == [0, 0, 0]


def test_randn_follows_the_seed(remote):
    torch.manual_seed(123)
    a = torch.randn(8, device="cuda").cpu()
    torch.manual_seed(123)
    b = torch.randn(8, device="cuda").cpu()
    torch.cuda.manual_seed(7)
    c = torch.randn(8, device="cuda").cpu()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0.2 < a.std() < 3


def test_empty_never_shows_leftover_memory(remote):
    # Another tensor's bytes must not be readable through an uninitialised allocation. A freed
    # block of the same size is what the allocator hands out next, so plant one each time.
    def plant(numel: int) -> None:
        secret = torch.full((numel,), 1234.5).cuda()
        secret.add_(1)  # run on the server, then free it there
        del secret

    plant(4096)
    leak = torch.empty(4096, device="cuda").cpu()
    assert torch.equal(leak, torch.zeros(4096))
    plant(4033)
    gapped = torch.empty_strided((64,), (64,), device="cuda")  # storage of 4033 floats, 64 visible
    assert torch.equal(gapped.as_strided((4033,), (1,)).cpu(), torch.zeros(4033))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(remote, context):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 6)
    expected = model(x).detach()
    model.cuda()
    with context():
        out = model(x.cuda())
        assert not out.requires_grad
        assert torch.equal(out.cpu(), expected)


def test_in_place_ops(remote):
    x = torch.arange(6.0).view(2, 3)
    y = x.cuda()
    ret = y.add_(1)
    assert ret is y
    y.mul_(2).clamp_(max=9)
    y[0].zero_()
    expected = x.add(1).mul(2).clamp(max=9)
    expected[0].zero_()
    assert torch.equal(y.cpu(), expected)


def test_in_place_shape_change(remote):
    x = torch.arange(6.0).cuda()
    x.unsqueeze_(0)
    assert x.shape == (1, 6)
    x.t_()
    assert x.shape == (6, 1)
    out = torch.empty(0, device="cuda")
    torch.add(torch.ones(3).cuda(), 1, out=out)  # resizes out, as on a GPU
    assert out.shape == (3,) and out.cpu().tolist() == [2.0, 2.0, 2.0]


def test_views_and_slicing(remote):
    x = torch.arange(24.0).view(2, 3, 4)
    y = x.cuda()
    cases = [lambda t: t[0], lambda t: t[:, 1:], lambda t: t[..., ::2], lambda t: t[None, 1, :, -1],
             lambda t: t.transpose(0, 2), lambda t: t.permute(2, 0, 1).reshape(4, 6), lambda t: t.view(-1, 4),
             lambda t: t[:, [2, 0]], lambda t: t[torch.tensor([1, 0])], lambda t: t.narrow(2, 1, 2),
             lambda t: t.unbind(1)[2], lambda t: t.split(2, dim=2)[1], lambda t: t.flatten(1).T]
    for f in cases:
        got = f(y)
        assert got.is_cuda
        assert got.shape == f(x).shape and got.stride() == f(x).stride()
        assert torch.equal(got.cpu(), f(x))
    v = y[1]  # a view: writing through it changes the base, as on a GPU
    v.fill_(-1)
    y[0, :, 0] = 100
    x[1] = -1
    x[0, :, 0] = 100
    assert torch.equal(y.cpu(), x)


def test_cpu_item_tolist_numpy(remote):
    x = torch.tensor([[1.5, -2.0], [3.0, 4.25]])
    y = x.cuda()
    c = y.cpu()
    assert type(c) is torch.Tensor and c.device.type == "cpu"
    assert torch.equal(c, x)
    assert y[1, 1].item() == 4.25
    assert y.sum().item() == pytest.approx(6.75)
    assert y.tolist() == x.tolist()
    assert np.array_equal(y.cpu().numpy(), x.numpy())
    with pytest.raises(TypeError, match="Use Tensor.cpu"):
        y.numpy()
    assert int(y[0, 0] > 0) == 1 and bool(y[0, 1] < 0) and float(y[1, 0]) == 3.0
    assert f"{y[0, 0]:.2f}" == "1.50"


def test_print_tensor(remote, capsys):
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).cuda()
    print(y)
    out = capsys.readouterr().out
    assert out.strip() == "tensor([[1., 2.],\n        [3., 4.]], device='cuda:0')"
    assert repr(torch.tensor([1, 2], dtype=torch.int32).cuda()) == \
        "tensor([1, 2], device='cuda:0', dtype=torch.int32)"
    assert repr(torch.tensor(2.5).cuda()) == "tensor(2.5000, device='cuda:0')"


def test_device_and_is_cuda(remote):
    y = torch.ones(2).cuda()
    assert y.device == torch.device("cuda:0")
    assert y.is_cuda
    assert y.get_device() == 0
    assert not y.cpu().is_cuda


def test_data_dependent_shapes(remote):
    x = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -4.0]])
    y = x.cuda()
    assert torch.equal(torch.nonzero(y > 0).cpu(), torch.nonzero(x > 0))
    assert torch.equal(y[y > 0].cpu(), x[x > 0])
    u = torch.tensor([3, 1, 3, 2, 1]).cuda()
    assert torch.unique(u).cpu().tolist() == [1, 2, 3]
    values, counts = torch.unique(u, return_counts=True)
    assert values.cpu().tolist() == [1, 2, 3] and counts.cpu().tolist() == [2, 1, 2]
    masked = y[y > 0]
    assert masked.shape == (3,)
    assert (masked * 2).sum().item() == pytest.approx(11.0)  # a server-shaped result keeps working


def test_ops_that_need_no_data_do_not_wait(remote):
    x = torch.randn(8, 16).cuda()
    w = torch.randn(4, 16).cuda()
    torch.cuda.synchronize()
    waits = remote.stats.round_trips
    for _ in range(3):
        y = torch.nn.functional.linear(x, w).relu().softmax(-1)[:, :2].contiguous()
        assert y.shape == (8, 2)
    assert remote.stats.round_trips == waits  # every shape came from the robot's meta kernels
    assert remote.stats.meta_cache_hits > 0


def test_unsupported_op_names_itself(remote):
    x = torch.randn(4).cuda()
    with pytest.raises(rrto.UnsupportedOpError, match=r"aten::bincount"):
        torch.bincount(torch.tensor([1, 2, 2]).cuda())
    assert x.add(1).cpu().shape == (4,)  # the session keeps working


def test_cuda_and_cpu_tensors_do_not_mix(remote):
    with pytest.raises(RuntimeError, match="same device"):
        torch.ones(3).cuda() + torch.ones(3)
    assert (torch.ones(3).cuda() * torch.tensor(2.0)).cpu().tolist() == [2, 2, 2]  # CPU scalars may


def test_threads_see_the_virtual_device(remote):
    results = {}

    def worker():
        results["t"] = (torch.arange(3.0).cuda() * 2).cpu()

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert torch.equal(results["t"], torch.tensor([0.0, 2.0, 4.0]))


def test_streams_events_and_memory(remote):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    x = torch.randn(64, 64).cuda() @ torch.randn(64, 64).cuda()
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0
    with torch.cuda.stream(torch.cuda.Stream()):
        pass
    torch.cuda.current_stream().synchronize()
    assert torch.cuda.memory_allocated() >= x.numel() * 4
    torch.cuda.empty_cache()


def test_garbage_collected_tensors_are_freed_on_the_server(remote):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(20):
        t = torch.ones(256, 1024).cuda()  # 1 MiB each; the previous one is garbage now
        del t
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base < 2 * 2**20


def test_every_data_factory_makes_tensors_on_the_device(remote):
    x = torch.arange(3.0).cuda()
    made = {"tensor": torch.tensor([1.0, 2.0], device="cuda"),
            "as_tensor": torch.as_tensor(np.array([1.0, 2.0]), device="cuda"),  # takes no requires_grad
            "asarray": torch.asarray([1.0, 2.0], device=torch.device("cuda", 0)),
            "new_tensor": x.new_tensor([1.0, 2.0]),
            "new_tensor on cuda": torch.ones(1).new_tensor([1.0, 2.0], device="cuda")}
    for name, t in made.items():
        assert type(t) is RemoteTensor, name
        assert torch.equal(t.cpu().double(), torch.tensor([1.0, 2.0], dtype=torch.float64)), name
    leaf = torch.tensor([1.0], device="cuda", requires_grad=True)
    assert leaf.requires_grad and leaf.is_leaf and type(leaf) is RemoteTensor


def test_a_thread_started_before_enable_sees_the_virtual_device(server):
    go, done, results = threading.Event(), threading.Event(), {}

    def worker():  # a camera thread the app started before rrto was turned on
        go.wait(10)
        try:
            y = torch.tensor([1.0, 2.0], device="cuda") * torch.ones(2).to("cuda")
            results["y"] = (type(y), y.cpu())
        finally:
            done.set()

    th = threading.Thread(target=worker)
    th.start()
    with rrto.offload(server=server.url, mode="eager", timeout=20):
        go.set()
        assert done.wait(20)
    th.join()
    assert results["y"][0] is RemoteTensor and torch.equal(results["y"][1], torch.tensor([1.0, 2.0]))


def test_local_mode_makes_cuda_the_cpu_in_threads_started_while_on():
    results = {}

    def worker():
        results["t"] = torch.zeros(2, device="cuda") + torch.ones(2).to("cuda") + torch.ones(2).cuda()

    with rrto.offload(mode="local"):
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        th = threading.Thread(target=worker)
        th.start()
        th.join()
    assert type(results["t"]) is torch.Tensor and torch.equal(results["t"], torch.full((2,), 2.0))


def test_disable_gives_torch_its_own_functions_back(server):
    import torch.nn.functional as F
    names = [(torch.Tensor, "to"), (torch.Tensor, "cuda"), (torch.Tensor, "backward"), (torch.Tensor, "new_tensor"),
             (torch, "tensor"), (torch, "conv2d"), (F, "conv2d"), (F, "batch_norm"), (torch.autograd, "grad"),
             (torch, "_has_compatible_shallow_copy_type")]
    before = [getattr(owner, name) for owner, name in names]
    in_dict = [name in vars(owner) for owner, name in names]
    with rrto.offload(server=server.url, mode="eager", timeout=20):
        assert torch.Tensor.to is not before[0] and F.conv2d is not before[6]
    assert [getattr(owner, name) for owner, name in names] == before
    assert [name in vars(owner) for owner, name in names] == in_dict  # inherited ones inherited again
    x = torch.ones(2)
    assert x.to(torch.float64).dtype == torch.float64 and F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1)).sum() == 9


def test_tensors_after_disable_say_so(server):
    with rrto.offload(server=server.url):
        x = torch.ones(2).cuda()
    with pytest.raises(rrto.RrtoError, match="session that has ended"):
        x + 1


def test_save_and_deepcopy(remote):
    import copy
    import io

    x = torch.arange(4.0).cuda()
    buf = io.BytesIO()
    torch.save({"x": x}, buf)  # saved as CPU data, loadable on a machine without rrto
    buf.seek(0)
    assert torch.equal(torch.load(buf)["x"], torch.arange(4.0))
    m = nn.Linear(3, 2).cuda()
    m2 = copy.deepcopy(m)
    assert isinstance(m2.weight, nn.Parameter) and m2.weight.is_cuda
    assert torch.equal(m2.weight.cpu(), m.weight.cpu())
    with torch.no_grad():
        m2.weight.fill_(0.5)  # a copy, not an alias: the original keeps its weights
    assert torch.equal(m2.weight.cpu(), torch.full((2, 3), 0.5))
    assert not torch.equal(m.weight.cpu(), torch.full((2, 3), 0.5))


def test_backward_is_refused_clearly(remote):
    w = torch.randn(3, device="cuda", requires_grad=True)
    with pytest.raises(rrto.UnsupportedOpError, match="backward"):
        (w * w).sum().backward()
    with pytest.raises(rrto.UnsupportedOpError, match="backward"):
        torch.autograd.grad((w * 2).sum(), [w])


CONV_CASES = [  # (dims, kwargs): every form of the arguments, and those that take torch's own path
    (2, dict(stride=1, padding=1)), (2, dict(stride=(2, 1), padding=(0, 2), dilation=2)),
    (2, dict(groups=2, bias=False)), (2, dict(padding="same", dilation=(1, 2))), (2, dict(unbatched=True)),
    (1, dict(stride=2, padding=3)), (3, dict(stride=(1, 2, 2), padding=1)), (3, dict(groups=4, dilation=2)),
]


@pytest.mark.parametrize("dims,kw", CONV_CASES)
def test_convolutions_equal_torchs_own_path(remote, dims, kw):
    torch.manual_seed(dims)
    kw = dict(kw)
    bias, unbatched = kw.pop("bias", True), kw.pop("unbatched", False)
    conv = getattr(torch, f"conv{dims}d")
    x = torch.randn(*([] if unbatched else [2]), 4, *[9 - d for d in range(dims)])
    w = torch.randn(8, 4 // kw.get("groups", 1), *[3] * dims)
    b = torch.randn(8) if bias else None
    expected = conv(x, w, b, **kw)
    with torch.no_grad():
        out = conv(x.cuda(), w.cuda(), None if b is None else b.cuda(), **kw)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert torch.equal(out.cpu(), expected)


def test_scalars_equal_in_value_but_not_in_type_promote_as_torch_does(remote):
    """1 == 1.0 == True in Python: neither the robot's plans nor the server's meta kernels may
    take one's result type for another's (an int tensor plus 1.0 is float, a mask plus True bool)."""
    x = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    gx = x.to("cuda")
    for offset in (1, 1.0, True, 1, True, 1.0):
        for fn in (lambda t: (t > 0).sum(1) + offset, lambda t: (t > 0) + offset,
                   lambda t: (t > 0).sum(1).clamp(min=offset * 2), lambda t: torch.full((2,), offset, device=t.device) + (t[0] > 0)):
            want, got = fn(x), fn(gx).cpu()
            assert got.dtype == want.dtype and torch.equal(got, want), (offset, want, got)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_in_eval_is_one_op_and_equals_torch(remote, affine):
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(5, affine=affine).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 4, 3)
    expected = bn(x).detach()
    bn.cuda()
    xc = x.cuda()
    with torch.no_grad():
        before = remote.stats.ops_intercepted
        out = bn(xc)
        assert remote.stats.ops_intercepted == before + 1  # native_batch_norm, without the reserve buffer
    assert torch.equal(out.cpu(), expected)
    graded = bn(xc)  # grad mode on, parameters that want grads: torch's own path, autograd records it
    assert graded.requires_grad == affine
    assert torch.equal(graded.detach().cpu(), expected)


def test_batch_norm_in_training_and_mixed_devices_take_torchs_path(remote):
    torch.manual_seed(4)
    bn, ref = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    with torch.no_grad():
        expected = ref(x)  # training: updates the running statistics
        out = bn.cuda()(x.cuda())
    assert torch.equal(out.cpu(), expected)
    assert torch.allclose(bn.running_mean.cpu(), ref.running_mean) and bn.num_batches_tracked.item() == 1
    with pytest.raises(RuntimeError, match="same device|cuda"):
        torch.nn.functional.batch_norm(x.cuda(), torch.zeros(3), torch.ones(3))


def test_convolution_by_keyword_and_bad_calls_keep_torchs_behaviour(remote):
    torch.manual_seed(5)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with torch.no_grad():
        out = torch.conv2d(input=x.cuda(), weight=w.cuda(), padding=1)
        assert torch.equal(out.cpu(), torch.conv2d(x, w, padding=1))
        with pytest.raises(TypeError):
            torch.conv2d(x.cuda(), w.cuda(), padding_mode="zeros")  # not an argument of torch.conv2d
        with pytest.raises(RuntimeError):
            torch.conv2d(x.cuda(), w)  # weight on the CPU: torch's own device error
