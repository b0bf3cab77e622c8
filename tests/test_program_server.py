"""The server's side of replay: registering programs and running them, with hostile inputs."""
from __future__ import annotations

import pytest
import torch

from .conftest import RawClient, ServerProcess
from .test_server import get, put

BASE = 2**51
PROGRAM = {  # y = relu(x @ w.T + 1), from the robot's upload x (offset 0) and parameter w (handle 7)
    "p": 1,
    "steps": [
        {"t": "put"},
        {"t": "op", "op": "aten::linear.default", "a": [{"s": 0}, {"h": 7}], "o": [1]},
        {"t": "op", "op": "aten::add.Scalar", "a": [{"s": 1}, 1], "o": [2]},
        {"t": "op", "op": "aten::relu.default", "a": [{"s": 2}], "o": [3]},
        {"t": "get"},
    ],
}


def register(raw, program=PROGRAM, frames=()) -> dict:
    return raw.request({"t": "prog", **program}, list(frames))


def test_a_registered_program_runs_the_confirmed_steps(raw):
    w = torch.randn(5, 3)
    put(raw, 7, w)
    assert register(raw).get("t") != "err"
    for i in range(3):
        x = torch.randn(2, 3)
        base = BASE + 100 * i
        put(raw, base, x)
        raw.request({"t": "sync", "pre": [[1, base, 1, 4, []]]})
        assert torch.equal(get(raw, base + 3), torch.relu(x @ w.T + 1))


def test_the_server_reports_how_long_each_step_took(raw):
    """lop's planner asks for measured server step times: op steps of runs that happened, not holes."""
    put(raw, 7, torch.randn(5, 3))
    register(raw)
    r = raw.request({"t": "times", "p": 1})
    assert r["s"] == [0.0] * 5 and r["runs"] == 0  # registered, not run yet
    for i in range(2):
        put(raw, BASE + 100 * i, torch.randn(2, 3))
        raw.request({"t": "sync", "pre": [[1, BASE + 100 * i, 1, 4, []]]})
    r = raw.request({"t": "times", "p": 1})
    assert r["runs"] == 2 and len(r["s"]) == 5
    assert r["s"][0] == r["s"][4] == 0.0 and all(0 < t < 1 for t in r["s"][1:4]), r
    for bad in (2, "1", None, [1]):
        r = raw.request({"t": "times", "p": bad})
        assert r["t"] == "err" and "no program" in r["msg"]
    assert raw.request({"t": "sync"}).get("t") != "err"


@pytest.fixture
def tight():
    """A raw client of its own server, which refuses any tensor over 1 MiB."""
    s = ServerProcess("--max-tensor-mb", "1")
    raw = RawClient(s.url)
    try:
        raw.hello()
        yield raw
    finally:
        raw.close()
        s.stop()


def refused_over_the_limit(raw, base: int) -> None:
    """A confirmed run from ``base`` is refused by the size check, and the session goes on."""
    r = raw.request({"t": "sync", "pre": [[1, base, 1, 4, []]]})
    assert r["t"] == "err" and "per-tensor limit" in r["msg"], r
    assert raw.request({"t": "sync"}).get("t") != "err"


# the same program with its upload's offset declared: its steps may reuse their sizes while the upload's
# layout stays (Program.epoch); undeclared, each step compares its own inputs' layouts each run
DECLARED = {**PROGRAM, "steps": [{"t": "put", "o": [0]}, *PROGRAM["steps"][1:]]}


@pytest.mark.parametrize("program", [PROGRAM, DECLARED], ids=["undeclared", "declared"])
def test_a_step_is_size_checked_again_when_its_inputs_change_layout(tight, program):
    """Steps keep their output sizes between runs; an upload of another shape must not reuse them."""
    w = torch.randn(5, 3)
    put(tight, 7, w)
    register(tight, program)
    for i, n in enumerate((2, 2, 7)):  # the same layout twice, then another: results of their own shape
        x, base = torch.randn(n, 3), BASE + 100 * i
        put(tight, base, x)
        tight.request({"t": "sync", "pre": [[1, base, 1, 4, []]]})
        assert torch.equal(get(tight, base + 3), torch.relu(x @ w.T + 1))
    put(tight, BASE + 300, torch.randn(60_000, 3))  # 0.7 MiB in, its linear's 1.1 MiB out: over the limit
    refused_over_the_limit(tight, BASE + 300)


def test_a_step_is_size_checked_again_when_an_op_resizes_its_parameter(tight):
    """A step's fixed arguments are not re-read each run: any op that writes in place (an out=
    argument is resized) makes every step check again, so a grown parameter cannot slip past."""
    put(tight, 7, torch.randn(5, 3))
    register(tight)
    for i in range(2):
        put(tight, BASE + 100 * i, torch.randn(8, 3))
        assert tight.request({"t": "sync", "pre": [[1, BASE + 100 * i, 1, 4, []]]}).get("t") != "err"
    put(tight, 8, torch.randn(40_000, 3))  # 0.46 MiB: w resized to this makes linear's output 1.2 MiB
    r = tight.request({"t": "op", "op": "aten::add.out", "a": [{"h": 8}, {"h": 8}], "k": {"out": {"h": 7}},
                       "o": [None], "q": 1})
    assert r.get("t") != "err", r
    put(tight, BASE + 300, torch.randn(8, 3))  # the same upload layout as before
    refused_over_the_limit(tight, BASE + 300)


def test_runs_are_checked(raw):
    put(raw, 7, torch.randn(5, 3))
    register(raw)
    put(raw, BASE, torch.randn(2, 3))
    for pre, what in [([[2, BASE, 1, 4, []]], "not registered"),
                      ([[1, BASE, 1, 99, []]], "bad run"),
                      ([[1, -5, 1, 4, []]], "bad run"),
                      ([[1, BASE, 1, 4, [0]]], "pairs"),
                      ([[1, BASE]], "a program run is"),
                      ("x" * 10, "short list")]:
        r = raw.request({"t": "sync", "pre": pre})
        assert r["t"] == "err" and what in r["msg"], (pre, r)
    # a run whose outputs were already produced (a replayed base reused) is refused, not overwritten
    assert raw.request({"t": "sync", "pre": [[1, BASE, 1, 4, []]]}).get("t") != "err"
    r = raw.request({"t": "sync", "pre": [[1, BASE, 1, 4, []]]})
    assert r["t"] == "err" and "already in use" in r["msg"]
    assert raw.request({"t": "sync"}).get("t") != "err"  # and the session goes on


def test_registration_is_validated(raw):
    put(raw, 7, torch.randn(5, 3))
    bad = [
        ({"p": 1, "steps": [{"t": "op", "op": "aten::from_file.default", "a": ["/etc/passwd"], "o": [0]}]},
         "allowlist"),
        ({"p": 1, "steps": [{"t": "op", "op": "aten::relu.default", "a": [{"h": 99999}], "o": [0]}]},
         "not one of this session's tensors"),
        ({"p": 1, "steps": [{"t": "op", "op": "aten::relu.default", "a": [{"s": -1}], "o": [0]}]}, "bad tensor"),
        ({"p": 1, "steps": [{"t": "op", "op": "aten::relu.default", "a": [{"s": 0}], "o": ["x"]}]}, "output"),
        ({"p": 1, "steps": [{"t": "exec"}]}, "unknown kind"),
        ({"p": 1, "steps": []}, "1 to"),
        ({"p": "1", "steps": [{"t": "put"}]}, "integer id"),
        ({"p": 1, "steps": [{"t": "put"}], "in": [{"dt": "float32", "sh": [2]}]}, "constants"),
        ({"p": 1, "steps": [{"t": "put", "o": [-1]}]}, "upload offsets"),
        ({"p": 1, "steps": [{"t": "put", "o": 0}]}, "upload offsets"),
        ({"p": 1, "steps": [{"t": "put", "o": [0] * 65}]}, "upload offsets"),
    ]
    for program, what in bad:
        r = register(raw, program)
        assert r["t"] == "err" and what in r["msg"], (program, r)
    assert register(raw).get("t") != "err"


def test_a_program_cannot_name_another_sessions_tensors(server):
    a, b = RawClient(server.url), RawClient(server.url)
    try:
        a.hello()
        b.hello()
        put(a, 7, torch.randn(5, 3))
        r = register(b)  # b has no tensor 7: a's handle is not b's to use
        assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]
        assert register(a).get("t") != "err"
        put(b, BASE, torch.randn(2, 3))
        r = b.request({"t": "sync", "pre": [[1, BASE, 1, 4, []]]})  # a's program id means nothing in b
        assert r["t"] == "err" and "not registered" in r["msg"]
    finally:
        a.close()
        b.close()


def test_freeing_a_parameter_drops_the_programs_that_use_it(raw):
    put(raw, 7, torch.randn(5, 3))
    register(raw)
    raw.request({"t": "free", "fr": [7]})
    put(raw, BASE, torch.randn(2, 3))
    r = raw.request({"t": "sync", "pre": [[1, BASE, 1, 4, []]]})
    assert r["t"] == "err" and "not registered" in r["msg"]


def test_slots_name_tensors_per_run(raw):
    prog = {"p": 3, "steps": [{"t": "op", "op": "aten::mul.Tensor", "a": [{"x": 0}, {"x": 1}], "o": [0]}]}
    assert register(raw, prog).get("t") != "err"
    put(raw, 1, torch.full((3,), 2.0))
    put(raw, 2, torch.full((3,), 5.0))
    raw.request({"t": "sync", "pre": [[3, BASE, 0, 1, [0, 1, 1, 2]]]})
    assert torch.equal(get(raw, BASE), torch.full((3,), 10.0))
    r = raw.request({"t": "sync", "pre": [[3, BASE + 10, 0, 1, [0, 1]]]})
    assert r["t"] == "err" and "slot 1 was not given" in r["msg"]
    r = raw.request({"t": "sync", "pre": [[3, BASE + 20, 0, 1, [0, 1, 1, 424242]]]})
    assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]


# -- running ahead: the upload asks the server to run the rest and answer the waits unasked ---------

AHEAD = {  # y = relu_(x @ w.T + 1) in place, z = -y; downloads of y and z
    "p": 4,
    "steps": [
        {"t": "put"},
        {"t": "op", "op": "aten::linear.default", "a": [{"s": 0}, {"h": 7}], "o": [1]},
        {"t": "op", "op": "aten::add.Scalar", "a": [{"s": 1}, 1], "o": [2]},
        {"t": "op", "op": "aten::relu_.default", "a": [{"s": 2}], "o": [None]},
        {"t": "get", "a": [{"s": 2}]},
        {"t": "op", "op": "aten::neg.default", "a": [{"s": 2}], "o": [3]},
        {"t": "get", "a": [{"s": 3}]},
    ],
}


def put_ahead(raw, base: int, x: torch.Tensor, ah: list, aq: list, **more) -> None:
    from rrto import codec
    desc, buf, _ = codec.tensor_frame(x)
    raw.send({"t": "put", "h": base, "d": desc, "ah": ah, "aq": aq, **more}, [buf])


def answers(raw, n: int) -> list:
    out = []
    for _ in range(n):
        reply, frames = raw.recv()
        out.append((reply, frames))
    return out


def test_a_run_ahead_answers_every_wait_unasked(raw):
    from rrto import codec
    w = torch.randn(5, 3)
    put(raw, 7, w)
    assert register(raw, AHEAD).get("t") != "err"
    for i in range(3):
        x, base = torch.randn(2, 3), BASE + 100 * i
        cf = {"cf": [4, base - 100, 7, []]} if i else {}
        put_ahead(raw, base, x, [4, base, 1, 7, []], [1000 + 2 * i, 1001 + 2 * i])
        (r1, f1), (r2, f2) = answers(raw, 2)
        assert (r1["q"], r2["q"]) == (1000 + 2 * i, 1001 + 2 * i) and "d" in r1 and "d" in r2, (r1, r2)
        y = torch.relu(torch.nn.functional.linear(x, w) + 1)
        assert torch.equal(codec.frame_tensor(r1["d"], f1[0], 1 << 30), y)
        assert torch.equal(codec.frame_tensor(r2["d"], f2[0], 1 << 30), -y)
        assert raw.request({"t": "sync", **cf}).get("t") != "err"


def test_a_sync_right_after_a_download_gets_no_reply_of_its_own(raw):
    """The robot has just had the download's reply, which says the work up to it is done: both
    ends count such a sync out of the reply numbers (codec.answered). A sync after an op is
    still answered."""
    from rrto import codec
    steps = AHEAD["steps"]
    program = {"p": 4, "steps": [*steps[:5], {"t": "sync"}, steps[5], {"t": "sync"}, steps[6], {"t": "sync"}]}
    assert codec.answered([st["t"] for st in program["steps"]]) == \
        (False, False, False, False, True, False, False, True, True, False)
    w = torch.randn(5, 3)
    put(raw, 7, w)
    assert register(raw, program).get("t") != "err"
    x = torch.randn(2, 3)
    put_ahead(raw, BASE, x, [4, BASE, 1, 10, []], [1000, 1001, 1002, 1003])  # one number per sync: refused
    assert all(r.get("stop") == 1 for r, _ in answers(raw, 4))
    settled = raw.request({"t": "sync", "cf": [4, BASE, 1, []], "fr": [BASE]})
    assert settled.get("t") != "err", settled
    put_ahead(raw, BASE + 100, x, [4, BASE + 100, 1, 10, []], [2000, 2001, 2002])
    (r1, f1), (r2, _), (r3, f3) = answers(raw, 3)
    assert [r1["q"], r2["q"], r3["q"]] == [2000, 2001, 2002] and "d" in r1 and "d" not in r2 and "d" in r3
    y = torch.relu(torch.nn.functional.linear(x, w) + 1)
    assert torch.equal(codec.frame_tensor(r1["d"], f1[0], 1 << 30), y)
    assert torch.equal(codec.frame_tensor(r3["d"], f3[0], 1 << 30), -y)
    assert not raw.sock.poll(300), "a reply for a sync the robot does not wait for"
    assert raw.request({"t": "sync", "cf": [4, BASE + 100, 10, []]}).get("t") != "err"


def test_a_run_ahead_sizes_its_steps_again_when_the_upload_changes_layout(raw):
    """Runs ahead of one upload layout reuse their steps' sizes; another layout, even one with
    the same number of elements, gets results of its own shape (and the sizes of the old again after)."""
    from rrto import codec
    w = torch.randn(5, 3)
    put(raw, 7, w)
    declared = {**AHEAD, "steps": [{"t": "put", "o": [0]}, *AHEAD["steps"][1:]]}
    assert register(raw, declared).get("t") != "err"
    prev = None
    for i, rows in enumerate((2, 2, 4, 4, 2)):
        x, base = torch.randn(rows, 3), BASE + 100 * i
        if rows == 4:
            x = torch.randn(3, 4).T  # a transposed upload arrives dense: only its shape differs
        put_ahead(raw, base, x, [4, base, 1, 7, []], [2 * i, 2 * i + 1])
        (r1, f1), (r2, f2) = answers(raw, 2)
        y = torch.relu(torch.nn.functional.linear(x, w) + 1)
        assert torch.equal(codec.frame_tensor(r1["d"], f1[0], 1 << 30), y), (rows, r1)
        assert torch.equal(codec.frame_tensor(r2["d"], f2[0], 1 << 30), -y)
        assert raw.request({"t": "sync", "cf": [4, base, 7, []]}).get("t") != "err"
        prev = base
    assert torch.equal(get(raw, prev + 3), -torch.relu(torch.nn.functional.linear(x, w) + 1))


def test_settling_short_of_a_run_ahead_undoes_what_ran_past(raw):
    """The app turned away before relu_: the server ran it ahead, so it puts y's old values back
    and forgets what the steps past the turn made; the steps before it stay."""
    g = torch.Generator().manual_seed(0)  # some of x @ w.T + 1 is negative: relu_ changes it
    w, x = torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g)
    put(raw, 7, w)
    register(raw, AHEAD)
    put_ahead(raw, BASE, x, [4, BASE, 1, 7, []], [500, 501])
    rs = [r for r, _ in answers(raw, 2)]
    assert [r["q"] for r in rs] == [500, 501] and all("d" in r for r in rs), rs
    assert raw.request({"t": "sync", "cf": [4, BASE, 3, []]}).get("t") != "err"
    old = torch.nn.functional.linear(x, w) + 1
    assert torch.equal(get(raw, BASE + 2), old) and (old < 0).any()  # relu_ undone
    r = raw.request({"t": "get", "h": BASE + 3})
    assert r["t"] == "err" and "not one of this session's tensors" in r["msg"]


def test_runs_ahead_of_two_programs_are_settled_each_on_its_own(raw):
    """Two app threads, a program each: the second's run ahead does not end the first's. One
    message settles both ('cf' a list); the first, short of its end, is undone past the turn."""
    g = torch.Generator().manual_seed(0)
    w, x1, x2 = torch.randn(5, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    put(raw, 7, w)
    assert register(raw, AHEAD).get("t") != "err"
    assert register(raw, {**AHEAD, "p": 5}).get("t") != "err"
    put_ahead(raw, BASE, x1, [4, BASE, 1, 7, []], [600, 601])
    put_ahead(raw, BASE + 1000, x2, [5, BASE + 1000, 1, 7, []], [602, 603])
    assert [r["q"] for r, _ in answers(raw, 4)] == [600, 601, 602, 603]
    settled = raw.request({"t": "sync", "cf": [[4, BASE, 3, []], [5, BASE + 1000, 7, []]]})
    assert settled.get("t") != "err", settled
    old = torch.nn.functional.linear(x1, w) + 1
    assert torch.equal(get(raw, BASE + 2), old) and (old < 0).any()  # program 4's relu_ undone
    assert raw.request({"t": "get", "h": BASE + 3})["t"] == "err"  # what it made past the turn is gone
    assert torch.equal(get(raw, BASE + 1000 + 3), -torch.relu(torch.nn.functional.linear(x2, w) + 1))


def test_a_run_ahead_stops_before_writing_a_tensor_older_than_the_iteration(raw):
    w = torch.randn(5, 3)
    put(raw, 7, w)
    counter = torch.zeros(5)
    put(raw, 8, counter)
    prog = {"p": 5, "steps": [
        {"t": "put"},
        {"t": "op", "op": "aten::linear.default", "a": [{"s": 0}, {"h": 7}], "o": [1]},
        {"t": "op", "op": "aten::add_.Scalar", "a": [{"h": 8}, 1], "o": [None]},  # a running count
        {"t": "op", "op": "aten::add.Tensor", "a": [{"s": 1}, {"h": 8}], "o": [2]},
        {"t": "get", "a": [{"s": 2}]},
    ]}
    assert register(raw, prog).get("t") != "err"
    x = torch.randn(2, 3)
    put_ahead(raw, BASE, x, [5, BASE, 1, 5, []], [900])
    (r, _), = answers(raw, 1)
    assert r == {"q": 900, "stop": 2}  # linear ran; the count waits for the robot
    assert torch.equal(get(raw, 8), counter)
    # the robot confirms up to the stop and sends the rest as a confirmed run
    raw.request({"t": "sync", "cf": [5, BASE, 2, []], "pre": [[5, BASE, 2, 4, []]]})
    assert torch.equal(get(raw, BASE + 2), torch.nn.functional.linear(x, w) + 1)
    assert torch.equal(get(raw, 8), counter + 1)


def test_malformed_runs_ahead_and_confirmations_are_refused(raw):
    put(raw, 7, torch.randn(5, 3))
    register(raw, AHEAD)
    for k, (ah, aq) in enumerate([([4, BASE, 1, 99, []], [1, 2]), ([4, BASE, 1, 7, []], [1]),
                                  ([9, BASE, 1, 7, []], [1, 2]), ("x", [1, 2]), ([4, BASE, 1, 7, [0]], [1, 2])]):
        base = BASE + 1000 * (k + 1)
        put_ahead(raw, base, torch.randn(2, 3), ah, aq)
        for r, _ in answers(raw, len(aq)):
            assert r.get("stop") is not None, (ah, aq, r)  # no run ahead: the robot asks for each wait
        assert get(raw, base).shape == (2, 3)  # the upload itself went through
    for cf, what in [("x", "confirmation"), ([4, BASE, 1], "confirmation"), ([4, BASE, 1, [0]], "confirmation")]:
        r = raw.request({"t": "sync", "cf": cf})
        assert r["t"] == "err" and what in r["msg"], (cf, r)
    good = BASE + 77_777
    put_ahead(raw, good, torch.randn(2, 3), [4, good, 1, 7, []], [3000, 3001])
    assert [r.get("t") for r, _ in answers(raw, 2)] == [None, None]


# -- captured segments: a stretch of static steps run as one traced graph (server/capture.py) ------

CHAIN = {  # ten op steps between the upload and the download: one segment once the sizes are known
    "p": 6,
    "steps": [
        {"t": "put", "o": [0]},
        {"t": "op", "op": "aten::linear.default", "a": [{"s": 0}, {"h": 7}], "o": [1]},  # 1
        {"t": "op", "op": "aten::add.Scalar", "a": [{"s": 1}, 1], "o": [2]},  # 2
        {"t": "op", "op": "aten::relu_.default", "a": [{"s": 2}], "o": [None]},  # 3: in place
        {"t": "op", "op": "aten::mul.Scalar", "a": [{"s": 2}, 3], "o": [3]},  # 4
        {"t": "op", "op": "aten::sub.Tensor", "a": [{"s": 3}, {"s": 1}], "o": [4]},  # 5
        {"t": "op", "op": "aten::tanh.default", "a": [{"s": 4}], "o": [5]},  # 6
        {"t": "op", "op": "aten::mul_.Scalar", "a": [{"s": 5}, 2], "o": [None]},  # 7: in place
        {"t": "op", "op": "aten::add.Tensor", "a": [{"s": 5}, {"s": 3}], "o": [6]},  # 8
        {"t": "op", "op": "aten::t.default", "a": [{"s": 6}], "o": [7]},  # 9: a view
        {"t": "op", "op": "aten::neg.default", "a": [{"s": 7}], "o": [8]},  # 10
        {"t": "get", "a": [{"s": 8}]},
    ],
}


def chain(x: torch.Tensor, w: torch.Tensor, until: int = 11) -> dict:
    """CHAIN's values by offset after its steps before ``until``, computed here op by op."""
    v = {0: x, 1: torch.nn.functional.linear(x, w)}
    v[2] = v[1] + 1
    if until > 3:
        v[2].relu_()
    v[3] = v[2] * 3
    v[4] = v[3] - v[1]
    v[5] = torch.tanh(v[4])
    if until > 7:
        v[5].mul_(2)
    v[6] = v[5] + v[3]
    v[8] = -v[6].t()
    return v


def captured(raw) -> int:
    return raw.request({"t": "stats"})["captured_steps"]


def chain_registered(raw, seed: int) -> tuple:
    """CHAIN registered with a random weight: (generator, weight, captured steps so far)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)
    put(raw, 7, w)
    assert register(raw, CHAIN).get("t") != "err"
    return g, w, captured(raw)


def ahead_to_end(raw, program: dict, x: torch.Tensor, base: int, q: int, **more) -> torch.Tensor:
    """Upload ``x`` at ``base`` and run ``program`` ahead to its end: the download it answers."""
    from rrto import codec
    end = len(program["steps"])
    put_ahead(raw, base, x, [program["p"], base, 1, end, []], [q], **more)
    ((r, f),) = answers(raw, 1)
    assert "d" in r, r
    return codec.frame_tensor(r["d"], f[0], 1 << 30)


def settle_at_end(raw, program: dict, base: int) -> None:
    """Confirm the run ahead at ``base`` to the program's end."""
    assert raw.request({"t": "sync", "cf": [program["p"], base, len(program["steps"]), []]}).get("t") != "err"


def chain_ahead(raw, x: torch.Tensor, w: torch.Tensor, base: int, q: int, **more) -> None:
    """Upload ``x`` at ``base`` and run CHAIN ahead: its download must be what op by op gives."""
    assert torch.equal(ahead_to_end(raw, CHAIN, x, base, q, **more), chain(x, w)[8]), q


def test_a_captured_segment_gives_what_the_op_list_gives(raw):
    g, w, before = chain_registered(raw, 1)
    for i in range(5):
        x, base = torch.randn(5, 4, generator=g), BASE + 100 * i
        chain_ahead(raw, x, w, base, i)
        settle_at_end(raw, CHAIN, base)
        for off in (2, 3, 5, 6):  # every output of the segment is bound, in-place writes included
            assert torch.equal(get(raw, base + off), chain(x, w)[off]), (i, off)
    # the first run sizes the steps, the second plans, traces and runs the segment, and so on
    assert captured(raw) - before == 4 * 10, "the segment did not run"


def test_a_segment_binds_what_no_later_step_reads_after_its_replies(raw):
    """Outputs of a segment that no step after it reads are bound once the run's replies are
    out (off the inference's critical path). A handle the robot already holds there is still
    refused: the value already sent stands, the robot's next request reports the clash, and the
    handle keeps its own tensor."""
    g, w, before = chain_registered(raw, 2)
    for i in range(3):
        x, base = torch.randn(5, 4, generator=g), BASE + 100 * i
        mine = torch.full((2,), float(i))
        if i == 2:  # segment output 3 is bound after the replies: this handle is in its way
            put(raw, base + 3, mine)
        chain_ahead(raw, x, w, base, i)
        got = raw.request({"t": "sync", "cf": [6, base, 12, []]})
        if i < 2:
            assert got.get("t") != "err", got
            continue
        assert got.get("t") == "err" and f"handle {base + 3} is already in use" in got.get("msg", ""), got
        assert torch.equal(get(raw, base + 3), mine)
    assert captured(raw) - before == 2 * 10, "the segment did not run"


def test_outputs_the_robot_expects_to_drop_are_left_out_and_made_again_if_held(raw):
    """'ad' names outputs the robot expects to drop within each iteration: the segment's graph
    does not return them, no handle names them. One the robot still holds when it settles
    ('cf' fifth item) is made again, op by op, with its value as eager gives it."""
    from rrto import codec
    g, w, before = chain_registered(raw, 4)
    left = raw.request({"t": "stats"})["outputs_left_out"]
    for i in range(4):
        x, base = torch.randn(5, 4, generator=g), BASE + 100 * i
        chain_ahead(raw, x, w, base, i, ad=[2, 2, 5, 1, 8, 1])  # 2, 3, 5; and 8, which the download reads
        held = [3] if i == 3 else []  # (the first run sizes the steps, op by op: all bound)
        assert raw.request({"t": "sync", "cf": [6, base, 12, [], held]}).get("t") != "err"
        r = raw.request({"t": "get", "h": base + 5})
        assert (r.get("t") == "err" and "not one of this session's tensors" in r["msg"]) == (i > 0), (i, r)
        for off in (1, 4, 6, 8):
            assert torch.equal(get(raw, base + off), chain(x, w)[off]), (i, off)
        if i == 3:
            assert torch.equal(get(raw, base + 3), chain(x, w)[3])
    assert captured(raw) - before == 3 * 10, "the segment did not run"
    assert raw.request({"t": "stats"})["outputs_left_out"] - left == 3 * 3
    for bad in ("x", [2], [2, 0], [0, 1000]):
        base = BASE + 9000
        put_ahead(raw, base, torch.randn(5, 4, generator=g), [6, base, 1, 12, []], [50], ad=bad)
        ((r, _),) = answers(raw, 1)
        assert r.get("stop") == 1, (bad, r)  # refused: no run ahead, the robot asks for each wait
        raw.request({"t": "sync", "fr": [base]})


ON_DEVICE = {"dtype": {"dt": "float32"}, "device": {"dev": "r"}}
GRID = {  # torch.arange on a device: an empty tensor that arange.out grows; one segment all the same
    "p": 7,
    "steps": [
        {"t": "put", "o": [0]},
        {"t": "op", "op": "aten::linear.default", "a": [{"s": 0}, {"h": 7}], "o": [1]},  # 1: (5, 4)
        {"t": "op", "op": "aten::empty.memory_format", "a": [[0]], "k": ON_DEVICE, "o": [2]},  # 2
        {"t": "op", "op": "aten::arange.start_out", "a": [0, 4, 1], "k": {"out": {"s": 2}}, "o": [None]},  # 3
        {"t": "op", "op": "aten::add.Tensor", "a": [{"s": 1}, {"s": 2}], "o": [3]},  # 4
        {"t": "op", "op": "aten::empty.memory_format", "a": [[4]], "k": ON_DEVICE, "o": [4]},  # 5: never written
        {"t": "op", "op": "aten::relu.default", "a": [{"s": 3}], "o": [5]},  # 6
        {"t": "op", "op": "aten::empty.memory_format", "a": [[4]], "k": ON_DEVICE, "o": [6]},  # 7
        {"t": "op", "op": "aten::arange.start_out", "a": [4, 8, 1], "k": {"out": {"s": 6}}, "o": [None]},  # 8
        {"t": "op", "op": "aten::mul.Tensor", "a": [{"s": 5}, {"s": 6}], "o": [7]},  # 9
        {"t": "op", "op": "aten::sub.Tensor", "a": [{"s": 7}, {"s": 4}], "o": [8]},  # 10
        {"t": "get", "a": [{"s": 8}]},
    ],
}


def test_uninitialised_steps_join_a_segment_zeroed_as_the_op_list_zeroes_them(raw):
    """``empty`` hands out memory another session may have used: op by op it is zeroed at
    binding. Inside a segment it is zeroed where it is made, so what a later step wrote into
    it stays, what nobody wrote reads back as zeros, and what ``arange`` grew is bound grown."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 4, generator=g)
    put(raw, 7, w)
    assert register(raw, GRID).get("t") != "err"
    before = captured(raw)
    for i in range(4):
        x, base = torch.randn(5, 4, generator=g), BASE + 100 * i
        y = torch.relu(torch.nn.functional.linear(x, w) + torch.arange(4.0)) * torch.arange(4.0, 8.0)
        assert torch.equal(ahead_to_end(raw, GRID, x, base, i), y), i
        settle_at_end(raw, GRID, base)
        assert torch.equal(get(raw, base + 2), torch.arange(4.0)), i  # grown and written after it was made
        assert torch.equal(get(raw, base + 4), torch.zeros(4)), i  # never written
    assert captured(raw) - before == 3 * 10, "the steps did not run as one segment"


RESHAPED = {  # an output reshaped in place by a later step (unsqueeze_): bound as op by op leaves it
    "p": 8,
    "steps": [
        {"t": "put", "o": [0]},
        {"t": "op", "op": "aten::linear.default", "a": [{"s": 0}, {"h": 7}], "o": [1]},  # 1: (5, 6)
        {"t": "op", "op": "aten::add.Scalar", "a": [{"s": 1}, 1], "o": [2]},  # 2
        {"t": "op", "op": "aten::unsqueeze_.default", "a": [{"s": 2}, 0], "o": [None]},  # 3: 2 is (1, 5, 6)
        {"t": "op", "op": "aten::mul.Scalar", "a": [{"s": 2}, 3], "o": [3]},  # 4
        {"t": "op", "op": "aten::tanh.default", "a": [{"s": 3}], "o": [4]},  # 5
        {"t": "op", "op": "aten::add.Tensor", "a": [{"s": 4}, {"s": 2}], "o": [5]},  # 6
        {"t": "op", "op": "aten::neg.default", "a": [{"s": 5}], "o": [6]},  # 7
        {"t": "op", "op": "aten::sub.Tensor", "a": [{"s": 6}, {"s": 3}], "o": [7]},  # 8
        {"t": "op", "op": "aten::relu.default", "a": [{"s": 7}], "o": [8]},  # 9
        {"t": "get", "a": [{"s": 8}]},
    ],
}


def test_an_output_a_later_step_reshapes_in_place_is_bound_as_the_op_list_binds_it(raw):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 4, generator=g)
    put(raw, 7, w)
    assert register(raw, RESHAPED).get("t") != "err"
    for i in range(4):
        x, base = torch.randn(5, 4, generator=g), BASE + 100 * i
        v2 = (torch.nn.functional.linear(x, w) + 1).unsqueeze(0)
        v3 = v2 * 3
        y = torch.relu(-(torch.tanh(v3) + v2) - v3)
        assert torch.equal(ahead_to_end(raw, RESHAPED, x, base, i), y), i
        settle_at_end(raw, RESHAPED, base)
        assert torch.equal(get(raw, base + 2), v2), i


def test_layouts_a_program_goes_back_to_keep_their_traced_segment(raw):
    """Inputs of one shape, then another, then the first again (lop's plan trial: bands, then
    whole uploads): back on the first, its segment runs from the first run, as traced before."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, generator=g)
    put(raw, 7, w)
    assert register(raw, CHAIN).get("t") != "err"
    i = 0

    def frame(rows: int) -> int:
        nonlocal i
        x, base = torch.randn(rows, 4, generator=g), BASE + 100 * i
        before = captured(raw)
        assert torch.equal(ahead_to_end(raw, CHAIN, x, base, i), chain(x, w)[8]), (i, rows)
        settle_at_end(raw, CHAIN, base)
        i += 1
        return captured(raw) - before

    assert [frame(5) for _ in range(3)] == [0, 10, 10]  # sized, then planned and traced
    assert [frame(3) for _ in range(3)] == [0, 10, 10]  # another layout: its own segment
    assert [frame(5) for _ in range(2)] == [10, 10]  # the first layout's, kept


@pytest.mark.parametrize("turn", [3, 5, 7])
def test_settling_inside_a_captured_segment_makes_its_steps_again_up_to_the_turn(raw, turn):
    """The app turned away at step ``turn``, inside the segment: the values before it are those
    op by op would leave (relu_ and mul_ not yet applied where the turn is before them), and
    nothing from the turn on is bound."""
    from rrto import codec
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, generator=g)
    put(raw, 7, w)
    register(raw, CHAIN)
    for i in range(3):  # warm: the third run ahead runs the segment
        x, base = torch.randn(5, 4, generator=g), BASE + 100 * i
        put_ahead(raw, base, x, [6, base, 1, 12, []], [i])
        answers(raw, 1)
        raw.request({"t": "sync", "cf": [6, base, 12, []]})
    before = captured(raw)
    x, base = torch.randn(5, 4, generator=g), BASE + 1000
    put_ahead(raw, base, x, [6, base, 1, 12, []], [9])
    ((r, f),) = answers(raw, 1)
    assert torch.equal(codec.frame_tensor(r["d"], f[0], 1 << 30), chain(x, w)[8])
    assert captured(raw) - before == 10, "the segment did not run"
    assert raw.request({"t": "sync", "cf": [6, base, turn, []]}).get("t") != "err"
    want = chain(x, w, until=turn)
    made_before = {3: (1, 2), 5: (1, 2, 3), 7: (1, 2, 3, 4, 5)}[turn]  # offsets the steps before it made
    assert (want[2] < 0).any() == (turn <= 3)  # relu_ undone where the app turned before it
    for off in made_before:
        assert torch.equal(get(raw, base + off), want[off]), (turn, off)
    for off in range(max(made_before) + 1, 9):
        r = raw.request({"t": "get", "h": base + off})
        assert r["t"] == "err" and "not one of this session's tensors" in r["msg"], (turn, off)
    assert raw.request({"t": "sync"}).get("t") != "err"
