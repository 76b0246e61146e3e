"""Media-masked cross-attention benchmarks (Flamingo's gated cross-attention core).

``media_cross_attention``: the op (text queries over the latents of the images before them, both modes) against what
a user would otherwise run on the same ``[B, Lt, H, D]`` queries and ``[B, M, Nl, H, D]`` latents:

- ``flamingo-pytorch``: flamingo-pytorch's ``MaskedCrossAttention`` math between its projections (the masked einsum,
  ``-finfo.max`` fill, max-subtracted softmax, the pre-media rows zeroed in immediate mode), reproduced in
  :func:`flamingo_masked_attention` (``tests/ops/test_media_cross_attention.py`` checks it equals the module with
  identity projections), so the row needs no optional package;
- ``sdpa[mask]``: ``scaled_dot_product_attention`` with an explicit boolean ``[B, 1, Lt, M * Nl]`` mask, the rows
  without media zeroed afterwards (SDPA gives NaN or an average there).

Default preset: OpenFlamingo-9B's cross-attention layers (LM width 4096: 32 heads x 128, 64 latents per image,
5 images, 2048 text tokens, batch 4), the first image after 10 text tokens, both modes. Quick: one tiny CPU row.
FLOPs count the attended (query, latent) pairs only: ``4 * H * D * pairs`` (``pairs`` from the row's media
pattern), backward 2.5x. Bytes: q, k, v read and the output written once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...kernels.reference.media_cross_attention import media_index
from ...ops.media_cross_attention import media_cross_attention
from ..suite import BenchConfig, Inputs, Shape, Suite, mmkernels_providers, register_suite

# (label, B, Lt, H, D, M, Nl)
SHAPES = {
    "quick": [("tiny", 2, 64, 2, 32, 3, 8)],
    "default": [("OpenFlamingo-9B", 4, 2048, 32, 128, 5, 64)],
}


def media_positions(Lt: int, M: int) -> list[int]:
    """The suite's media pattern: M images spread over the text, the first after 10 text tokens (or at 0)."""
    first = min(10, Lt // (2 * M))
    return [first + i * ((Lt - first) // M) for i in range(M)]


def flamingo_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, media_locations: torch.Tensor,
                              only_immediate: bool, scale: float) -> torch.Tensor:
    """flamingo-pytorch's ``MaskedCrossAttention.forward`` between ``to_q``/``to_kv`` and ``to_out``, on
    ``q [B, Lt, H, D]``, ``k/v [B, M, Nl, H, D]`` (no GQA) -> ``[B, Lt, H, D]``."""
    B, M, Nl = k.shape[:3]
    q = q.transpose(1, 2) * scale
    k, v = (t.flatten(1, 2).transpose(1, 2) for t in (k, v))
    sim = q @ k.transpose(-1, -2)
    text_time = media_locations.cumsum(-1)
    media_time = (torch.arange(M, device=q.device) + 1).repeat_interleave(Nl)
    op = torch.eq if only_immediate else torch.ge
    mask = op(text_time[:, None, :, None], media_time)
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    if only_immediate:
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    return (attn @ v).transpose(1, 2)


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, media_locations: torch.Tensor,
                only_immediate: bool, scale: float) -> torch.Tensor:
    """SDPA with an explicit boolean mask ``[B, 1, Lt, M * Nl]``; rows without media zeroed afterwards."""
    B, M, Nl = k.shape[:3]
    index = media_index(media_locations, M)
    key_media = torch.arange(M, device=q.device, dtype=index.dtype).repeat_interleave(Nl)
    mask = (index[:, :, None] == key_media) if only_immediate else (key_media <= index[:, :, None])
    k, v = (t.flatten(1, 2).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale)
    return torch.where((index >= 0)[:, :, None, None], out.transpose(1, 2), 0.0)


def _inputs(B, Lt, H, D, M, Nl, device, dtype, grad) -> Inputs:
    q = torch.randn(B, Lt, H, D, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(B, M, Nl, H, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
    ml = torch.zeros(B, Lt, dtype=torch.bool, device=device)
    ml[:, media_positions(Lt, M)] = True
    return Inputs((q, k, v, ml), wrt=(q, k, v), grad_out=torch.randn_like(q) if grad else None)


def _pairs(Lt: int, M: int, Nl: int, only_immediate: bool) -> int:
    """Attended (query, latent) pairs per sample and head for the suite's media pattern."""
    ml = torch.zeros(1, Lt, dtype=torch.bool)
    ml[0, media_positions(Lt, M)] = True
    index = media_index(ml, M)[0]
    seen = (index >= 0).to(torch.int64) if only_immediate else index + 1
    return int(seen.sum()) * Nl


def _shapes(config: BenchConfig, ours: list[str]) -> list[Shape]:
    device, dtype = config.device, config.dtype
    shapes = []
    for label, B, Lt, H, D, M, Nl in SHAPES[config.preset]:
        scale = D**-0.5
        for only_immediate in (True, False):
            providers = mmkernels_providers(ours, lambda b, imm=only_immediate: lambda q, k, v, ml: (
                media_cross_attention(q, k, v, ml, only_immediate=imm, backend=b)))
            providers["flamingo-pytorch"] = functools.partial(_call, flamingo_masked_attention, only_immediate, scale)
            providers["sdpa[mask]"] = functools.partial(_call, sdpa_masked, only_immediate, scale)
            mode = "immediate" if only_immediate else "all-media"
            elem = torch.finfo(dtype).bits // 8
            shapes.append(Shape(
                name=f"{label} B={B} Lt={Lt} H={H} D={D} M={M} Nl={Nl} {mode}",
                make_inputs=functools.partial(_inputs, B, Lt, H, D, M, Nl, device, dtype),
                providers=providers,
                baseline="flamingo-pytorch",
                flops=4.0 * B * H * D * _pairs(Lt, M, Nl, only_immediate),
                bytes=float(elem * B * H * D * (2 * Lt + 2 * M * Nl)),
                params={"B": B, "Lt": Lt, "H": H, "D": D, "M": M, "Nl": Nl, "only_immediate": only_immediate},
            ))
    return shapes


def _call(fn, only_immediate, scale, q, k, v, ml):
    return fn(q, k, v, ml, only_immediate, scale)


register_suite(Suite(
    name="media_cross_attention",
    description="Flamingo media-masked cross-attention (text over image latents) vs flamingo-pytorch's math and "
                "SDPA with a boolean mask",
    shapes=_shapes,
    default_dtype=torch.bfloat16,
    cpu_dtype=torch.float32,
    ops=("media_cross_attention",),
    modes=("fwd", "fwd+bwd"),
    bwd_flop_factor=2.5,
))
