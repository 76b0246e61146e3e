"""``moe_grouped_swiglu``: the grouped SwiGLU FFN over rows already grouped by expert (the middle split MoE piece).

Layers: ``kernels/triton/moe_ffn.py`` (the FFN sequence, forward and backward, shared with ``moe_experts``),
registered as ``torch.ops.mmkernels.moe_grouped_swiglu_fwd_triton`` (+ ``_bwd_triton``); the per-expert loop of
``kernels/reference/moe.py`` (reference).
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from ..kernels.reference.moe import moe_grouped_swiglu_reference
from . import _validate as v
from .moe_common import AUTO, FLOAT_DTYPES, KERNEL_ONLY, check_experts

__all__ = ["SWIGLU_BACKENDS", "moe_grouped_swiglu"]

SWIGLU_BACKENDS = OpBackends("moe_grouped_swiglu", auto_order=AUTO)
SWIGLU_BACKENDS.register("reference", batch_invariant=True)(moe_grouped_swiglu_reference)


if triton_available():
    from ..kernels.triton import moe as tk
    from ..kernels.triton.moe_ffn import swiglu_ffn_backward, swiglu_ffn_forward
    from ._triton_op import triton_op

    def _groups(rows, offsets, tile_expert, tile_row):
        return tk.Groups(offsets, tile_expert, tile_row, tk.block_m(rows.dtype))

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
        out = rows.new_zeros(rows.shape)  # rows outside the groups stay zero
        return swiglu_ffn_forward(rows, w_gate_up, w_down, _groups(rows, offsets, tile_expert, tile_row), out,
                                  rows=rows.shape[0], launch=torch.library.wrap_triton)

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
        d_rows = rows.new_zeros(rows.shape)  # rows outside the groups get zero
        d_rows, d_w_gate_up, d_w_down, _ = swiglu_ffn_backward(
            grad_out.contiguous(), rows, w_gate_up, w_down, _groups(rows, offsets, tile_expert, tile_row), d_rows,
            rows=rows.shape[0], launch=torch.library.wrap_triton)
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

    @SWIGLU_BACKENDS.register("triton", supports=KERNEL_ONLY, batch_invariant=True)
    def _swiglu_backend(rows, offsets, w_gate_up, w_down):
        # Same rule as the reference: offsets clamped into [0, M] and made non-decreasing (no out-of-range tile).
        offsets = offsets.long().clamp(0, rows.shape[0]).cummax(0).values.to(torch.int32)
        g = tk.tiles(offsets, rows.shape[0], tk.block_m(rows.dtype))
        return torch.ops.mmkernels.moe_grouped_swiglu_fwd_triton(rows, g.offsets, g.tile_expert, g.tile_row,
                                                                 w_gate_up, w_down)


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
    e, _ = check_experts(op, rows.shape[1], rows.dtype, w_gate_up, w_down)
    if offsets.shape[0] != e + 1:
        raise ValueError(f"{op}: offsets must have E+1 = {e + 1} entries (E = w_gate_up.shape[0]), "
                         f"got {offsets.shape[0]}")
    v.same_device(op, rows=rows, offsets=offsets, w_gate_up=w_gate_up, w_down=w_down)
    name, impl = SWIGLU_BACKENDS.select(rows.device, backend, (rows,))
    if name == "triton":
        rows, w_gate_up, w_down = rows.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    return impl(rows, offsets, w_gate_up, w_down)


