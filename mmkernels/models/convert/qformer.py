"""Hugging Face ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` state dicts -> :class:`mmkernels.models.QFormer`.

Key mapping (``L`` = layer, ``c`` = its index among the cross-attention layers):

====================================================================  ==========================================
HF                                                                    mmkernels
====================================================================  ==========================================
``layernorm.*`` (BLIP-2) or ``embeddings.layernorm.*`` (InstructBLIP)  ``layernorm.*``
``encoder.layer.L.attention.attention.{query,key,value}.*``           ``layers.L.qkv.*`` (concatenated q, k, v)
``encoder.layer.L.attention.output.dense.*`` / ``.LayerNorm.*``       ``layers.L.attn_out.*`` / ``attn_norm.*``
``encoder.layer.L.crossattention.attention.query.*``                  ``layers.L.cross.query.*``
``encoder.layer.L.crossattention.attention.{key,value}.*``            ``kv_proj.*`` rows ``[2c d, (2c+2) d)``
``encoder.layer.L.crossattention.output.dense.*`` / ``.LayerNorm.*``  ``layers.L.cross_out.*`` / ``cross_norm.*``
``encoder.layer.L.intermediate_query.dense.*``                        ``layers.L.fc1.*``
``encoder.layer.L.output_query.dense.*`` / ``.LayerNorm.*``           ``layers.L.fc2.*`` / ``ffn_norm.*``
``embeddings.word_embeddings.*``                                      ``word_embeddings.*`` (text path)
``embeddings.position_embeddings.*``                                  ``position_embeddings.*`` (text path)
``encoder.layer.L.intermediate.dense.*`` (L < last)                   ``layers.L.text_fc1.*`` (text path)
``encoder.layer.L.output.dense.*`` / ``.LayerNorm.*`` (L < last)      ``layers.L.text_fc2.*`` / ``text_ffn_norm.*``
====================================================================  ==========================================

With ``config.vocab_size`` set (InstructBLIP's text path) the word / position embeddings and the text FFN of every
layer but the last are loaded; the last layer's text FFN is recognised and dropped (its output, the text rows of HF's
``last_hidden_state``, never reaches the query outputs: HF gives it zero gradients). Without it (BLIP-2), every
text-path weight is recognised and dropped: ``encoder.layer.L.intermediate.*``, ``encoder.layer.L.output.*`` (the
text FFN), ``embeddings.word_embeddings.*``, ``embeddings.position_embeddings.*``. ``embeddings.position_ids`` (a
buffer) is always dropped. Anything else unknown, or anything missing, is a :class:`ConversionError` listing the
keys. A full BLIP-2 / InstructBLIP state dict works too: the ``qformer.`` prefix is detected and other keys
(vision model, language model, ``query_tokens``) are ignored. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from ..qformer_config import QFormerConfig
from ._common import ConversionError, check_keys, check_value, strip_prefix

__all__ = ["TEXT_EMBEDDING_KEY", "ConversionError", "from_hf", "hf_to_mmkernels"]

TEXT_EMBEDDING_KEY = "embeddings.word_embeddings.weight"  # present: the HF Q-Former has InstructBLIP's text path

_SOURCE = "QFormer from HF Blip2QFormerModel"
_TEXT_ONLY = re.compile(
    r"^(encoder\.layer\.\d+\.(intermediate|output)\.|embeddings\.(word_embeddings|position_embeddings)\.|"
    r"embeddings\.position_ids$)"
)


def _is_wrapped(state_dict: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """A whole BLIP-2 / InstructBLIP state dict: keys under ``qformer.`` and none of the Q-Former's own."""
    own = ("layernorm.", "embeddings.", "encoder.")
    return not any(k.startswith(own) for k in state_dict) and any(k.startswith(prefix) for k in state_dict)


def hf_to_mmkernels(state_dict: Mapping[str, torch.Tensor], config: QFormerConfig, *,
                    prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a HF Q-Former state dict (tensors or, e.g., gradients keyed the same way) to ``QFormer`` keys.

    ``prefix``: strip it and ignore keys without it (``None``: detect ``"qformer."`` when the dict is a whole
    BLIP-2 model's).
    """
    sd, _ = strip_prefix(state_dict, prefix, candidates=("qformer.",), is_root=_is_wrapped)
    d = config.hidden_size
    if "embeddings.layernorm.weight" in sd and "layernorm.weight" in sd:
        raise ConversionError(f"{_SOURCE}: both layernorm.* (BLIP-2) and embeddings.layernorm.* (InstructBLIP) "
                              "are present; pass one Q-Former's state dict")
    ln = "embeddings.layernorm" if "embeddings.layernorm.weight" in sd else "layernorm"

    expected: dict[str, tuple[int, ...]] = {f"{ln}.weight": (d,), f"{ln}.bias": (d,)}
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % config.cross_attention_frequency == 0 else [])
        for blk in blocks:
            kv_in = config.encoder_hidden_size if blk == "crossattention" else d
            for name, fan_in in (("query", d), ("key", kv_in), ("value", kv_in)):
                expected[f"{p}{blk}.attention.{name}.weight"] = (d, fan_in)
                expected[f"{p}{blk}.attention.{name}.bias"] = (d,)
            expected[f"{p}{blk}.output.dense.weight"] = (d, d)
            expected[f"{p}{blk}.output.dense.bias"] = (d,)
            expected[f"{p}{blk}.output.LayerNorm.weight"] = (d,)
            expected[f"{p}{blk}.output.LayerNorm.bias"] = (d,)
        expected[f"{p}intermediate_query.dense.weight"] = (config.intermediate_size, d)
        expected[f"{p}intermediate_query.dense.bias"] = (config.intermediate_size,)
        expected[f"{p}output_query.dense.weight"] = (d, config.intermediate_size)
        expected[f"{p}output_query.dense.bias"] = (d,)
        expected[f"{p}output_query.LayerNorm.weight"] = (d,)
        expected[f"{p}output_query.LayerNorm.bias"] = (d,)
        if config.has_text_input and i < config.num_hidden_layers - 1:
            expected[f"{p}intermediate.dense.weight"] = (config.intermediate_size, d)
            expected[f"{p}intermediate.dense.bias"] = (config.intermediate_size,)
            expected[f"{p}output.dense.weight"] = (d, config.intermediate_size)
            for name in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
                expected[f"{p}{name}"] = (d,)
    if config.has_text_input:
        expected["embeddings.word_embeddings.weight"] = (config.vocab_size, d)
        expected["embeddings.position_embeddings.weight"] = (config.max_position_embeddings, d)

    unknown = [k for k in sd if k not in expected and not _TEXT_ONLY.match(k)]
    missing = [k for k in expected if k not in sd]
    check_keys(_SOURCE, unknown, missing)
    for k in expected:
        check_value(_SOURCE, k, sd[k])
    bad = [f"{k}: {tuple(sd[k].shape)} (expected {shape})" for k, shape in expected.items()
           if tuple(sd[k].shape) != shape]
    if bad:
        raise ConversionError(f"{_SOURCE}: {len(bad)} tensor(s) with the wrong shape for this config: "
                              + "; ".join(bad[:20]))

    out = {"layernorm.weight": sd[f"{ln}.weight"], "layernorm.bias": sd[f"{ln}.bias"]}
    kv_w, kv_b = [], []
    for i in range(config.num_hidden_layers):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        a = f"{p}attention."
        for suffix in ("weight", "bias"):
            out[f"{o}qkv.{suffix}"] = torch.cat([sd[f"{a}attention.{n}.{suffix}"] for n in ("query", "key", "value")])
            out[f"{o}attn_out.{suffix}"] = sd[f"{a}output.dense.{suffix}"]
            out[f"{o}attn_norm.{suffix}"] = sd[f"{a}output.LayerNorm.{suffix}"]
            out[f"{o}fc1.{suffix}"] = sd[f"{p}intermediate_query.dense.{suffix}"]
            out[f"{o}fc2.{suffix}"] = sd[f"{p}output_query.dense.{suffix}"]
            out[f"{o}ffn_norm.{suffix}"] = sd[f"{p}output_query.LayerNorm.{suffix}"]
            if f"{p}intermediate.dense.{suffix}" in expected:
                out[f"{o}text_fc1.{suffix}"] = sd[f"{p}intermediate.dense.{suffix}"]
                out[f"{o}text_fc2.{suffix}"] = sd[f"{p}output.dense.{suffix}"]
                out[f"{o}text_ffn_norm.{suffix}"] = sd[f"{p}output.LayerNorm.{suffix}"]
        if i % config.cross_attention_frequency == 0:
            x = f"{p}crossattention."
            for suffix in ("weight", "bias"):
                out[f"{o}cross.query.{suffix}"] = sd[f"{x}attention.query.{suffix}"]
                out[f"{o}cross_out.{suffix}"] = sd[f"{x}output.dense.{suffix}"]
                out[f"{o}cross_norm.{suffix}"] = sd[f"{x}output.LayerNorm.{suffix}"]
            kv_w += [sd[f"{x}attention.key.weight"], sd[f"{x}attention.value.weight"]]
            kv_b += [sd[f"{x}attention.key.bias"], sd[f"{x}attention.value.bias"]]
    out["kv_proj.weight"] = torch.cat(kv_w)
    out["kv_proj.bias"] = torch.cat(kv_b)
    if config.has_text_input:
        out["word_embeddings.weight"] = sd["embeddings.word_embeddings.weight"]
        out["position_embeddings.weight"] = sd["embeddings.position_embeddings.weight"]
    return out


def from_hf(model, *, hidden_dropout_prob: float | None = None
            ) -> tuple[QFormerConfig, dict[str, torch.Tensor], torch.Tensor, bool]:
    """``(config, state_dict, like, training)`` of :class:`QFormer` for a loaded HF ``Blip2QFormerModel`` /
    ``InstructBlipQFormerModel`` (or a BLIP-2 / InstructBLIP model holding one as ``.qformer``): ``like`` is one of
    its parameters (the device and dtype to build on), ``training`` its mode. ``hidden_dropout_prob`` overrides the
    config's. The text path (InstructBLIP's instruction tokens) is built when the model holds word embeddings
    (``embeddings.word_embeddings``). :meth:`QFormer.from_hf` builds the model from them."""
    qformer = getattr(model, "qformer", model)
    state_dict = qformer.state_dict()
    config = QFormerConfig.from_hf(qformer.config, text_input=TEXT_EMBEDDING_KEY in state_dict)
    if hidden_dropout_prob is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=hidden_dropout_prob)
    return config, hf_to_mmkernels(state_dict, config), next(qformer.parameters()), bool(qformer.training)
