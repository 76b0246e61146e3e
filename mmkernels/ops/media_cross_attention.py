"""Media-masked cross-attention (Flamingo's gated cross-attention: text tokens over the latents of the images before
them): one op, two backends.

Layers:
- kernels: none of its own. The ``triton`` backend is ONE varlen call of the registered attention op
  (``torch.ops.mmkernels.attention_fwd_triton``, ``kernels/triton/attention_varlen.py``) whose autograd gives the
  gradients; the ``reference`` backend is ``kernels/reference/media_cross_attention.py`` (an explicit masked
  softmax);
- backends on ``MEDIA_CROSS_ATTENTION_BACKENDS`` (``"triton"``, ``"reference"``);
- the validated public function :func:`media_cross_attention` below.

How the Triton path maps the media mask onto varlen attention, with no ``[B, Lt, M * Nl]`` mask and no host sync:
the media index ``m(i) = cumsum(media_locations)[i] - 1`` is non-decreasing along a sample's text, so the text
tokens of sample ``b`` with media index ``m`` form one contiguous run. Each ``(b, m)`` for ``m = -1 .. M - 1`` is a
varlen "sequence" (``B * (M + 1)`` of them, in the order of the flattened ``[B * Lt]`` text rows). Its query count
comes from a ``searchsorted`` of the media index on the device; its keys are static: the ``Nl`` latents of media
``m`` (``only_immediate``), or the ``(m + 1) * Nl`` latents of media ``0..m`` copied into a packed buffer of
prefixes by static slices (all-media mode), and none for ``m = -1`` (the attention op gives zeros and zero
gradients to a query that sees no key). ``max_seqlen_q = Lt`` and ``max_seqlen_k = Nl`` (or ``M * Nl``) are host ints
from the shapes. The all-media copy's backward sums the slices' gradients in a fixed order (no atomics), so
:func:`mmkernels.deterministic` makes the whole backward bitwise reproducible.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from .._config import debug_checks_enabled, is_batch_invariant
from ..kernels.reference.attention import attention_reference
from ..kernels.reference.media_cross_attention import media_cross_attention_reference, media_index
from . import _validate as check
from .attention import MAX_HEAD_DIM  # importing ops/attention registers torch.ops.mmkernels.attention_fwd_triton

__all__ = ["DTYPES", "MAX_HEAD_DIM", "media_cross_attention"]

OP = "media_cross_attention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs on the reference only

MEDIA_CROSS_ATTENTION_BACKENDS = OpBackends(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("reference",)})


@MEDIA_CROSS_ATTENTION_BACKENDS.register("reference", batch_invariant=True)
def _reference(q, k, v, media_locations, only_immediate, softmax_scale):
    if is_batch_invariant():  # the mask's key axis is M * Nl for every sample: the batch's M would decide
        return _as_varlen(q, k, v, media_locations, only_immediate, softmax_scale, _reference_varlen)
    return media_cross_attention_reference(q, k, v, media_locations, only_immediate, softmax_scale)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return attention_reference(q, k, v, False, scale, cu_q, cu_k, max_q, max_k)  # per sequence in the mode


def varlen_plan(media_locations: torch.Tensor, num_media: int, num_latents: int, only_immediate: bool
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The varlen form of a media mask, on ``media_locations``' device, without a host sync.

    Returns ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_k)``: int32 ``cu_seqlens`` of ``B * (M + 1) + 1`` entries;
    sequence ``b * (M + 1) + m + 1`` holds the text rows of sample ``b`` with media index ``m`` (``m = -1`` first,
    with no key). Its keys: the ``Nl`` latent rows of media ``m`` in ``k.reshape(B * M * Nl, ...)``
    (``only_immediate``), or segment ``m`` of the packed prefixes (all media: per sample, the prefixes of
    ``Nl, 2 Nl, .., M Nl`` latent rows one after the other, ``M (M + 1) / 2 * Nl`` rows)."""
    B, Lt = media_locations.shape
    M, Nl = num_media, num_latents
    device = media_locations.device
    runs = media_index(media_locations, M) + 1  # [B, Lt] in [0, M], non-decreasing per row
    bounds = torch.arange(M + 1, device=device, dtype=torch.int32).expand(B, M + 1).contiguous()
    upto = torch.searchsorted(runs.contiguous(), bounds, right=True, out_int32=True)  # rows with run <= j
    offsets = torch.arange(B, device=device, dtype=torch.int32)[:, None] * Lt
    cu_q = torch.cat([torch.zeros(1, device=device, dtype=torch.int32), (upto + offsets).flatten()])
    r = torch.arange(B * (M + 1) + 1, device=device, dtype=torch.int64)
    b, j = r // (M + 1), r % (M + 1)  # sequence r is (sample b, media j - 1); r = B * (M + 1) closes the list
    if only_immediate:
        return cu_q, ((b * M + (j - 1).clamp(min=0)) * Nl).to(torch.int32), Nl
    cu_k = b * (M * (M + 1) // 2 * Nl) + (j - 1) * j // 2 * Nl  # segment m starts at m (m + 1) / 2 * Nl
    return cu_q, cu_k.to(torch.int32), M * Nl


def packed_prefixes(x: torch.Tensor) -> torch.Tensor:
    """``[B, M, Nl, H, d]`` -> ``[B * M (M + 1) / 2 * Nl, H, d]``: per sample, the latents of media ``0..m`` for
    ``m = 0 .. M - 1``, one after the other (the all-media keys). Copies by slicing (its backward sums the slices'
    gradients in a fixed order: deterministic, no atomics)."""
    B, M, Nl = x.shape[:3]
    flat = x.reshape(B, M * Nl, *x.shape[3:])
    return torch.cat([flat[:, :(m + 1) * Nl] for m in range(M)], 1).reshape(-1, *x.shape[3:])


def _as_varlen(q, k, v, media_locations, only_immediate, softmax_scale, varlen_attention):
    """The op as ONE varlen attention call (``varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale)`` on the
    flattened rows), the Triton path's plan; the batch-invariant reference runs it with the per-sequence reference."""
    B, Lt, Hq, _ = q.shape
    M, Nl, Hkv = k.shape[1], k.shape[2], k.shape[3]
    cu_q, cu_k, max_k = varlen_plan(media_locations, M, Nl, only_immediate)
    # The latents of media a sample does not use form key segments of runs without queries: no kernel loads them
    # (per-sequence, packed: _seen_cols) and their gradients stay exact zeros, so no masking copy of k and v here.
    if only_immediate:  # sequence (b, m) reads the latents of media m
        kf, vf = k.reshape(-1, Hkv, k.shape[-1]), v.reshape(-1, Hkv, v.shape[-1])
    else:  # all media: the packed prefixes, M (M + 1) / 2 * Nl latent rows per sample
        kf, vf = packed_prefixes(k), packed_prefixes(v)
    qf = q.reshape(B * Lt, Hq, q.shape[-1])
    qf, kf, vf = (t if t.stride(-1) == 1 else t.contiguous() for t in (qf, kf, vf))
    out = varlen_attention(qf, kf, vf, cu_q, cu_k, Lt, max_k, softmax_scale)
    return out.reshape(B, Lt, Hq, v.shape[-1])


def _triton_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return torch.ops.mmkernels.attention_fwd_triton(q, k, v, cu_q, cu_k, max_q, max_k, False, scale, 0.0, None)[0]


if triton_available():

    @MEDIA_CROSS_ATTENTION_BACKENDS.register("triton", supports=check.first_arg_dtype_in(KERNEL_DTYPES),
                                             batch_invariant=True)
    def _triton(q, k, v, media_locations, only_immediate, softmax_scale):
        return _as_varlen(q, k, v, media_locations, only_immediate, softmax_scale, _triton_varlen)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def media_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_locations: torch.Tensor,
    *,
    only_immediate: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Text tokens attending to the latents of the media (images) before them: Flamingo's masked cross-attention
    (flamingo-pytorch's ``MaskedCrossAttention`` between its projections).

    - q ``[B, Lt, Hq, D]`` (projected text queries, flash-attn layout), k ``[B, M, Nl, Hkv, D]``,
      v ``[B, M, Nl, Hkv, Dv]`` (the ``Nl`` projected latents of each of ``M`` media per sample),
      ``media_locations`` bool ``[B, Lt]`` (True where a media token sits). Output ``[B, Lt, Hq, Dv]`` in q's dtype.
    - Text token ``i`` has media index ``m(i) = cumsum(media_locations)[i] - 1``. It attends to the latents of media
      ``m(i)`` only (``only_immediate=True``, flamingo-pytorch's ``only_attend_immediate_media=True``) or of every
      media ``0..m(i)`` (``False``). Tokens with no media at or before them (``m(i) = -1``) get exact zeros in the
      output and zero gradients in both modes. (flamingo-pytorch in ``only_attend_immediate_media=False`` mode
      gives such tokens the uniform average of all latents instead: its mask is all False there and it does not
      zero them; every other row is the same.)
    - Media past the count a sample uses (``media_locations[b].sum()``) reach no output or gradient, whatever
      they hold (NaN included: on the Triton path their key segments belong to varlen runs without queries, which
      no attention kernel loads); their gradients are exactly zero. More media tokens in a sample than ``M`` is an
      error under :func:`mmkernels.debug_checks` (one host read; the tests run with it); otherwise the result is
      unspecified (the media index is clamped to ``M - 1``: never an out-of-bounds read).
    - GQA: ``Hq`` a multiple of ``Hkv``; head dims ``D, Dv`` in ``[1, 256]``; ``softmax_scale`` defaults to
      ``D ** -0.5``. fp16, bf16, fp32 (all three tensors alike), fp32 accumulation; float64 on the reference backend
      only. Differentiable in q, k and v (the reference also twice).
    - ``backend``: ``None`` (auto: ``"triton"`` on CUDA, ``"reference"`` on CPU), ``"triton"`` or ``"reference"``.
      The Triton backend is one varlen call of the attention kernels with ``B * (M + 1)`` sequences (one per sample
      and media index, the pre-media run with no key; see the module docstring): no ``[B, Lt, M * Nl]`` mask and
      no host synchronisation (``max_seqlen_q = Lt``, ``max_seqlen_k = Nl`` from the shapes). With
      ``only_immediate=False`` it copies each run's key prefix into a packed buffer first: ``M (M + 1) / 2 * Nl``
      key and value rows per sample (``(M + 1) / 2`` times k's and v's size) and ``max_seqlen_k = M * Nl``.
      The reference builds the ``[B, Lt, M * Nl]`` mask and a ``[B, Hq, Lt, M * Nl]`` score matrix.

    Raises ``TypeError``/``ValueError`` naming the argument for bad dtypes, shapes, devices and scalars;
    :class:`mmkernels.BackendError` for a backend that cannot run these tensors.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dtypes=DTYPES, op=OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must have the same dtype, got q {_dtype_name(q.dtype)}, "
                        f"k {_dtype_name(k.dtype)}, v {_dtype_name(v.dtype)}")
    check.tensor("media_locations", media_locations, dtypes=(torch.bool,), op=OP)
    device = check.same_device(OP, q=q, k=k, v=v, media_locations=media_locations)
    only_immediate = check.flag("only_immediate", only_immediate, op=OP)
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must be [B, Lt, Hq, D] (4 dims), got shape {tuple(q.shape)}")
    for name, t, last in (("k", k, "D"), ("v", v, "Dv")):
        if t.dim() != 5:
            raise ValueError(f"{OP}: {name} must be [B, M, Nl, Hkv, {last}] (5 dims), got shape {tuple(t.shape)}")
    if tuple(k.shape[:-1]) != tuple(v.shape[:-1]):
        raise ValueError(f"{OP}: v must have the same shape as k but for the head dim ([B, M, Nl, Hkv, Dv]), got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    B, Lt, hq, head_dim = q.shape
    M, Nl, hkv = k.shape[1], k.shape[2], k.shape[3]
    if k.shape[0] != B:
        raise ValueError(f"{OP}: q and k/v must have the same batch size, got {B} and {k.shape[0]}")
    if tuple(media_locations.shape) != (B, Lt):
        raise ValueError(f"{OP}: media_locations must have shape [B, Lt] = [{B}, {Lt}] (q's first two dims), got "
                         f"{tuple(media_locations.shape)}")
    if M < 1 or Nl < 1:
        raise ValueError(f"{OP}: k and v need at least one media and one latent per media (M >= 1, Nl >= 1), got "
                         f"M={M}, Nl={Nl}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{OP}: q and k must have the same head dim, got q {head_dim} and k {k.shape[-1]} (only "
                         "v's head dim may differ)")
    for name, d in (("q/k", head_dim), ("v", v.shape[-1])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{OP}: {name} head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ValueError(f"{OP}: the number of query heads ({hq}) must be a positive multiple of the number of "
                         f"key/value heads ({hkv})")
    scale = head_dim**-0.5 if softmax_scale is None else check.real("softmax_scale", softmax_scale, op=OP)
    if (B * Lt and debug_checks_enabled() and not media_locations.is_meta
            and not torch.compiler.is_compiling()):
        # one host read, under mmkernels.debug_checks only; otherwise the media index is clamped to M - 1
        most = int(media_locations.sum(1, dtype=torch.int32).max())
        if most > M:
            raise ValueError(f"{OP}: a sample of media_locations has {most} media tokens but k/v hold M = {M} media "
                             "per sample")
    args = (q, k, v, media_locations, only_immediate, scale)
    _, impl = MEDIA_CROSS_ATTENTION_BACKENDS.select(device, backend, args)
    return impl(*args)
