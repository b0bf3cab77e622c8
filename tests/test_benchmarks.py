"""The benchmark harness: its link emulation really delays and shapes, ``direct`` computes what the
app computes, and ``python -m benchmarks --quick`` runs end to end and writes sane results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.energy import PowerModel, robot_energy_j
from benchmarks.links import NetnsNetwork, parse_link, start_ready, stop
from benchmarks.netcheck import Sink, probe
from benchmarks.relay import Relay, Shaper
from benchmarks.report import targets, timeline_plot
from benchmarks.robot import CoreSplit

from .conftest import ROOT, run_rrto

PNG = b"\x89PNG\r\n\x1a\n"


def test_delay_relay_adds_the_configured_round_trip():
    sink = Sink(("127.0.0.1", 0))
    direct = probe(sink.address, nbytes=100_000, pings=10)
    relay = Relay(("127.0.0.1", 0), sink.address, delay_s=0.010)  # 10 ms each way: 20 ms RTT
    try:
        delayed = probe(relay.address, nbytes=100_000, pings=10)
    finally:
        relay.close()
        sink.close()
    assert direct["rtt_ms"] < 5
    assert 18 <= delayed["rtt_ms"] <= 40, delayed


def test_userspace_shaper_holds_throughput_to_its_rate():
    sink = Sink(("127.0.0.1", 0))
    relay = Relay(("127.0.0.1", 0), sink.address, 0.0, Shaper(20e6), Shaper(20e6))
    try:
        got = probe(relay.address, nbytes=1_500_000, pings=3)
    finally:
        relay.close()
        sink.close()
    for direction in ("up", "down"):
        assert 17 <= got[f"{direction}_mbit"] <= 23, got  # 20 Mbit/s within 15 %


def test_tbf_in_network_namespaces_holds_throughput_to_its_rate():
    try:
        net = NetnsNetwork(f"rrto-bench-{os.getpid()}")
    except OSError as e:
        pytest.skip(f"no network namespaces here ({e}); the userspace shaper test covers the fallback")
    sink = None
    try:
        sink, (m,) = start_ready(net.server_cmd([sys.executable, "-m", "benchmarks.netcheck", "sink", "--listen",
                                                 f"{net.server_host}:0"]), r"sink ([\d.]+):(\d+)")
        target = net.apply(parse_link("fixed:40mbit,6ms"), {"sink": (m.group(1), int(m.group(2)))})["sink"]
        # the delay relay runs at real-time priority where this machine allows it (a busy robot
        # core must not stretch the emulated air time)
        rt = subprocess.run([sys.executable, "-c", "import os; os.sched_setscheduler(0, os.SCHED_FIFO, "
                             "os.sched_param(50))"], capture_output=True).returncode == 0
        assert net.relay_priority == ("real-time" if rt else "normal priority")
        assert (os.sched_getscheduler(net.relay.pid) == os.SCHED_FIFO) == rt
        probes = []
        for nbytes in ("3000000", "64000"):  # a stream, then one message after the link idled
            res = subprocess.run(net.robot_cmd([sys.executable, "-m", "benchmarks.netcheck", "probe", "--to",
                                                f"{target[0]}:{target[1]}", "--bytes", nbytes]),
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            probes.append(json.loads(res.stdout))
        got, one = probes
    finally:
        stop(sink)
        net.close()
    for direction in ("up", "down"):
        assert 34 <= got[f"{direction}_mbit"] <= 46, got  # 40 Mbit/s within 15 %
        # no burst of tens of kB passes unpaced after a gap (a 32 kB one read 68-77 Mbit/s here)
        assert 34 <= one[f"{direction}_mbit"] <= 46, one
    assert 5.4 <= got["rtt_ms"] <= 20, got  # the relay's 6 ms, through the veth
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"rrto-bench-{os.getpid()}-" not in names, "namespaces left behind"


@pytest.mark.parametrize("model, app, compare", [
    ("mobilenet_v2:96", ["examples/camera_loop.py", "--arch", "mobilenet_v2", "--size", "96"],
     lambda local, i: local["logits"][i:i + 1]),
    ("keypoint:96x160", ["examples/keypoint_loop.py", "--height", "96", "--width", "160"],
     lambda local, i: local[f"people{i}"]),
])
def test_direct_offload_computes_what_the_app_computes(tmp_path, model, app, compare):
    server, (m,) = start_ready([sys.executable, "-m", "benchmarks.direct", "serve", "--model", model, "--device", "cpu"],
                               r"listening on (\S+)")
    try:
        res = subprocess.run([sys.executable, "-m", "benchmarks.direct", "robot", "--server", m.group(1), "--model",
                              model, "--frames", "2", "--save", str(tmp_path / "direct.npz"), "--stats",
                              str(tmp_path / "stats.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        stop(server)
    local = run_rrto("--mode", "local", *app, "--frames", "2", "--save", str(tmp_path / "local.npz"))
    assert local.returncode == 0, local.stderr[-2000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [i["messages_sent"] for i in stats["inferences"]] == [1, 1]  # one request per inference
    with np.load(tmp_path / "direct.npz") as d, np.load(tmp_path / "local.npz") as lo:
        for i in range(2):
            assert np.array_equal(d[f"out0_{i}"], compare(lo, i)), f"frame {i} differs from the local run"


def test_energy_model_splits_an_inference_into_power_states():
    p = PowerModel()
    assert robot_energy_j(0.0, 0.0, 0.0, 1.0, p) == pytest.approx(p.idle_w)
    assert robot_energy_j(1.0, 0.0, 0.0, 1.0, p) == pytest.approx(p.compute_w)
    both = robot_energy_j(0.4, 0.3, 0.1, 1.0, p)
    assert both == pytest.approx(0.3 * p.compute_w + 0.2 * p.transmit_w + 0.1 * p.compute_transmit_w + 0.4 * p.idle_w)
    assert robot_energy_j(0.8, 0.5, 0.0, 1.0, p) == pytest.approx(  # 0.3 s must have overlapped
        0.5 * p.compute_w + 0.2 * p.transmit_w + 0.3 * p.compute_transmit_w)
    assert PowerModel.parse("idle=1,both=20").idle_w == 1 and PowerModel.parse("").compute_w == 13.35


def test_timeline_plot_draws_given_events(tmp_path):
    results = {"results": [{"mode": "lop", "model": "m", "link": "indoor", "timeline": [
        ["robot compute", 0.0, 0.004, "band 0"], ["uplink", 0.001, 0.006, "x"],
        {"lane": "server compute", "start": 0.006, "end": 0.009, "label": "bands 1-3"}]}]}
    timeline_plot(results, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes().startswith(PNG)


def test_targets_set_replay_beside_direct_and_rpc_per_model_and_link():
    def row(model, link, mode, ms, status="ok"):
        return {"model": model, "link": link, "mode": mode, "status": status, "latency_ms": {"median": ms},
                "robot_busy_ms": ms / 2}
    results = {"results": [
        row("net", None, "local", 9.0),
        row("net", "lan", "rpc", 100.0), row("net", "lan", "replay", 10.8), row("net", "lan", "direct", 10.0),
        row("net", "slow", "replay", 2.0), row("net", "slow", "direct", 1.5), row("net", "slow", "rpc", 60.0),
        row("other", "lan", "replay", 3.0), row("other", "lan", "direct", 2.0, status="failed")]}
    lines = targets(results).splitlines()
    assert len(lines) == 4  # header, rule, one line per model and link with both replay and direct
    assert lines[2] == "| net | lan | 10.8 | 10.0 | 1.08 met | 0.108 missed | 0.100 | 5.4 |"
    assert lines[3] == "| net | slow | 2.0 | 1.5 | 1.33 missed | 0.033 met | 0.025 | 1.0 |"
    assert targets({"results": [row("net", "lan", "replay", 1.0)]}) == ""  # nothing to set it beside


def test_robot_and_servers_get_disjoint_cores_when_there_are_enough():
    def split(share, cores, siblings=None, **kw):
        d = CoreSplit(share, cores=cores, siblings=siblings or {}, **kw).describe()
        return d["robot_cores"], d["server_cores"], d["idle_siblings"]

    assert split(1.0, [0, 1]) == ([0], [1], [])
    assert split(0.5, [2, 3, 5]) == ([2], [3, 5], [])
    assert split(1.5, [0, 1, 2, 3]) == ([0, 1], [2, 3], [])
    # SMT: cpu k and k+4 are one physical core. The robot's sibling serves nobody.
    smt = {c: frozenset((c % 4, c % 4 + 4)) for c in range(8)}
    assert split(1.0, list(range(8)), smt) == ([0], [1, 5, 2, 6, 3, 7], [4])
    assert split(2.0, list(range(8)), smt) == ([0, 1], [2, 6, 3, 7], [4, 5])
    assert split(1.0, [0, 4], smt) == ([0], [4], [])  # one physical core: its two threads are all there is
    assert CoreSplit(1.0, cores=[0, 1], siblings={0: frozenset((0, 1)), 1: frozenset((0, 1))}).robot == [0]
    for share, cores, kw in ((1.0, [0], {}), (2.0, [0, 1], {}), (None, [0, 1], {}), (1.0, [0, 1], {"enabled": False})):
        assert split(share, cores, **kw)[:2] == (None, None)
        assert CoreSplit(share, cores=cores, siblings={}, **kw).pin("robot") is None
    split = CoreSplit(1.0)  # this machine's cores: a child pinned to the servers' gets just those
    if split.server:
        for which, cores in (("robot", split.robot), ("server", split.server)):
            res = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                                 capture_output=True, text=True, preexec_fn=split.pin(which))
            assert res.stdout.strip() == str(cores), (which, res)


def test_quick_benchmark_writes_sane_results(tmp_path):
    from rrto.config import MODES

    out = tmp_path / "results"
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--modes", "local,eager,direct,lop",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["torch"] and results["machine"]["cores"] and results["server"]["device"]
    assert results["link_emulation_kind"] in ("netns", "userspace")
    fixed = results["links"]["fixed:100mbit,10ms"]
    assert fixed["rate_mbit"] == 100 and fixed["rtt_ms"] == 10
    check = fixed["self_check"]
    assert check["up_mbit"] <= 115 and check["down_mbit"] <= 115, check  # the shaping holds
    assert check["rtt_ms"] >= 9, check  # the delay is there
    rows = {(r["mode"], r["link"]): r for r in results["results"]}
    assert set(rows) == {("local", None), *((m, link) for m in ("eager", "direct", "lop")
                                            for link in ("lan", "fixed:100mbit,10ms"))}
    for (mode, link), r in rows.items():
        if mode == "lop" and "lop" not in MODES:
            assert r["status"] == "not available", r
            continue
        assert r["status"] == "ok", r
        # lop's frames start after its plan: fewer when planning ended late on a loaded machine, and said so
        assert r["frames"] == 4 or mode == "lop" and 1 <= r["frames"] < 4 and "planning ended late" in r["note"], r
        assert 0 < r["latency_ms"]["median"] <= r["latency_ms"]["p90"]
        assert r["energy_j"] > 0
        per = r["per_inference"]
        if mode == "local":
            assert per["messages"] == 0
        elif mode == "direct":
            assert per["messages"] == 1 and per["round_trips"] == 1 and per["bytes_up"] >= 96 * 96 * 3
        elif mode == "eager":
            assert per["messages"] > 10 and per["bytes_up"] > 96 * 96 * 3
        else:  # lop: replayed inferences, the input up whole or in bands, the answers sent unasked
            # measured from the frame after planning ended, or said to include planning
            assert r.get("plan_from_frame", 0) >= 2 or "planning had not ended" in r.get("note", ""), r
            assert 1 <= per["messages"] <= 10 and per["round_trips"] <= 1 and per["bytes_up"] >= 96 * 96 * 3, per
    for name in ("latency.png", "energy.png", "timeline.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    assert "| mobilenet_v2:96 | lan | direct |" in res.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in results.get("namespaces", []):
        assert ns not in left, "the harness left a network namespace behind"
    if results["robot"].get("cgroup"):
        assert not os.path.exists(results["robot"]["cgroup"]), "the harness left its cgroup behind"


def test_walk_benchmark_times_replayed_frames_and_ops():
    """``python -m benchmarks.walk`` with its embedded server: every timed frame replayed."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.walk", "--models", "mobilenet_v2:32", "--frames", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    per_op = {line.split(":")[0]: float(line.split(":")[1].split()[0]) for line in res.stdout.splitlines()
              if line.startswith(("wrapper op", "replayed op"))}
    assert len(per_op) == 2 and all(v > 0 for v in per_op.values()), res.stdout
    row = next(line for line in res.stdout.splitlines() if line.startswith("| mobilenet_v2:32 |"))
    frame_ms, ops, op_us, replayed = [c.strip() for c in row.strip("|").split("|")][1:]
    assert float(frame_ms) > 0 and float(ops) > 50 and float(op_us) > 0, row
    assert replayed == "10 of 10", row


def test_threads_benchmark_runs_two_models_at_once(tmp_path):
    """``python -m benchmarks.threads`` end to end: both models replay in their threads at once."""
    out = tmp_path / "threads.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--models", "mobilenet_v2:32,keypoint:32x64",
                          "--frames", "3", "--warmup", "5", "--repeats", "1", "--rtt-ms", "0", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    runs = {(r["mode"], r["together"]): r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {(m, t) for m in ("replay", "eager") for t in (False, True)}
    for r in runs.values():
        assert r["frames"] == 16 and len(r["median_ms"]) == 2 and all(ms > 0 for ms in r["median_ms"]), r
    assert runs["eager", True]["replayed"] == 0
    assert runs["replay", True]["replayed"] >= 2 * 3, runs["replay", True]  # each thread's measured frames
    assert runs["replay", True]["messages_per_frame"] < runs["eager", True]["messages_per_frame"] / 3
