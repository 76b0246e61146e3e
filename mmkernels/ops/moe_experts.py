"""``moe_experts``: grouped SwiGLU experts with zero-computation experts (docs/ops/moe.md).

``moe_experts = moe_unpermute(moe_grouped_swiglu(moe_permute(...)))``; the split pieces are public for expert
parallelism (rows cross ranks between them). This op runs the same plan and kernel sequence fused: the first GEMM
gathers its rows from ``hidden`` by index (no permuted copy) and the second scales by the routing weight and
scatter-adds into the output (no [T*K, Dm] buffer). The plan (sort by expert, offsets, tile map) is computed once
in the forward and saved for the backward.

Layers: ``kernels/triton/moe_ffn.py`` (the FFN sequence, forward and backward, over ``kernels/triton/moe.py``'s
grouped GEMMs), registered as ``torch.ops.mmkernels.moe_experts_fwd_triton`` (+ ``_bwd_triton``); the per-expert
loop of ``kernels/reference/moe.py``, registered as ``torch.ops.mmkernels.moe_experts_reference`` (+ backward) for
torch.compile.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from .._config import is_deterministic
from ..kernels.reference.moe import keep_weights_in_graph, moe_experts_reference, moe_experts_reference_backward
from . import _validate as v
from .moe_common import AUTO, FLOAT_DTYPES, KERNEL_ONLY, MoERouting, check_experts, check_routing

__all__ = ["EXPERTS_BACKENDS", "moe_experts"]

EXPERTS_BACKENDS = OpBackends("moe_experts", auto_order=AUTO)

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


@EXPERTS_BACKENDS.register("reference", batch_invariant=True)
def _experts_reference_backend(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
    # Under torch.compile and on the meta device (no data to loop over) the registered op: its fake gives the shape.
    if torch.compiler.is_compiling() or hidden.is_meta:
        return torch.ops.mmkernels.moe_experts_reference(hidden, topk_ids, topk_weights, zero_weight, w_gate_up,
                                                         w_down)
    return moe_experts_reference(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down)


if triton_available():
    from ..kernels.triton import moe as tk
    from ..kernels.triton.moe_ffn import swiglu_ffn_backward, swiglu_ffn_forward
    from ..kernels.triton.moe_permute import token_sums
    from ._triton_op import triton_op

    def _plan_maps(hidden, topk_weights, order, offsets, tile_expert, tile_row):
        """What both fused ops read off the saved plan: (tile map, token of each sorted row, routing weight of each
        sorted row)."""
        g = tk.Groups(offsets, tile_expert, tile_row, tk.block_m(hidden.dtype))
        scale = topk_weights.reshape(-1)[order.long()].contiguous()
        return g, order // topk_weights.shape[1], scale

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
        g, token, scale = _plan_maps(hidden, topk_weights, order, offsets, tile_expert, tile_row)
        out = hidden.float() * zero_weight[:, None]
        if deterministic:  # weighted rows per slot, then each token sums its slots in slot order
            y = hidden.new_empty((t * k, dm), dtype=torch.float32)
            swiglu_ffn_forward(hidden, w_gate_up, w_down, g, y, rows=t * k, a_index=token, scale=scale, launch=wrap)
            return token_sums(y, order, offsets[-1:], t, k, init=out, deterministic=True, launch=wrap).to(hidden.dtype)
        swiglu_ffn_forward(hidden, w_gate_up, w_down, g, out, rows=t * k, a_index=token, c_index=token, scale=scale,
                           launch=wrap)
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
        g, token, scale = _plan_maps(hidden, topk_weights, order, offsets, tile_expert, tile_row)
        grad_out = grad_out.contiguous()
        d_zero = (grad_out.float() * hidden.float()).sum(-1).to(zero_weight.dtype)
        init = grad_out.float() * zero_weight[:, None]  # the identity term's share of d hidden
        if deterministic:
            rows = hidden.new_empty((t * k, dm), dtype=torch.float32)
            _, d_w_gate_up, d_w_down, d_scale = swiglu_ffn_backward(grad_out, hidden, w_gate_up, w_down, g, rows,
                                                                    rows=t * k, a_index=token, scale=scale,
                                                                    launch=wrap)
            d_hidden = token_sums(rows, order, offsets[-1:], t, k, init=init, deterministic=True, launch=wrap)
        else:
            d_hidden, d_w_gate_up, d_w_down, d_scale = swiglu_ffn_backward(
                grad_out, hidden, w_gate_up, w_down, g, init, rows=t * k, a_index=token, c_index=token, scale=scale,
                launch=wrap)
        # Rows past offsets[-1] were never written (and their weights never read): where, not a product with 0.
        dispatched = torch.arange(t * k, device=hidden.device) < offsets[-1:].long()
        d_w_sorted = torch.where(dispatched, d_scale, 0.0)
        d_weights = torch.zeros(t * k, dtype=torch.float32, device=hidden.device).index_copy_(0, order.long(),
                                                                                               d_w_sorted)
        d_weights = d_weights.view(t, k).to(topk_weights.dtype)
        return d_hidden.to(hidden.dtype), d_weights, d_zero, d_w_gate_up, d_w_down

    def _experts_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9])  # the plan (order, offsets, tile map) included: not recomputed
        ctx.deterministic = inputs[9]

    def _experts_autograd_backward(ctx, grad_out):
        v.no_double_backward("moe_experts")
        grads = torch.ops.mmkernels.moe_experts_bwd_triton(grad_out, *ctx.saved_tensors, ctx.deterministic)
        return (*grads, None, None, None, None, None)

    _experts_triton.register_autograd(_experts_autograd_backward, setup_context=_experts_setup)

    @EXPERTS_BACKENDS.register("triton", supports=KERNEL_ONLY, batch_invariant=True)
    def _experts_triton_backend(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
        order, offsets = tk.align(topk_ids, w_gate_up.shape[0], 0)
        g = tk.tiles(offsets, order.numel(), tk.block_m(hidden.dtype))
        return torch.ops.mmkernels.moe_experts_fwd_triton(hidden, topk_weights, zero_weight, w_gate_up, w_down,
                                                          order, g.offsets, g.tile_expert, g.tile_row,
                                                          is_deterministic())


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
    check_routing(op, t, topk_ids, topk_weights, zero_weight)
    n, _ = check_experts(op, dm, hidden.dtype, w_gate_up, w_down)
    v.same_device(op, hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, zero_weight=zero_weight,
                  w_gate_up=w_gate_up, w_down=w_down)
    if t == 0 or n == 0:  # nothing to dispatch: only the identity term (keeps autograd to hidden/zero_weight), and
        # the expert weights get zero gradients (never None)
        return keep_weights_in_graph((hidden.float() * zero_weight[:, None]).to(hidden.dtype), w_gate_up, w_down)
    name, impl = EXPERTS_BACKENDS.select(hidden.device, backend, (hidden,))
    if name == "triton":
        hidden, w_gate_up, w_down = hidden.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    return impl(hidden, topk_ids, topk_weights.contiguous(), zero_weight.contiguous(), w_gate_up, w_down)
