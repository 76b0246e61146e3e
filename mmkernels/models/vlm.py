"""``VisionLanguageModel``: BLIP-2 style vision front end, LongCat-Flash style MoE language model.

```
pixel_values [B, 3, H, W] -> ViT -> image tokens [B, Li, Dv]
learned queries [Nq, Dq]  -> QFormer (cross-attends to the image tokens) -> [B, Nq, Dq]
                          -> projector Linear(Dq, D) -> visual prefix [B, Nq, D]
input_ids [B, L]          -> decoder.embed_tokens -> [B, L, D]
[prefix | text]           -> ScMoEDecoder (causal) -> logits of the text positions [B, L, V]
```

Position i of the text predicts token i+1 (the usual next-token shift is the caller's, as in HF). The visual prefix
is attended by every text token; the prefix tokens themselves attend only to earlier prefix tokens (one causal
decoder, as LLaVA / BLIP-2 OPT). Every op (patch embedding, attention, Q-Former attention, routing, experts, bias
update) takes the model's ``backend``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as v
from .convert import blip2 as _convert
from .qformer import QFormer
from .scmoe import _LAYER_OPS, ScMoEConfig, ScMoEDecoder
from .vit import ViT
from .vlm_config import VLM_PRESETS, VLMConfig

__all__ = ["VLM_PRESETS", "VLMConfig", "VisionLanguageModel"]

_NAME = "VisionLanguageModel"
_VLM_OPS = (*_LAYER_OPS, "patch_embed", "qformer_cross_attention")


class VisionLanguageModel(nn.Module):
    """ViT -> learned queries through the Q-Former -> linear projector -> prefix of an :class:`ScMoEDecoder`.

    Modules (and state-dict prefixes): ``vision`` (:class:`ViT`), ``query_tokens`` ``[1, Nq, Dq]``, ``qformer``
    (:class:`QFormer`), ``projector`` (``Linear(Dq, D)``), ``decoder`` (:class:`ScMoEDecoder`).

    Args:
        config: a :class:`VLMConfig` or a preset name.
        overlap, ep_group: passed to the decoder's layers (expert parallelism).
        backend: ``None``, a name or ``{op: name}`` over every op of the model (``patch_embed``, ``attention``,
            ``qformer_cross_attention``, ``moe_route``, ``moe_experts``, ``moe_permute``, ``moe_grouped_swiglu``,
            ``moe_unpermute``, ``expert_bias_update_``); a name reaches every op (an op without it raises
            :class:`mmkernels.BackendError` here).

    ``forward(pixel_values [B, C, H, W], input_ids [B, L], *, padding_mask=None, qformer_input_ids=None,
    qformer_attention_mask=None) -> logits [B, L, V]`` for the text positions (position i predicts token i+1).
    ``padding_mask`` bool [B, L], right padding (see :class:`ScMoEDecoder`). ``qformer_input_ids`` /
    ``qformer_attention_mask`` [B, Lt]: InstructBLIP's instruction for the Q-Former (HF's names; the Q-Former needs
    its text path, ``config.qformer.vocab_size``), see :meth:`encode_image`.
    ``generate(pixel_values, input_ids, max_new_tokens, *, qformer_input_ids=None, qformer_attention_mask=None) ->
    [B, L + max_new_tokens]``: greedy decoding with a :class:`KVCache`.

    ``vlm.backend = ...`` checks the whole choice against every op of the model (``BackendError`` naming the op)
    before any part changes, then hands the vision tower, the Q-Former and the decoder their shares.
    """

    backend = ModuleBackend(*_VLM_OPS)

    def __init__(self, config: VLMConfig | str, *, overlap: bool = True, ep_group=None,
                 backend: BackendChoice = None, device=None, dtype=None) -> None:
        super().__init__()
        v.module_dtype(_NAME, dtype)
        overlap = v.flag("overlap", overlap, op=_NAME)
        if isinstance(config, str):
            config = VLMConfig.preset(config)
        if not isinstance(config, VLMConfig):
            raise TypeError(f"{_NAME}: config must be a VLMConfig or a preset name, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.vision = ViT(config.vision, **factory)
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_query_tokens, config.qformer.hidden_size,
                                                     **factory))
        self.qformer = QFormer(config.qformer, **factory)
        self.projector = nn.Linear(config.qformer.hidden_size, config.decoder.hidden_size, **factory)
        self.decoder = ScMoEDecoder(config.decoder, overlap=overlap, ep_group=ep_group, **factory)
        self.backend = backend  # last: checked, then each part gets its share
        if not self.query_tokens.is_meta:
            nn.init.normal_(self.query_tokens, std=0.02)  # BLIP-2's init of the learned queries

    @property
    def num_query_tokens(self) -> int:
        return self.config.num_query_tokens

    def balance_loss(self) -> torch.Tensor | None:
        """The decoder's device-level balance loss of the last training forward (coefficient included), or None."""
        return self.decoder.balance_loss()

    def update_bias(self) -> None:
        """The decoder's balancer step (once per optimizer step)."""
        self.decoder.update_bias()

    # -- the pieces ---------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, *, qformer_input_ids: torch.Tensor | None = None,
                     qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Q-Former's query outputs [B, Nq, Dq] for ``pixel_values`` [B, C, H, W] (HF BLIP-2's
        ``qformer(query_embeds=query_tokens, encoder_hidden_states=vision(pixels))`` ``last_hidden_state``).

        ``qformer_input_ids`` [B, Lt] / ``qformer_attention_mask`` [B, Lt]: InstructBLIP's instruction, fed to the
        Q-Former beside the queries (``QFormer(..., input_ids=, attention_mask=)``; the Q-Former needs its text path,
        ``config.qformer.vocab_size``), as HF ``InstructBlipForConditionalGeneration`` does; the query rows are
        returned."""
        v.tensor("pixel_values", pixel_values, dim=4, op=_NAME)
        image = self.vision(pixel_values)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        return self.qformer(queries, image, input_ids=qformer_input_ids, attention_mask=qformer_attention_mask)

    def image_prefix(self, pixel_values: torch.Tensor, *, qformer_input_ids: torch.Tensor | None = None,
                     qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The projected query outputs [B, Nq, D] that the decoder sees before the text (instruction: see
        :meth:`encode_image`)."""
        return self.projector(self.encode_image(pixel_values, qformer_input_ids=qformer_input_ids,
                                                qformer_attention_mask=qformer_attention_mask))

    def _inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, qformer_input_ids=None,
                qformer_attention_mask=None) -> torch.Tensor:
        v.tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32), dim=2, op=_NAME)
        prefix = self.image_prefix(pixel_values, qformer_input_ids=qformer_input_ids,
                                   qformer_attention_mask=qformer_attention_mask)
        if prefix.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{_NAME}: pixel_values and input_ids must share the batch size, got "
                             f"{prefix.shape[0]} and {input_ids.shape[0]}")
        text = self.decoder.embed_tokens(self._checked_ids(input_ids))
        return torch.cat([prefix.to(text.dtype), text], dim=1)

    def _checked_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.config.decoder.vocab_size
        if input_ids.numel() and not input_ids.is_meta and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(input_ids)
            if int(lo) < 0 or int(hi) >= vocab:  # one host read, eager only
                raise ValueError(f"{_NAME}: input_ids must lie in [0, {vocab}), got values in [{int(lo)}, {int(hi)}]")
        return input_ids

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, *,
                padding_mask: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        nq = self.config.num_query_tokens
        embeds = self._inputs(pixel_values, input_ids, qformer_input_ids, qformer_attention_mask)
        mask = None
        if padding_mask is not None:
            v.tensor("padding_mask", padding_mask, dtypes=(torch.bool,), op=_NAME)
            if tuple(padding_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"{_NAME}: padding_mask must be [B, L] = {tuple(input_ids.shape)}, got "
                                 f"{tuple(padding_mask.shape)}")
            mask = torch.cat([padding_mask.new_zeros(padding_mask.shape[0], nq), padding_mask], dim=1)
        hidden = self.decoder.hidden_states(inputs_embeds=embeds, padding_mask=mask)
        return self.decoder.lm_head(hidden[:, nq:])  # the LM head only where a text token is predicted

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int, *,
                 qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: ``[B, L + max_new_tokens]`` (``input_ids`` followed by the argmax tokens). An instruction
        for the Q-Former (``qformer_input_ids`` / ``qformer_attention_mask``, see :meth:`encode_image`) shapes the
        image prefix once.

        The prompt (image prefix + ``input_ids``, all rows of one length L >= 1) is run once into a
        :class:`KVCache`, then one token per step. Call in eval mode (in training mode the MoE would count the
        generated tokens for its balancer). Raises ``ValueError`` for ``max_new_tokens < 0`` or an empty prompt.
        """
        v.integer("max_new_tokens", max_new_tokens, op=f"{_NAME}.generate", low=0)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"{_NAME}.generate: input_ids must be [B, L] with L >= 1, got {tuple(input_ids.shape)}")
        out = [input_ids]
        if max_new_tokens == 0:
            return input_ids
        cache = self.decoder.new_cache()
        embeds = self._inputs(pixel_values, input_ids, qformer_input_ids, qformer_attention_mask)
        hidden = self.decoder.hidden_states(inputs_embeds=embeds, kv_cache=cache)
        for step in range(max_new_tokens):
            token = self.decoder.lm_head(hidden[:, -1]).argmax(-1, keepdim=True).to(input_ids.dtype)
            out.append(token)
            if step + 1 < max_new_tokens:
                hidden = self.decoder.hidden_states(token, kv_cache=cache)
        return torch.cat(out, dim=1)

    # -- converters -----------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_blip2(cls, model, *, decoder: ScMoEConfig | None = None, hf_config=None,
                      backend: BackendChoice = None) -> VisionLanguageModel:
        """The vision tower, learned queries and Q-Former of a HF ``Blip2Model`` / ``Blip2ForConditionalGeneration``
        (the model object, or its state dict with ``hf_config`` its ``Blip2Config``): a thin call into
        :mod:`mmkernels.models.convert.blip2` (which uses :func:`mmkernels.models.convert.vit.hf_to_mmkernels` and
        :func:`mmkernels.models.convert.qformer.hf_to_mmkernels`).
        An InstructBLIP model (``InstructBlipForConditionalGeneration``, or its state dict with its
        ``InstructBlipConfig``) converts the same way, its Q-Former with the text path (word / position embeddings,
        text FFN), so the model takes an instruction (``qformer_input_ids=``).
        The projector and the decoder are ours and freshly initialised (``decoder`` defaults to the tiny ScMoE
        preset); the HF language model and its projection are not used. Nothing is downloaded. Same dtype as the
        source weights; train/eval mode of the source object (eval for a state dict).

        Raises ``TypeError`` naming the argument for a ``model`` that is neither a BLIP-2 model (an ``nn.Module``
        whose ``config`` has ``vision_config`` and ``qformer_config``; e.g. a bare ``Blip2VisionModel`` is not) nor a
        state dict, a state dict without ``hf_config`` or with one that is not a ``Blip2Config``, and a ``decoder``
        that is not a :class:`ScMoEConfig`; :class:`ConversionError` naming the key for keys that do not match and
        for values that are not floating-point tensors or have the wrong shape (``query_tokens`` must be
        ``[1, hf_config.num_query_tokens, qformer hidden_size]``).
        """
        parts = _convert.from_hf_blip2(model, decoder=decoder, hf_config=hf_config)
        like = parts.query_tokens
        return _convert.load_blip2(cls(parts.config, backend=backend, device=like.device, dtype=like.dtype), parts)
