"""The server's side of replay: registering programs and running them, with hostile inputs."""
from __future__ import annotations

import torch

from .conftest import RawClient
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
