"""Hugging Face ``LongcatFlashMoE`` <-> ``mmkernels.nn.ZeroComputeMoE``, without any download.

HF layout (transformers/models/longcat_flash): ``router.classifier.weight`` [N+Z, Dm] (used in fp32; a
classifier bias, if the config asks for one, is ignored by HF's forward and so here), ``router.
e_score_correction_bias`` [N+Z], ``experts.gate_up_proj`` [N+Z, 2*Di, Dm] (allocated for N+Z experts but only
the first N are FFNs: rows N.. are never used), ``experts.down_proj`` [N, Dm, Di].
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn.moe import ZeroComputeMoE
from ._common import ConversionError, check_keys, strip_prefix

__all__ = ["hf_to_mmkernels", "mmkernels_to_hf", "moe_from_hf"]

_HF_KEYS = ("router.classifier.weight", "router.e_score_correction_bias", "experts.gate_up_proj",
            "experts.down_proj")
_HF_OPTIONAL = ("router.classifier.bias",)


def hf_to_mmkernels(state_dict: dict[str, torch.Tensor], *, num_ffn_experts: int, prefix: str = "") -> dict:
    """A ``LongcatFlashMoE`` state dict (keys under ``prefix``) -> a ``ZeroComputeMoE`` state dict."""
    sd, _ = strip_prefix(state_dict, prefix)
    check_keys("LongcatFlashMoE", set(sd) - set(_HF_KEYS) - set(_HF_OPTIONAL), set(_HF_KEYS) - set(sd))
    gate_up = sd["experts.gate_up_proj"]
    if gate_up.shape[0] < num_ffn_experts or sd["experts.down_proj"].shape[0] != num_ffn_experts:
        raise ConversionError(
            f"LongcatFlashMoE: expected {num_ffn_experts} FFN experts, got gate_up_proj {tuple(gate_up.shape)} "
            f"and down_proj {tuple(sd['experts.down_proj'].shape)}"
        )
    return {
        "router.weight": sd["router.classifier.weight"].float(),
        "experts.w_gate_up": gate_up[:num_ffn_experts].clone(),
        "experts.w_down": sd["experts.down_proj"].clone(),
        "balancer.bias": sd["router.e_score_correction_bias"].float().clone(),
    }


def mmkernels_to_hf(state_dict: dict[str, torch.Tensor], *, num_zero_experts: int, prefix: str = "") -> dict:
    """A ``ZeroComputeMoE`` state dict -> ``LongcatFlashMoE``'s, padding ``gate_up_proj`` with zeros for the Z
    zero experts as HF allocates it."""
    w = state_dict["experts.w_gate_up"]
    pad = torch.zeros((num_zero_experts, *w.shape[1:]), dtype=w.dtype, device=w.device)
    return {
        prefix + "router.classifier.weight": state_dict["router.weight"].clone(),
        prefix + "router.e_score_correction_bias": state_dict["balancer.bias"].clone(),
        prefix + "experts.gate_up_proj": torch.cat([w, pad]),
        prefix + "experts.down_proj": state_dict["experts.w_down"].clone(),
    }


def moe_from_hf(hf_moe: nn.Module, **kwargs):
    """``ZeroComputeMoE`` with the config and weights of an HF ``LongcatFlashMoE`` (same device and dtype).

    The HF bias is loaded and kept fixed unless ``target_ffn_per_token`` is passed to enable the balancer.
    """
    config = hf_moe.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"LongcatFlashMoE: only SiLU experts are supported, got {config.hidden_act!r}")
    weight = hf_moe.experts.down_proj
    moe = ZeroComputeMoE(
        config.hidden_size,
        config.n_routed_experts,
        config.zero_expert_num or 0,
        config.moe_topk,
        config.expert_ffn_hidden_size,
        routed_scaling_factor=config.routed_scaling_factor,
        device=weight.device,
        dtype=weight.dtype,
        **kwargs,
    )
    sd = hf_to_mmkernels(hf_moe.state_dict(), num_ffn_experts=config.n_routed_experts)
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    allowed_missing = {"balancer.state", "balancer._extra_state"}
    if set(missing) - allowed_missing or unexpected:
        raise ConversionError(f"LongcatFlashMoE: could not load {sorted(set(missing) - allowed_missing)} / "
                              f"{sorted(unexpected)}")
    return moe
