"""Plain-PyTorch Q-Former cross-attention: the definition the Triton kernels are tested against, the CPU
fallback and the benchmarks' "eager" baseline.

``q [B, Lq, H, D]``, ``k/v [B, Lk, H, D]``; ``kv_lens`` int32 ``[B]`` masks keys ``>= kv_lens[b]``.
Products run in the input dtype (as an eager PyTorch user would write it), the softmax in fp32. Pass float64
tensors for a float64 truth. Differentiable through ordinary autograd. No host synchronisation.
"""

from __future__ import annotations

import torch

__all__ = ["key_padding_mask", "qformer_attention_reference"]


def key_padding_mask(kv_lens: torch.Tensor, lk: int) -> torch.Tensor:
    """Boolean ``[B, Lk]``: True where key ``j < kv_lens[b]`` (attended)."""
    return torch.arange(lk, device=kv_lens.device)[None, :] < kv_lens.to(torch.int64)[:, None]


def qformer_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Returns ``[B, Lq, H, D]`` in q's dtype."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    scores = (scores if scores.dtype == torch.float64 else scores.float()) * scale
    if kv_lens is not None:
        keep = key_padding_mask(kv_lens, k.shape[1])[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
