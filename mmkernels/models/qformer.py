"""``QFormer``: the BLIP-2 Querying Transformer for learned query tokens, as Hugging Face ``Blip2QFormerModel``
computes it, on mmkernels ops.

Per layer (post-norm BERT): self-attention over the queries, then (every ``cross_attention_frequency`` layers,
starting with layer 0) cross-attention from the queries to the image features, then the query feed-forward
(HF's ``intermediate_query`` / ``output_query``); each block is ``LayerNorm(x + dropout(dense(block(x))))``. The
input goes through a LayerNorm first (``Blip2QFormerModel.layernorm``), as in HF.

The one structural change: the image features are the same for every cross-attention layer, so the K and V
projections of *all* cross-attention layers are one GEMM (``kv_proj``, ``[n_cross * 2 * hidden, encoder_hidden]``,
layer-major, K before V), done once before the layers; each layer reads its K/V slice in place (strided views,
no copies). On the real config that GEMM is about half of the model's FLOPs (see :func:`qformer_flops`).
Both attentions run on :func:`mmkernels.ops.qformer_cross_attention` (the self-attention is the same shape
class: 32 queries over 32 keys).

Dropout on the attention probabilities (HF ``attention_probs_dropout_prob``, self- and cross-attention) and hidden
dropout run in training mode as in HF (the masks differ: the kernels draw their own Philox numbers). Results equal
HF's in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..nn.qformer_attention import QFormerCrossAttention
from ..ops import _validate as check
from ..ops.qformer_attention import MAX_QUERIES, kv_lens_from_mask, qformer_cross_attention
from .convert import qformer as _convert
from .qformer_config import ACTIVATIONS, NUM_QUERY_TOKENS, PRESETS, QFormerConfig

__all__ = ["NUM_QUERY_TOKENS", "PRESETS", "QFormer", "QFormerConfig", "qformer_flops"]

_NAME = "QFormer"
_OP = "qformer_cross_attention"


def qformer_flops(config: QFormerConfig = PRESETS["blip2"], *, num_queries: int = NUM_QUERY_TOKENS,
                  image_tokens: int = 257, batch: int = 1) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) by part, analytically. Keys: ``cross_kv_proj`` (the hoisted K/V GEMM),
    ``attention_math`` (QK^T and PV of self- and cross-attention), ``cross_q_out_proj``, ``self_attn_proj``
    (QKV and output projections), ``ffn``, ``total``, and ``*_share`` fractions of the total. Norms, softmax and
    activations are left out (a fraction of a percent)."""
    c, Lq, Lk = config, num_queries, image_tokens
    d, e, n_layers, n_cross = c.hidden_size, c.encoder_hidden_size, c.num_hidden_layers, len(c.cross_layers)
    parts = {
        "cross_kv_proj": n_cross * 2 * (2 * Lk * e * d),
        "attention_math": n_layers * 4 * Lq * Lq * d + n_cross * 4 * Lq * Lk * d,
        "cross_q_out_proj": n_cross * 2 * (2 * Lq * d * d),
        "self_attn_proj": n_layers * 4 * (2 * Lq * d * d),
        "ffn": n_layers * 2 * (2 * Lq * d * c.intermediate_size),
    }
    parts = {k: float(batch * v) for k, v in parts.items()}
    total = sum(parts.values())
    out = dict(parts, total=total)
    out.update({f"{k}_share": v / total for k, v in parts.items()})
    return out


class _QFormerLayer(nn.Module):
    # The layer's self-attention runs the op itself; its cross-attention part gets its share of the choice.
    backend = ModuleBackend(_OP)

    def __init__(self, config: QFormerConfig, cross_index: int | None, factory: dict,
                 backend: BackendChoice = None) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_probs_dropout_prob
        self.cross_index = cross_index
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.qkv = nn.Linear(d, 3 * d, **factory)
        self.attn_out = nn.Linear(d, d, **factory)
        self.attn_norm = nn.LayerNorm(d, eps=eps, **factory)
        if cross_index is not None:
            self.cross = QFormerCrossAttention(d, config.num_attention_heads, config.encoder_hidden_size,
                                               project_kv=False,
                                               dropout=config.attention_probs_dropout_prob, **factory)
            self.cross_out = nn.Linear(d, d, **factory)
            self.cross_norm = nn.LayerNorm(d, eps=eps, **factory)
        self.fc1 = nn.Linear(d, config.intermediate_size, **factory)
        self.fc2 = nn.Linear(config.intermediate_size, d, **factory)
        self.ffn_norm = nn.LayerNorm(d, eps=eps, **factory)
        self.backend = backend  # last: the cross-attention part gets it too

    def forward(self, x: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_lens: torch.Tensor | None) -> torch.Tensor:
        q, sk, sv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        ctx = qformer_cross_attention(q, sk, sv, backend=self._backends[_OP],
                                      dropout_p=self.attention_dropout if self.training else 0.0).flatten(2)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        if self.cross_index is not None:
            # QFormer._kv_lens checked the lengths once for every layer
            ctx = self.cross(x, key=k, value=v, kv_lens=kv_lens, validate_kv_lens=False)
            x = self.cross_norm(x + self.dropout(self.cross_out(ctx)))
        h = self.fc2(self.act(self.fc1(x)))
        return self.ffn_norm(x + self.dropout(h))


class QFormer(nn.Module):
    """BLIP-2 Q-Former over learned query tokens.

    ``QFormer(query_embeds [B, Lq, hidden], image_embeds [B, Lk, encoder_hidden], image_attention_mask=None)``
    returns ``[B, Lq, hidden]`` (HF's ``last_hidden_state``). ``Lq <= 128``. ``image_attention_mask`` ``[B, Lk]``
    (1/True = attend) must be a prefix mask per row (tokens past each image's length padded), with at least one
    token per row; it becomes per-sample ``kv_lens`` for the attention kernel. Inputs are cast to the model's dtype,
    as HF does.

    Build from a config (``QFormer(PRESETS["blip2"])``), from a HF model (:meth:`from_hf`) or load a converted HF
    state dict (:func:`mmkernels.models.convert.qformer.hf_to_mmkernels`). ``backend`` applies to every attention
    op (``None`` = auto); assigning ``qformer.backend`` checks it (``BackendError``) and passes it to every layer.
    """

    backend = ModuleBackend(_OP)

    def __init__(self, config: QFormerConfig = PRESETS["blip2"], *, backend: BackendChoice = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check.module_dtype(_NAME, dtype)
        if not isinstance(config, QFormerConfig):
            raise TypeError(f"{_NAME}: config must be a QFormerConfig, got {type(config).__name__}")
        self.config = config
        factory = dict(device=device, dtype=dtype)
        d = config.hidden_size
        cross = config.cross_layers
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps, **factory)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # K and V of every cross-attention layer in one GEMM: rows [(2c) d, (2c+1) d) are layer c's K, then its V.
        self.kv_proj = nn.Linear(config.encoder_hidden_size, 2 * len(cross) * d, **factory)
        index = {layer: c for c, layer in enumerate(cross)}
        self.layers = nn.ModuleList(
            _QFormerLayer(config, index.get(i), factory) for i in range(config.num_hidden_layers)
        )
        self.backend = backend  # last: checked, then handed to every layer

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> QFormer:
        if name not in PRESETS:
            raise ValueError(f"{_NAME}: unknown preset {name!r}; one of {sorted(PRESETS)}")
        return cls(PRESETS[name], **kwargs)

    @classmethod
    def from_hf(cls, model: nn.Module, *, backend: BackendChoice = None, hidden_dropout_prob: float | None = None
                ) -> QFormer:
        """Copy a HF ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` (or a BLIP-2 / InstructBLIP model that
        holds one as ``.qformer``). Same device, dtype and train/eval mode. Nothing is downloaded. A thin call:
        :func:`mmkernels.models.convert.qformer.from_hf` reads the config and converts the weights."""
        config, state_dict, like, training = _convert.from_hf(model, hidden_dropout_prob=hidden_dropout_prob)
        out = cls(config, backend=backend, device=like.device, dtype=like.dtype)
        out.load_state_dict(state_dict)
        return out.train(training)

    def _kv_lens(self, mask: torch.Tensor | None, B: int, Lk: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{_NAME}: image_attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (B, Lk):
            raise ValueError(f"{_NAME}: image_attention_mask must be [B, Lk] = [{B}, {Lk}], got {tuple(mask.shape)}")
        # A prefix per row with at least one token, checked eagerly (one host read, ValueError) and inside
        # torch.compile (torch._assert_async): a mask with holes never becomes lengths. None: nothing masked.
        return kv_lens_from_mask(mask, op=_NAME, name="image_attention_mask", none_if_full=True)

    def forward(self, query_embeds: torch.Tensor, image_embeds: torch.Tensor,
                image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        for name, t, width in (("query_embeds", query_embeds, c.hidden_size),
                               ("image_embeds", image_embeds, c.encoder_hidden_size)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"{_NAME}: {name} must be [B, L, {width}], got {tuple(t.shape)}")
            if not t.is_floating_point():  # floats are cast to the weights' dtype below; integers are a mistake
                raise TypeError(f"{_NAME}: {name} must be a floating-point tensor, got {t.dtype}")
            if t.device != self.layernorm.weight.device:
                raise ValueError(f"{_NAME}: input {name} is on {t.device} but the module's weights are on "
                                 f"{self.layernorm.weight.device}")
        B, Lq, _ = query_embeds.shape
        Lk = image_embeds.shape[1]
        if image_embeds.shape[0] != B:
            raise ValueError(f"{_NAME}: query_embeds and image_embeds must share the batch size, got {B} and "
                             f"{image_embeds.shape[0]}")
        if not 1 <= Lq <= MAX_QUERIES:
            raise ValueError(f"{_NAME}: 1 <= Lq <= {MAX_QUERIES} query tokens supported, got {Lq}")
        if Lk < 1:
            raise ValueError(f"{_NAME}: image_embeds needs at least one token")
        kv_lens = self._kv_lens(image_attention_mask, B, Lk)
        dtype = self.layernorm.weight.dtype
        x = self.dropout(self.layernorm(query_embeds.to(dtype)))
        n_cross = len(c.cross_layers)
        kv = self.kv_proj(image_embeds.to(dtype)).unflatten(-1, (2 * n_cross, c.num_attention_heads, c.head_dim))
        kv = kv.unbind(2)  # views [B, Lk, H, D]; backward is one stack
        for layer in self.layers:
            ci = layer.cross_index
            if ci is None:
                x = layer(x, None, None, None)
            else:
                x = layer(x, kv[2 * ci], kv[2 * ci + 1], kv_lens)
        return x
