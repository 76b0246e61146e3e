"""ViT converters: HF ``ViTModel`` (current and older key names), HF ``Blip2VisionModel``, timm ``VisionTransformer``.

Functions on state dicts (``hf_to_mmkernels``, ``timm_to_mmkernels``) return the state dict of
:class:`mmkernels.models.ViT`; ``vit_config_from_hf`` / ``vit_config_from_timm`` read the shapes. Every key of the
source must be understood (or be a known part the encoder does not use: HF's pooler and mask token, timm's
classifier head), and every key the encoder needs must be present; otherwise :class:`ConversionError` lists them.

HF key names handled:
- ViT, transformers >= 5 (in memory): ``embeddings.{cls_token,position_embeddings,patch_embeddings.projection.*}``,
  ``layers.{i}.{layernorm_before,layernorm_after}``, ``layers.{i}.attention.{q,k,v,o}_proj``,
  ``layers.{i}.mlp.{fc1,fc2}``, ``layernorm``;
- ViT, older checkpoints on disk (transformers 4): ``encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``encoder.layer.{i}.attention.output.dense``, ``encoder.layer.{i}.intermediate.dense``,
  ``encoder.layer.{i}.output.dense``, ``encoder.layer.{i}.layernorm_{before,after}``;
- BLIP-2 vision: ``embeddings.{class_embedding,position_embedding,patch_embedding}``,
  ``encoder.layers.{i}.{layer_norm1,layer_norm2,mlp.fc1,mlp.fc2}``, ``encoder.layers.{i}.self_attn.qkv`` with
  either a fused ``qkv.bias`` (transformers >= 5) or ``q_bias`` / ``v_bias`` (older; the k bias is zero),
  ``encoder.layers.{i}.self_attn.projection``, ``post_layernorm``.

A prefix such as ``vit.`` (``ViTForImageClassification``) or ``vision_model.`` (``Blip2ForConditionalGeneration``)
is found and stripped; keys outside it are left alone.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..vit_config import ViTConfig
from ._common import ConversionError, check_keys, check_value, strip_prefix

__all__ = [
    "ConversionError",
    "from_hf",
    "from_timm",
    "hf_to_mmkernels",
    "timm_to_mmkernels",
    "vit_config_from_hf",
    "vit_config_from_timm",
]

_HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
_HF_PREFIXES = ("", "vit.", "vision_model.", "model.vision_model.", "blip.vision_model.")
_HF_STEMS = ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embedding.weight")
_HF_IGNORED = ("pooler.", "embeddings.mask_token")
_TIMM_IGNORED = ("head.", "fc_norm.", "attn_pool.")


class _Taker:
    """Pops keys from a copy of the source state dict and records the ones that are missing. Every value taken must
    be a floating-point tensor (:class:`ConversionError` naming the key otherwise)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
        self.remaining = dict(state_dict)
        self.missing: list[str] = []
        self.source, self.prefix = source, prefix

    def take(self, key: str) -> torch.Tensor | None:
        if key in self.remaining:
            value = self.remaining.pop(key)
            check_value(self.source, self.prefix + key, value)
            return value
        self.missing.append(key)
        return None

    def has(self, key: str) -> bool:
        return key in self.remaining


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _num_layers(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _split_prefix(state_dict: dict[str, torch.Tensor], prefix: str | None) -> tuple[dict[str, torch.Tensor], str]:
    return strip_prefix(state_dict, prefix, candidates=_HF_PREFIXES,
                        is_root=lambda sd, p: any(p + stem in sd for stem in _HF_STEMS))


def _qkv(taker: _Taker, names: tuple[str, str, str], out: dict, dst: str) -> None:
    parts = [taker.take(n + ".weight") for n in names]
    if all(p is not None for p in parts):
        out[dst + ".weight"] = torch.cat(parts, 0).detach().clone()
    bias_keys = [n + ".bias" for n in names]
    if any(taker.has(k) for k in bias_keys):
        biases = [taker.take(k) for k in bias_keys]
        if all(b is not None for b in biases):
            out[dst + ".bias"] = torch.cat(biases, 0).detach().clone()


def hf_to_mmkernels(
    state_dict: dict[str, torch.Tensor], *, num_layers: int | None = None, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Convert a HF ``ViTModel`` or ``Blip2VisionModel`` state dict (either key-name generation) to :class:`ViT`'s.

    ``num_layers`` defaults to the number of layers in the keys; ``prefix`` (e.g. ``"vision_model."``) is found
    automatically when None.
    """
    sd, prefix = _split_prefix(state_dict, prefix)
    keys = list(sd)
    out: dict[str, torch.Tensor] = {}
    t = _Taker(sd, "hf_to_mmkernels (ViT)", prefix)
    blip2 = any(".self_attn.qkv." in k for k in keys) or "embeddings.class_embedding" in sd
    if blip2:
        source = "Blip2VisionModel"
        n = num_layers if num_layers is not None else _num_layers(keys, r"encoder\.layers\.(\d+)\.")
        emb = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "weight": "embeddings.patch_embedding.weight", "bias": "embeddings.patch_embedding.bias"}
        for dst, src in emb.items():
            if (x := t.take(src)) is not None:
                out[f"patch_embed.{dst}"] = _fresh(x)
        for i in range(n):
            s, d = f"encoder.layers.{i}.", f"blocks.{i}."
            pairs = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                     "self_attn.projection": "attn.proj"}
            for src, dst in pairs.items():
                for p in ("weight", "bias"):
                    if (x := t.take(f"{s}{src}.{p}")) is not None:
                        out[f"{d}{dst}.{p}"] = _fresh(x)
            if (x := t.take(f"{s}self_attn.qkv.weight")) is not None:
                out[f"{d}attn.qkv.weight"] = _fresh(x)
            if t.has(f"{s}self_attn.qkv.bias"):
                out[f"{d}attn.qkv.bias"] = _fresh(t.take(f"{s}self_attn.qkv.bias"))
            elif t.has(f"{s}self_attn.q_bias") or t.has(f"{s}self_attn.v_bias"):
                q, v = t.take(f"{s}self_attn.q_bias"), t.take(f"{s}self_attn.v_bias")
                if q is not None and v is not None:
                    out[f"{d}attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v]).detach().clone()
        final = "post_layernorm"
    else:
        source = "ViTModel"
        old = any(k.startswith("encoder.layer.") for k in keys)
        if old:
            source += " (transformers 4 key names)"
            n = num_layers if num_layers is not None else _num_layers(keys, r"encoder\.layer\.(\d+)\.")
        else:
            n = num_layers if num_layers is not None else _num_layers(keys, r"layers\.(\d+)\.")
        emb = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
               "weight": "embeddings.patch_embeddings.projection.weight",
               "bias": "embeddings.patch_embeddings.projection.bias"}
        for dst, src in emb.items():
            if (x := t.take(src)) is not None:
                out[f"patch_embed.{dst}"] = _fresh(x)
        for i in range(n):
            d = f"blocks.{i}."
            if old:
                s = f"encoder.layer.{i}."
                qkv = tuple(f"{s}attention.attention.{x}" for x in ("query", "key", "value"))
                pairs = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                         "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
            else:
                s = f"layers.{i}."
                qkv = tuple(f"{s}attention.{x}_proj" for x in ("q", "k", "v"))
                pairs = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
                         "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            _qkv(t, qkv, out, f"{d}attn.qkv")
            for src, dst in pairs.items():
                for p in ("weight", "bias"):
                    if (x := t.take(f"{s}{src}.{p}")) is not None:
                        out[f"{d}{dst}.{p}"] = _fresh(x)
        final = "layernorm"
    for p in ("weight", "bias"):
        if (x := t.take(f"{final}.{p}")) is not None:
            out[f"norm.{p}"] = _fresh(x)
    unknown = [prefix + k for k in t.remaining if not k.startswith(_HF_IGNORED)]
    check_keys(f"hf_to_mmkernels ({source})", unknown, [prefix + k for k in t.missing])
    return out


def timm_to_mmkernels(state_dict: dict[str, torch.Tensor], *, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Convert a timm ``VisionTransformer`` state dict to :class:`ViT`'s (the classifier head is dropped).

    A patch embedding without bias (timm's ``pre_norm`` models) gets a zero bias.
    """
    keys = list(state_dict)
    n = num_layers if num_layers is not None else _num_layers(keys, r"blocks\.(\d+)\.")
    t = _Taker(state_dict, "timm_to_mmkernels (VisionTransformer)")
    out: dict[str, torch.Tensor] = {}
    for dst, src in {"cls_token": "cls_token", "pos_embed": "pos_embed", "weight": "patch_embed.proj.weight"}.items():
        if dst == "cls_token" and not t.has(src):
            continue  # class_token=False models
        if (x := t.take(src)) is not None:
            out[f"patch_embed.{dst}"] = _fresh(x)
    if t.has("patch_embed.proj.bias"):
        out["patch_embed.bias"] = _fresh(t.take("patch_embed.proj.bias"))
    elif "patch_embed.weight" in out:
        w = out["patch_embed.weight"]
        out["patch_embed.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    for p in ("weight", "bias"):
        if t.has(f"norm_pre.{p}"):
            out[f"norm_pre.{p}"] = _fresh(t.take(f"norm_pre.{p}"))
    for i in range(n):
        s = f"blocks.{i}."
        for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                if (x := t.take(f"{s}{name}.{p}")) is not None:
                    out[f"{s}{name}.{p}"] = _fresh(x)
        if (x := t.take(f"{s}attn.qkv.weight")) is not None:
            out[f"{s}attn.qkv.weight"] = _fresh(x)
        if t.has(f"{s}attn.qkv.bias"):
            out[f"{s}attn.qkv.bias"] = _fresh(t.take(f"{s}attn.qkv.bias"))
    for p in ("weight", "bias"):
        if (x := t.take(f"norm.{p}")) is not None:
            out[f"norm.{p}"] = _fresh(x)
    unknown = [k for k in t.remaining if not k.startswith(_TIMM_IGNORED)]
    check_keys("timm_to_mmkernels (VisionTransformer)", unknown, t.missing)
    return out


def _square(x, what: str, source: str) -> int:
    if isinstance(x, int):
        return x
    x = tuple(x)
    if len(x) != 2 or x[0] != x[1]:
        raise ConversionError(f"{source}: only square patches are supported, got {what}={x}")
    return int(x[0])


def _image_size(x) -> int | tuple[int, int]:
    if isinstance(x, int):
        return x
    x = tuple(int(i) for i in x)
    return x[0] if x[0] == x[1] else x


def vit_config_from_hf(config) -> ViTConfig:
    """A :class:`ViTConfig` from a HF ``ViTConfig`` or ``Blip2VisionConfig`` / ``InstructBlipVisionConfig`` (the same
    tower; or a ``Blip2Config`` / ``InstructBlipConfig``: its vision part)."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("blip-2", "blip_2", "instructblip") and hasattr(config, "vision_config"):
        config = config.vision_config
        model_type = config.model_type
    if model_type not in ("vit", "blip_2_vision_model", "instructblip_vision_model"):
        raise ConversionError(f"vit_config_from_hf: expected a ViT or BLIP-2 vision config, "
                              f"got model_type={model_type!r}")
    source = f"HF {type(config).__name__}"
    act = _HF_ACTS.get(config.hidden_act)
    if act is None:
        raise ConversionError(f"{source}: hidden_act={config.hidden_act!r} is not supported; "
                              f"supported: {sorted(_HF_ACTS)}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ConversionError(f"{source}: head_dim * num_attention_heads must equal hidden_size")
    # ViTConfig names it attention_probs_dropout_prob, Blip2VisionConfig attention_dropout.
    attention_dropout = float(getattr(config, "attention_probs_dropout_prob", getattr(config, "attention_dropout", 0.0))
                              or 0.0)
    _warn_unmodelled_dropout(source, hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0))
    return ViTConfig(
        image_size=_image_size(config.image_size),
        patch_size=_square(config.patch_size, "patch_size", source),
        in_channels=getattr(config, "num_channels", 3),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        qkv_bias=bool(getattr(config, "qkv_bias", True)),
        layer_norm_eps=float(config.layer_norm_eps),
        act=act,
        class_token=True,
        pre_norm=False,
        pos_interpolation="hf",
        attention_dropout=attention_dropout,
    )


def _warn_unmodelled_dropout(source: str, **rates: float) -> None:
    """Hidden dropout and drop-path are not part of mmkernels' ViT: say so instead of dropping them silently (eval
    outputs are unaffected; training differs)."""
    on = {name: rate for name, rate in rates.items() if rate > 0}
    if on:
        warnings.warn(f"{source}: {on} are not modelled by mmkernels.models.ViT (eval outputs match; training runs "
                      "without them)", stacklevel=3)


def _unwrap_hf(model):
    """The encoder inside a HF wrapper (``ViTForImageClassification.vit``, ``Blip2*.vision_model``)."""
    for attr in ("vit", "vision_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def vit_config_from_timm(model) -> ViTConfig:
    """A :class:`ViTConfig` from a timm ``VisionTransformer``; unsupported variants raise :class:`ConversionError`."""
    source = f"timm {type(model).__name__}"
    problems = []
    if getattr(model, "no_embed_class", False):
        problems.append("no_embed_class=True (position embedding without a cls entry)")
    if getattr(model, "reg_token", None) is not None:
        problems.append("register tokens")
    if getattr(model, "pos_embed", None) is None:
        problems.append("no learned position embedding")
    if not isinstance(getattr(model, "norm", None), nn.LayerNorm):
        problems.append("no final LayerNorm (global_pool='avg' models put it in fc_norm)")
    norm_pre = getattr(model, "norm_pre", None)
    if not _is_identity(norm_pre) and not isinstance(norm_pre, nn.LayerNorm):
        problems.append(f"norm_pre of type {type(norm_pre).__name__}")
    pe = model.patch_embed
    if not _is_identity(getattr(pe, "norm", None)):
        problems.append("a norm inside patch_embed")
    blocks = list(model.blocks)
    if not blocks:
        problems.append("no blocks")
    for i, blk in enumerate(blocks):
        if type(blk).__name__ != "Block":
            problems.append(f"blocks.{i} is a {type(blk).__name__}, not a pre-norm Block")
            break
        extras = [name for name in ("ls1", "ls2") if not _is_identity(getattr(blk, name, None))]
        extras += [f"attn.{name}" for name in ("q_norm", "k_norm", "norm") if not _is_identity(getattr(blk.attn, name,
                                                                                                         None))]
        if not _is_identity(getattr(blk.mlp, "norm", None)) or not hasattr(blk.mlp, "fc1"):
            extras.append("mlp (not a plain fc1-act-fc2 MLP)")
        if extras:
            problems.append(f"blocks.{i} has {', '.join(extras)} (layer scale / qk-norm / SwiGLU variants)")
            break
    if problems:
        raise ConversionError(f"{source}: not a plain pre-norm ViT: " + "; ".join(problems))
    act_mod = blocks[0].mlp.act
    if isinstance(act_mod, nn.GELU):
        act = "gelu" if act_mod.approximate == "none" else "gelu_tanh"
    elif type(act_mod).__name__ == "QuickGELU":
        act = "quick_gelu"
    else:
        raise ConversionError(f"{source}: MLP activation {type(act_mod).__name__} is not supported")
    attn_drop = getattr(blocks[0].attn, "attn_drop", None)
    proj_drop = getattr(blocks[0].attn, "proj_drop", None)
    drop_path = getattr(blocks[0], "drop_path1", None)
    _warn_unmodelled_dropout(source, proj_drop=float(getattr(proj_drop, "p", 0.0)),
                             pos_drop=float(getattr(getattr(model, "pos_drop", None), "p", 0.0)),
                             drop_path=float(getattr(drop_path, "drop_prob", 0.0) or 0.0))
    return ViTConfig(
        attention_dropout=float(getattr(attn_drop, "p", 0.0)),
        image_size=_image_size(pe.img_size),
        patch_size=_square(pe.patch_size, "patch_size", source),
        in_channels=pe.proj.in_channels,
        hidden_size=model.embed_dim,
        num_layers=len(blocks),
        num_heads=blocks[0].attn.num_heads,
        mlp_dim=blocks[0].mlp.fc1.out_features,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        layer_norm_eps=float(model.norm.eps),
        act=act,
        class_token=model.cls_token is not None,
        pre_norm=isinstance(norm_pre, nn.LayerNorm),
        pos_interpolation="timm",
    )


def from_hf(model) -> tuple[ViTConfig, dict[str, torch.Tensor], bool]:
    """``(config, state_dict, training)`` of :class:`ViT` for a loaded HF ``ViTModel`` / ``ViTFor*`` /
    ``Blip2VisionModel`` (or a BLIP-2 model: its ``vision_model``); :meth:`ViT.from_hf` builds the model from them."""
    model = _unwrap_hf(model)
    config = vit_config_from_hf(model.config)
    return config, hf_to_mmkernels(model.state_dict(), num_layers=config.num_layers), bool(model.training)


def from_timm(model) -> tuple[ViTConfig, dict[str, torch.Tensor], bool]:
    """``(config, state_dict, training)`` of :class:`ViT` for a loaded timm ``VisionTransformer``;
    :meth:`ViT.from_timm` builds the model from them."""
    config = vit_config_from_timm(model)
    return config, timm_to_mmkernels(model.state_dict(), num_layers=config.num_layers), bool(model.training)
