"""Plain-PyTorch media-masked cross-attention (Flamingo's ``MaskedCrossAttention`` math): the tests' baseline, the
benchmarks' reference and the CPU backend of :func:`mmkernels.ops.media_cross_attention`.

Text token ``i`` of sample ``b`` has media index ``m(i) = cumsum(media_locations[b])[i] - 1`` (clamped to
``[-1, M - 1]``). It attends to the ``Nl`` latents of media ``m(i)`` (``only_immediate=True``) or to those of every
media ``0..m(i)`` (``False``); a token with ``m(i) = -1`` sees no latent and gets zeros (and zero gradients).

This is an explicit masked softmax over a ``[B, Lt, M * Nl]`` visibility mask, computed in float32 (float64 stays
float64; ``upcast=False`` computes in the input dtype: the "same-dtype PyTorch reference" of the 2x rule) with the
masked-softmax helper of the attention reference: latents that no token sees (the media a sample does not use) and
the q rows that see nothing are replaced by zeros with ``torch.where`` before any product, so NaN there reaches no
result, forward or backward. Differentiable (also twice) through PyTorch autograd.
"""

from __future__ import annotations

import torch

from .attention import _masked

__all__ = ["media_cross_attention_reference", "media_index"]


def media_index(media_locations: torch.Tensor, num_media: int) -> torch.Tensor:
    """int32 ``[B, Lt]``: the media index of each text token, ``cumsum(media_locations) - 1`` clamped to
    ``[-1, num_media - 1]`` (``-1``: no media at or before the token). Non-decreasing along each row."""
    count = media_locations.to(torch.int32).cumsum(-1, dtype=torch.int32)
    return count.clamp(max=num_media) - 1


def media_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_locations: torch.Tensor,
    only_immediate: bool = True,
    softmax_scale: float | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """q ``[B, Lt, Hq, D]``, k ``[B, M, Nl, Hkv, D]``, v ``[B, M, Nl, Hkv, Dv]``, media_locations bool ``[B, Lt]``
    -> ``[B, Lt, Hq, Dv]`` in q's dtype (see the module docstring for the semantics)."""
    B, M, Nl = k.shape[:3]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    index = media_index(media_locations, M)  # [B, Lt]
    key_media = torch.arange(M, device=q.device, dtype=torch.int32).repeat_interleave(Nl)  # [M * Nl]
    if only_immediate:
        visible = index[:, :, None] == key_media[None, None, :]
    else:  # m(i) = -1 sees nothing: no key has a media index <= -1
        visible = key_media[None, None, :] <= index[:, :, None]
    k = k.reshape(B, M * Nl, *k.shape[3:])
    v = v.reshape(B, M * Nl, *v.shape[3:])
    return _masked(q, k, v, visible, scale, upcast, 0.0, None)[0]
