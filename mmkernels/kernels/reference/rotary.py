"""PyTorch reference of the vision rotary embedding, written as HF's ``apply_rotary_pos_emb_vision``
(``transformers.models.qwen2_5_vl.modeling_qwen2_5_vl``): ``x * cos + rotate_half(x) * sin`` in float32 (float64
stays float64), cast back to the inputs' dtypes. Differentiable through PyTorch autograd (in q, k, cos and sin, to
any order); the tests' oracle (run in float64) and the benchmarks' eager baseline."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (HF's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_out, k_out)``, contiguous, q's / k's dtype. q ``[T, Hq, D]``, k ``[T, Hk, D]``; cos/sin ``[T, D]`` (HF) or
    ``[T, D/2]`` (flash-attn's layout: both halves of the head dim share the angles)."""
    if cos.shape[-1] * 2 == q.shape[-1]:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    compute = torch.promote_types(q.dtype, torch.float32)
    cos, sin = cos.unsqueeze(-2).to(compute), sin.unsqueeze(-2).to(compute)
    outs = []
    for x in (q, k):
        xf = x.to(compute)
        outs.append(((xf * cos) + (rotate_half(xf) * sin)).to(x.dtype).contiguous())
    return outs[0], outs[1]
