"""``MoEConfig``: the shape of a LongCat-Flash MoE block, and its presets. Its own module, so that the block
(:mod:`mmkernels.nn.moe`) and the Hugging Face converter (:mod:`mmkernels.models.convert.longcat`) both import it and
neither imports the other's classes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ops import _validate as v

__all__ = ["MOE_PRESETS", "MoEConfig"]


@dataclass(frozen=True)
class MoEConfig:
    """Shape of a :class:`ZeroComputeMoE` block (``MoEConfig.preset(name)``, ``config.replace(...)``)."""

    hidden_size: int
    num_ffn_experts: int
    num_zero_experts: int
    top_k: int
    expert_intermediate_size: int
    routed_scaling_factor: float = 1.0
    target_ffn_per_token: float | None = None  # K_e for the balancer; None: no target given

    def __post_init__(self) -> None:
        name = "MoEConfig"
        for field, low in (("hidden_size", 1), ("num_ffn_experts", 1), ("num_zero_experts", 0),
                           ("expert_intermediate_size", 1)):
            v.integer(field, getattr(self, field), op=name, low=low)
        v.integer("top_k", self.top_k, op=name, low=1, high=self.num_ffn_experts + self.num_zero_experts)
        v.real("routed_scaling_factor", self.routed_scaling_factor, op=name)
        if self.target_ffn_per_token is not None:
            v.real("target_ffn_per_token", self.target_ffn_per_token, op=name, low=0.0, high=float(self.top_k))

    @classmethod
    def preset(cls, name: str) -> MoEConfig:
        if name not in MOE_PRESETS:
            raise ValueError(f"MoEConfig: unknown preset {name!r}; presets: {sorted(MOE_PRESETS)}")
        return MOE_PRESETS[name]

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)


# docs/design/longcat_moe.md#presets. K_e = 8 of 12 (about 27B of 560B activated on average).
MOE_PRESETS: dict[str, MoEConfig] = {
    "longcat-flash": MoEConfig(6144, 512, 256, 12, 2048, 6.0, 8.0),
    "longcat-flash-lite": MoEConfig(3072, 256, 128, 12, 1024, 6.0, 8.0),
}
