"""Someone else's app: Hugging Face transformers models and a kornia vision front end,
unmodified, offloaded and replayed.

rrto's own examples were written next to rrto. These apps were not: embeddings,
attention with and without a mask, shifted windows, a KV cache that starts with ``torch.tensor([],
device=...)`` every forward, layer norm, GELU, a ResNet backbone under a detection
transformer with its data-dependent mask checks, ``generate()`` with its stopping
criteria (``tests/apps/transformers_app.py``, 20 frames, each model built from a config
with random weights: nothing is downloaded); kornia's filters, corner response, a
perspective warp and a homography inverse (``tests/apps/kornia_app.py``, 12 frames).

Replay runs the same kernels on the same server as eager offload, so their outputs are
bit-equal. Against the robot's own CPU they agree to float tolerance, not bit for bit:
``scaled_dot_product_attention`` takes torch's fused CPU kernel on a CPU tensor and its
math form on a cuda one, which sums in another order.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import run_rrto

APPS = "tests/apps/"
# model: (inferences replayed at least of 20, replay divergences at most)
MODELS = {
    "vit": (15, 0),
    "swin": (15, 0),
    "detr": (15, 0),
    "bert": (10, 4),  # its padding changes; where there is none, transformers skips the mask: another branch
    "gpt2": (10, 8),  # every fifth frame is a generate(): not the forward's sequence
}


def run_app(tmp_path, app: list[str], *rrto_args: str) -> dict:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.npz"
    res = run_rrto(*rrto_args, APPS + app[0], *app[1:], "--save", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def replay_against_eager_and_local(tmp_path, server, app: list[str]) -> dict:
    """The app run locally, offloaded eagerly and replayed; returns the replay's stats."""
    local = run_app(tmp_path, app, "--mode", "local")
    eager = run_app(tmp_path, app, "--server", server.url, "--mode", "eager")
    stats = tmp_path / "stats.json"
    replayed = run_app(tmp_path, app, "--server", server.url, "--stats", str(stats))
    assert local.keys() == eager.keys() == replayed.keys() and len(local) >= 12
    for key in local:
        assert np.array_equal(eager[key], replayed[key]), f"{app}: {key} replayed differs from eager offload"
        np.testing.assert_allclose(replayed[key], local[key], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{app}: {key} differs from the robot's CPU beyond float tolerance")
    s = json.loads(stats.read_text())
    assert s["sequence_found"], s
    # one message per upload that travels: the server runs ahead and answers every wait unasked
    assert s["messages_per_replayed_inference"] == s["sequence_uploads"] <= 2, s
    return s


@pytest.mark.parametrize("model", MODELS)
def test_a_transformers_model_replays_with_the_outputs_of_eager_offload(tmp_path, server, model):
    s = replay_against_eager_and_local(tmp_path, server, ["transformers_app.py", "--model", model, "--frames", "20"])
    least, most = MODELS[model]
    assert s["replayed_inferences"] >= least and s["replay_divergences"] <= most, s


def test_a_kornia_vision_front_end_replays_with_the_outputs_of_eager_offload(tmp_path, server):
    s = replay_against_eager_and_local(tmp_path, server, ["kornia_app.py", "--frames", "12"])
    assert s["replayed_inferences"] >= 12 - 4 and s["replay_divergences"] == 0, s
    assert s["sequence_waits"] >= 2, s  # the corner count's .item() in the middle, and the downloads
