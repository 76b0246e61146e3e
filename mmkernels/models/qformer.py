"""``QFormer``: the BLIP-2 Querying Transformer for learned query tokens, as Hugging Face ``Blip2QFormerModel``
computes it, on mmkernels ops; with InstructBLIP's instruction tokens (``input_ids=``) as ``InstructBlipQFormerModel``.

Per layer (post-norm BERT): self-attention over the queries, then (every ``cross_attention_frequency`` layers,
starting with layer 0) cross-attention from the queries to the image features, then the query feed-forward
(HF's ``intermediate_query`` / ``output_query``); each block is ``LayerNorm(x + dropout(dense(block(x))))``. The
input goes through a LayerNorm first (``Blip2QFormerModel.layernorm``), as in HF.

The one structural change: the image features are the same for every cross-attention layer, so the K and V
projections of *all* cross-attention layers are one GEMM (``kv_proj``, ``[n_cross * 2 * hidden, encoder_hidden]``,
layer-major, K before V), done once before the layers; each layer reads its K/V slice in place (strided views,
no copies). On the real config that GEMM is about half of the model's FLOPs (see :func:`qformer_flops`).
Both attentions run on :func:`mmkernels.ops.qformer_cross_attention` (the self-attention is the same shape
class: 32 queries over 32 keys; with an instruction, the query and text rows over all of them, padded text keys
masked by ``kv_lens``, in chunks of 128 rows).

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
                  image_tokens: int = 257, batch: int = 1, text_tokens: int = 0) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) by part, analytically. Keys: ``cross_kv_proj`` (the hoisted K/V GEMM),
    ``attention_math`` (QK^T and PV of self- and cross-attention), ``cross_q_out_proj``, ``self_attn_proj``
    (QKV and output projections), ``ffn`` (the query FFN), ``text_ffn``, ``total``, and ``*_share`` fractions of the
    total. Norms, softmax and activations are left out (a fraction of a percent).

    ``text_tokens``: InstructBLIP instruction tokens (all attended), as :class:`QFormer` computes them: every
    self-attention and its QKV GEMM over ``num_queries + text_tokens`` rows, except the last layer's attention and
    output projection (query rows only); the text FFN in every layer but the last."""
    c, Lq, Lk, Lt = config, num_queries, image_tokens, text_tokens
    d, e, n_layers, n_cross = c.hidden_size, c.encoder_hidden_size, c.num_hidden_layers, len(c.cross_layers)
    L, full, last = Lq + Lt, max(n_layers - 1, 0), min(n_layers, 1)  # rows; layers with all rows; the last layer
    parts = {
        "cross_kv_proj": n_cross * 2 * (2 * Lk * e * d),
        "attention_math": (full * L + last * Lq) * 4 * L * d + n_cross * 4 * Lq * Lk * d,
        "cross_q_out_proj": n_cross * 2 * (2 * Lq * d * d),
        "self_attn_proj": n_layers * 3 * (2 * L * d * d) + (full * L + last * Lq) * 2 * d * d,
        "ffn": n_layers * 2 * (2 * Lq * d * c.intermediate_size),
        "text_ffn": full * 2 * (2 * Lt * d * c.intermediate_size),
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
                 backend: BackendChoice = None, *, text_ffn: bool = False) -> None:
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
        # InstructBLIP's text FFN (HF intermediate / output), on the instruction rows; every layer but the last has
        # one (the last layer's text rows never reach the query outputs, so that layer runs the query rows only).
        self.text_ffn = text_ffn
        if text_ffn:
            self.text_fc1 = nn.Linear(d, config.intermediate_size, **factory)
            self.text_fc2 = nn.Linear(config.intermediate_size, d, **factory)
            self.text_ffn_norm = nn.LayerNorm(d, eps=eps, **factory)
        self.backend = backend  # last: the cross-attention part gets it too

    def _self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_lens: torch.Tensor | None) -> torch.Tensor:
        """The few-query kernel over every row; with instruction tokens the rows can exceed its 128-query tile, so
        they run in chunks of 128 query rows over the same keys (one call for up to 128 rows). Padded
        instruction tokens sit past ``kv_lens`` (the QFormer moved them there)."""
        p = self.attention_dropout if self.training else 0.0
        backend = self._backends[_OP]
        chunks = q.split(MAX_QUERIES, dim=1)
        out = [qformer_cross_attention(c, k, v, kv_lens=kv_lens, backend=backend, dropout_p=p,
                                       validate_kv_lens=False) for c in chunks]
        return (out[0] if len(out) == 1 else torch.cat(out, dim=1)).flatten(2)

    def forward(self, x: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_lens: torch.Tensor | None, num_queries: int, self_kv_lens: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``x`` ``[B, Lq + Lt, d]``: the ``num_queries`` query rows, then the instruction rows (``Lt = 0`` without
        an instruction). Returns the same rows, or the query rows only in a layer without a text FFN (the last)."""
        nq = num_queries
        q, sk, sv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        if x.shape[1] > nq and not self.text_ffn:  # the last layer: only the query rows' outputs are used
            q, x = q[:, :nq], x[:, :nq]
        ctx = self._self_attention(q, sk, sv, self_kv_lens)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        xq, xt = (x, None) if x.shape[1] == nq else (x[:, :nq], x[:, nq:])
        if self.cross_index is not None:
            # QFormer._kv_lens checked the lengths once for every layer
            ctx = self.cross(xq, key=k, value=v, kv_lens=kv_lens, validate_kv_lens=False)
            xq = self.cross_norm(xq + self.dropout(self.cross_out(ctx)))
        xq = self.ffn_norm(xq + self.dropout(self.fc2(self.act(self.fc1(xq)))))
        if xt is None:
            return xq
        xt = self.text_ffn_norm(xt + self.dropout(self.text_fc2(self.act(self.text_fc1(xt)))))
        return torch.cat([xq, xt], dim=1)


class QFormer(nn.Module):
    """BLIP-2 / InstructBLIP Q-Former over learned query tokens.

    ``QFormer(query_embeds [B, Lq, hidden], image_embeds [B, Lk, encoder_hidden], image_attention_mask=None, *,
    input_ids=None, attention_mask=None)`` returns ``[B, Lq, hidden]`` (HF's ``last_hidden_state``, query rows).
    ``Lq <= 128``. ``image_attention_mask`` ``[B, Lk]`` (1/True = attend) must be a prefix mask per row (tokens past
    each image's length padded), with at least one token per row; it becomes per-sample ``kv_lens`` for the attention
    kernel. Inputs are cast to the model's dtype, as HF does.

    Instruction (InstructBLIP, HF ``InstructBlipQFormerModel``; needs ``config.vocab_size``, which ``from_hf`` of an
    InstructBLIP Q-Former sets): ``input_ids`` int64/int32 ``[B, Lt]`` (``Lt <= max_position_embeddings``) go through
    word + position embeddings and are appended after the queries before the input LayerNorm; queries and text share
    every self-attention, only the query rows cross-attend to the image and run the query FFN, the text rows run the
    text FFN. ``attention_mask`` (0/1 or bool) is the instruction's padding, ``[B, Lt]`` (HF's
    ``qformer_attention_mask``) or ``[B, Lq + Lt]`` with ones over the queries (what HF's Q-Former itself takes);
    padding may sit anywhere (right, left, holes): the padded tokens are moved behind the attended ones once, so every
    self-attention masks a suffix of keys through ``kv_lens``, never an explicit mask. One host read per forward checks
    the ids and the mask (skipped inside ``torch.compile``). Without ``input_ids`` the forward is BLIP-2's.

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
        if config.has_text_input:  # InstructBLIP's instruction tokens (HF embeddings.word/position_embeddings)
            self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id, **factory)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, d, **factory)
        index = {layer: c for c, layer in enumerate(cross)}
        last = config.num_hidden_layers - 1
        self.layers = nn.ModuleList(
            _QFormerLayer(config, index.get(i), factory, text_ffn=config.has_text_input and i < last)
            for i in range(config.num_hidden_layers)
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

    def _instruction(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, B: int, Lq: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The instruction rows ``[B, Lt, d]`` (word + position embeddings, attended tokens first) and the
        self-attention's int32 ``kv_lens`` ``Lq + attended tokens`` (``None``: nothing padded), or ``(None, None)``
        without an instruction."""
        c = self.config
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError(f"{_NAME}: attention_mask is the instruction tokens' mask; it needs input_ids")
            return None, None
        if not c.has_text_input:
            raise ValueError(f"{_NAME}: input_ids (instruction tokens) need the text path, and this Q-Former has no "
                             "word embeddings (config.vocab_size is None: a BLIP-2 Q-Former); build it with "
                             "vocab_size=, or QFormer.from_hf of an InstructBLIP Q-Former")
        check.tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32), dim=2, op=_NAME)
        device = self.layernorm.weight.device
        if input_ids.device != device:
            raise ValueError(f"{_NAME}: input_ids is on {input_ids.device} but the module's weights are on {device}")
        Lt = input_ids.shape[1]
        if input_ids.shape[0] != B:
            raise ValueError(f"{_NAME}: input_ids must be [B, Lt] with B = {B} (query_embeds' batch), got "
                             f"{tuple(input_ids.shape)}")
        if Lt > c.max_position_embeddings:
            raise ValueError(f"{_NAME}: input_ids has {Lt} tokens, more than max_position_embeddings "
                             f"({c.max_position_embeddings})")
        keep = None
        if attention_mask is not None:
            check.tensor("attention_mask", attention_mask, dim=2, op=_NAME)
            if tuple(attention_mask.shape) not in ((B, Lt), (B, Lq + Lt)):
                raise ValueError(f"{_NAME}: attention_mask must be [B, Lt] = [{B}, {Lt}] (the instruction tokens', "
                                 f"as HF's qformer_attention_mask) or [B, Lq + Lt] = [{B}, {Lq + Lt}] (queries "
                                 f"then instruction, as HF's Q-Former takes it), got {tuple(attention_mask.shape)}")
            if attention_mask.device != device:
                raise ValueError(f"{_NAME}: attention_mask is on {attention_mask.device} but the module's weights "
                                 f"are on {device}")
            keep = attention_mask != 0
            binary = keep.new_ones(()) if attention_mask.dtype == torch.bool else (
                (attention_mask == 0) | (attention_mask == 1)).all()
            queries_kept = keep.new_ones(())
            if attention_mask.shape[1] != Lt:
                queries_kept, keep = keep[:, :Lq].all(), keep[:, Lq:]
        message = (f"{_NAME}: attention_mask must hold 0/1 (or bool) values, with 1 at every query position when it "
                   "covers the queries too (the learned queries always attend)")
        if torch.compiler.is_compiling():
            if keep is not None:
                torch._assert_async(binary & queries_kept, message)
        elif input_ids.numel() and not input_ids.is_meta:  # one host read for every check
            lo, hi = torch.aminmax(input_ids)
            flags = [lo, hi] if keep is None else [lo, hi, binary, queries_kept, keep.all()]
            values = torch.stack([f.to(torch.int64) for f in flags]).tolist()
            if values[0] < 0 or values[1] >= c.vocab_size:
                raise ValueError(f"{_NAME}: input_ids must lie in [0, {c.vocab_size}) (config.vocab_size), got "
                                 f"values in [{values[0]}, {values[1]}]")
            if keep is not None:
                if not (values[2] and values[3]):
                    raise ValueError(message)
                if values[4]:
                    keep = None  # nothing padded: no masking work
        if Lt == 0:
            return None, None
        text = self.word_embeddings(input_ids) + self.position_embeddings.weight[:Lt]
        if keep is None:
            return text, None
        # Padded tokens (anywhere: right, left, holes) move behind the attended ones, so that the keys to mask are a
        # suffix of every row: kv_lens, no explicit mask. Positions were added before; attention is order-free and
        # the rest of a layer works per token, so this changes no query output (the text rows are not returned).
        order = torch.argsort(keep.logical_not().to(torch.int32), dim=1, stable=True)
        text = text.gather(1, order.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        return text, keep.sum(1, dtype=torch.int32) + Lq

    def forward(self, query_embeds: torch.Tensor, image_embeds: torch.Tensor,
                image_attention_mask: torch.Tensor | None = None, *, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
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
        text, self_kv_lens = self._instruction(input_ids, attention_mask, B, Lq)
        dtype = self.layernorm.weight.dtype
        x = query_embeds.to(dtype)
        if text is not None:
            x = torch.cat([x, text], dim=1)
        x = self.dropout(self.layernorm(x))
        n_cross = len(c.cross_layers)
        kv = self.kv_proj(image_embeds.to(dtype)).unflatten(-1, (2 * n_cross, c.num_attention_heads, c.head_dim))
        kv = kv.unbind(2)  # views [B, Lk, H, D]; backward is one stack
        for layer in self.layers:
            ci = layer.cross_index
            if ci is None:
                x = layer(x, None, None, None, Lq, self_kv_lens)
            else:
                x = layer(x, kv[2 * ci], kv[2 * ci + 1], kv_lens, Lq, self_kv_lens)
        return x if x.shape[1] == Lq else x[:, :Lq]
