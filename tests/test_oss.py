"""Operator Sequence Search on synthetic op logs (no server needed: it only reads the log)."""
from __future__ import annotations

import itertools

import pytest
import torch

from rrto.intercept.remote_tensor import TensorMeta
from rrto.record import EXT, GET, IN, MODEL_STATE, OP, PERSIST, PUT, Event, OpLog, SequenceSearch, name_key
from rrto.record.program import erase

WEIGHTS = {"conv": 1001, "fc": 1002}  # persistent handles (uploaded long before)


def meta(shape) -> TensorMeta:
    return TensorMeta(tuple(shape), tuple(1 for _ in shape), 0, torch.float32)


class Robot:
    """Writes the events an app's loop would, with fresh handles like the runtime's."""

    def __init__(self):
        self.log = OpLog()
        self.handles = itertools.count(1)

    def put(self, shape=(1, 3, 8, 8), value: bytes | None = None, model_state: bool = False) -> int:
        """An upload; ``value``: its bytes, as the runtime keeps them for a small one."""
        h = next(self.handles)
        small = {} if value is None else {"wire": {"in": [{"dt": "f32", "sh": list(shape), "st": [1] * len(shape)}]},
                                          "frames": (value,)}
        key = (PUT, meta(shape), MODEL_STATE) if model_state else (PUT, meta(shape))
        self.log.append(Event(PUT, name_key(PUT), key, outs=(h,), **small))
        return h

    def op(self, name: str, *args: int, scalar=1, shape=(1, 4, 8, 8), shaped=False) -> int:
        h = next(self.handles)
        key = (name, tuple(meta(shape) for _ in args), scalar)
        wire = {"op": f"aten::{name}.default", "a": [{"h": a} for a in args] + [scalar]}
        self.log.append(Event(OP, name_key(OP, name), key, tuple(args), (), (h,), wire, shaped=shaped))
        return h

    def get(self, h: int, shape=(1, 4)) -> None:
        self.log.append(Event(GET, name_key(GET), (GET, meta(shape)), handles=(h,)))

    def inference(self, scalar=1, in_shape=(1, 3, 8, 8), extra=None) -> None:
        x = self.put(in_shape)
        y = self.op("conv", x, WEIGHTS["conv"])
        y = self.op("relu", y)
        if extra is not None:
            y = self.op(extra, y)
        z = self.op("linear", y, WEIGHTS["fc"], scalar=scalar)
        self.get(z)

    def noise(self, n: int) -> None:
        for i in range(n):  # weight uploads and one-off warm-up ops
            h = self.put((i + 7, 3))
            self.op("mul", h, scalar=i)


def found(robot: Robot, repeats: int = 2):
    return SequenceSearch(repeats).find(robot.log)


def test_noise_before_the_first_period_is_skipped():
    r = Robot()
    r.noise(30)
    r.inference()
    assert found(r) is None  # once is not a sequence yet
    r.inference()
    prog = found(r)
    assert prog is not None
    assert [s.kind for s in prog.steps] == ["put", "op", "op", "op", "get"]
    assert [s.name for s in prog.steps[1:4]] == ["aten::conv.default", "aten::relu.default", "aten::linear.default"]


def test_data_flow_roles():
    r = Robot()
    for _ in range(3):
        r.inference()
    prog = found(r)
    put, conv, relu, linear, get = prog.steps
    assert put.out_offsets == (0,)
    assert conv.roles == ((IN, 0), (PERSIST, WEIGHTS["conv"]))
    assert relu.roles == ((IN, conv.out_offsets[0]),)
    assert linear.roles == ((IN, relu.out_offsets[0]), (PERSIST, WEIGHTS["fc"]))
    assert get.roles == ((IN, linear.out_offsets[0]),)
    assert prog.n_handles == 4 and prog.sync_points == 1 and prog.uploads == 1
    # the server's op list names earlier steps by offset and parameters by handle
    assert conv.spec["a"] == [{"s": 0}, {"h": WEIGHTS["conv"]}, 1]


def test_period_inside_a_longer_log_after_another_pattern():
    r = Robot()
    for _ in range(3):
        r.inference(extra="sigmoid")
    r.noise(5)
    r.inference()
    assert found(r) is None
    r.inference()
    prog = found(r)
    assert prog is not None and len(prog) == 5  # the new sequence, not the older one with sigmoid


def test_repeats_k_is_respected():
    r = Robot()
    r.inference()
    r.inference()
    assert found(r, repeats=3) is None
    r.inference()
    assert found(r, repeats=3) is not None


@pytest.mark.parametrize("change", ["scalar", "shape"])
def test_near_repeats_are_not_adopted(change):
    r = Robot()
    for i in range(6):  # the same ops every time, but a scalar or the input shape alternates
        if change == "scalar":
            r.inference(scalar=i % 2)
        else:
            r.inference(in_shape=(1, 3, 8 + 8 * (i % 2), 8))
    prog = found(r)
    # no period of one inference; the true period of two inferences is found instead
    assert prog is not None and len(prog) == 10


def test_near_repeats_differing_each_time_are_never_adopted():
    r = Robot()
    for i in range(8):
        r.inference(scalar=i)
    assert found(r) is None


def test_a_tensor_that_changes_every_iteration_is_a_slot():
    """Recurrent state: each iteration reads the previous one's output."""
    r = Robot()
    h = r.put((1, 4))
    for _ in range(3):
        x = r.put()
        y = r.op("conv", x, WEIGHTS["conv"])
        h = r.op("add", y, h)
        r.get(h)
    prog = found(r)
    add = prog.steps[2]
    assert add.roles[0][0] == IN and add.roles[1] == (EXT, 0)
    assert prog.n_slots == 1 and add.spec["a"][1] == {"x": 0}


def test_shapes_after_a_data_dependent_op_may_vary():
    r = Robot()
    for n in (5, 9, 2):  # a detector keeps a different number of boxes each frame
        x = r.put()
        y = r.op("conv", x, WEIGHTS["conv"])
        keep = r.op("index", y, shaped=True, shape=(1, 4, 8, 8))
        boxes = r.op("slice", keep, shape=(n, 4, 8, 8))
        r.get(boxes, shape=(n, 4))
    prog = found(r)
    assert prog is not None and [s.kind for s in prog.steps] == ["put", "op", "shaped", "op", "get"]
    assert prog.steps[3].ekey == erase(prog.steps[3].key)


def test_the_program_starts_at_the_upload():
    r = Robot()
    for _ in range(3):
        w = r.op("zeros")  # made on the device before the input arrives
        r.get(w)
        r.inference()
    prog = found(r)
    assert prog.steps[0].kind == "put" and len(prog) == 7
    # "zeros" comes last in the rotated program; its output is fresh each iteration
    assert prog.steps[5].name == "aten::zeros.default"


def normalised_inference(r: Robot, mean: bytes, std: bytes = b"\x00" * 12) -> None:
    """An app that makes its normalisation constants on the device every frame, after its input."""
    x = r.put()
    m, s = r.put((3,), mean), r.put((3,), std)
    y = r.op("sub", x, m, shape=(1, 3, 8, 8))
    y = r.op("div", y, s, shape=(1, 3, 8, 8))
    r.get(r.op("conv", y, WEIGHTS["conv"]))


def test_a_small_upload_with_the_same_bytes_every_time_becomes_a_constant():
    r = Robot()
    for i in range(3):
        normalised_inference(r, mean=b"\x01" * 12)
    prog = found(r)
    assert [s.kind for s in prog.steps] == ["put", "op", "op", "op", "op", "op", "get"]
    x, m, s = prog.steps[:3]
    assert x.value is None and prog.uploads == 1  # the input still travels; the constants do not
    assert m.value == b"\x01" * 12 and m.spec == {"t": "op", "op": "aten::clone.default", "a": [{"i": 0}], "o": [1]}
    assert s.value == b"\x00" * 12 and s.spec["a"] == [{"i": 1}]
    assert prog.frames == [b"\x01" * 12, b"\x00" * 12] and [d["sh"] for d in prog.descs] == [[3], [3]]
    assert prog.steps[3].roles == ((IN, 0), (IN, 1))  # the server's copy is what the ops read


def test_a_small_upload_that_changes_is_not_a_constant():
    r = Robot()
    for i in range(3):
        normalised_inference(r, mean=bytes([i]) * 12)
    prog = found(r)
    assert [s.kind for s in prog.steps[:3]] == ["put", "put", "op"] and prog.uploads == 2
    assert prog.steps[1].value is None


def test_an_upload_seen_to_change_is_never_a_constant_again():
    r = Robot()
    for i in range(3):
        normalised_inference(r, mean=b"\x01" * 12)
    search = SequenceSearch(2)
    search.varying.add((PUT, meta((3,))))  # the replayer saw such an upload change
    prog = search.find(r.log)
    assert [s.kind for s in prog.steps[:3]] == ["put", "put", "put"] and prog.uploads == 3


def test_a_program_that_differs_only_in_a_constant_is_another_program():
    a, b = Robot(), Robot()
    for i in range(3):
        normalised_inference(a, mean=b"\x01" * 12)
        normalised_inference(b, mean=b"\x02" * 12)
    assert found(a).fingerprint != found(b).fingerprint


def test_the_program_starts_at_the_upload_that_is_not_a_constant():
    r = Robot()
    for i in range(3):
        m = r.put((3,), b"\x01" * 12)  # made before the input arrives
        x = r.put()
        r.get(r.op("sub", x, m, shape=(1, 3, 8, 8)))
    prog = found(r)
    assert [s.kind for s in prog.steps] == ["put", "op", "get", "op"]
    assert prog.steps[3].value == b"\x01" * 12


def test_a_model_called_twice_on_one_upload_is_found_as_the_whole_frame():
    r = Robot()
    w = r.op("detach", r.put((4, 3, 3, 3), model_state=True))  # model.cuda(): uploaded, then detached

    def frame():
        y = r.op("mul", r.put(), shape=(1, 3, 8, 8))
        for _ in range(2):  # each call reads this frame's y, as if it were a weight
            r.get(r.op("linear", r.op("conv", y, w)))
        return y

    y = frame()
    short = found(r)  # one call repeated: all there is to go on yet
    assert len(short) == 3 and short.young == {y} and short.uploads == 0
    assert short.steps[0].roles == ((PERSIST, y), (PERSIST, w))
    frame()
    whole = found(r)
    assert [s.kind for s in whole.steps] == ["put", "op"] + ["op", "op", "get"] * 2
    assert whole.young == frozenset() and whole.steps[2].roles[1] == (PERSIST, w)


def test_a_tensor_made_by_the_app_before_its_loop_is_young_but_adopted():
    r = Robot()
    m = r.put((3,))  # torch.tensor(mean, device="cuda") before the loop
    w = r.op("detach", r.put((4, 3, 3, 3), model_state=True))
    for _ in range(2):
        r.get(r.op("conv", r.op("sub", r.put(), m, shape=(1, 3, 8, 8)), w))
    prog = found(r)
    assert [s.kind for s in prog.steps] == ["put", "op", "op", "get"] and prog.young == {m}
