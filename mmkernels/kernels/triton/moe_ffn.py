"""The grouped SwiGLU FFN as one kernel-layer sequence, forward and backward, for every MoE op that runs it.

``moe_experts`` (rows gathered from ``hidden`` by token, weighted and scattered back into the tokens) and
``moe_grouped_swiglu`` (rows already permuted, no weights) run the same GEMM sequence; only the row maps differ:

- ``a_index`` [M]: the source row of each sorted row (the token of a slot) or None (row r is row r);
- ``scale`` [M]: the routing weight of each sorted row, or None;
- forward ``out``: ``c_index`` scatters (atomics) into the tokens, else row r of ``out`` is written.

Forward: ``h = silu(x W_g^T) * (x W_u^T)`` in the gated GEMM's epilogue, then ``(scale *) h W_d^T``.
Backward: gate/up recomputed by one GEMM (cheaper in memory than saving them), ``dY W_d`` by a second, the SwiGLU
derivative once (:func:`swiglu_backward`), then the input gradient and the two grouped weight gradients. The
derivative is fp32 elementwise work between the GEMMs: ``tests/ops/test_moe_experts.py`` pins the path bit for bit
to its PyTorch arithmetic (``F.silu``, ``torch.sigmoid``), which a GEMM epilogue (Triton's ``exp``) would not
reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import moe as tk

__all__ = ["swiglu_backward", "swiglu_ffn_backward", "swiglu_ffn_forward"]


def transposed(w: torch.Tensor) -> tuple[int, int, int]:
    """Strides (expert, k, n) that read expert e's [rows, cols] weight as B_e = W_e^T (y = x @ W_e^T)."""
    return w.stride(0), w.stride(2), w.stride(1)


def as_is(w: torch.Tensor) -> tuple[int, int, int]:
    """Strides (expert, k, n) that read W_e itself (y = x @ W_e)."""
    return w.stride(0), w.stride(1), w.stride(2)


def swiglu_backward(gu: torch.Tensor, dh: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The SwiGLU derivative, the one place it is written: from fp32 ``gu = [gate | up]`` [M, 2Di] and ``dh`` =
    dL/dh [M, Di], returns (``d_gu = [dh * up * silu'(gate) | dh * silu(gate)]`` in ``dtype``, ``h = silu(gate) *
    up`` in fp32)."""
    di = dh.shape[1]
    gate, up = gu[:, :di], gu[:, di:]
    act = F.silu(gate)
    sig = torch.sigmoid(gate)
    d_gu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * act], dim=1).to(dtype)
    return d_gu, act * up


def swiglu_ffn_forward(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, g: tk.Groups, out: torch.Tensor,
                       *, rows: int, a_index: torch.Tensor | None = None, c_index: torch.Tensor | None = None,
                       scale: torch.Tensor | None = None, launch=None) -> torch.Tensor:
    """``out[(c_index[r] or r)] (+)= (scale[r] *) down_e(silu(gate_e x_r) * up_e x_r)`` over the ``rows`` sorted rows
    of ``g``'s tiles (x row ``a_index[r]`` or r). Rows outside every tile are not written."""
    dm = x.shape[1]
    di = w_gate_up.shape[1] // 2
    h = x.new_empty((rows, di))  # rows of other slots never written or read
    tk.grouped_gemm(x, w_gate_up, transposed(w_gate_up), h, g, n=di, k=dm, a_index=a_index, up_offset=di,
                    launch=launch)
    tk.grouped_gemm(h, w_down, transposed(w_down), out, g, n=dm, k=di, c_index=c_index, scale=scale, launch=launch)
    return out


def swiglu_ffn_backward(grad_out: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                        g: tk.Groups, d_x: torch.Tensor, *, rows: int, a_index: torch.Tensor | None = None,
                        c_index: torch.Tensor | None = None, scale: torch.Tensor | None = None, launch=None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`swiglu_ffn_forward` with ``grad_out`` dL/d out (read at row ``a_index[r]`` or r).

    ``d_gu @ W_gu`` of each sorted row is added into ``d_x`` at ``c_index[r]`` (atomics), or written to row r of
    ``d_x`` without ``c_index`` (a caller that needs a deterministic sum passes a [rows, Dm] buffer and sums it).
    Returns (``d_x``, d ``w_gate_up``, d ``w_down``, and with ``scale`` the fp32 [rows] dL/d scale of each sorted
    row, garbage on rows outside the tiles: mask them)."""
    dm = x.shape[1]
    di = w_gate_up.shape[1] // 2
    gu = x.new_empty((rows, 2 * di), dtype=torch.float32)
    tk.grouped_gemm(x, w_gate_up, transposed(w_gate_up), gu, g, n=2 * di, k=dm, a_index=a_index, launch=launch)
    dhp = x.new_empty((rows, di), dtype=torch.float32)  # dY W_d per sorted row, before the routing weight
    tk.grouped_gemm(grad_out, w_down, as_is(w_down), dhp, g, n=di, k=dm, a_index=a_index, launch=launch)
    d_gu, h = swiglu_backward(gu, dhp * scale[:, None] if scale is not None else dhp, x.dtype)
    d_scale = (dhp * h).sum(-1) if scale is not None else None
    tk.grouped_gemm(d_gu, w_gate_up, as_is(w_gate_up), d_x, g, n=dm, k=2 * di, c_index=c_index, launch=launch)
    d_w_down = torch.empty_like(w_down)
    tk.grouped_wgrad(grad_out, h.to(x.dtype), d_w_down, g, a_index=a_index, scale=scale, launch=launch)
    d_w_gate_up = torch.empty_like(w_gate_up)
    tk.grouped_wgrad(d_gu, x, d_w_gate_up, g, b_index=a_index, launch=launch)
    return d_x, d_w_gate_up, d_w_down, d_scale
