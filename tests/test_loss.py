"""Cost model, LOSS planner and layer-partition baselines on synthetic profiles (no server, no torch)."""
import itertools
import math
import time

import numpy as np
import pytest

from rrto.lop import baselines
from rrto.lop.cost import Link, LinkEstimator, Power, StepTimes, mbit, simulate
from rrto.lop.loss import MAX_BANDS, Planner, _Space, plan
from rrto.lop.plan import BandPlan
from rrto.lop.synthetic import Net, Speed, conv_chain, resnet18_like

SLOW = Speed(robot_flops=4e9)
JETSON = Speed(robot_flops=40e9)
FAST_SERVER = Speed(robot_flops=4e9, server_flops=1e15, server_op_s=1e-7)


def profiles():
    return {
        "chain-s1": conv_chain(((3, 1, 1, 16),) * 6, rows=128, cols=128, speed=JETSON),
        "chain-s2": conv_chain(((3, 2, 1, 32), (3, 1, 1, 32), (3, 2, 1, 64), (3, 1, 1, 64), (3, 2, 1, 128)),
                               rows=224, cols=224, speed=JETSON),
        "resnet-slow": resnet18_like(speed=SLOW),
        "resnet-jetson": resnet18_like(speed=JETSON),
    }


def baseline_plans(profile, link, power=Power()):
    plans = [baselines.local(profile), baselines.offload(), baselines.neurosurgeon(profile, link, power)[0],
             baselines.spso_ga(profile, link, None, power)[0]]
    return plans + baselines.layer_plans(profile)


# -- cost model -------------------------------------------------------------------------

def test_band_rows_follow_the_halo_of_a_strided_chain():
    p = conv_chain(((3, 2, 1, 16), (3, 1, 1, 16), (3, 2, 1, 32)), rows=32, cols=32)
    # steps: conv s2 (16 rows), relu, conv s1 (16), relu, conv s2 (8), relu, pool, fc
    assert [s.rows for s in p.steps[:6]] == [16, 16, 16, 16, 8, 8]
    # relu rows [2, 4) <- conv s2 rows [2, 4) <- step-3 rows [3, 8) <- conv s1 needs [2, 9) <- input [3, 18)
    assert p.steps[5].need(2, 4) == (3, 18)
    assert p.band_rows(6, 2, 4) == [(2, 9), (2, 9), (3, 8), (3, 8), (2, 4), (2, 4)]
    # borders clip: the first band needs no rows above 0
    assert p.band_rows(6, 0, 2)[0] == (0, 5)


def test_offload_and_local_timelines():
    p = conv_chain(speed=SLOW)
    link = Link(mbit(50), 4e-3)
    n = len(p.steps)
    off = simulate(p, BandPlan.offload(), link)
    server = sum(s.server_s for s in p.steps)
    assert off.latency == pytest.approx(link.rtt + (p.in_bytes + p.result_bytes) / link.bandwidth + server)
    loc = simulate(p, baselines.local(p), link)
    assert loc.latency == pytest.approx(sum(s.robot_s for s in p.steps))
    assert loc.energy == pytest.approx(loc.latency * Power().compute)
    # offload: the radio works during the transfers, the robot idles during the server's part
    tx = (p.in_bytes + p.result_bytes) / link.bandwidth
    assert off.energy == pytest.approx(tx * 4.25 + (off.latency - tx) * 4.04)


def test_banding_overlaps_compute_and_transfer():
    p = resnet18_like(speed=JETSON)
    link = Link(mbit(73), 3e-3)
    d = 27
    rows = p.steps[d - 1].rows
    split = simulate(p, BandPlan(d, (0, 10, rows), (False, True)), link)
    # the robot's band is computed while the server band's input is on the wire
    assert split.latency < split.robot_busy + split.link_busy
    # power while computing and transmitting at once is the documented sum over standby
    assert Power().compute_and_transmit == pytest.approx(13.35 + 4.25 - 4.04)
    assert split.energy > Power().idle * split.latency


def test_layer_cut_ships_every_tensor_live_across_it():
    p = resnet18_like()
    # inside a residual block the block input is still live: a cut there ships both tensors
    add = next(i for i, s in enumerate(p.steps) if s.name == "add")
    first_conv = p.producers[add][0] - 4  # conv of the block's first layer
    x = p.producers[first_conv][0]  # the block input
    assert p.live_bytes(first_conv + 1) == p.steps[first_conv].out_bytes + p.steps[x].out_bytes


def test_step_times_tables_update_the_model():
    p = conv_chain(speed=SLOW)
    link = Link(mbit(73), 3e-3)
    before = simulate(p, baselines.local(p), link).latency
    times = StepTimes(p, alpha=1.0)
    version, r0 = p.version, p.steps[0].robot_s
    times.observe(0, p.steps[0].rows, r0 * 3, robot=True)
    assert p.version > version
    after = simulate(p, baselines.local(p), link).latency
    assert after == pytest.approx(before + 2 * r0)
    times.observe(0, 10, 1.0, robot=True)  # a measured band height: interpolated per-row rate
    assert p.step_time(0, 10, True) == pytest.approx(1.0)


# -- link estimator ---------------------------------------------------------------------

def test_the_robots_walk_bounds_every_plan_and_follows_its_bands():
    p = resnet18_like(speed=JETSON)
    link = Link(mbit(73), 3e-3)
    d = 27
    rows = p.steps[d - 1].rows
    split_plan = BandPlan(d, (0, 10, rows), (False, True))
    off0, split0 = simulate(p, BandPlan.offload(), link), simulate(p, split_plan, link)
    assert split0.latency < off0.latency  # without the walk the robot's band pays off here
    robot_band = p.band_time(d, 10, rows, True)
    p.robot_walk_s = off0.latency * 1.5
    p.touch()
    off, split = simulate(p, BandPlan.offload(), link), simulate(p, split_plan, link)
    assert off.latency == pytest.approx(p.robot_walk_s)  # the walk overlaps the upload and the server
    assert split.latency == pytest.approx(robot_band + p.robot_walk_s)  # ... but follows the robot's bands
    assert off.robot_busy == pytest.approx(p.robot_walk_s)
    # no band plan beats the walk: what is left is offload, or the app without rrto (no walk)
    assert plan(p, link).plan in (BandPlan.offload(), baselines.local(p))
    # the robot found slower than profiled: its band costs scale, the server's do not
    server_band = p.band_time(d, 0, 10, False)
    p.robot_scale = 2.0
    p.touch()
    assert p.band_time(d, 10, rows, True) == pytest.approx(2 * robot_band)
    assert p.band_time(d, 0, 10, False) == pytest.approx(server_band)
    assert simulate(p, split_plan, link).latency == pytest.approx(2 * robot_band + p.robot_walk_s)


def test_link_estimator_recovers_bandwidth_and_rtt():
    rng = np.random.default_rng(1)
    est = LinkEstimator(window=32)
    bw, rtt = mbit(73), 3e-3
    for _ in range(40):
        nb = float(rng.choice([200, 5_000, 150_000, 600_000]))
        t = rtt + nb / bw + abs(rng.normal(0, 2e-4))
        if rng.random() < 0.1:
            t *= 3  # a retransmission
        est.add(nb, t)
    assert est.bandwidth == pytest.approx(bw, rel=0.05)
    assert est.rtt == pytest.approx(rtt, abs=5e-4)
    # the link slows down: the sliding window follows
    for _ in range(40):
        nb = float(rng.choice([200, 600_000]))
        est.add(nb, rtt + nb / mbit(20))
    assert est.bandwidth == pytest.approx(mbit(20), rel=0.05)


def test_link_estimator_with_one_transfer_size_keeps_rtt():
    est = LinkEstimator(rtt_prior=2e-3)
    for _ in range(10):
        est.add(600_000, 2e-3 + 600_000 / mbit(93))
    assert est.rtt == pytest.approx(2e-3)
    assert est.bandwidth == pytest.approx(mbit(93), rel=1e-6)


# -- LOSS -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chain-s1", "chain-s2", "resnet-slow"])
def test_no_bandwidth_gives_local(name):
    p = profiles()[name]
    c = plan(p, Link(1e3, 5e-3))
    assert c.plan == baselines.local(p)


@pytest.mark.parametrize("name", ["chain-s1", "resnet-slow"])
def test_huge_bandwidth_and_fast_server_give_offload(name):
    p = conv_chain(speed=FAST_SERVER) if name == "chain-s1" else resnet18_like(speed=FAST_SERVER)
    c = plan(p, Link(1e12, 1e-5))
    assert c.plan == BandPlan.offload()


def test_plan_is_never_worse_than_any_baseline():
    ratios = {}
    for name, p in profiles().items():
        for mb in (10, 73, 93, 300):
            link = Link(mbit(mb), 3e-3)
            c = plan(p, link)
            assert c.latency == pytest.approx(simulate(p, c.plan, link).latency)
            best = min(simulate(p, b, link).latency for b in baseline_plans(p, link))
            assert c.latency <= best + 1e-12, (name, mb)
            ratios[name, mb] = c.latency / best
    # where the robot is fast enough to matter, overlapping bands beat every layer cut
    assert ratios["resnet-jetson", 73] < 0.88
    assert ratios["resnet-jetson", 93] < 0.92


def test_search_is_close_to_exhaustive_on_a_small_space():
    p = conv_chain(((3, 1, 1, 16), (3, 2, 1, 32), (3, 1, 1, 32)), rows=96, cols=96, speed=JETSON)
    link = Link(mbit(73), 3e-3)
    space = _Space(p, link, Power(), "latency", None)
    best = math.inf
    for di in range(len(space.depths)):
        for nb in range(1, 4):
            for mask in itertools.product([0, 1], repeat=nb):
                for lw in np.linspace(-3, 3, 25):
                    best = min(best, space(np.array([nb, di, *mask] + [0] * (MAX_BANDS - nb) + [lw])))
    assert plan(p, link).latency <= best * 1.02


def test_energy_objective_respects_the_deadline():
    for name in ("resnet-jetson", "chain-s2"):
        p = profiles()[name]
        for mb in (73, 93):
            link = Link(mbit(mb), 3e-3)
            fastest = plan(p, link)
            deadline = fastest.latency * 1.25
            c = plan(p, link, objective="energy", deadline=deadline)
            assert c.latency <= deadline
            spso = simulate(p, baselines.spso_ga(p, link, deadline)[0], link)
            assert c.energy <= spso.energy + 1e-12
            assert c.energy <= fastest.energy + 1e-12


def test_planning_time_of_a_resnet_sized_profile():
    p = resnet18_like(speed=JETSON)
    assert len(p.steps) >= 60
    t = time.perf_counter()
    plan(p, Link(mbit(73), 3e-3))
    assert time.perf_counter() - t < 2.0  # about 0.2-0.4 s here; generous for a loaded CI box


# -- baselines --------------------------------------------------------------------------

def test_min_cut_matches_the_best_prefix_cut_on_a_chain():
    p = conv_chain(((3, 1, 1, 8), (3, 2, 1, 64), (3, 2, 1, 128), (3, 2, 1, 32)), rows=128, cols=128, speed=JETSON)
    for mb in (1, 10, 73, 1000):
        link = Link(mbit(mb), 0.0)
        robot = baselines.min_cut(p, link)
        assert robot == set(range(len(robot)))  # a prefix
        cut = baselines.layer(p, len(robot))
        best = baselines.best_cut(p, link)[1]
        assert simulate(p, cut, link).latency == pytest.approx(best.latency)


def test_min_cut_on_a_branching_graph_pays_a_shared_tensor_once():
    # input (48 KiB) -> a (32 KiB) -> b, c (both read a; heavy, big outputs) -> add -> pool -> fc.
    # Shipping a once beats shipping the input; shipping it per reader (64 KiB) would not.
    net = Net(64, 64, 3, Speed(robot_flops=1e9, server_flops=1e12))
    a = net.conv(-1, 2, 3, 1, 1)
    net.dense(net.global_pool(net.add(net.conv(a, 32, 5, 1, 2), net.conv(a, 32, 5, 1, 2))), 10)
    p = net.profile()
    n = len(p.steps)
    for mb in (1, 10, 100, 1000):
        link = Link(mbit(mb), 0.0)
        best, best_r = math.inf, None
        for mask in itertools.product([0, 1], repeat=n):  # every predecessor-closed robot set
            r = {j for j in range(n) if mask[j]}
            if any(not all(i in r for i in p.producers[q] if i >= 0) for q in r):
                continue
            server = [j for j in range(n) if j not in r]
            cost = sum(p.steps[j].robot_s for j in r) + sum(p.steps[j].server_s for j in server)
            if any(i < 0 for j in server for i in p.producers[j]):
                cost += p.in_bytes / link.bandwidth
            cost += sum(p.steps[j].out_bytes for j in r if any(j in p.producers[k] for k in server)) / link.bandwidth
            if n - 1 in server:
                cost += p.result_bytes / link.bandwidth
            if cost < best - 1e-12:
                best, best_r = cost, r
        assert baselines.min_cut(p, link) == best_r, mb
        if mb == 10:
            assert best_r == {0}
            assert baselines.neurosurgeon(p, link)[0] == baselines.layer(p, 1)


# -- background planner -----------------------------------------------------------------

def test_background_planner_answers_at_once_and_caches_per_bin():
    p = resnet18_like(speed=JETSON)
    est = LinkEstimator()
    planner = Planner(p, est)
    try:
        assert planner.plan().plan == BandPlan.offload()  # nothing measured yet
        for nb in (1_000, 600_000) * 4:
            est.add(nb, 3e-3 + nb / mbit(73))
        waits = []
        for _ in range(20):
            t = time.perf_counter()
            c = planner.plan()
            waits.append(time.perf_counter() - t)
        assert not c.searched or planner.bin(c.bandwidth) == planner.bin(mbit(73))
        assert np.median(waits) < 2e-3 and max(waits) < 0.05
        searched = planner.wait(mbit(73))
        assert searched.searched and planner.plan() == searched
        # the measured bandwidth moves to another bin: the old plan answers while the new one is searched
        for nb in (1_000, 600_000) * 16:
            est.add(nb, 3e-3 + nb / mbit(20))
        stand_in = planner.plan()
        assert stand_in.plan == searched.plan and not stand_in.searched
        moved = planner.wait(mbit(20))
        assert planner.plan() == moved and moved.bandwidth != searched.bandwidth
    finally:
        planner.close()


def test_planner_replans_when_step_times_change():
    p = resnet18_like(speed=JETSON)
    planner = Planner(p, replan_s=0.0)
    link = Link(mbit(73), 3e-3)
    try:
        planner.plan(link)
        before = planner.wait(link.bandwidth)
        assert before.plan.depth > 0  # the robot takes part (see the baseline test)
        times = StepTimes(p, alpha=1.0)
        for j, s in enumerate(p.steps):  # the robot turns out 100x slower than profiled
            times.observe(j, s.rows, s.robot_s * 100, robot=True)
        assert planner.plan(link) == before  # the stale plan answers while the new one is searched
        after = planner.wait(link.bandwidth)
        assert after.plan == BandPlan.offload()
    finally:
        planner.close()


def test_band_costs_with_measured_tables_match_the_per_step_sum():
    p = resnet18_like(speed=JETSON)
    times = StepTimes(p, alpha=1.0)
    for j, s in enumerate(p.steps[:30]):  # some steps measured per band height, the rest linear
        for h in sorted({s.rows, max(1, s.rows // 4)}):
            times.observe(j, h, s.robot_s * h / s.rows * 1.5 + 1e-4, robot=True)
    for d in (5, 27, 42):
        rows = p.steps[d - 1].rows
        assert p.need(d, 0, rows) == p.steps[d - 1].need(0, rows)
        for a, b in ((0, 1), (rows // 3, rows // 2 + 1), (rows - 2, rows)):
            assert p.need(d, a, b) == p.steps[d - 1].need(a, b)
            for robot in (True, False):
                per_step = sum(p.step_time(j, y - x, robot) for j, (x, y) in enumerate(p.band_rows(d, a, b)))
                assert p.band_time(d, a, b, robot) == pytest.approx(per_step, rel=1e-12)
    link = Link(mbit(73), 3e-3)
    c = plan(p, link)
    assert c.latency <= min(simulate(p, b, link).latency for b in baseline_plans(p, link))


def test_planner_without_a_thread_searches_in_the_call():
    p = conv_chain(speed=JETSON)
    planner = Planner(p, background=False)
    link = Link(mbit(93), 3e-3)
    c = planner.plan(link)
    assert c.searched and c == planner.plan(link)
    assert c.latency == pytest.approx(simulate(p, c.plan, Link(planner.bin_bandwidth(planner.bin(link.bandwidth)), link.rtt)).latency)


def test_profile_from_the_analysis_records():
    from types import SimpleNamespace

    chain = conv_chain(((3, 2, 1, 8), (3, 1, 1, 8)), rows=64, cols=64, speed=JETSON)
    infos = [SimpleNamespace(name=s.name, rows=s.rows, bytes=s.out_bytes, need=s.need) for s in chain.steps[:chain.chain]]
    tail = chain.steps[chain.chain:]
    p = type(chain).from_chain(infos, tail, chain.in_bytes, chain.result_bytes, depths=[0, 2, 4, 5, 6],
                               robot_s=[s.robot_s for s in chain.steps[:chain.chain]],
                               server_s=[s.server_s for s in chain.steps[:chain.chain]], in_rows=chain.in_rows)
    assert p.chain == chain.chain and p.cut_depths() == [0, 2, 4, 5, 6]
    link = Link(mbit(73), 3e-3)
    for d in (2, 4):
        for plan_ in (BandPlan.even(d, p.steps[d - 1].rows, (False, True)), baselines.layer(p, d)):
            assert simulate(p, plan_, link) == simulate(chain, plan_, link)
    c = plan(p, link)
    assert c.plan.depth in p.cut_depths()


def test_an_impossible_deadline_gives_the_fastest_plan():
    p = resnet18_like(speed=JETSON)
    link = Link(mbit(73), 3e-3)
    fastest = plan(p, link)
    c = plan(p, link, objective="energy", deadline=fastest.latency / 2)
    assert c.latency <= fastest.latency * 1.02  # as close to the deadline as the model allows
    with pytest.raises(ValueError, match="objective"):
        plan(p, link, objective="power")


def test_band_and_span_timings_calibrate_the_model():
    p = resnet18_like(speed=JETSON)
    times = StepTimes(p, alpha=0.5)
    d, a, b = 27, 10, 28
    model = p.band_time(d, a, b, robot=True)
    for _ in range(12):  # the robot is twice as slow as profiled
        times.observe_band(d, a, b, 2 * model)
    assert p.band_time(d, a, b, robot=True) == pytest.approx(2 * model, rel=1e-3)
    rest = p.suffix_time(d, robot=False)
    tail = [(j, p.steps[j].rows) for j in range(d, len(p.steps))]
    times.observe_steps(tail, 3 * rest, robot=False)  # the first sample sets the table
    assert p.suffix_time(d, robot=False) == pytest.approx(3 * rest)
    times.observe_steps(tail, rest, robot=False)  # then exponential averaging, alpha 0.5
    assert p.suffix_time(d, robot=False) == pytest.approx(2 * rest)


def test_what_inferences_measured_calibrates_the_live_planners_profile():
    from rrto.lop.planning import SUBSTANTIAL_S, LossPlanner

    p = resnet18_like(speed=SLOW)
    planner = LossPlanner({}, probe=lambda n: 1e-3, server_speedup=2.0)
    d = 27
    rows = p.steps[d - 1].rows
    big = BandPlan(d, (0, 10, rows), (False, True))
    modelled = p.band_time(d, 10, rows, True)
    assert modelled >= SUBSTANTIAL_S
    for _ in range(30):  # the robot's band ran 3x its profiled time, every inference; its walk took 12 ms
        planner.observe([], 0.012, (big, 3 * modelled))
    version = p.version
    planner._apply(p)
    assert p.robot_scale == pytest.approx(3.0, rel=0.01) and p.robot_walk_s == pytest.approx(0.012)
    assert p.version > version and p.band_time(d, 10, rows, True) == pytest.approx(3 * modelled, rel=0.01)
    tiny = BandPlan(2, (0, 1, p.steps[1].rows), (True, False))  # fixed costs more than compute: ignored
    assert p.band_time(2, 0, 1, True) / p.robot_scale < SUBSTANTIAL_S
    planner.observe([], None, (tiny, 100 * p.band_time(2, 0, 1, True)))
    planner._apply(p)
    assert p.robot_scale == pytest.approx(3.0, rel=0.01)


def test_link_samples_too_short_to_time_leave_the_probed_rate_alone():
    from rrto.lop.planning import MIN_TRANSFER_S, TRACK, LossPlanner

    planner = LossPlanner({}, probe=lambda n: 0.004 + n / 10e6, server_speedup=2.0)  # 10 MB/s, 4 ms
    planner.prepare()
    probed = planner.link.link()
    assert probed.bandwidth == pytest.approx(10e6, rel=0.05) and probed.rtt == pytest.approx(0.004, rel=0.05)
    p = resnet18_like(speed=SLOW)
    rtt = probed.rtt
    # a band plan's small first message, answered within the round trip plus timing noise
    planner.observe([(20_000, rtt + MIN_TRANSFER_S / 2)] * TRACK * 2, None, None)
    planner.observe([(90_000, rtt + MIN_TRANSFER_S / 2)] * TRACK, None, None)  # no time to divide by
    planner._apply(p)
    assert planner.reference_rate is None and planner.measured_link() == probed
    # samples that took real time on the wire track the link: at half the reference rate...
    planner.observe([(90_000, rtt + 90_000 / 10e6)] * TRACK, None, None)
    planner._apply(p)
    assert planner.reference_rate == pytest.approx(10e6, rel=0.05)
    planner.observe([(90_000, rtt + 90_000 / 5e6)] * TRACK, None, None)
    planner._apply(p)
    assert planner.measured_link().bandwidth == pytest.approx(probed.bandwidth / 2, rel=0.05)


def test_one_throttled_walk_does_not_move_the_live_profile():
    from rrto.lop.planning import LossPlanner

    p = resnet18_like(speed=SLOW)
    planner = LossPlanner({}, probe=lambda n: 1e-3, server_speedup=2.0)
    for w in [0.010] * 6 + [0.160] + [0.011]:  # one walk stalled by the CPU quota while planning ran
        planner.observe([], w, None)
    planner._apply(p)
    assert p.robot_walk_s == pytest.approx(0.0105, abs=6e-4)
