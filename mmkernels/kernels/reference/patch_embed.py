"""PyTorch reference of the ViT patch embedding, written the way timm and HF do it:
``conv2d(stride=P) -> flatten -> transpose -> cat cls -> add pos``. Differentiable through PyTorch autograd; the
tests' oracle (run in float64) and the benchmarks' eager baseline. In the batch-invariant mode
(:func:`mmkernels.set_batch_invariant`) the convolution runs as im2col + GEMM (``unfold`` and ``F.linear``, whose
product the mode runs in fixed row blocks): a convolution's algorithm follows the batch size, a patch's row of the
GEMM does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._config import is_batch_invariant


def patch_embed_reference(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, (1 if cls) + (H/P)*(W/P), D]``. ``pos_embed`` ``[L, D]`` (or ``[1, L, D]``), ``cls_token`` ``[D]``
    (or ``[1, 1, D]``)."""
    p = weight.shape[-1]
    if pixels.shape[-2:] == (p, p):
        # One patch per image (the flattened patches of Qwen-VL towers): the convolution is one GEMM, run as one.
        k = weight[0].numel()
        x = F.linear(pixels.reshape(pixels.shape[0], k), weight.reshape(weight.shape[0], k), bias)[:, None, :]
    elif is_batch_invariant():
        cols = F.unfold(pixels, p, stride=p).transpose(1, 2)  # [B, N, C*P*P], (c, i, j) order as the weight
        x = F.linear(cols, weight.reshape(weight.shape[0], -1), bias)
    else:
        x = F.conv2d(pixels, weight, bias, stride=p)  # [B, D, Hp, Wp]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    if cls_token is not None:
        x = torch.cat([cls_token.reshape(1, 1, -1).expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], -1)
    return x.contiguous()  # the conv's [B, D, N] memory transposed: the op returns a row-major [B, N, D]
