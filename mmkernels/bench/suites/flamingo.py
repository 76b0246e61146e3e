"""``flamingo``: Flamingo's two bridge modules, whole, against flamingo-pytorch's and a hand-written SDPA block.

- ``PerceiverResampler``: ours (:class:`mmkernels.models.PerceiverResampler`, built with ``from_flamingo_pytorch``,
  so the same weights) against ``flamingo_pytorch.PerceiverResampler``. Default: OpenFlamingo-9B's resampler
  (``open_flamingo/src/helpers.py`` defaults over CLIP ViT-L/14 features: dim 1024, depth 6, 8 heads of 64,
  64 latents, ff_mult 4) on 257 tokens per image, batch 8 x 5 images (``num_media_embeds`` 5). The image features
  need no gradient (the vision encoder is frozen): ``fwd+bwd`` is the parameters' gradients.
- ``GatedCrossAttentionBlock``: ours (same weights, both gates set to 0.5 so both branches count) against
  ``flamingo_pytorch.GatedCrossAttentionBlock`` (the masked einsum over every latent of the sample) and against
  ``sdpa[mask]``: our block's own projections with ``scaled_dot_product_attention`` given the explicit boolean
  ``[B, Lt, M * Nl]`` mask, as a user without our op would write it (:func:`sdpa_block`). Default: LM width 4096,
  32 heads of 128, ff_mult 4, 5 images of 64 latents, 2048 text tokens, batch 4, the op suite's media pattern (the
  first image after 10 text tokens), immediate mode. ``fwd+bwd``: the gradients of the parameters, of the text
  hidden states and of the latents (the resampler below is trained).

  OpenFlamingo-9B's own block differs from this one in two ways flamingo-pytorch 0.1.x (and so ours) cannot
  express: its ``to_kv`` reads the 1024-wide visual latents (``dim_visual``) and it uses the 8 x 64 default heads
  (inner width 512). The rows here take the media at the LM width and 32 x 128 heads (inner 4096), the width
  ``ops.media_cross_attention``'s suite times.

Quick: tiny configurations of both (CPU, seconds). Without ``flamingo_pytorch`` its rows are left out (ours then
runs random weights) and the speed-up column is relative to ours (resampler) or to ``sdpa[mask]`` (block).

FLOPs: the matmuls only, from the definitions (:func:`resampler_flops`, :func:`block_flops`; LayerNorm, GELU,
softmax and the residuals are not counted). The block's attention counts the attended (text token, latent) pairs
only, as the op suite does, although flamingo-pytorch and ``sdpa[mask]`` compute every pair and mask. Backward 2x
the forward. Bytes: every parameter and input read once and every output written once (see ``_shapes``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..suite import BenchConfig, Inputs, Shape, Suite, has_module, mmkernels_providers, register_suite
from .media_cross_attention import _pairs, media_positions

# (label, resampler config, batch, images per sample, tokens per image)
RESAMPLER_SHAPES = {
    "quick": [("tiny", dict(dim=64, depth=2, dim_head=16, heads=4, num_latents=8, ff_mult=4), 2, 2, 17)],
    "default": [("OpenFlamingo-9B", dict(dim=1024, depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4),
                 8, 5, 257)],
}
# (label, block config, batch, text tokens, images per sample, latents per image)
BLOCK_SHAPES = {
    "quick": [("tiny", dict(dim=64, dim_head=16, heads=4, ff_mult=4), 2, 48, 2, 8)],
    "default": [("OpenFlamingo-9B LM", dict(dim=4096, dim_head=128, heads=32, ff_mult=4), 4, 2048, 5, 64)],
}
GATE = 0.5  # both gates of the block (flamingo-pytorch starts them at 0: the block would be the identity)
OURS_R, THEIRS_R = "mmkernels PerceiverResampler", "flamingo-pytorch PerceiverResampler"
OURS_B, THEIRS_B = "mmkernels GatedCrossAttentionBlock", "flamingo-pytorch GatedCrossAttentionBlock"
SDPA_B = "sdpa[mask]"


def resampler_flops(dim: int, depth: int, dim_head: int, heads: int, num_latents: int, ff_dim: int, items: int,
                    tokens: int) -> float:
    """Forward matmul FLOPs of a resampler over ``items`` media items of ``tokens`` tokens each.

    Per item and layer, n = num_latents, N = tokens, i = heads * dim_head: to_q ``2 n dim i``; to_kv over the
    ``N + n`` keys ``2 (N + n) dim 2i``; QK^T and PV ``4 n (N + n) i``; to_out ``2 n i dim``; feed-forward
    ``2 n dim ff_dim`` twice."""
    n, i = num_latents, heads * dim_head
    per_layer = 2 * n * dim * i + 4 * (tokens + n) * dim * i + 4 * n * (tokens + n) * i + 2 * n * i * dim \
        + 4 * n * dim * ff_dim
    return float(items * depth * per_layer)


def block_flops(dim: int, dim_head: int, heads: int, ff_dim: int, batch: int, text: int, latents: int,
                pairs: int) -> float:
    """Forward matmul FLOPs of a gated cross-attention block.

    Per sample, i = heads * dim_head, ``latents`` = M * Nl keys, ``pairs`` the attended (text token, latent) pairs:
    to_q ``2 Lt dim i``; to_kv ``2 (M Nl) dim 2i``; QK^T and PV ``4 pairs i``; to_out ``2 Lt i dim``;
    feed-forward ``2 Lt dim ff_dim`` twice."""
    i = heads * dim_head
    return float(batch * (2 * text * dim * i + 4 * latents * dim * i + 4 * pairs * i + 2 * text * i * dim
                          + 4 * text * dim * ff_dim))


def sdpa_block(block, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor) -> torch.Tensor:
    """A gated cross-attention block written with ``scaled_dot_product_attention`` and an explicit boolean
    ``[B, Lt, M * Nl]`` mask, on ``block``'s parameters (a :class:`mmkernels.models.GatedCrossAttentionBlock` or
    flamingo-pytorch's: same keys), immediate mode. Text before the first media (a fully masked row: NaN or zeros,
    depending on SDPA's kernel) is zeroed after SDPA, as flamingo-pytorch zeroes it."""
    a = block.attn
    h = a.heads
    B, M, Nl, _ = media.shape
    q = a.to_q(a.norm(x)).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, h, Lt, d]
    k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in a.to_kv(media.flatten(1, 2)).chunk(2, dim=-1))
    text_time = media_locations.cumsum(dim=-1)  # [B, Lt]: 1-based media index, 0 before the first media
    media_time = torch.arange(1, M + 1, device=x.device).repeat_interleave(Nl)  # [M * Nl]
    mask = text_time[:, :, None] == media_time  # [B, Lt, M * Nl]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    out = torch.where((text_time > 0)[:, None, :, None], out, 0.0)
    x = a.to_out(out.transpose(1, 2).flatten(-2)) * block.attn_gate.tanh() + x
    return block.ff(x) * block.ff_gate.tanh() + x


@functools.cache
def _resampler(fields: tuple, device: torch.device, dtype: torch.dtype, backend, theirs: bool):
    """flamingo-pytorch's resampler (``theirs``; seeded random init) or ours with its weights (without
    flamingo_pytorch: our own seeded random init, the same for every backend). Built once per config, device, dtype
    and backend."""
    from ...models.flamingo import PerceiverResampler

    f = dict(fields)
    if has_module("flamingo_pytorch"):
        import flamingo_pytorch

        torch.manual_seed(0)
        ref = flamingo_pytorch.PerceiverResampler(**f).to(device=device, dtype=dtype).train()
        return ref if theirs else PerceiverResampler.from_flamingo_pytorch(ref, backend=backend)
    dim, depth = f.pop("dim"), f.pop("depth")
    torch.manual_seed(0)  # every backend's copy the same weights
    return PerceiverResampler(dim, depth, backend=backend, device=device, dtype=dtype, **f).train()


@functools.cache
def _block(fields: tuple, device: torch.device, dtype: torch.dtype, backend, theirs: bool):
    """flamingo-pytorch's block (``theirs``; seeded random init, gates ``GATE``) or ours with its weights (without
    flamingo_pytorch: our own seeded random init, gates ``GATE``)."""
    from ...models.flamingo import GatedCrossAttentionBlock

    f = dict(fields)
    if has_module("flamingo_pytorch"):
        import flamingo_pytorch

        torch.manual_seed(0)
        ref = flamingo_pytorch.GatedCrossAttentionBlock(**f)
        with torch.no_grad():
            ref.attn_gate.fill_(GATE)
            ref.ff_gate.fill_(GATE)
        ref = ref.to(device=device, dtype=dtype).train()
        return ref if theirs else GatedCrossAttentionBlock.from_flamingo_pytorch(ref, backend=backend)
    torch.manual_seed(0)  # every backend's copy (and sdpa[mask]'s) the same weights
    ours = GatedCrossAttentionBlock(f.pop("dim"), backend=backend, device=device, dtype=dtype, **f).train()
    with torch.no_grad():
        ours.attn_gate.fill_(GATE)
        ours.ff_gate.fill_(GATE)
    return ours


@functools.cache
def _param_count(kind: str, fields: tuple) -> int:
    """Our module's parameter count for ``fields`` (the ``_resampler``/``_block`` keys), counted on the meta device
    (no memory, no init)."""
    from ...models.flamingo import GatedCrossAttentionBlock, PerceiverResampler

    f = dict(fields)
    if kind == "resampler":
        module = PerceiverResampler(f.pop("dim"), f.pop("depth"), device="meta", **f)
    else:
        module = GatedCrossAttentionBlock(f.pop("dim"), device="meta", **f)
    return sum(p.numel() for p in module.parameters())


def _resampler_shapes(config: BenchConfig, ours: list) -> list[Shape]:
    device, dtype = config.device, config.dtype
    have_ref = has_module("flamingo_pytorch")
    elem = torch.finfo(dtype).bits // 8
    shapes = []
    for label, fields, batch, media, tokens in RESAMPLER_SHAPES[config.preset]:
        fields = {**fields, "num_media_embeds": media}
        key = tuple(sorted(fields.items()))
        dim, n = fields["dim"], fields["num_latents"]

        def make_inputs(grad, batch=batch, media=media, tokens=tokens, dim=dim, n=n):
            x = torch.randn(batch, media, tokens, dim, device=device, dtype=dtype)  # frozen encoder: no grad
            grad_out = torch.randn(batch, media, n, dim, device=device, dtype=dtype) if grad else None
            return Inputs((x,), grad_out=grad_out)

        providers = mmkernels_providers(
            ours, lambda b, key=key: lambda x: _resampler(key, device, dtype, b, False)(x), label=OURS_R)
        if have_ref:
            providers[THEIRS_R] = lambda x, key=key: _resampler(key, device, dtype, None, True)(x)
        ff_dim = int(dim * fields["ff_mult"])
        weights = _param_count("resampler", key)
        feats, out = batch * media * tokens * dim, batch * media * n * dim
        shapes.append(Shape(
            name=f"PerceiverResampler {label} B={batch} T={media} N={tokens} dim={dim}",
            make_inputs=make_inputs,
            providers=providers,
            baseline=THEIRS_R if have_ref else OURS_R,
            flops=resampler_flops(dim, fields["depth"], fields["dim_head"], fields["heads"], n, ff_dim,
                                  batch * media, tokens),
            # forward: every parameter, the features [B, T, N, dim] read, [B, T, n, dim] written; backward: the
            # output gradient, the parameters and the features (to_kv's weight gradient) read, every parameter's
            # gradient written (the features need none)
            bytes=float(elem * (weights + feats + out)),
            bwd_bytes=float(elem * (2 * weights + feats + out)),
            params={"batch": batch, "media": media, "tokens": tokens, **fields},
        ))
    return shapes


def _block_inputs(batch, text, media, latents, dim, device, dtype, grad) -> Inputs:
    x = torch.randn(batch, text, dim, device=device, dtype=dtype, requires_grad=grad)
    lat = torch.randn(batch, media, latents, dim, device=device, dtype=dtype, requires_grad=grad)
    ml = torch.zeros(batch, text, dtype=torch.bool, device=device)
    ml[:, media_positions(text, media)] = True
    return Inputs((x, lat, ml), grad_out=torch.randn_like(x) if grad else None)


def _block_shapes(config: BenchConfig, ours: list) -> list[Shape]:
    device, dtype = config.device, config.dtype
    have_ref = has_module("flamingo_pytorch")
    elem = torch.finfo(dtype).bits // 8
    shapes = []
    for label, fields, batch, text, media, latents in BLOCK_SHAPES[config.preset]:
        key = tuple(sorted(fields.items()))
        dim = fields["dim"]
        providers = mmkernels_providers(
            ours, lambda b, key=key: lambda x, m, ml: _block(key, device, dtype, b, False)(x, m, ml), label=OURS_B)
        if have_ref:
            providers[THEIRS_B] = lambda x, m, ml, key=key: _block(key, device, dtype, None, True)(x, m, ml)
        # on the parameters of ours with the automatic backend (its gradients accumulate there, as ours do)
        providers[SDPA_B] = lambda x, m, ml, key=key: sdpa_block(_block(key, device, dtype, None, False), x, m, ml)
        ff_dim = int(dim * fields["ff_mult"])
        weights = _param_count("block", key)
        hidden, lat = batch * text * dim, batch * media * latents * dim
        shapes.append(Shape(
            name=f"GatedCrossAttentionBlock {label} B={batch} Lt={text} M={media} Nl={latents} dim={dim} "
                 f"H={fields['heads']} D={fields['dim_head']}",
            make_inputs=functools.partial(_block_inputs, batch, text, media, latents, dim, device, dtype),
            providers=providers,
            baseline=THEIRS_B if have_ref else SDPA_B,
            flops=block_flops(dim, fields["dim_head"], fields["heads"], ff_dim, batch, text, media * latents,
                              _pairs(text, media, latents, True)),
            # forward: every parameter, the text [B, Lt, dim] and the latents [B, M, Nl, dim] read, [B, Lt, dim]
            # written; backward: the output gradient, the parameters, the text and the latents read, the gradients
            # of all three written
            bytes=float(elem * (weights + 2 * hidden + lat)),
            bwd_bytes=float(elem * (2 * weights + 3 * hidden + 2 * lat)),
            params={"batch": batch, "text": text, "media": media, "latents": latents, **fields},
        ))
    return shapes


def _shapes(config: BenchConfig, ours: list) -> list[Shape]:
    return _resampler_shapes(config, ours) + _block_shapes(config, ours)


register_suite(Suite(
    name="flamingo",
    description="Flamingo PerceiverResampler and GatedCrossAttentionBlock, whole: mmkernels vs flamingo-pytorch "
                "(same weights) and, for the block, SDPA with an explicit boolean mask",
    shapes=_shapes,
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=("qformer_cross_attention", "attention", "media_cross_attention"),
    modes=("fwd", "fwd+bwd"),
    model=True,
))
