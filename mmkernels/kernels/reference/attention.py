"""Plain-PyTorch attention: the tests' baseline, the benchmarks' reference and the CPU backend.

Same semantics as the Triton kernels (see ``mmkernels.ops.attention``): layout ``[B, L, H, D]`` (or varlen
``[total, H, D]`` with ``cu_seqlens``), GQA by head grouping (query head ``h`` reads key/value head
``h // (Hq // Hkv)``), causal masks aligned to the bottom-right corner when ``Lq != Lk``, and query rows that see
no key (causal with ``Lq > Lk``) give zeros. Differentiable through PyTorch autograd.

It materialises the ``[B, H, Lq, Lk]`` score matrix: fine for tests and as a baseline, not for long sequences.
"""

from __future__ import annotations

import torch

__all__ = ["attention_reference", "attention_reference_with_lse"]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, upcast: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> (out [B, Lq, Hq, D] in q's dtype, lse [B, Hq, Lq] in the math dtype)."""
    out_dtype = q.dtype
    if upcast:
        math_dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    lq, lk = q.shape[1], k.shape[1]
    group = q.shape[2] // max(k.shape[2], 1)
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        rows = torch.arange(lq, device=q.device)[:, None]
        cols = torch.arange(lk, device=q.device)[None, :]
        visible = cols <= rows + (lk - lq)  # bottom-right aligned, as flash-attn >= 2.1
        scores = scores.masked_fill(~visible, float("-inf"))
    # Softmax that gives zeros (and zero gradients) for rows with no visible key, instead of NaN.
    row_max = scores.amax(dim=-1, keepdim=True) if lk > 0 else scores.sum(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    lse = torch.where(denom.squeeze(-1) == 0, torch.full_like(lse, float("inf")), lse)
    return out.to(out_dtype), lse


def attention_reference_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp (natural log, ``+inf`` for rows that see no key).

    ``upcast=True`` (the default, and the backend's behaviour) computes in float32 (float64 stays float64) and
    returns the output in the input dtype; ``upcast=False`` computes in the input dtype, which is the "same-dtype
    PyTorch reference" of the flash-attn accuracy rule. The lse has the layout of the Triton op: ``[B, Hq, Lq]``
    dense, ``[Hq, total_q]`` varlen. ``max_seqlen_*`` are accepted for signature compatibility and ignored.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_q is None:
        return _dense(q, k, v, causal, scale, upcast)
    # varlen: one dense call per sequence (reads cu_seqlens on the host).
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(bounds_q) - 1):
        qs, qe = bounds_q[i], bounds_q[i + 1]
        ks, ke = bounds_k[i], bounds_k[i + 1]
        o, lse = _dense(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, scale, upcast)
        outs.append(o[0])
        lses.append(lse[0])
    if not outs:
        math_dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
        return q.new_zeros(q.shape), q.new_zeros((q.shape[1], 0), dtype=math_dtype)
    out = torch.cat(outs, dim=0)
    lse = torch.cat(lses, dim=1)
    if out.shape[0] != q.shape[0]:  # rows past cu_seqlens_q[-1]: zeros, like the kernel
        pad = q.shape[0] - out.shape[0]
        out = torch.cat([out, out.new_zeros((pad, *out.shape[1:]))])
        lse = torch.cat([lse, lse.new_full((lse.shape[0], pad), float("inf"))], dim=1)
    return out, lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention output only; see :func:`attention_reference_with_lse`."""
    return attention_reference_with_lse(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, upcast=upcast)[0]
