"""Plain-PyTorch Q-Former cross-attention: the definition the Triton kernels are tested against, the CPU
fallback and the benchmarks' "eager" baseline.

``q [B, Lq, H, D]``, ``k/v [B, Lk, H, D]``; ``kv_lens`` int32 ``[B]`` masks keys ``>= kv_lens[b]`` (clamped to
``[0, Lk]``; a sample with no key gets zeros and zero gradients). Keys past ``kv_lens`` never reach a result, even
when they hold NaN or inf: they are replaced by zeros with ``torch.where`` before any product (a masked score alone
would still leave ``0 * NaN`` in ``P V`` and in the backward's ``dS K``).

``upcast=True`` (default, the backend's behaviour) computes in fp32 (float64 stays float64), so fp16 scores past
65504 do not overflow; ``upcast=False`` runs the products in the input dtype and the softmax in fp32, as an eager
PyTorch user would write it (the "same-dtype reference" of the flash-attn accuracy rule). Differentiable through
ordinary autograd. No host synchronisation, except in the batch-invariant mode (:func:`mmkernels.set_batch_invariant`):
there each sample runs on its own with its keys cut at ``kv_lens[b]`` (read on the host), so a sample's result is the
same alone, in any batch and with any padding.
"""

from __future__ import annotations

import torch

from ..._config import is_batch_invariant
from .attention import attention_reference_per_sequence

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
    *,
    upcast: bool = True,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns ``[B, Lq, H, D]`` in q's dtype.

    ``dropout_p``: inverted dropout on the probabilities (kept with probability ``1 - p``, scaled by
    ``1 / (1 - p)``). ``dropout_mask`` (bool ``[B, H, Lq, Lk]``) replaces the random draw (tests pass the Triton
    kernels' own mask)."""
    out_dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if is_batch_invariant() and upcast and dropout_p == 0.0:
        return _per_sample(q, k, v, kv_lens, scale)
    if upcast:
        math_dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    keep = None
    if kv_lens is not None:
        keep = key_padding_mask(kv_lens, k.shape[1])  # out-of-range lengths act clamped to [0, Lk]
        k = torch.where(keep[:, :, None, None], k, 0.0)
        v = torch.where(keep[:, :, None, None], v, 0.0)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    scores = (scores if scores.dtype == torch.float64 else scores.float()) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    # softmax with zeros (not NaN) for a sample whose keys are all masked
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        drop_keep = dropout_mask if dropout_mask is not None else torch.rand_like(probs) >= dropout_p
        probs = torch.where(drop_keep, probs * (1.0 / (1.0 - dropout_p)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(out_dtype).contiguous()  # einsum leaves [B, H, Lq, D] memory


def _per_sample(q, k, v, kv_lens, scale) -> torch.Tensor:
    """The batch-invariant path: sample ``b`` attends to its first ``kv_lens[b]`` keys (clamped to ``[0, Lk]``) on
    its own; a sample without keys gets zeros (and zero gradients)."""
    lk = k.shape[1]
    lens = [lk] * q.shape[0] if kv_lens is None else [min(max(n, 0), lk) for n in kv_lens.tolist()]
    outs = []
    for b, n in enumerate(lens):
        if n == 0:
            outs.append(q.new_zeros((1, *q.shape[1:-1], v.shape[-1])))
            continue
        outs.append(attention_reference_per_sequence(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], False, scale)[0])
    if not outs:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return torch.cat(outs)
