"""Which operators a robot may run here, and how big their outputs may get.

An op is allowed when its name is on ALLOWED below or torch tags it pointwise
(an element-wise op: its output is the broadcast of its inputs), and DENIED does not
match it. Everything else, notably ops that touch files, raw storage or uninitialised
memory of a resized tensor, is refused with a clear error. Only the ``aten`` namespace
is served: ``prims``, ``quantized``, ``c10d``, ``inductor`` and every other
``torch.ops`` namespace are refused by name. Before an op runs, its output sizes are
computed with meta kernels (cached by signature) and checked against the limits,
so a request can never make the server allocate more than a session may hold.
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rrto import codec

# Activations are named although torch tags most of them pointwise: the tags vary between
# versions (torch 2.11 leaves hardtanh_, MobileNet's ReLU6, untagged).
ALLOWED = set("""
view _unsafe_view reshape _reshape_alias as_strided as_strided_ expand expand_as permute transpose t
squeeze unsqueeze select slice narrow split split_with_sizes unbind chunk tensor_split unflatten
movedim alias detach detach_ view_as_real view_as_complex unfold diagonal flip roll rot90 repeat
clone _to_copy copy_ lift_fresh lift_fresh_copy contiguous real imag conj _conj resolve_conj resolve_neg
cat stack _unsafe_index index index_put index_put_ _index_put_impl_ index_select index_add index_add_
index_copy index_copy_ index_fill index_fill_ gather scatter scatter_ scatter_add scatter_add_
scatter_reduce scatter_reduce_ masked_fill masked_fill_ masked_scatter masked_scatter_ masked_select
nonzero nonzero_static take put_ where tril triu tril_ triu_ diag diag_embed fill_diagonal_
constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
replication_pad3d im2col col2im pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
fill fill_ zero_ zeros zeros_like ones ones_like empty empty_like empty_strided empty_permuted new_empty
new_empty_strided new_zeros new_ones new_full full full_like arange linspace logspace eye scalar_tensor
randn rand randint randperm randn_like rand_like randint_like normal normal_ uniform_ bernoulli bernoulli_
exponential_ multinomial native_dropout random_ cauchy_ geometric_ log_normal_
sum mean prod max min amax amin aminmax argmax argmin std var std_mean var_mean norm linalg_vector_norm
logsumexp cumsum cumprod cummax cummin all any _is_all_true _is_any_true count_nonzero median nanmedian mode kthvalue topk sort
argsort msort nansum nanmean _unique _unique2 unique_dim unique_consecutive histc bucketize searchsorted isin
dist cdist _cdist_forward _euclidean_dist renorm
convolution _convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d
avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d
_adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d max_unpool2d max_unpool3d
native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
_native_batch_norm_legit_functional batch_norm native_layer_norm layer_norm native_group_norm group_norm
instance_norm rms_norm _fused_rms_norm linear addmm mm bmm baddbmm addbmm matmul mv dot vdot addmv addr outer
einsum _softmax softmax _safe_softmax _log_softmax log_softmax _thnn_fused_lstm_cell _thnn_fused_gru_cell
_transformer_encoder_layer_fwd _native_multi_head_attention embedding_bag _embedding_bag _embedding_bag_forward_only
upsample_nearest1d upsample_nearest2d upsample_nearest3d
_upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d upsample_bilinear2d
_upsample_bilinear2d_aa upsample_bicubic2d _upsample_bicubic2d_aa upsample_linear1d upsample_trilinear3d
grid_sampler grid_sampler_2d grid_sampler_3d affine_grid_generator embedding one_hot
_fused_sdp_choice scaled_dot_product_attention _scaled_dot_product_attention_math
_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu
_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention
pdist _pdist_forward cosine_similarity pairwise_distance nll_loss_forward nll_loss2d_forward mse_loss
l1_loss smooth_l1_loss huber_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div
to type_as view_as reshape_as flatten squeeze_ unsqueeze_ t_ transpose_ swapaxes swapdims moveaxis
broadcast_to broadcast_tensors atleast_1d atleast_2d atleast_3d meshgrid hstack vstack dstack column_stack
tile fliplr flipud take_along_dim argwhere tensordot kron diff inner ger dropout feature_dropout alpha_dropout
pad _pad_enum conv1d conv2d conv3d _convolution_mode relu6 prelu _prelu_kernel glu log_sigmoid
log_sigmoid_forward hardswish hardswish_ hardtanh hardtanh_ hardsigmoid hardsigmoid_ relu relu_ leaky_relu
leaky_relu_ elu elu_ silu silu_ gelu gelu_ mish mish_ softplus threshold threshold_ sigmoid sigmoid_ tanh tanh_
floor_divide fix numpy_T mT mH adjoint expand_copy
_local_scalar_dense item is_nonzero equal allclose isclose is_same_size complex polar cross linalg_cross
linalg_inv_ex _linalg_check_errors _linalg_solve_ex linalg_cholesky_ex _linalg_det _linalg_svd linalg_qr _linalg_eigh
linalg_lu_factor_ex linalg_lu_solve triangular_solve linalg_solve_triangular _fft_r2c _fft_c2r _fft_c2c
""".split())

# Outputs whose size depends on values, bounded by the size of their inputs.
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "index", "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "_fused_sdp_choice"}
# Ops that hand out uninitialised memory: their outputs are zeroed, so no robot can read
# what another session left in the allocator's cache.
UNINITIALISED = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}

# Never served, whatever ALLOWED says or torch tags pointwise in some version: files,
# storages, pinned or resized memory, nested/sparse/quantized layouts, backend-private
# kernels, optimiser steps, asserts and debugging hooks. A guard against a future edit.
DENIED = re.compile(r"from_file|nested|storage|^set_|resize|pin_memory|record_stream|^_?cudnn_|miopen|mkldnn|mps"
                    r"|sparse|quantize|_make_|_copy_from|foreach|^_fused_(adam|sgd)|^_amp_|assert|print|save|load"
                    r"|^_?wait|_cufft|^_?cuda|^_?c10d|dispatch|^_test|_lazy|_propagate")

_NAME = re.compile(r"aten::([a-z_][a-z0-9_]*)\.([a-zA-Z0-9_]+)")


class OpError(ValueError):
    """A request the server refuses; ``kind`` tells the robot which exception to raise."""

    def __init__(self, message: str, kind: str = "bad_request"):
        super().__init__(message)
        self.kind = kind


class OutputMeta(NamedTuple):
    """What an op's meta kernel says one output will be, and what it costs."""
    shape: tuple
    stride: tuple
    offset: int
    dtype: torch.dtype
    new_bytes: int  # bytes this output adds to the session (0 for views and in-place results)
    grows_input: bool  # an out= input whose storage the op enlarges


@dataclass(frozen=True)
class OpInfo:
    op: torch._ops.OpOverload
    base: str
    generator_arg: str | None  # random ops: where the session's generator goes
    uninitialised: bool
    data_dependent: bool
    writes: bool  # writes an argument in place (an out= argument may be resized)


def allowed_names() -> list[str]:
    """Every overload name this server accepts, as the robot spells it (``aten::add.Tensor``)."""
    names = []
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("aten::"):
            continue
        base, _, overload = full[6:].partition(".")
        name = f"aten::{base}.{overload or 'default'}"
        if DENIED.search(base):
            continue
        if base in ALLOWED:
            names.append(name)
            continue
        try:
            op = getattr(getattr(torch.ops.aten, base), overload or "default")
        except (AttributeError, RuntimeError):
            continue
        if torch.Tag.pointwise in op.tags:
            names.append(name)
    return sorted(names)


class OpTable:
    """Resolves wire op names against the allowlist, once per name."""

    def __init__(self):
        self.allowed = frozenset(allowed_names())
        self._infos: dict[str, OpInfo] = {}

    def resolve(self, name: object) -> OpInfo:
        info = self._infos.get(name)  # type: ignore[arg-type]
        if info is not None:
            return info
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise OpError(f"malformed op name {str(name)[:80]!r}; expected e.g. 'aten::add.Tensor'")
        if name not in self.allowed:
            raise OpError(f"op {name} is not on this server's allowlist (torch {torch.__version__})",
                          kind="unsupported")
        base, overload = _NAME.fullmatch(name).groups()
        op = getattr(getattr(torch.ops.aten, base), overload)
        schema = op._schema
        gen = next((a.name for a in schema.arguments if a.name == "generator"), None)
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        info = OpInfo(op, base, gen, base in UNINITIALISED, base in DATA_DEPENDENT, writes)
        if len(self._infos) < 100_000:
            self._infos[name] = info
        return info


def signature(x):
    """Hashable key of op arguments: tensors by metadata, everything else by value."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, x.untyped_storage().nbytes())
    if isinstance(x, (list, tuple)):
        return tuple(signature(y) for y in x)
    if isinstance(x, dict):
        return tuple((k, signature(v)) for k, v in x.items())
    if isinstance(x, torch.Generator):
        return "generator"
    if type(x) is float or type(x) is bool:  # 1 == 1.0 == True, but an int tensor plus 1.0 is float
        return (type(x), x)
    return x


def to_meta(x):
    if isinstance(x, torch.Tensor):  # same storage size as the real tensor, so in-place checks agree
        n = x.untyped_storage().nbytes() // x.element_size()
        return torch.empty(n, dtype=x.dtype, device="meta").as_strided(x.shape, x.stride(), x.storage_offset())
    if isinstance(x, list):
        return [to_meta(y) for y in x]
    if isinstance(x, torch.device):
        return torch.device("meta")
    return x


def output_binding(t: torch.Tensor, meta: OutputMeta, args, kwargs) -> str | None:
    """How an op's output ``t`` is made to the layout its meta kernel promised the robot:
    None (it is), "unusable" (its shape or dtype differ), "view" (only the strides of
    length-1 dims differ: they address nothing, so the same memory takes the promised
    strides), "refused" (a view or in-place result of the op's arguments in another
    layout: a copy would break it) or "copy"."""
    shape, stride = meta.shape, meta.stride
    if t.dtype != meta.dtype or tuple(t.shape) != shape:
        return "unusable"
    if t.stride() == stride or t.numel() <= 1:
        return None
    if all(n == 1 or a == b for n, a, b in zip(shape, t.stride(), stride)):
        return "view"
    storages = {x.untyped_storage()._cdata for x in flat_tensors([args, list(kwargs.values())], [])}
    return "refused" if t.untyped_storage()._cdata in storages else "copy"


def written_args(args: list, kwargs: dict, writes: tuple):
    """The arguments at ``writes`` positions (("a", index) or ("k", name)): what an op writes in place."""
    for box, where in writes:
        if box == "a":
            if where < len(args):
                yield args[where]
        elif where in kwargs:
            yield kwargs[where]


def flat_tensors(x, out: list) -> list:
    """The tensors of an op result in order (tuples and lists walked depth first)."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            flat_tensors(y, out)
    return out


class SizeCheck:
    """Output metadata of an op from meta kernels, checked against byte limits before it runs."""

    def __init__(self, max_tensor_bytes: int):
        self.max_tensor_bytes = max_tensor_bytes
        self._cache: dict = {}

    def outputs(self, info: OpInfo, args: list, kwargs: dict) -> list[OutputMeta] | None:
        """One OutputMeta per output tensor; None when the data decides the shapes."""
        key = (info.op, signature(args), signature(kwargs))
        try:
            hit = self._cache.get(key)
        except TypeError:  # an unhashable value (e.g. nan-free float lists are fine; objects are not)
            key, hit = None, None
        if hit is not None:
            return hit
        margs, mkwargs = to_meta(args), {k: to_meta(v) for k, v in kwargs.items()}
        if info.generator_arg in mkwargs:  # (meta kernels draw nothing; randn.generator must be given one)
            mkwargs[info.generator_arg] = None
        inputs = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                  for t in flat_tensors([margs, list(mkwargs.values())], [])}
        try:
            res = codec.cuda_layout(info.op, margs, info.op(*margs, **mkwargs))
        except Exception as e:  # noqa: BLE001 - any failure of a meta kernel means "cannot size-check"
            if info.data_dependent:
                self._check_inputs(info, args, kwargs)
                return None
            if _is_meta_gap(e):
                raise OpError(f"op {info.op.name()} cannot be size-checked on this server (no meta kernel)",
                              kind="unsupported") from None
            raise OpError(f"{info.op.name()}: {short_error(e)}") from None
        outs = []
        for t in flat_tensors(res, []):
            st = t.untyped_storage()
            before = inputs.get(st._cdata)
            # An output sharing an input's storage costs nothing, unless the op grew that
            # storage (an out= tensor resized): then the grown storage counts in full.
            grows = before is not None and st.nbytes() > before
            nbytes = st.nbytes() if before is None or grows else 0
            if nbytes > self.max_tensor_bytes:
                raise OpError(f"{info.op.name()} would create a {list(t.shape)} {t.dtype} tensor of "
                              f"{nbytes / 2**20:.1f} MiB, over this server's per-tensor limit of "
                              f"{self.max_tensor_bytes / 2**20:.0f} MiB", kind="quota")
            outs.append(OutputMeta(tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, nbytes, grows))
        if key is not None:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = outs
        return outs

    def _check_inputs(self, info: OpInfo, args, kwargs) -> None:
        ts = flat_tensors(list(args) + list(kwargs.values()), [])
        bound = sum(t.numel() * max(t.dim(), 1) * 8 for t in ts)
        if bound > self.max_tensor_bytes:
            raise OpError(f"{info.op.name()} on inputs this large could exceed this server's per-tensor limit",
                          kind="quota")


def warm_up() -> None:
    """Run the meta kernels that are Python code once: their first call imports ~1 s of torch.

    Then freeze what the imports made (``gc.freeze``): ~300k objects that the cyclic
    collector would otherwise walk at every full collection, stalling every robot. Measured,
    two keypoint robots one after the other (1,300 frames, one core): full collections of
    164-165 ms before, of 1.3-3.7 ms with the freeze (docs/benchmarks.md, "Collector pauses")."""
    x, w, c = (torch.empty(s, device="meta") for s in ((1, 4, 8, 8), (4, 4, 3, 3), (4,)))
    torch.ops.aten.convolution.default(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    torch.ops.aten.native_batch_norm.default(x, c, c, c, c, False, 0.1, 1e-5)
    gc.collect()
    gc.freeze()


def _is_meta_gap(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, NotImplementedError) or "Meta" in text and ("kernel" in text or "backend" in text)


def short_error(e: Exception) -> str:
    """The first line of an exception's message: what a robot is told, never a traceback."""
    return str(e).strip().split("\n")[0][:400]
