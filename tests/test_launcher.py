"""``python -m rrto``: unmodified apps, the embedded server, stats, modes and a dying link."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import rrto

from .conftest import ROOT, ServerProcess, run_rrto

APP = textwrap.dedent("""
    import json, os, sys, torch
    children = []
    for pid in os.listdir("/proc"):  # the embedded server is a child of this process
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read()
        except (OSError, ValueError):
            continue
        if ppid == os.getpid() and "server" in cmd:
            children.append(int(pid))
    x = torch.arange(6.0, device="cuda").view(2, 3)
    y = (x * 2).relu().sum(0)
    info = {"name": __name__, "argv": sys.argv, "cuda": torch.cuda.is_available(), "is_cuda": y.is_cuda,
            "y": y.tolist(), "children": children}
    print("APP " + json.dumps(info))
""")


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "robot_app.py"
    path.write_text(APP)
    return path


def app_info(out: str) -> dict:
    line = next(line for line in out.splitlines() if line.startswith("APP "))
    return json.loads(line[4:])


def test_unmodified_app_with_embedded_server(app, tmp_path):
    stats = tmp_path / "stats.json"
    res = run_rrto("--stats", str(stats), str(app), "first", "--flag", timeout=120)
    assert res.returncode == 0, res.stderr
    info = app_info(res.stdout)
    assert info["name"] == "__main__"
    assert info["argv"] == [str(app), "first", "--flag"]
    assert info["cuda"] and info["is_cuda"] and info["y"] == [6.0, 10.0, 14.0]
    assert len(info["children"]) == 1, "an embedded server process should run beside the app"
    pid = info["children"][0]
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the embedded server outlived the app"
    s = json.loads(stats.read_text())
    for key in ("mode", "ops_intercepted", "messages_sent", "round_trips", "bytes_sent", "bytes_received",
                "uploads", "downloads", "server"):
        assert key in s
    assert s["mode"] == "replay" and s["server"].startswith("tcp://127.0.0.1:") and s["embedded_server"]
    assert s["ops_intercepted"] > 0 and s["downloads"] >= 1 and s["messages_sent"] > s["round_trips"] > 0
    assert "rrto: replay mode via" in res.stderr  # the summary line


def test_server_option_and_environment(app, server, tmp_path):
    stats = tmp_path / "env.json"
    res = run_rrto(str(app), env={"RRTO_SERVER": server.url, "RRTO_STATS": str(stats), "RRTO_MODE": "rpc"})
    assert res.returncode == 0, res.stderr
    info = app_info(res.stdout)
    assert info["children"] == [] and info["y"] == [6.0, 10.0, 14.0]
    s = json.loads(stats.read_text())
    assert s["server"] == server.url and s["mode"] == "rpc" and not s["embedded_server"]


def test_rpc_waits_for_every_message_eager_does_not(server, tmp_path):
    counts = {}
    for mode in ("eager", "rpc"):
        with rrto.offload(server=server.url, mode=mode) as off:
            x = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)).cuda()
            for _ in range(20):
                x = torch.tanh(x @ x)
            result = x.cpu()
            counts[mode] = (off.stats.messages_sent, off.stats.round_trips, result)
    eager_msgs, eager_waits, eager_out = counts["eager"]
    rpc_msgs, rpc_waits, rpc_out = counts["rpc"]
    assert torch.equal(eager_out, rpc_out)
    assert rpc_waits == rpc_msgs  # every message waited on
    assert eager_waits <= 3 < eager_msgs  # hello, the download


def test_local_mode_runs_on_the_robot_cpu(app):
    res = run_rrto("--mode", "local", str(app))
    assert res.returncode == 0, res.stderr
    info = app_info(res.stdout)
    assert info["cuda"] and info["y"] == [6.0, 10.0, 14.0] and not info["is_cuda"] and info["children"] == []


def test_exit_codes_and_errors(tmp_path, server):
    (tmp_path / "exits.py").write_text("import sys; sys.exit(3)\n")
    (tmp_path / "raises.py").write_text("import torch\nx = torch.ones(2).cuda()\nraise ValueError('app bug')\n")
    res = run_rrto("--server", server.url, str(tmp_path / "exits.py"))
    assert res.returncode == 3
    res = run_rrto("--server", server.url, str(tmp_path / "raises.py"))
    assert res.returncode == 1 and "ValueError: app bug" in res.stderr and "raises.py" in res.stderr
    res = run_rrto(str(tmp_path / "missing.py"))
    assert res.returncode == 2 and "no such file" in res.stderr
    res = run_rrto("--mode", "warp", str(tmp_path / "exits.py"))
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_help_explains_modes_and_environment():
    res = run_rrto("--help")
    assert res.returncode == 0
    for word in ("--server", "--mode", "--stats", "eager", "rpc", "local", "RRTO_SERVER"):
        assert word in res.stdout


def test_run_a_module(tmp_path, server):
    pkg = tmp_path / "robotpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "node.py").write_text("import sys, torch\nprint('NODE', torch.ones(2).cuda().sum().item(), sys.argv[1:])\n")
    res = run_rrto("--server", server.url, "-m", "robotpkg.node", "x", env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "NODE 2.0 ['x']" in res.stdout


def test_unreachable_server_is_a_clear_error_not_a_hang(app):
    t0 = time.time()
    res = run_rrto("--server", "tcp://127.0.0.1:9", "--timeout", "2", str(app), timeout=60)
    assert res.returncode == 2
    assert "could not reach rrto-server at tcp://127.0.0.1:9" in res.stderr
    assert time.time() - t0 < 30


def test_link_drop_goes_on_locally_instead_of_hanging():
    """A dead server is noticed within the fault timeout; the result comes from the robot's own CPU."""
    s = ServerProcess()
    rrto.enable(server=s.url, fault_timeout=1)
    try:
        x = torch.ones(1000).cuda()
        assert x.sum().item() == 1000
        s.proc.kill()
        s.proc.wait()
        t0 = time.time()
        assert torch.equal((x * 2).cpu(), torch.full((1000,), 2.0))
        assert time.time() - t0 < 5
        assert rrto.current().stats.faults == 1 and rrto.current().runtime.lost
    finally:
        rrto.disable()
        s.stop()


def test_rrto_console_scripts_exist():
    bindir = os.path.dirname(sys.executable)
    for name in ("rrto", "rrto-server"):
        exe = os.path.join(bindir, name)
        assert os.path.exists(exe), f"{name} is not installed next to {sys.executable}"
        res = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert res.returncode == 0 and "usage" in res.stdout


def test_server_error_of_a_streamed_op_surfaces_at_the_next_sync():
    s = ServerProcess("--max-session-mb", "16")
    rrto.enable(server=s.url)
    try:
        small = torch.ones(4).cuda()
        big = torch.zeros(8 * 2**20, device="cuda")  # 32 MiB: streamed, refused by the server's quota
        with pytest.raises(rrto.RemoteError, match="memory limit"):
            torch.cuda.synchronize()
        assert (small + 1).cpu().tolist() == [2.0] * 4  # the session goes on
        del big
    finally:
        rrto.disable()
        s.stop()


def test_ctrl_c_with_a_hung_server_exits_promptly(tmp_path):
    s = ServerProcess()
    app = tmp_path / "waits.py"
    go = tmp_path / "go"  # the app asks for .item() only once the server is stopped, however loaded the machine
    app.write_text("import os, time, torch\nx = torch.ones(3).cuda()\nprint('ready', flush=True)\n"
                   f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\nprint(x.sum().item())\n")
    # a fault timeout longer than the test: the app is still waiting when Ctrl-C comes
    # SIG_DFL: a suite started in the background (`./scripts/test &`) ignores SIGINT, and so would the app
    p = subprocess.Popen([sys.executable, "-m", "rrto", "--server", s.url, "--fault-timeout", "30", str(app)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().strip() == "ready"
        s.proc.send_signal(signal.SIGSTOP)  # the server hangs while the app waits for .item()
        go.touch()
        time.sleep(2)
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err[-2000:]
        assert time.time() - t0 < 5
    finally:
        p.kill()
        s.proc.send_signal(signal.SIGCONT)
        s.stop()
