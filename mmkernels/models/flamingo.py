"""Flamingo's vision-to-language bridge on mmkernels ops: ``PerceiverResampler`` and ``GatedCrossAttentionBlock``.

The math and the parameter layout are flamingo-pytorch's (``lucidrains/flamingo-pytorch`` 0.1.x): the state-dict
keys are the same, so ``from_flamingo_pytorch(module)`` is a strict state-dict copy (hyper-parameters read from the
module) and a flamingo-pytorch checkpoint loads with ``load_state_dict`` as is.

- :class:`PerceiverResampler`: ``num_latents`` learned latents attend to ``[media tokens; latents]`` (keys and values
  from both, no mask) per media item, ``depth`` times (attention + feed-forward, pre-norm, residual), then a final
  LayerNorm. The attention runs on :func:`mmkernels.ops.qformer_cross_attention` (the few-query kernel: one program
  per (item, head) holds every latent) when ``num_latents <= 128`` and ``dim_head <= 128``, else on
  :func:`mmkernels.ops.attention`. (``mmkernels.nn.QFormerCrossAttention`` has HF's square ``query`` projection and
  ``nn.Attention`` the dense kernel, so the projections live here with flamingo-pytorch's names.)
- :class:`GatedCrossAttentionBlock`: text tokens attend to the latents of their media through
  :func:`mmkernels.ops.media_cross_attention` (one call per block, the per-token media range inside the kernel), then
  ``to_out`` times ``tanh(attn_gate)`` plus the residual, then a feed-forward times ``tanh(ff_gate)`` plus the
  residual. Both gates start at 0 (the block starts as the identity).

One semantic difference from flamingo-pytorch: with ``only_attend_immediate_media=False``, text tokens that come
before the first media get exact zeros from the attention (only the feed-forward branch changes them); flamingo-pytorch
gives them a uniform average over every latent of the sample (its mask is all False there and it zeroes such rows only
in the immediate mode). Every other row matches.
"""

from __future__ import annotations

import torch
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as check
from ..ops.attention import MAX_HEAD_DIM as _ATTN_MAX_HEAD_DIM
from ..ops.attention import attention
from ..ops.media_cross_attention import media_cross_attention
from ..ops.qformer_attention import MAX_HEAD_DIM as _FEW_MAX_HEAD_DIM
from ..ops.qformer_attention import MAX_QUERIES as _FEW_MAX_QUERIES
from ..ops.qformer_attention import qformer_cross_attention

__all__ = ["FeedForward", "GatedCrossAttentionBlock", "MaskedCrossAttention", "PerceiverAttention",
           "PerceiverResampler"]


def _ff_dim(owner: str, dim: int, ff_mult, ff_dim) -> int:
    if ff_dim is not None:
        return check.integer("ff_dim", ff_dim, op=owner, low=1)
    ff_mult = check.real("ff_mult", ff_mult, op=owner, low=0.0)
    inner = int(dim * ff_mult)
    if inner < 1:
        raise ValueError(f"{owner}: ff_mult must give a feed-forward width int(dim * ff_mult) >= 1, got {ff_mult}")
    return inner


class FeedForward(nn.Sequential):
    """flamingo-pytorch's ``FeedForward``: ``LayerNorm -> Linear(dim, inner, no bias) -> GELU (erf) -> Linear(inner,
    dim, no bias)`` (keys ``0``, ``1``, ``3``)."""

    def __init__(self, dim: int, inner: int, **factory) -> None:
        super().__init__(nn.LayerNorm(dim, **factory), nn.Linear(dim, inner, bias=False, **factory), nn.GELU(),
                         nn.Linear(inner, dim, bias=False, **factory))


class PerceiverAttention(nn.Module):
    """One resampler attention: ``to_out(attn(to_q(norm_latents(l)), to_kv([norm_media(x); norm_latents(l)])))``.

    ``forward(x [I, N, dim], latents [I, n, dim]) -> [I, n, dim]`` (I = batch x media items)."""

    backend = ModuleBackend("qformer_cross_attention", "attention")

    def __init__(self, dim: int, dim_head: int, heads: int, *, backend: BackendChoice = None, **factory) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim, **factory)
        self.norm_latents = nn.LayerNorm(dim, **factory)
        self.to_q = nn.Linear(dim, inner, bias=False, **factory)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False, **factory)
        self.to_out = nn.Linear(inner, dim, bias=False, **factory)
        self.backend = backend

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        h, d = self.heads, self.dim_head
        q = self.to_q(latents).unflatten(-1, (h, d))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).unflatten(-1, (2, h, d)).unbind(-3)
        if q.shape[1] <= _FEW_MAX_QUERIES and d <= _FEW_MAX_HEAD_DIM:
            out = qformer_cross_attention(q, k, v, backend=self._backends["qformer_cross_attention"])
        else:
            out = attention(q, k, v, backend=self._backends["attention"])
        return self.to_out(out.flatten(-2))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler: a fixed number of latents per media item, whatever its token count.

    Args:
        dim: width of the media tokens, the latents and the output.
        depth: number of (attention, feed-forward) layers.
        dim_head: per-head width (up to 256; the few-query kernel takes up to 128).
        heads: attention heads.
        num_latents: learned latents per media item (the few-query kernel takes up to 128; more use the dense
            attention op).
        num_media_embeds: media positions with a learned embedding (``T`` of the input must not exceed it).
        ff_mult: feed-forward width ``int(dim * ff_mult)``.
        ff_dim: the feed-forward width itself (overrides ``ff_mult``).
        backend: ``None`` (auto), a name, or ``{"qformer_cross_attention": ..., "attention": ...}``; reaches every
            attention op inside (``mmkernels.BackendError`` for a name an op lacks).

    Parameters (flamingo-pytorch's keys): ``latents [num_latents, dim]``, ``media_pos_emb [num_media_embeds, 1, dim]``,
    ``layers.{i}.0.{norm_media,norm_latents,to_q,to_kv,to_out}`` (``to_kv`` rows ``[k | v]``, no biases),
    ``layers.{i}.1.{0,1,3}`` (the feed-forward), ``norm``.

    ``forward(x)``: ``x`` ``[B, T, N, dim]`` (T media items of N tokens each) or ``[B, N, dim]`` (one item); returns
    ``[B, T, num_latents, dim]`` (``T = 1`` for a 3-D input), in the module's dtype.
    """

    backend = ModuleBackend("qformer_cross_attention", "attention")

    def __init__(
        self,
        dim: int,
        depth: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        num_media_embeds: int = 4,
        ff_mult: float = 4,
        ff_dim: int | None = None,
        backend: BackendChoice = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check.module_dtype(name, dtype)
        self.dim = check.integer("dim", dim, op=name, low=1)
        self.depth = check.integer("depth", depth, op=name, low=1)
        self.dim_head = check.integer("dim_head", dim_head, op=name, low=1, high=_ATTN_MAX_HEAD_DIM)
        self.heads = check.integer("heads", heads, op=name, low=1)
        self.num_latents = check.integer("num_latents", num_latents, op=name, low=1)
        self.num_media_embeds = check.integer("num_media_embeds", num_media_embeds, op=name, low=1)
        self.ff_dim = _ff_dim(name, self.dim, ff_mult, ff_dim)
        factory = {"device": device, "dtype": dtype}
        self.latents = nn.Parameter(torch.randn(self.num_latents, self.dim, **factory))
        self.media_pos_emb = nn.Parameter(torch.randn(self.num_media_embeds, 1, self.dim, **factory))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(self.dim, self.dim_head, self.heads, **factory),
                           FeedForward(self.dim, self.ff_dim, **factory)])
            for _ in range(self.depth))
        self.norm = nn.LayerNorm(self.dim, **factory)
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, depth={self.depth}, heads={self.heads}, dim_head={self.dim_head}, "
                f"num_latents={self.num_latents}, num_media_embeds={self.num_media_embeds}, ff_dim={self.ff_dim}")

    @classmethod
    def from_flamingo_pytorch(cls, module: nn.Module, *, backend: BackendChoice = None) -> PerceiverResampler:
        """A copy of a ``flamingo_pytorch.PerceiverResampler`` (its weights copied into new parameters, its
        hyper-parameters read from it, on its device and dtype, in its train/eval mode)."""
        try:
            latents, pos, layers = module.latents, module.media_pos_emb, module.layers
            attn, ff = layers[0][0], layers[0][1]
            heads, inner = int(attn.heads), attn.to_q.out_features
        except (AttributeError, IndexError, TypeError) as e:
            raise TypeError(f"{cls.__name__}.from_flamingo_pytorch: module must be a flamingo_pytorch "
                            f"PerceiverResampler, got {type(module).__name__} ({e})") from None
        if not isinstance(module, nn.Module) or inner % heads:
            raise TypeError(f"{cls.__name__}.from_flamingo_pytorch: module must be a flamingo_pytorch "
                            f"PerceiverResampler, got {type(module).__name__}")
        out = cls(latents.shape[1], len(layers), dim_head=inner // heads, heads=heads, num_latents=latents.shape[0],
                  num_media_embeds=pos.shape[0], ff_dim=ff[1].out_features, backend=backend, device=latents.device,
                  dtype=latents.dtype)
        _copy_from(out, module)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        check.tensor("x", x, op=name)
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x must be [B, T, N, {self.dim}] or [B, N, {self.dim}], got {tuple(x.shape)}")
        check.module_input(name, "x", x, self.latents)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        B, T, N, D = x.shape
        if self.num_media_embeds < T:
            raise ValueError(f"{name}: x has T = {T} media items (dim 1 of [B, T, N, D]) but the resampler has "
                             f"num_media_embeds = {self.num_media_embeds} media position embeddings")
        if N < 1:
            raise ValueError(f"{name}: x must have at least one token per media item, got shape {tuple(x.shape)}")
        x = (x + self.media_pos_emb[:T]).flatten(0, 1)  # [B*T, N, D]: every media item resampled on its own
        latents = self.latents.expand(B * T, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents).unflatten(0, (B, T))


class MaskedCrossAttention(nn.Module):
    """Text-to-media attention of a gated block: ``to_out(media_cross_attention(to_q(norm(x)), to_kv(media)))``.

    ``forward(x [B, Lt, dim], media [B, M, Nl, dim], media_locations bool [B, Lt] | None) -> [B, Lt, dim]``."""

    backend = ModuleBackend("media_cross_attention")

    def __init__(self, dim: int, dim_head: int, heads: int, only_attend_immediate_media: bool, *,
                 backend: BackendChoice = None, **factory) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim, **factory)
        self.to_q = nn.Linear(dim, inner, bias=False, **factory)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False, **factory)
        self.to_out = nn.Linear(inner, dim, bias=False, **factory)
        self.only_attend_immediate_media = only_attend_immediate_media
        self.backend = backend

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None) -> torch.Tensor:
        h, d = self.heads, self.dim_head
        q = self.to_q(self.norm(x)).unflatten(-1, (h, d))
        k, v = self.to_kv(media).unflatten(-1, (2, h, d)).unbind(-3)  # [B, M, Nl, h, d] each
        immediate = self.only_attend_immediate_media
        if media_locations is None:  # flamingo-pytorch without locations: every token sees every latent
            k, v = k.flatten(1, 2).unsqueeze(1), v.flatten(1, 2).unsqueeze(1)
            media_locations = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            media_locations[:, :1] = True
            immediate = True
        out = media_cross_attention(q, k, v, media_locations, only_immediate=immediate,
                                    backend=self._backends["media_cross_attention"])
        return self.to_out(out.flatten(-2))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block, inserted before a language-model layer.

    ``x = tanh(attn_gate) * to_out(attn(norm(x), media)) + x``, then ``x = tanh(ff_gate) * ff(x) + x``.

    Args:
        dim: width of the text tokens and of the media latents.
        dim_head, heads: attention heads (``heads * dim_head`` is the inner width; ``dim_head`` up to 256).
        ff_mult: feed-forward width ``int(dim * ff_mult)``; ``ff_dim`` gives it directly.
        only_attend_immediate_media: each text token attends to the latents of the last media at or before it
            (True, Flamingo) or of every media up to it (False). Tokens before the first media get exact zeros
            from the attention in both modes (flamingo-pytorch averages every latent for them in the False mode:
            the one difference). A plain attribute: may be changed later.
        backend: ``None``, a name or ``{"media_cross_attention": name}``.

    Parameters (flamingo-pytorch's keys): ``attn.{norm,to_q,to_kv,to_out}`` (no biases; ``to_kv`` rows
    ``[k | v]``), ``attn_gate [1]``, ``ff.{0,1,3}``, ``ff_gate [1]``; the gates start at 0.

    ``forward(x, media, media_locations=None)``: ``x`` ``[B, Lt, dim]`` text hidden states, ``media``
    ``[B, M, Nl, dim]`` (a resampler's output), ``media_locations`` bool ``[B, Lt]`` (True where a media token sits:
    token i belongs to media ``cumsum(media_locations)[i] - 1``) or ``None`` (every token attends to every latent,
    as flamingo-pytorch without locations). Returns ``[B, Lt, dim]``.
    """

    backend = ModuleBackend("media_cross_attention")

    def __init__(
        self,
        dim: int,
        *,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        ff_dim: int | None = None,
        only_attend_immediate_media: bool = True,
        backend: BackendChoice = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check.module_dtype(name, dtype)
        self.dim = check.integer("dim", dim, op=name, low=1)
        self.dim_head = check.integer("dim_head", dim_head, op=name, low=1, high=_ATTN_MAX_HEAD_DIM)
        self.heads = check.integer("heads", heads, op=name, low=1)
        self.ff_dim = _ff_dim(name, self.dim, ff_mult, ff_dim)
        only_attend_immediate_media = check.flag("only_attend_immediate_media", only_attend_immediate_media, op=name)
        factory = {"device": device, "dtype": dtype}
        self.attn = MaskedCrossAttention(self.dim, self.dim_head, self.heads, only_attend_immediate_media, **factory)
        self.attn_gate = nn.Parameter(torch.zeros(1, **factory))
        self.ff = FeedForward(self.dim, self.ff_dim, **factory)
        self.ff_gate = nn.Parameter(torch.zeros(1, **factory))
        self.backend = backend

    @property
    def only_attend_immediate_media(self) -> bool:
        return self.attn.only_attend_immediate_media

    @only_attend_immediate_media.setter
    def only_attend_immediate_media(self, value: bool) -> None:
        self.attn.only_attend_immediate_media = check.flag("only_attend_immediate_media", value,
                                                           op=type(self).__name__)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, ff_dim={self.ff_dim}, "
                f"only_attend_immediate_media={self.only_attend_immediate_media}")

    @classmethod
    def from_flamingo_pytorch(cls, module: nn.Module, *, backend: BackendChoice = None) -> GatedCrossAttentionBlock:
        """A copy of a ``flamingo_pytorch.GatedCrossAttentionBlock`` (weights copied into new parameters,
        hyper-parameters including ``only_attend_immediate_media`` read from it, on its device and dtype)."""
        try:
            attn, ff = module.attn, module.ff
            heads, inner, dim = int(attn.heads), attn.to_q.out_features, attn.to_q.in_features
            immediate = bool(attn.only_attend_immediate_media)
            ff_dim, weight = ff[1].out_features, attn.to_q.weight
            if not (isinstance(module.attn_gate, torch.Tensor) and isinstance(module.ff_gate, torch.Tensor)):
                raise TypeError("attn_gate and ff_gate must be tensors")
        except (AttributeError, IndexError, TypeError) as e:
            raise TypeError(f"{cls.__name__}.from_flamingo_pytorch: module must be a flamingo_pytorch "
                            f"GatedCrossAttentionBlock, got {type(module).__name__} ({e})") from None
        if not isinstance(module, nn.Module) or inner % heads:
            raise TypeError(f"{cls.__name__}.from_flamingo_pytorch: module must be a flamingo_pytorch "
                            f"GatedCrossAttentionBlock, got {type(module).__name__}")
        out = cls(dim, dim_head=inner // heads, heads=heads, ff_dim=ff_dim, only_attend_immediate_media=immediate,
                  backend=backend, device=weight.device, dtype=weight.dtype)
        _copy_from(out, module)
        return out

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None
                ) -> torch.Tensor:
        name = type(self).__name__
        check.tensor("x", x, op=name)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x must be [B, Lt, {self.dim}], got {tuple(x.shape)}")
        check.tensor("media", media, op=name)
        B, Lt, _ = x.shape
        if media.dim() != 4 or media.shape[0] != B or media.shape[-1] != self.dim:
            raise ValueError(f"{name}: media must be [B, M, Nl, {self.dim}] with B = {B} (a resampler's output), got "
                             f"{tuple(media.shape)}")
        if media.shape[1] < 1 or media.shape[2] < 1:
            raise ValueError(f"{name}: media must hold at least one media item of at least one latent, got "
                             f"{tuple(media.shape)}")
        check.module_input(name, "x", x, self.attn_gate)
        check.module_input(name, "media", media, self.attn_gate)
        if media_locations is not None:
            check.tensor("media_locations", media_locations, dtypes=(torch.bool,), op=name)
            if tuple(media_locations.shape) != (B, Lt):
                raise ValueError(f"{name}: media_locations must be bool [B, Lt] = [{B}, {Lt}] like x, got "
                                 f"{tuple(media_locations.shape)}")
            if media_locations.device != x.device:
                raise ValueError(f"{name}: media_locations is on {media_locations.device} but x is on {x.device}")
        x = self.attn(x, media, media_locations) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


def _copy_from(ours: nn.Module, theirs: nn.Module) -> None:
    """Strict state-dict copy (same keys by construction) plus the LayerNorm epsilons and the train/eval mode."""
    try:
        ours.load_state_dict(theirs.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{type(ours).__name__}.from_flamingo_pytorch: the module's parameters do not match "
                         f"flamingo-pytorch's layout: {e}") from None
    mods = dict(theirs.named_modules())
    for n, m in ours.named_modules():
        if isinstance(m, nn.LayerNorm) and isinstance(mods.get(n), nn.LayerNorm):
            m.eps = mods[n].eps
    ours.train(theirs.training)

