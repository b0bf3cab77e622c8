"""Someone else's app: Hugging Face transformers models, unmodified, offloaded and replayed.

rrto's own examples were written next to rrto. These models were not: embeddings,
attention with and without a mask, shifted windows, a KV cache that starts with ``torch.tensor([],
device=...)`` every forward, layer norm, GELU, a ResNet backbone under a detection
transformer with its data-dependent mask checks, ``generate()`` with its stopping
criteria. Each runs 20 frames (``tests/apps/transformers_app.py``), built from a
config with random weights (nothing is downloaded).

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

APP = "tests/apps/transformers_app.py"
# model: (inferences replayed at least of 20, replay divergences at most)
MODELS = {
    "vit": (15, 0),
    "swin": (15, 0),
    "detr": (15, 0),
    "bert": (10, 4),  # its padding changes; where there is none, transformers skips the mask: another branch
    "gpt2": (10, 8),  # every fifth frame is a generate(): not the forward's sequence
}


def run_app(tmp_path, model: str, *rrto_args: str) -> dict:
    out = tmp_path / f"{model}-{len(list(tmp_path.iterdir()))}.npz"
    res = run_rrto(*rrto_args, APP, "--model", model, "--frames", "20", "--save", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("model", MODELS)
def test_a_transformers_model_replays_with_the_outputs_of_eager_offload(tmp_path, server, model):
    local = run_app(tmp_path, model, "--mode", "local")
    eager = run_app(tmp_path, model, "--server", server.url, "--mode", "eager")
    stats = tmp_path / "stats.json"
    replayed = run_app(tmp_path, model, "--server", server.url, "--stats", str(stats))
    assert local.keys() == eager.keys() == replayed.keys() and len(local) >= 20
    for key in local:
        assert np.array_equal(eager[key], replayed[key]), f"{model}: {key} replayed differs from eager offload"
        np.testing.assert_allclose(replayed[key], local[key], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{model}: {key} differs from the robot's CPU beyond float tolerance")
    s = json.loads(stats.read_text())
    least, most = MODELS[model]
    assert s["sequence_found"] and s["replayed_inferences"] >= least, s
    assert s["replay_divergences"] <= most, s
    # one message per upload that travels: the server runs ahead and answers every wait unasked
    assert s["messages_per_replayed_inference"] == s["sequence_uploads"] <= 2, s
