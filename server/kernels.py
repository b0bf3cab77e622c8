"""Kernels this server's torch lacks: ops a robot's virtual cuda device makes that have no
kernel here for the CPU, or no meta kernel (outputs are sized on meta tensors before an op runs).

An LSTM or GRU on a cuda tensor runs its cells as fused ops (``_thnn_fused_lstm_cell``,
``_thnn_fused_gru_cell``), which torch has for CUDA only. A GPU server runs torch's own;
a server on the CPU (tests, a CPU-only edge box) runs them here as the ops they fuse,
and GRU's also gets the meta kernel torch lacks. The workspace output only serves
backward, which rrto does not offload: it holds the activated gates, as CUDA's does.

Older torch also lacks meta kernels for ops a robot sends (torch 2.11's CUDA build, found on
an H100): ``_convolution``, which TorchScript models call for a conv, and the transformer
encoder layer's fused eval path, which a robot's ``nn.TransformerEncoder`` takes on the
virtual cuda device. Each gets one here, from an op with the same outputs.
"""
from __future__ import annotations

import torch


def _lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    gates = input_gates + hidden_gates
    if input_bias is not None:
        gates = gates + input_bias + hidden_bias
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat([i, f, g, o], 1)


def _gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    if input_bias is not None:
        input_gates, hidden_gates = input_gates + input_bias, hidden_gates + hidden_bias
    ir, ii, in_ = input_gates.chunk(3, 1)
    hr, hi, hn = hidden_gates.chunk(3, 1)
    r, z = (ir + hr).sigmoid(), (ii + hi).sigmoid()
    n = (in_ + r * hn).tanh()
    return n + z * (hx - n), torch.cat([r, z, n, hx, hn], 1)


def _convolution_meta(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                      *_flags):
    # (torch 2.11's composite kernel ends in convolution_overrideable, which meta tensors lack)
    return torch.ops.aten.convolution.default(input, weight, bias, stride, padding, dilation, transposed,
                                              output_padding, groups)


def _encoder_layer_meta(src, *_args, **_kwargs):
    return torch.empty_like(src, memory_format=torch.contiguous_format)


# (op, kernel, the dispatch keys it serves where this torch has no kernel of its own)
STAND_INS = (
    ("_thnn_fused_lstm_cell", _lstm_cell, ("CPU", "Meta")),
    ("_thnn_fused_gru_cell", _gru_cell, ("CPU", "Meta")),
    ("_convolution", _convolution_meta, ("Meta",)),
    ("_transformer_encoder_layer_fwd", _encoder_layer_meta, ("Meta",)),
)


def install() -> torch.library.Library | None:
    """Register what is missing for the server's devices; keep the returned Library alive."""
    lib = None
    for name, kernel, keys in STAND_INS:
        for key in keys:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", key):
                lib = lib or torch.library.Library("aten", "IMPL")
                lib.impl(name, kernel, key)
    return lib
