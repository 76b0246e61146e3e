"""MoE routing with zero-computation experts (``moe_route``) and grouped SwiGLU experts (``moe_experts``).

Semantics and design: docs/design/longcat_moe.md; usage: docs/ops/moe.md.

Layers:
- routing: ``csrc/cpu/moe_route.cpp`` (cpp), ``csrc/cuda/moe_route.cu`` (cuda), ``kernels/reference/moe.py``;
  registered as ``torch.ops.mmkernels.moe_route`` with a fake and autograd (gradient to the logits through
  the chosen weights and ``zero_weight``);
- experts: ``kernels/triton/moe.py`` (alignment + grouped gather-GEMMs + grouped weight gradients),
  registered as ``torch.ops.mmkernels.moe_experts_fwd_triton`` (+ ``_bwd_triton``) with autograd, and the
  per-expert-loop reference; the split pieces for expert parallelism (``moe_permute``, ``moe_grouped_swiglu``,
  ``moe_unpermute``) as ``torch.ops.mmkernels.moe_permute`` / ``moe_grouped_swiglu_fwd_triton`` (+ ``_bwd_triton``) /
  ``moe_unpermute``, each with a reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._backends import OpBackends, triton_available
from .._config import is_deterministic
from ..kernels.reference.moe import (
    RENORM_EPS,
    keep_weights_in_graph,
    moe_experts_reference,
    moe_experts_reference_backward,
    moe_grouped_swiglu_reference,
    moe_permute_reference,
    moe_route_reference,
    moe_unpermute_reference,
    route_scores,
)
from . import _validate as v
from ._library import define

__all__ = ["MoEPermutation", "MoERouting", "moe_experts", "moe_grouped_swiglu", "moe_permute", "moe_route",
           "moe_unpermute"]

SCORINGS = ("softmax", "sigmoid")
MAX_LOCAL_EXPERTS = 2**24  # moe_permute's num_local_experts: its int32 plan offsets [E+1] (64 MiB) on every call
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs on the reference backend (tests' truth, CPU users)
_KERNEL_ONLY = v.first_arg_dtype_in(KERNEL_DTYPES)


class MoERouting(NamedTuple):
    """What ``moe_route`` returns; ``moe_experts`` takes it as is."""

    topk_ids: torch.Tensor  # int32 [T, K], global expert ids (zero experts are ids >= N)
    topk_weights: torch.Tensor  # fp32 [T, K]: unbiased scores of the picks (renormalised if asked) x scale
    zero_weight: torch.Tensor  # fp32 [T]: sum of the weights on zero-expert slots
    counts: torch.Tensor  # int32 [N+Z]: selections per expert (feed ExpertBiasController.update)


# ---- routing -----------------------------------------------------------------------------------------------------

ROUTE = define(
    "moe_route(Tensor logits, Tensor? bias, int top_k, int num_ffn_experts, str scoring, "
    "float routed_scaling_factor, bool renormalize, int n_groups, int topk_groups) -> "
    "(Tensor topk_weights, Tensor zero_weight, Tensor topk_ids, Tensor counts)"
)
# Float outputs first: opcheck's autograd test sums the outputs into one scalar and trips over an int first.


@torch.library.register_fake(ROUTE)
def _route_fake(logits, bias, top_k, num_ffn_experts, scoring, routed_scaling_factor, renormalize, n_groups,
                topk_groups):
    t, e = logits.shape
    return (logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t,), dtype=torch.float32),
            logits.new_empty((t, top_k), dtype=torch.int32), logits.new_empty((e,), dtype=torch.int32))


def route_backward(logits, topk_ids, grad_weights, grad_zero_weight, num_ffn_experts, scoring, scale, renormalize):
    """d logits from d topk_weights and d zero_weight (the zero slots' weights feed zero_weight)."""
    scores = route_scores(logits, scoring)
    ids = topk_ids.long()
    g = torch.zeros(ids.shape, dtype=scores.dtype, device=logits.device)
    if grad_weights is not None:
        g = g + grad_weights.to(scores.dtype)
    if grad_zero_weight is not None:  # where, not a mask product: zero_weight reads the zero slots only
        g = g + torch.where(ids >= num_ffn_experts, grad_zero_weight.to(scores.dtype)[:, None], 0.0)
    picked = scores.gather(1, ids)
    if renormalize:  # w_k = s p_k / D, D = sum_j p_j over the picks + eps (the forward's denominator)
        denom = picked.sum(-1, keepdim=True) + RENORM_EPS
        d_picked = scale * (g - (g * picked).sum(-1, keepdim=True) / denom) / denom
    else:
        d_picked = scale * g
    d_scores = torch.zeros_like(scores).scatter_add_(1, ids, d_picked)
    if scoring == "softmax":
        d_logits = scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))
    else:
        d_logits = d_scores * scores * (1 - scores)
    return d_logits.to(logits.dtype)


def _route_setup(ctx, inputs, output):
    logits, _, _, num_ffn, scoring, scale, renormalize, _, _ = inputs
    ctx.save_for_backward(logits, output[2])
    ctx.args = (num_ffn, scoring, scale, renormalize)


def _route_autograd_backward(ctx, grad_weights, grad_zero_weight, grad_ids, grad_counts):
    logits, ids = ctx.saved_tensors
    d = route_backward(logits, ids, grad_weights, grad_zero_weight, *ctx.args)
    return d, None, None, None, None, None, None, None, None


torch.library.register_autograd(ROUTE, _route_autograd_backward, setup_context=_route_setup)

ROUTE_BACKENDS = OpBackends("moe_route", auto_order={"cuda": ("cuda", "reference"), "cpu": ("cpp", "reference")})


def _route_cuda_supports(logits, bias, top_k, num_ffn, scoring, scale, renormalize, n_groups, topk_groups):
    """The CUDA kernel keeps a token's scores in one warp's registers."""
    e = logits.shape[1]
    if e > 1024 or top_k > 32 or n_groups > 32:
        return (f"the CUDA kernel takes N+Z <= 1024, top_k <= 32 and n_groups <= 32, got N+Z = {e}, top_k = {top_k}, "
                f"n_groups = {n_groups}")
    return None


@ROUTE_BACKENDS.register("cuda", supports=lambda *a: _KERNEL_ONLY(*a) or _route_cuda_supports(*a))
@ROUTE_BACKENDS.register("cpp", supports=_KERNEL_ONLY)
def _route_native(*args):
    weights, zero_weight, ids, counts = torch.ops.mmkernels.moe_route(*args)
    return ids, weights, zero_weight, counts


@ROUTE_BACKENDS.register("reference")
def _route_reference(logits, bias, top_k, num_ffn, scoring, scale, renormalize, n_groups, topk_groups):
    ids, w, zw, counts = moe_route_reference(logits, bias, top_k, num_ffn, scoring, scale, renormalize, n_groups,
                                             topk_groups)
    return ids, w.float(), zw.float(), counts


def moe_route(
    logits: torch.Tensor,
    *,
    top_k: int,
    num_ffn_experts: int,
    bias: torch.Tensor | None = None,
    scoring: str = "softmax",
    routed_scaling_factor: float = 1.0,
    renormalize: bool = False,
    n_groups: int = 1,
    topk_groups: int = 1,
    backend: str | None = None,
) -> MoERouting:
    """Top-k routing over N FFN experts and Z zero-computation experts, on the device, no host sync.

    ``scores = softmax(logits)`` (or ``sigmoid``) over all N+Z experts in fp32; the top-k of ``scores + bias``
    are chosen (ties go to the lower expert id); ``topk_weights`` are the *unbiased* scores of the picks
    (divided by their sum when ``renormalize``) times ``routed_scaling_factor``; ``zero_weight`` sums the
    weights of picks with id >= N; ``counts`` is the histogram of picks. ``n_groups``/``topk_groups`` give
    DeepSeek-V3's group-limited choice. Gradients reach ``logits`` through the weights and ``zero_weight``.

    Non-finite input gives the same answer on every backend (cpp, cuda, reference):

    - scores are exactly fp32 ``torch.softmax`` / ``torch.sigmoid``: a NaN logit (or, under softmax, a +inf
      logit or a row of -inf) gives NaN scores, which are not hidden: a NaN logit is a broken model;
    - selection order: a NaN ``score + bias`` ranks below every number, -inf included; ties (NaN with NaN too)
      go to the lower expert id; so ids are always valid and equal across backends, and counts follow from them.
      The group-limited choice ranks groups by the sum of their two best values in the same order;
    - renormalisation divides by ``sum + 1e-20`` (as HF's DeepSeek-V3 router), so picks whose scores are all
      zero (sigmoid of -120) get zero weights and zero gradients, never 0/0; the backward uses the same
      denominator;
    - ``zero_weight`` sums the weights of the zero slots only: a NaN there gives NaN, a NaN weight on an FFN
      slot never leaks into it.

    Args:
        logits: [T, N+Z], fp32 / fp16 / bf16 (the router's output; LongCat keeps the router in fp32).
        top_k: K, 1 <= K <= N+Z (K <= 32 and N+Z <= 1024 on the CUDA kernel; larger runs on the reference).
        num_ffn_experts: N (0 <= N <= N+Z).
        bias: optional fp32 [N+Z] selection bias (``ExpertBiasController.bias``).

    Raises:
        TypeError: wrong dtype for logits/bias, or a non-bool ``renormalize``.
        ValueError: wrong shapes, devices or sizes (top_k, num_ffn_experts, n_groups, topk_groups), or an unknown
            ``scoring``.
        mmkernels.BackendError: an explicit ``backend`` that cannot run here, e.g. ``"cuda"`` beyond its limits
            (auto then picks the reference).
    """
    op = "moe_route"
    v.tensor("logits", logits, dtypes=FLOAT_DTYPES, dim=2, op=op)
    e = logits.shape[1]
    if e < 1:
        raise ValueError(f"{op}: logits must have at least one expert column, got shape {tuple(logits.shape)}")
    k = v.integer("top_k", top_k, op=op, low=1, high=e)
    n = v.integer("num_ffn_experts", num_ffn_experts, op=op, low=0, high=e)
    if bias is not None:
        v.tensor("bias", bias, dtypes=(torch.float32,), dim=1, op=op)
        if bias.shape[0] != e:
            raise ValueError(f"{op}: bias must have N+Z = {e} entries like the logits' last dim, got {bias.shape[0]}")
        v.same_device(op, logits=logits, bias=bias)
    v.choice("scoring", scoring, SCORINGS, op=op)
    scale = v.real("routed_scaling_factor", routed_scaling_factor, op=op)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    groups = v.integer("n_groups", n_groups, op=op, low=1, high=e)
    if e % groups:
        raise ValueError(f"{op}: n_groups ({groups}) must divide the number of experts ({e})")
    kept = v.integer("topk_groups", topk_groups, op=op, low=1, high=groups)
    if k > kept * (e // groups):
        raise ValueError(f"{op}: top_k ({k}) exceeds the {kept * (e // groups)} experts of the kept groups")
    args = (logits, bias, k, n, scoring, scale, renormalize, groups, kept)
    _, impl = ROUTE_BACKENDS.select(logits.device, backend, args)
    return MoERouting(*impl(*args))


# ---- experts -----------------------------------------------------------------------------------------------------
#
# moe_experts = moe_unpermute(moe_grouped_swiglu(moe_permute(...))). The split pieces are public for expert
# parallelism (rows cross ranks between them); moe_experts runs the same plan and kernels fused: the first GEMM
# gathers its rows from `hidden` by index (no permuted copy) and the second scales by the routing weight and
# scatter-adds into the output (no [T*K, Dm] buffer). The plan (sort by expert, offsets, tile map) is computed once
# in the forward and saved for the backward.


class MoEPermutation(NamedTuple):
    """The plan ``moe_permute`` returns next to the permuted rows; ``moe_unpermute`` takes it back (no re-sort)."""

    slots: torch.Tensor  # int32 [T*K]: slot t*K + k of each permuted row; undispatched slots last, in slot order
    offsets: torch.Tensor  # int32 [E+1]: local expert e owns rows [offsets[e], offsets[e+1]); offsets[0] = 0


_AUTO = {"cuda": ("triton", "reference"), "cpu": ("reference",)}
EXPERTS_BACKENDS = OpBackends("moe_experts", auto_order=_AUTO)
PERMUTE_BACKENDS = OpBackends("moe_permute", auto_order=_AUTO)
SWIGLU_BACKENDS = OpBackends("moe_grouped_swiglu", auto_order=_AUTO)
UNPERMUTE_BACKENDS = OpBackends("moe_unpermute", auto_order=_AUTO)


# The reference loops over the experts present (data-dependent shapes). Inside torch.compile it runs as one opaque
# registered op, forward and backward, so graphs with it trace without a graph break; eager calls keep plain autograd
# (and with it higher-order gradients).
@torch.library.custom_op("mmkernels::moe_experts_reference", mutates_args=())
def _experts_reference_op(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          zero_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return moe_experts_reference(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down)


@_experts_reference_op.register_fake
def _(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
    return torch.empty_like(hidden)


@torch.library.custom_op("mmkernels::moe_experts_reference_backward", mutates_args=())
def _experts_reference_backward_op(
    grad_out: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
    zero_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_experts_reference_backward(grad_out, hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down)


@_experts_reference_backward_op.register_fake
def _(grad_out, hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
    return tuple(torch.empty_like(t) for t in (hidden, topk_weights, zero_weight, w_gate_up, w_down))


def _experts_reference_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _experts_reference_autograd(ctx, grad_out):
    v.no_double_backward("moe_experts")
    hidden, ids, weights, zero_weight, w_gate_up, w_down = ctx.saved_tensors
    d = torch.ops.mmkernels.moe_experts_reference_backward(grad_out, hidden, ids, weights, zero_weight, w_gate_up,
                                                           w_down)
    return d[0], None, d[1], d[2], d[3], d[4]


_experts_reference_op.register_autograd(_experts_reference_autograd, setup_context=_experts_reference_setup)


@EXPERTS_BACKENDS.register("reference")
def _experts_reference_backend(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
    # Under torch.compile and on the meta device (no data to loop over) the registered op: its fake gives the shape.
    if torch.compiler.is_compiling() or hidden.is_meta:
        return torch.ops.mmkernels.moe_experts_reference(hidden, topk_ids, topk_weights, zero_weight, w_gate_up,
                                                         w_down)
    return moe_experts_reference(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down)

PERMUTE_BACKENDS.register("reference")(moe_permute_reference)
SWIGLU_BACKENDS.register("reference")(moe_grouped_swiglu_reference)
UNPERMUTE_BACKENDS.register("reference")(moe_unpermute_reference)


def _token_sums(rows, order, end, t, k, *, weights=None, init=None, deterministic=False):
    """fp32 [T, C]: ``init`` plus, per token, the sum over its dispatched slots of (weight *) the slot's row.

    ``rows`` [M', C] are in sorted order (row r belongs to slot ``order[r]``); a row is read when ``r < end`` (a 0-d
    device tensor: no host sync) and ``order[r] >= 0`` (``moe_unpermute`` maps out-of-range slots to -1). Rows not
    read and their weights never reach the result (``torch.where``, so NaN there stays out). Deterministic: the rows
    land in a [T*K, C] buffer at their slots (one add onto zero each), then each token sums its K slots in slot
    order; otherwise ``index_add_`` into the tokens (atomics on CUDA)."""
    m, c = rows.shape
    out = init if init is not None else rows.new_zeros((t, c), dtype=torch.float32)
    if m == 0 or t == 0:
        return out
    slot = order[:m].long()
    read = (torch.arange(m, device=rows.device) < end) & (slot >= 0)
    slot = slot.clamp_min(0)
    contrib = rows.float()
    if weights is not None:
        contrib = contrib * weights.reshape(-1)[slot][:, None]
    contrib = torch.where(read[:, None], contrib, 0.0)
    if deterministic:
        # Rows not read go to a spare last row of the buffer, so every real slot gets at most its own row(s).
        target = torch.where(read, slot, t * k)
        buf = contrib.new_zeros((t * k + 1, c)).index_add_(0, target, contrib)
        return out + buf[: t * k].view(t, k, c).sum(1)
    return out.index_add_(0, slot // k, contrib)


if triton_available():
    from ..kernels.triton import moe as tk
    from ._triton_op import triton_op

    def _transposed(w):
        """Strides (expert, k, n) that read expert e's [rows, cols] weight as B_e = W_e^T (y = x @ W_e^T)."""
        return w.stride(0), w.stride(2), w.stride(1)

    def _as_is(w):
        """Strides (expert, k, n) that read W_e itself (y = x @ W_e)."""
        return w.stride(0), w.stride(1), w.stride(2)

    def _groups(a, offsets, tile_expert, tile_row) -> tk.Groups:
        return tk.Groups(offsets, tile_expert, tile_row, tk.block_m(a.dtype))

    def _slots(hidden, topk_weights, order, offsets, tile_expert, tile_row):
        """What both fused experts ops read off the plan: (tile map, token of each sorted row, routing weight of each
        sorted row)."""
        g = _groups(hidden, offsets, tile_expert, tile_row)
        scale = topk_weights.reshape(-1)[order.long()].contiguous()
        return g, order // topk_weights.shape[1], scale

    def _plan(topk_ids, num_experts, expert_offset, dtype):
        """The device-side plan: slots sorted by local expert, offsets, the tile map for ``dtype`` operands."""
        order, offsets = tk.align(topk_ids, num_experts, expert_offset)
        return order, tk.tiles(offsets, order.numel(), tk.block_m(dtype))

    # -- fused moe_experts: plan in, plan saved for the backward --

    def _experts_fake(hidden, topk_weights, zero_weight, w_gate_up, w_down, order, offsets, tile_expert, tile_row,
                      deterministic):
        return torch.empty_like(hidden)

    @triton_op("mmkernels::moe_experts_fwd_triton", mutates_args=(), fake=_experts_fake)
    def _experts_triton(
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        zero_weight: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        order: torch.Tensor,
        offsets: torch.Tensor,
        tile_expert: torch.Tensor,
        tile_row: torch.Tensor,
        deterministic: bool,
    ) -> torch.Tensor:
        wrap = torch.library.wrap_triton
        t, dm = hidden.shape
        k = topk_weights.shape[1]
        di = w_gate_up.shape[1] // 2
        g, token, scale = _slots(hidden, topk_weights, order, offsets, tile_expert, tile_row)
        # SwiGLU intermediate of every dispatched slot, in expert order (rows of other slots never written or read).
        h = hidden.new_empty((t * k, di))
        tk.grouped_gemm(hidden, w_gate_up, _transposed(w_gate_up), h, g, n=di, k=dm, a_index=token, up_offset=di,
                        launch=wrap)
        if deterministic:
            y = hidden.new_empty((t * k, dm), dtype=torch.float32)
            tk.grouped_gemm(h, w_down, _transposed(w_down), y, g, n=dm, k=di, scale=scale, launch=wrap)
            init = hidden.float() * zero_weight[:, None]
            return _token_sums(y, order, offsets[-1], t, k, init=init, deterministic=True).to(hidden.dtype)
        out = hidden.float() * zero_weight[:, None]
        tk.grouped_gemm(h, w_down, _transposed(w_down), out, g, n=dm, k=di, c_index=token, scale=scale, launch=wrap)
        return out.to(hidden.dtype)

    def _experts_backward_fake(grad_out, hidden, topk_weights, zero_weight, w_gate_up, w_down, order, offsets,
                               tile_expert, tile_row, deterministic):
        return (torch.empty_like(hidden), torch.empty_like(topk_weights), torch.empty_like(zero_weight),
                torch.empty_like(w_gate_up), torch.empty_like(w_down))

    @triton_op("mmkernels::moe_experts_bwd_triton", mutates_args=(), fake=_experts_backward_fake)
    def _experts_triton_backward(
        grad_out: torch.Tensor,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        zero_weight: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        order: torch.Tensor,
        offsets: torch.Tensor,
        tile_expert: torch.Tensor,
        tile_row: torch.Tensor,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        wrap = torch.library.wrap_triton
        t, dm = hidden.shape
        k = topk_weights.shape[1]
        di = w_gate_up.shape[1] // 2
        g, token, scale = _slots(hidden, topk_weights, order, offsets, tile_expert, tile_row)
        grad_out = grad_out.contiguous()
        # Recompute gate/up (cheaper in memory than saving them from the forward).
        gu = hidden.new_empty((t * k, 2 * di), dtype=torch.float32)
        tk.grouped_gemm(hidden, w_gate_up, _transposed(w_gate_up), gu, g, n=2 * di, k=dm, a_index=token, launch=wrap)
        gate, up = gu[:, :di], gu[:, di:]
        act = F.silu(gate)
        h = act * up
        # dY_t @ W_down_e, per slot: gives d(weight) = <., h> and d(h) = weight * (.)
        dhp = hidden.new_empty((t * k, di), dtype=torch.float32)
        tk.grouped_gemm(grad_out, w_down, _as_is(w_down), dhp, g, n=di, k=dm, a_index=token, launch=wrap)
        # Rows past offsets[-1] were never written (and their weights never read): where, not a product with 0.
        dispatched = torch.arange(t * k, device=hidden.device) < offsets[-1:].long()
        d_w_sorted = torch.where(dispatched, (dhp * h).sum(-1), 0.0)
        d_weights = torch.zeros(t * k, dtype=torch.float32, device=hidden.device).index_copy_(0, order.long(),
                                                                                               d_w_sorted)
        d_weights = d_weights.view(t, k).to(topk_weights.dtype)
        dh = dhp * scale[:, None]
        sig = torch.sigmoid(gate)
        d_gate = dh * up * sig * (1 + gate * (1 - sig))
        d_gu = torch.cat([d_gate, dh * act], dim=1).to(hidden.dtype)
        # d hidden: identity term, plus d_gu @ W_gate_up_e scattered back to the tokens.
        d_zero = (grad_out.float() * hidden.float()).sum(-1).to(zero_weight.dtype)
        if deterministic:
            dx_rows = hidden.new_empty((t * k, dm), dtype=torch.float32)
            tk.grouped_gemm(d_gu, w_gate_up, _as_is(w_gate_up), dx_rows, g, n=dm, k=2 * di, launch=wrap)
            init = grad_out.float() * zero_weight[:, None]
            d_hidden = _token_sums(dx_rows, order, offsets[-1], t, k, init=init, deterministic=True)
        else:
            d_hidden = grad_out.float() * zero_weight[:, None]
            tk.grouped_gemm(d_gu, w_gate_up, _as_is(w_gate_up), d_hidden, g, n=dm, k=2 * di, c_index=token,
                            launch=wrap)
        d_hidden = d_hidden.to(hidden.dtype)
        d_w_down = torch.empty_like(w_down)
        tk.grouped_wgrad(grad_out, h.to(hidden.dtype), d_w_down, g, a_index=token, scale=scale, launch=wrap)
        d_w_gate_up = torch.empty_like(w_gate_up)
        tk.grouped_wgrad(d_gu, hidden, d_w_gate_up, g, b_index=token, launch=wrap)
        return d_hidden, d_weights, d_zero, d_w_gate_up, d_w_down

    def _experts_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9])  # the plan (order, offsets, tile map) included: not recomputed
        ctx.deterministic = inputs[9]

    def _experts_autograd_backward(ctx, grad_out):
        v.no_double_backward("moe_experts")
        grads = torch.ops.mmkernels.moe_experts_bwd_triton(grad_out, *ctx.saved_tensors, ctx.deterministic)
        return (*grads, None, None, None, None, None)

    _experts_triton.register_autograd(_experts_autograd_backward, setup_context=_experts_setup)

    @EXPERTS_BACKENDS.register("triton", supports=_KERNEL_ONLY)
    def _experts_triton_backend(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
        order, g = _plan(topk_ids, w_gate_up.shape[0], 0, hidden.dtype)
        return torch.ops.mmkernels.moe_experts_fwd_triton(hidden, topk_weights, zero_weight, w_gate_up, w_down,
                                                          order, g.offsets, g.tile_expert, g.tile_row,
                                                          is_deterministic())

    # -- moe_permute: the plan plus the permuted copy of the rows (device-side torch ops, no Triton kernel) --

    def _permute_fake(hidden, topk_ids, num_local_experts, expert_offset, deterministic):
        m = topk_ids.numel()
        return (hidden.new_empty((m, hidden.shape[1])), topk_ids.new_empty((m,), dtype=torch.int32),
                topk_ids.new_empty((num_local_experts + 1,), dtype=torch.int32))

    @torch.library.custom_op("mmkernels::moe_permute", mutates_args=())
    def _permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int, expert_offset: int,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order, offsets = tk.align(topk_ids, num_local_experts, expert_offset)
        m = order.numel()
        rows = hidden.index_select(0, order.long() // topk_ids.shape[1])
        # Rows of undispatched slots are zero (never the token's values: NaN there must not travel on).
        rows.masked_fill_((torch.arange(m, device=rows.device) >= offsets[-1])[:, None], 0)
        return rows, order, offsets

    _permute.register_fake(_permute_fake)

    def _permute_setup(ctx, inputs, output):
        hidden, topk_ids, _, _, deterministic = inputs
        ctx.save_for_backward(output[1], output[2])
        ctx.shape = (hidden.shape[0], topk_ids.shape[1], hidden.dtype, deterministic)

    def _permute_backward(ctx, grad_rows, grad_slots, grad_offsets):
        order, offsets = ctx.saved_tensors
        t, k, dtype, deterministic = ctx.shape
        d = _token_sums(grad_rows, order, offsets[-1], t, k, deterministic=deterministic)
        return d.to(dtype), None, None, None, None

    _permute.register_autograd(_permute_backward, setup_context=_permute_setup)

    @PERMUTE_BACKENDS.register("triton", supports=_KERNEL_ONLY)
    def _permute_backend(hidden, topk_ids, num_local_experts, expert_offset):
        return torch.ops.mmkernels.moe_permute(hidden, topk_ids, num_local_experts, expert_offset, is_deterministic())

    # -- moe_grouped_swiglu: the two grouped GEMMs over permuted rows --

    def _swiglu_fake(rows, offsets, tile_expert, tile_row, w_gate_up, w_down):
        return torch.empty_like(rows)

    @triton_op("mmkernels::moe_grouped_swiglu_fwd_triton", mutates_args=(), fake=_swiglu_fake)
    def _swiglu_triton(
        rows: torch.Tensor,
        offsets: torch.Tensor,
        tile_expert: torch.Tensor,
        tile_row: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> torch.Tensor:
        wrap = torch.library.wrap_triton
        m, dm = rows.shape
        di = w_gate_up.shape[1] // 2
        g = _groups(rows, offsets, tile_expert, tile_row)
        h = rows.new_empty((m, di))
        tk.grouped_gemm(rows, w_gate_up, _transposed(w_gate_up), h, g, n=di, k=dm, up_offset=di, launch=wrap)
        out = rows.new_zeros((m, dm))  # rows outside the groups stay zero
        tk.grouped_gemm(h, w_down, _transposed(w_down), out, g, n=dm, k=di, launch=wrap)
        return out

    def _swiglu_backward_fake(grad_out, rows, offsets, tile_expert, tile_row, w_gate_up, w_down):
        return torch.empty_like(rows), torch.empty_like(w_gate_up), torch.empty_like(w_down)

    @triton_op("mmkernels::moe_grouped_swiglu_bwd_triton", mutates_args=(), fake=_swiglu_backward_fake)
    def _swiglu_triton_backward(
        grad_out: torch.Tensor,
        rows: torch.Tensor,
        offsets: torch.Tensor,
        tile_expert: torch.Tensor,
        tile_row: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wrap = torch.library.wrap_triton
        m, dm = rows.shape
        di = w_gate_up.shape[1] // 2
        g = _groups(rows, offsets, tile_expert, tile_row)
        grad_out = grad_out.contiguous()
        gu = rows.new_empty((m, 2 * di), dtype=torch.float32)  # recomputed; rows outside the groups never touched
        tk.grouped_gemm(rows, w_gate_up, _transposed(w_gate_up), gu, g, n=2 * di, k=dm, launch=wrap)
        gate, up = gu[:, :di], gu[:, di:]
        act = F.silu(gate)
        dh = rows.new_empty((m, di), dtype=torch.float32)
        tk.grouped_gemm(grad_out, w_down, _as_is(w_down), dh, g, n=di, k=dm, launch=wrap)
        sig = torch.sigmoid(gate)
        d_gu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * act], dim=1).to(rows.dtype)
        d_rows = rows.new_zeros((m, dm))
        tk.grouped_gemm(d_gu, w_gate_up, _as_is(w_gate_up), d_rows, g, n=dm, k=2 * di, launch=wrap)
        d_w_down = torch.empty_like(w_down)
        tk.grouped_wgrad(grad_out, (act * up).to(rows.dtype), d_w_down, g, launch=wrap)
        d_w_gate_up = torch.empty_like(w_gate_up)
        tk.grouped_wgrad(d_gu, rows, d_w_gate_up, g, launch=wrap)
        return d_rows, d_w_gate_up, d_w_down

    def _swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _swiglu_autograd_backward(ctx, grad_out):
        v.no_double_backward("moe_grouped_swiglu")
        rows, offsets, tile_expert, tile_row, w_gate_up, w_down = ctx.saved_tensors
        d_rows, d_gu, d_down = torch.ops.mmkernels.moe_grouped_swiglu_bwd_triton(
            grad_out, rows, offsets, tile_expert, tile_row, w_gate_up, w_down)
        return d_rows, None, None, None, d_gu, d_down

    _swiglu_triton.register_autograd(_swiglu_autograd_backward, setup_context=_swiglu_setup)

    @SWIGLU_BACKENDS.register("triton", supports=_KERNEL_ONLY)
    def _swiglu_backend(rows, offsets, w_gate_up, w_down):
        # Same rule as the reference: offsets clamped into [0, M] and made non-decreasing (no out-of-range tile).
        offsets = offsets.long().clamp(0, rows.shape[0]).cummax(0).values.to(torch.int32)
        g = tk.tiles(offsets, rows.shape[0], tk.block_m(rows.dtype))
        return torch.ops.mmkernels.moe_grouped_swiglu_fwd_triton(rows, g.offsets, g.tile_expert, g.tile_row,
                                                                 w_gate_up, w_down)

    # -- moe_unpermute: weights, combine per token, identity term (device-side torch ops) --

    def _unpermute_fake(expert_out, slots, offsets, topk_weights, zero_weight, hidden, deterministic):
        return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]))

    @torch.library.custom_op("mmkernels::moe_unpermute", mutates_args=())
    def _unpermute(expert_out: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, topk_weights: torch.Tensor,
                   zero_weight: torch.Tensor | None, hidden: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
        t, k = topk_weights.shape
        init = hidden.float() * zero_weight[:, None] if hidden is not None else None
        out = _token_sums(expert_out, slots, offsets[-1], t, k, weights=topk_weights, init=init,
                          deterministic=deterministic)
        return out.to(expert_out.dtype)

    _unpermute.register_fake(_unpermute_fake)

    def _unpermute_setup(ctx, inputs, output):
        expert_out, slots, offsets, topk_weights, zero_weight, hidden, _ = inputs
        ctx.save_for_backward(expert_out, slots, offsets, topk_weights, zero_weight, hidden)

    def _unpermute_backward(ctx, grad_out):
        expert_out, slots, offsets, topk_weights, zero_weight, hidden = ctx.saved_tensors
        t, k = topk_weights.shape
        m = expert_out.shape[0]
        g = grad_out.float()
        slot = slots[:m].long()
        # Read rows: dispatched (r < offsets[-1]) with a slot (moe_unpermute maps out-of-range slots to -1).
        read = (torch.arange(m, device=g.device) < offsets[-1]) & (slot >= 0)
        slot = slot.clamp_min(0)
        g_rows = g[slot // k]
        w = topk_weights.reshape(-1)[slot].float()
        # where, not a product with 0: undispatched rows and their weights may hold NaN/inf.
        d_out = torch.where(read[:, None], g_rows * w[:, None], 0.0).to(expert_out.dtype)
        d_w_rows = torch.where(read, (g_rows * expert_out.float()).sum(-1), 0.0)
        d_weights = torch.zeros(t * k + 1, dtype=torch.float32, device=g.device).index_add_(
            0, torch.where(read, slot, t * k), d_w_rows)  # rows not read land in a spare last entry
        d_weights = d_weights[: t * k].view(t, k).to(topk_weights.dtype)
        d_zero = d_hidden = None
        if hidden is not None:
            d_zero = (g * hidden.float()).sum(-1).to(zero_weight.dtype)
            d_hidden = (g * zero_weight.float()[:, None]).to(hidden.dtype)
        return d_out, None, None, d_weights, d_zero, d_hidden, None

    _unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)

    @UNPERMUTE_BACKENDS.register("triton", supports=_KERNEL_ONLY)
    def _unpermute_backend(expert_out, slots, offsets, topk_weights, zero_weight, hidden):
        return torch.ops.mmkernels.moe_unpermute(expert_out, slots, offsets, topk_weights, zero_weight, hidden,
                                                 is_deterministic())


def _check_routing(op, t, topk_ids, topk_weights, zero_weight):
    v.tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), dim=2, op=op)
    v.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, op=op)
    v.tensor("zero_weight", zero_weight, dtypes=(torch.float32,), dim=1, op=op)
    if topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{op}: topk_ids and topk_weights must both be [T={t}, K], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if tuple(zero_weight.shape) != (t,):
        raise ValueError(f"{op}: zero_weight must be [T={t}], got {tuple(zero_weight.shape)}")


def _check_experts(op, dm, dtype, w_gate_up, w_down) -> tuple[int, int]:
    """(E, Di) of the weights ``w_gate_up`` [E, 2*Di, Dm] and ``w_down`` [E, Dm, Di]."""
    v.tensor("w_gate_up", w_gate_up, dtypes=(dtype,), dim=3, op=op)
    v.tensor("w_down", w_down, dtypes=(dtype,), dim=3, op=op)
    n, two_di, dm_w = w_gate_up.shape
    if two_di % 2 or dm_w != dm:
        raise ValueError(f"{op}: w_gate_up must be [N, 2*Di, Dm={dm}], got {tuple(w_gate_up.shape)}")
    di = two_di // 2
    if tuple(w_down.shape) != (n, dm, di):
        raise ValueError(f"{op}: w_down must be [N, Dm, Di] = {(n, dm, di)}, got {tuple(w_down.shape)}")
    return n, di


def moe_experts(
    hidden: torch.Tensor,
    routing: MoERouting | tuple,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU experts with zero-computation experts.

    ``y_t = sum_{k: 0<=id<N} w_tk * down_e(silu(gate_e x_t) * up_e x_t) + zero_weight_t * x_t``; dropless, no
    capacity factor. Differentiable in ``hidden``, both weights, ``routing.topk_weights`` and
    ``routing.zero_weight``. ``mmkernels.set_deterministic(True)`` replaces the atomic scatter-add with an ordered
    combine (bitwise reproducible, more memory).

    Slots that are not dispatched: a slot whose id is >= N (a zero expert, ids in [N, N+Z), whose term arrives
    through ``zero_weight``, or any larger id) or negative (-1: expert parallelism's "not mine") goes to no
    expert GEMM and contributes nothing; its ``topk_weights`` entry is never read (NaN there stays out of the output
    and every gradient) and gets gradient 0. Every backend applies this rule; no host sync is added.

    The composition of the split pieces: ``rows, perm = moe_permute(hidden, topk_ids, num_local_experts=N)``,
    ``moe_unpermute(moe_grouped_swiglu(rows, perm.offsets, w_gate_up, w_down), perm, topk_weights,
    zero_weight=zero_weight, hidden=hidden)``; the Triton path runs the same plan and kernels fused (no permuted
    copy of the rows, weights and scatter-add in the second GEMM's epilogue).

    Args:
        hidden: [T, Dm] fp32 / fp16 / bf16.
        routing: a ``MoERouting`` (or (topk_ids, topk_weights, zero_weight[, counts])): ``topk_ids`` int32 or int64
            [T, K], ``topk_weights`` fp32 [T, K], ``zero_weight`` fp32 [T].
        w_gate_up: [N, 2*Di, Dm], rows [:Di] gate and [Di:] up (the HF LongCat layout), same dtype as hidden.
        w_down: [N, Dm, Di].

    Returns:
        [T, Dm] in ``hidden``'s dtype.

    Raises:
        TypeError / ValueError: wrong types, dtypes, dimensions, shapes or devices (the message names the argument).
    """
    op = "moe_experts"
    v.tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dim=2, op=op)
    if not isinstance(routing, tuple) or len(routing) not in (3, 4):
        raise TypeError(f"{op}: routing must be a MoERouting (or a (topk_ids, topk_weights, zero_weight) tuple)")
    topk_ids, topk_weights, zero_weight = routing[:3]
    t, dm = hidden.shape
    _check_routing(op, t, topk_ids, topk_weights, zero_weight)
    n, _ = _check_experts(op, dm, hidden.dtype, w_gate_up, w_down)
    v.same_device(op, hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, zero_weight=zero_weight,
                  w_gate_up=w_gate_up, w_down=w_down)
    if t == 0 or n == 0:  # nothing to dispatch: only the identity term (keeps autograd to hidden/zero_weight), and
        # the expert weights get zero gradients (never None)
        return keep_weights_in_graph((hidden.float() * zero_weight[:, None]).to(hidden.dtype), w_gate_up, w_down)
    name, impl = EXPERTS_BACKENDS.select(hidden.device, backend, (hidden,))
    if name == "triton":
        hidden, w_gate_up, w_down = hidden.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    return impl(hidden, topk_ids, topk_weights.contiguous(), zero_weight.contiguous(), w_gate_up, w_down)


def moe_permute(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_local_experts: int,
    expert_offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, MoEPermutation]:
    """Dispatch plan and permuted rows (Megatron's ``permute``): the token rows of every slot routed to one of the
    local experts ``[expert_offset, expert_offset + E)``, grouped by expert, on the device, no host sync.

    A slot (t, k) is dispatched when ``expert_offset <= topk_ids[t, k] < expert_offset + E``; zero experts, other
    ranks' experts, negative ids (-1) and ids past the range are not. Rows come out in expert order, each
    expert's slots in slot order (slot = t*K + k), so with ``expert_offset=0, num_local_experts=N`` the rows are
    grouped by destination rank as well (rank r owns a contiguous block of experts). The output is sized for the
    worst case, T*K rows: rows ``>= perm.offsets[-1]`` belong to undispatched slots and are zero.

    Args:
        hidden: [T, Dm] fp32 / fp16 / bf16.
        topk_ids: int32 or int64 [T, K] global expert ids (``MoERouting.topk_ids``, or received ids with K = 1).
        num_local_experts: E, 0 <= E <= 2**24 (``MAX_LOCAL_EXPERTS``: the plan ``offsets`` [E+1] is allocated on
            every call, so E is capped at 64 MiB of it, far past any real model's experts per rank; larger is a
            ``ValueError`` naming the argument, not an out-of-memory error).
        expert_offset: global id of local expert 0, 0 <= offset <= 2**62.

    Returns:
        ``(rows, perm)``: rows [T*K, Dm] in ``hidden``'s dtype; ``perm`` a ``MoEPermutation`` with ``slots`` int32
        [T*K] (the slot of each row; undispatched slots last, in slot order) and ``offsets`` int32 [E+1]
        (expert e owns rows ``[offsets[e], offsets[e+1])``; ``offsets[E]`` = rows dispatched). Differentiable in
        ``hidden`` (its gradient sums each token's dispatched rows).

    Raises:
        TypeError / ValueError: wrong types, dtypes, dimensions, shapes or devices.
    """
    op = "moe_permute"
    v.tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dim=2, op=op)
    v.tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), dim=2, op=op)
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: topk_ids must be [T={hidden.shape[0]}, K], got {tuple(topk_ids.shape)}")
    # Bounds of the plan (offsets [E+1], allocated per call: MAX_LOCAL_EXPERTS keeps it <= 64 MiB) and of int64 id
    # arithmetic (id - expert_offset).
    e = v.integer("num_local_experts", num_local_experts, op=op, low=0, high=MAX_LOCAL_EXPERTS)
    offset = v.integer("expert_offset", expert_offset, op=op, low=0, high=2**62)
    v.same_device(op, hidden=hidden, topk_ids=topk_ids)
    _, impl = PERMUTE_BACKENDS.select(hidden.device, backend, (hidden,))
    rows, slots, offsets = impl(hidden, topk_ids, e, offset)
    return rows, MoEPermutation(slots, offsets)


def moe_grouped_swiglu(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU FFN over rows already grouped by expert (``moe_permute``'s rows, or rows received from other
    ranks and permuted again): ``out[r] = down_e(silu(gate_e rows[r]) * up_e rows[r])`` for the rows
    ``[offsets[e], offsets[e+1])`` of expert e. Rows outside every group are not read (NaN there stays out) and
    come out zero. No routing weights: ``moe_unpermute`` applies them.

    ``offsets`` is used as clamped into [0, M] and made non-decreasing (on the device: no host sync), so a bad
    offset never reads out of bounds.

    Args:
        rows: [M, Dm] fp32 / fp16 / bf16.
        offsets: int32 or int64 [E+1] (``MoEPermutation.offsets``).
        w_gate_up: [E, 2*Di, Dm] (rows [:Di] gate, [Di:] up), same dtype as ``rows``.
        w_down: [E, Dm, Di].

    Returns:
        [M, Dm] in ``rows``' dtype. Differentiable in ``rows`` and both weights.

    Raises:
        TypeError / ValueError: wrong types, dtypes, dimensions, shapes or devices.
    """
    op = "moe_grouped_swiglu"
    v.tensor("rows", rows, dtypes=FLOAT_DTYPES, dim=2, op=op)
    v.tensor("offsets", offsets, dtypes=(torch.int32, torch.int64), dim=1, op=op)
    e, _ = _check_experts(op, rows.shape[1], rows.dtype, w_gate_up, w_down)
    if offsets.shape[0] != e + 1:
        raise ValueError(f"{op}: offsets must have E+1 = {e + 1} entries (E = w_gate_up.shape[0]), "
                         f"got {offsets.shape[0]}")
    v.same_device(op, rows=rows, offsets=offsets, w_gate_up=w_gate_up, w_down=w_down)
    name, impl = SWIGLU_BACKENDS.select(rows.device, backend, (rows,))
    if name == "triton":
        rows, w_gate_up, w_down = rows.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    return impl(rows, offsets, w_gate_up, w_down)


def moe_unpermute(
    expert_out: torch.Tensor,
    permutation: MoEPermutation | tuple,
    topk_weights: torch.Tensor,
    *,
    zero_weight: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Combine (Megatron's ``unpermute``): ``y_t = sum_k w_tk * expert_out[row of slot (t, k)] (+ zero_weight_t *
    hidden_t)`` over the dispatched slots of ``permutation`` (``moe_permute``'s, reused: no second sort).

    ``expert_out`` may have fewer rows than T*K (for instance only the dispatched rows, received back from other
    ranks): row r is read when ``r < offsets[-1]`` (``offsets[-1]`` clamped into [0, M]: a negative one reads no row)
    and ``permutation.slots[r]`` is a slot, in [0, T*K) (a row whose slot is negative or >= T*K names no token and is
    not read: the rule of out-of-range routing ids, on every backend, no host sync; int64 slots are never narrowed).
    Undispatched slots contribute nothing, their ``topk_weights`` entries are never read and get gradient 0.
    ``set_deterministic(True)``: each token sums its slots in slot order (bitwise reproducible) instead of a
    scatter-add.

    Args:
        expert_out: [M, C] fp32 / fp16 / bf16, M <= T*K, rows in ``permutation``'s order.
        permutation: a ``MoEPermutation`` (or a (slots, offsets) tuple) from ``moe_permute``.
        topk_weights: fp32 [T, K] routing weights.
        zero_weight: fp32 [T], with ``hidden`` [T, C] (``expert_out``'s dtype): adds the zero-expert term. Give
            both or neither.

    Returns:
        [T, C] in ``expert_out``'s dtype, accumulated in fp32. Differentiable in ``expert_out``, ``topk_weights``,
        ``zero_weight`` and ``hidden``.

    Raises:
        TypeError / ValueError: wrong types, dtypes, dimensions, shapes or devices.
    """
    op = "moe_unpermute"
    v.tensor("expert_out", expert_out, dtypes=FLOAT_DTYPES, dim=2, op=op)
    if not isinstance(permutation, tuple) or len(permutation) != 2:
        raise TypeError(f"{op}: permutation must be a MoEPermutation (or a (slots, offsets) tuple)")
    slots, offsets = permutation
    v.tensor("slots", slots, dtypes=(torch.int32, torch.int64), dim=1, op=op)
    v.tensor("offsets", offsets, dtypes=(torch.int32, torch.int64), dim=1, op=op)
    v.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, op=op)
    t, k = topk_weights.shape
    m, c = expert_out.shape
    if slots.shape[0] != t * k:
        raise ValueError(f"{op}: permutation.slots must have T*K = {t * k} entries (topk_weights is {[t, k]}), "
                         f"got {slots.shape[0]}")
    if offsets.shape[0] < 1:
        raise ValueError(f"{op}: permutation.offsets must have E+1 >= 1 entries")
    if m > t * k:
        raise ValueError(f"{op}: expert_out has {m} rows, more than the T*K = {t * k} slots")
    if (zero_weight is None) != (hidden is None):
        raise ValueError(f"{op}: give zero_weight and hidden together (the zero-expert term), or neither")
    tensors = dict(expert_out=expert_out, slots=slots, offsets=offsets, topk_weights=topk_weights)
    if hidden is not None:
        v.tensor("zero_weight", zero_weight, dtypes=(torch.float32,), dim=1, op=op)
        v.tensor("hidden", hidden, dtypes=(expert_out.dtype,), dim=2, op=op)
        if tuple(zero_weight.shape) != (t,) or tuple(hidden.shape) != (t, c):
            raise ValueError(f"{op}: zero_weight must be [T={t}] and hidden [T, C] = {[t, c]}, got "
                             f"{list(zero_weight.shape)} and {list(hidden.shape)}")
        tensors.update(zero_weight=zero_weight, hidden=hidden)
    v.same_device(op, **tensors)
    name, impl = UNPERMUTE_BACKENDS.select(expert_out.device, backend, (expert_out,))
    # One rule for every backend, on the device (no host sync): a slot outside [0, T*K) names no (token, k), so its
    # row is not read, like an undispatched one; it becomes -1 before any narrowing to int32 (an int64 slot 2**32 is
    # not slot 0).
    slots = torch.where((slots >= 0) & (slots < t * k), slots, -1)
    if name == "triton":
        slots, offsets = slots.to(torch.int32).contiguous(), offsets.contiguous()
        topk_weights = topk_weights.contiguous()
    return impl(expert_out, slots, offsets, topk_weights, zero_weight, hidden)
