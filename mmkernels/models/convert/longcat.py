"""Hugging Face ``LongcatFlashMoE`` <-> ``mmkernels.nn.ZeroComputeMoE``, without any download.

HF layout (transformers/models/longcat_flash): ``router.classifier.weight`` [N+Z, Dm] (used in fp32; a
classifier bias, if the config asks for one, is ignored by HF's forward and so here), ``router.
e_score_correction_bias`` [N+Z], ``experts.gate_up_proj`` [N, 2*Di, Dm] (transformers >= 5.25) or [N+Z, 2*Di, Dm]
(5.17 .. 5.24 allocate rows for the zero experts too; they are never used), ``experts.down_proj`` [N, Dm, Di].

Sizes are read by :func:`mmkernels.models.convert._hf_moe.moe_layout` (config first, then the modules' attributes of
every supported release, checked against the tensors' shapes), so a release that moved or renamed them is no
``AttributeError``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn.moe_config import MoEConfig
from ._common import ConversionError, check_keys, check_value, strip_prefix
from ._hf_moe import moe_layout

__all__ = ["hf_allocates_zero_expert_rows", "hf_to_mmkernels", "load_converted", "mmkernels_to_hf",
           "moe_config_from_hf"]

_HF_KEYS = ("router.classifier.weight", "router.e_score_correction_bias", "experts.gate_up_proj",
            "experts.down_proj")
_HF_OPTIONAL = ("router.classifier.bias",)


def hf_to_mmkernels(state_dict: dict[str, torch.Tensor], *, num_ffn_experts: int, prefix: str = "") -> dict:
    """A ``LongcatFlashMoE`` state dict (keys under ``prefix``) -> a ``ZeroComputeMoE`` state dict."""
    sd, _ = strip_prefix(state_dict, prefix)
    check_keys("LongcatFlashMoE", set(sd) - set(_HF_KEYS) - set(_HF_OPTIONAL), set(_HF_KEYS) - set(sd))
    for key in (*_HF_KEYS, *(k for k in _HF_OPTIONAL if k in sd)):
        check_value("LongcatFlashMoE", prefix + key, sd[key])
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


def hf_allocates_zero_expert_rows() -> bool:
    """Whether the installed transformers allocates ``gate_up_proj`` rows for LongCat's zero experts (5.17 .. 5.24:
    ``[N+Z, 2*Di, Dm]``) or not (5.25 and later: ``[N, 2*Di, Dm]``); False when transformers is not installed. Found
    by building a tiny ``LongcatFlashExperts`` on the meta device (no memory, nothing downloaded)."""
    global _ZERO_ROWS
    if _ZERO_ROWS is None:
        try:
            from transformers.models.longcat_flash.configuration_longcat_flash import LongcatFlashConfig
            from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashExperts

            cfg = LongcatFlashConfig(hidden_size=4, n_routed_experts=2, zero_expert_num=1, moe_topk=1,
                                     expert_ffn_hidden_size=2)
            with torch.device("meta"):
                experts = LongcatFlashExperts(cfg)
            _ZERO_ROWS = experts.gate_up_proj.shape[0] == 3
        except Exception:  # noqa: BLE001 - no (usable) transformers: the newest layout
            _ZERO_ROWS = False
    return _ZERO_ROWS


_ZERO_ROWS: bool | None = None


def mmkernels_to_hf(state_dict: dict[str, torch.Tensor], *, num_zero_experts: int, prefix: str = "",
                    zero_expert_rows: bool | None = None) -> dict:
    """A ``ZeroComputeMoE`` state dict -> ``LongcatFlashMoE``'s.

    ``zero_expert_rows``: pad ``gate_up_proj`` with zero rows for the Z zero experts (the layout of transformers
    5.17 .. 5.24) or not (5.25 and later); ``None`` (default): as the installed transformers allocates it
    (:func:`hf_allocates_zero_expert_rows`), so the result loads into a ``LongcatFlashMoE`` built here.
    """
    if zero_expert_rows is None:
        zero_expert_rows = hf_allocates_zero_expert_rows()
    w = state_dict["experts.w_gate_up"]
    gate_up = w.clone()
    if zero_expert_rows:
        pad = torch.zeros((num_zero_experts, *w.shape[1:]), dtype=w.dtype, device=w.device)
        gate_up = torch.cat([w, pad])
    return {
        prefix + "router.classifier.weight": state_dict["router.weight"].clone(),
        prefix + "router.e_score_correction_bias": state_dict["balancer.bias"].clone(),
        prefix + "experts.gate_up_proj": gate_up,
        prefix + "experts.down_proj": state_dict["experts.w_down"].clone(),
    }


def moe_config_from_hf(hf_moe: nn.Module, *, config=None
                       ) -> tuple[MoEConfig, dict[str, torch.Tensor], torch.device, torch.dtype]:
    """The :class:`~mmkernels.nn.moe_config.MoEConfig`, the ``ZeroComputeMoE`` state dict, and the device and dtype
    of an HF ``LongcatFlashMoE``'s experts: what ``ZeroComputeMoE.from_hf`` builds the block from (this module
    imports no module class, so ``mmkernels.nn`` and the converters form no import circle).

    ``config``: the ``LongcatFlashConfig`` when the block does not carry one (transformers >= 5.25 blocks have no
    ``config``; their sizes are then read from the modules and the tensors' shapes).

    Raises:
        TypeError: ``hf_moe`` is not an ``nn.Module``.
        ConversionError: not a LongCat-Flash MoE block (no router / experts, sizes that cannot be found or do not
            match the tensors), or experts with an activation other than SiLU.
    """
    if not isinstance(hf_moe, nn.Module):
        raise TypeError(f"ZeroComputeMoE.from_hf: hf_moe must be an HF LongcatFlashMoE module, got "
                        f"{type(hf_moe).__name__}")
    layout = moe_layout(hf_moe, "longcat_flash", config=config)
    if layout.hidden_act not in (None, "silu"):
        raise ConversionError(f"LongcatFlashMoE: only SiLU experts are supported, got {layout.hidden_act!r}")
    if layout.num_ffn_experts < 1:
        raise ConversionError("LongcatFlashMoE: no FFN experts (only zero experts): ZeroComputeMoE needs N >= 1")
    if layout.transposed:
        raise ConversionError("LongcatFlashMoE: transposed expert weights are not supported")
    weight = hf_moe.experts.down_proj
    moe_config = MoEConfig(layout.hidden_size, layout.num_ffn_experts, layout.num_zero_experts, layout.top_k,
                           layout.intermediate_size, routed_scaling_factor=layout.routed_scaling_factor)
    state = hf_to_mmkernels(hf_moe.state_dict(), num_ffn_experts=layout.num_ffn_experts)
    return moe_config, state, weight.device, weight.dtype


def load_converted(moe: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` (from :func:`moe_config_from_hf`) into ``moe``, the block built from its config; returns it.
    The balancer's PID state and step counter are the only keys HF has no counterpart for (they start at zero).

    Raises:
        ConversionError: a key is missing or unexpected (a block that does not match the converted config).
    """
    missing, unexpected = moe.load_state_dict(state, strict=False)
    allowed_missing = {"balancer.state", "balancer._extra_state"}
    if set(missing) - allowed_missing or unexpected:
        raise ConversionError(f"LongcatFlashMoE: could not load {sorted(set(missing) - allowed_missing)} / "
                              f"{sorted(unexpected)}")
    return moe
