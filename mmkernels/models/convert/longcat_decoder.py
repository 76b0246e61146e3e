"""Hugging Face ``LongcatFlashForCausalLM`` / ``LongcatFlashModel`` -> :class:`mmkernels.models.ScMoEDecoder` with
``attention="mla"``, without any download (``ScMoEDecoder.from_hf``).

Every weight is taken over: the embedding (its ``padding_idx`` too), per layer both ``LongcatFlashMLA`` blocks (same
parameter names as :class:`mmkernels.nn.MultiHeadLatentAttention`), the four RMSNorms, both dense MLPs, the MoE
(router, FFN experts, zero experts, ``e_score_correction_bias``; :func:`mmkernels.models.convert.longcat.
moe_config_from_hf`), the final norm and the LM head (tied or not). HF's structure is read tolerantly, as
:mod:`mmkernels.models.convert._hf_moe` does: numbers come from the modules first (what HF's forward uses), then the
config, checked against the tensors' shapes; what cannot be found or disagrees is a ``ConversionError`` naming it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import ConversionError
from ._hf_moe import base_module, lookup
from .longcat import moe_config_from_hf

__all__ = ["decoder_config_fields", "decoder_state_from_hf", "load_decoder_state", "split_hf_model"]

_OP = "ScMoEDecoder.from_hf"
_ALLOWED_MISSING = ("balancer.state", "balancer._extra_state", "balancer.step")


def split_hf_model(model: nn.Module) -> tuple[nn.Module, nn.Module | None, object]:
    """``(base, lm_head or None, config)`` of a ``LongcatFlashForCausalLM`` (``.model`` + ``.lm_head``) or a bare
    ``LongcatFlashModel`` (``embed_tokens``, ``layers``, ``norm``).

    Raises:
        TypeError: ``model`` is neither.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: model must be an HF LongcatFlashForCausalLM or LongcatFlashModel, got "
                        f"{type(model).__name__}")
    base, head = model, None
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "layers"):
        base, head = inner, getattr(model, "lm_head", None)
    if not all(isinstance(getattr(base, n, None), nn.Module) for n in ("embed_tokens", "layers", "norm")):
        raise TypeError(f"{_OP}: model must be an HF LongcatFlashForCausalLM or LongcatFlashModel (embed_tokens, "
                        f"layers, norm), got {type(model).__name__}")
    config = getattr(model, "config", None) or getattr(base, "config", None)
    if config is None:
        raise TypeError(f"{_OP}: {type(model).__name__} carries no config")
    return base, (base_module(head) if isinstance(head, nn.Module) else None), config


def _eps(norm: nn.Module, where: str) -> float:
    value = lookup((norm,), ("variance_epsilon", "eps"), None)
    if value is None:
        raise ConversionError(f"{_OP}: cannot find the epsilon of {where} (variance_epsilon / eps)")
    return float(value)


def _silu(module: nn.Module, config, where: str) -> None:
    act_fn = lookup((module,), ("act_fn",), None)
    name = (("silu" if type(act_fn).__name__ in ("SiLU", "SiLUActivation") else type(act_fn).__name__)
            if act_fn is not None else lookup((config,), ("hidden_act",), "silu"))
    if name != "silu":
        raise ConversionError(f"{_OP}: only SiLU dense MLPs are supported, {where} uses {name!r}")


def decoder_config_fields(model: nn.Module) -> dict:
    """The fields of the :class:`~mmkernels.models.ScMoEConfig` (``attention="mla"``) of an HF LongCat-Flash model,
    as a dict (``ScMoEConfig(**fields)``; this module imports no model class, so the two form no import circle).

    Raises:
        TypeError: not a LongCat-Flash model.
        ConversionError: a size found nowhere, sizes that disagree between layers or with the tensors, an activation
            other than SiLU, or a rotary embedding HF itself could not run (``head_dim != qk_rope_head_dim``).
    """
    base, head, cfg = split_hf_model(model)
    layers = list(base.layers)
    num_layers = int(lookup((cfg,), ("num_layers",), len(layers)))
    if num_layers != len(layers) or not layers:
        raise ConversionError(f"{_OP}: config.num_layers = {num_layers} but the model holds {len(layers)} layers")
    first = layers[0]
    attn = first.self_attn[0]
    for n in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        if not isinstance(getattr(attn, n, None), nn.Module):
            raise ConversionError(f"{_OP}: layers.0.self_attn.0 is no LongcatFlashMLA (no {n})")
    embed = base.embed_tokens.weight
    vocab, hidden = embed.shape
    heads = int(lookup((attn, cfg), ("num_heads", "num_attention_heads")))
    dims = {}
    for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        value = lookup((attn, cfg), (field,), None)
        if value is None:
            raise ConversionError(f"{_OP}: cannot find {field} (layers.0.self_attn.0.{field} / config.{field})")
        dims[field] = int(value)
    q_lora = getattr(attn, "q_lora_rank", lookup((cfg,), ("q_lora_rank",), None))
    if q_lora is None and isinstance(getattr(attn, "q_a_proj", None), nn.Module):
        q_lora = attn.q_a_proj.weight.shape[0]
    hf_rope_dim = lookup((cfg,), ("head_dim",), None) or dims["qk_rope_head_dim"]
    if hf_rope_dim != dims["qk_rope_head_dim"]:
        raise ConversionError(f"{_OP}: HF's rotary embedding is config.head_dim = {hf_rope_dim} wide but its MLA "
                              f"rotates qk_rope_head_dim = {dims['qk_rope_head_dim']} dims (HF itself cannot run this)")
    rope = dict(lookup((cfg,), ("rope_parameters",), None) or {})
    theta = rope.pop("rope_theta", lookup((cfg,), ("rope_theta",), None))
    if theta is None:
        raise ConversionError(f"{_OP}: the config names no rope_theta (config.rope_parameters / config.rope_theta)")
    if rope.get("rope_type", rope.get("type", "default")) == "default" and set(rope) <= {"rope_type", "type"}:
        rope = {}
    mla_eps = {_eps(n, "an MLA RMSNorm") for layer in layers for a in layer.self_attn
               for n in (a.kv_a_layernorm, getattr(a, "q_a_layernorm", None)) if n is not None}
    norm_eps = {_eps(n, "a decoder RMSNorm") for layer in layers
                for n in (*layer.input_layernorm, *layer.post_attention_layernorm)} | {_eps(base.norm, "norm")}
    if len(mla_eps) != 1 or len(norm_eps) != 1:
        raise ConversionError(f"{_OP}: RMSNorm epsilons differ between modules (MLA {sorted(mla_eps)}, layers and "
                              f"final norm {sorted(norm_eps)}); this decoder has one of each")
    dense = first.mlps[0]
    _silu(dense, cfg, "layers.0.mlps.0")
    moe_config, _, _, _ = moe_config_from_hf(first.mlp, config=cfg)
    tied = head is not None and head.weight is embed
    if head is None:
        tied = bool(lookup((cfg,), ("tie_word_embeddings",), False))
    elif head.weight.shape != embed.shape:
        raise ConversionError(f"{_OP}: lm_head.weight is {tuple(head.weight.shape)}, expected {tuple(embed.shape)}")
    return dict(
        hidden_size=int(hidden), num_heads=heads, num_kv_heads=heads,
        dense_intermediate_size=int(dense.gate_proj.weight.shape[0]), num_ffn_experts=moe_config.num_ffn_experts,
        num_zero_experts=moe_config.num_zero_experts, top_k=moe_config.top_k,
        expert_intermediate_size=moe_config.expert_intermediate_size,
        routed_scaling_factor=float(moe_config.routed_scaling_factor), target_ffn_per_token=None, vocab_size=int(vocab),
        balance_loss_coef=0.0,  # no target: no balance loss either (config.replace(...) both to fine-tune with them)
        num_layers=num_layers, rms_norm_eps=norm_eps.pop(), rope_theta=float(theta), tie_word_embeddings=tied,
        initializer_range=float(lookup((cfg,), ("initializer_range",), 0.02)), attention="mla",
        q_lora_rank=None if q_lora is None else int(q_lora), rope_scaling=rope or None,
        attention_bias=attn.o_proj.bias is not None,
        attention_dropout=float(lookup((attn, cfg), ("attention_dropout",), 0.0) or 0.0),
        mla_rms_norm_eps=mla_eps.pop(), pad_token_id=getattr(base.embed_tokens, "padding_idx", None), **dims)


def decoder_state_from_hf(model: nn.Module, *, num_ffn_experts: int) -> dict[str, torch.Tensor]:
    """Our decoder's state dict from an HF LongCat-Flash model's: names kept except the MoE blocks' (converted by
    :func:`~mmkernels.models.convert.longcat.moe_config_from_hf`, layer by layer); ``lm_head.weight`` when the model
    has one; multi-token-prediction weights (``mtp.*``) left out."""
    base, head, cfg = split_hf_model(model)
    state = {}
    for key, value in base.state_dict().items():
        if key.startswith("mtp.") or (key.startswith("layers.") and ".mlp." in key):
            continue
        state[key] = value
    for i, layer in enumerate(base.layers):
        moe_config, moe_state, _, _ = moe_config_from_hf(layer.mlp, config=cfg)
        if moe_config.num_ffn_experts != num_ffn_experts:
            raise ConversionError(f"{_OP}: layer {i} has {moe_config.num_ffn_experts} FFN experts, layer 0 "
                                  f"{num_ffn_experts}; this decoder has one MoE shape")
        state.update({f"layers.{i}.mlp.{k}": t for k, t in moe_state.items()})
    if head is not None:
        state["lm_head.weight"] = head.weight
    return state


def load_decoder_state(decoder: nn.Module, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``decoder`` and check that every HF MLA's constants are what ours compute.

    Raises:
        ConversionError: a key missing or unexpected (beyond the balancer's PID state, and the LM head of a bare
            untied ``LongcatFlashModel``, which keeps its initialisation), or an MLA scale that differs.
    """
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    _, head, _ = split_hf_model(model)
    allowed = [k for k in missing if k.endswith(_ALLOWED_MISSING) or (head is None and k == "lm_head.weight")]
    if set(missing) - set(allowed) or unexpected:
        raise ConversionError(f"{_OP}: could not take over {sorted(set(missing) - set(allowed))} / "
                              f"{sorted(unexpected)}")
    base = split_hf_model(model)[0]
    for i, (ours, theirs) in enumerate(zip(decoder.layers, base.layers, strict=True)):
        for b in (0, 1):
            a, h = ours.self_attn[b], theirs.self_attn[b]
            for mine, name in (("softmax_scale", "scaling"), ("q_scale", "mla_scale_q_lora"),
                               ("kv_scale", "mla_scale_kv_lora")):
                if hasattr(h, name) and not math.isclose(getattr(a, mine), float(getattr(h, name)), rel_tol=1e-12):
                    raise ConversionError(f"{_OP}: layers.{i}.self_attn.{b}.{name} = {getattr(h, name)} but ours "
                                          f"computes {mine} = {getattr(a, mine)} from the config")
