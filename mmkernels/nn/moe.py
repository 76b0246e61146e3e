"""MoE modules: ``SwiGLUExperts`` (grouped expert FFNs) and ``ZeroComputeMoE`` (LongCat-Flash's MoE block:
fp32 router over N FFN + Z zero-computation experts, biased top-k, experts, identity term, bias balancer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _validate as v
from ..ops.moe import MoERouting, moe_experts, moe_route
from .expert_bias import ExpertBiasController

__all__ = ["MOE_PRESETS", "MoEConfig", "SwiGLUExperts", "ZeroComputeMoE", "update_expert_biases"]


class SwiGLUExperts(nn.Module):
    """N SwiGLU FFNs without bias, stored grouped: ``w_gate_up`` [N, 2*Di, Dm] (gate rows first, the HF LongCat
    layout) and ``w_down`` [N, Dm, Di]. ``forward(hidden [T, Dm], routing) -> [T, Dm]`` via ``moe_experts``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, device=None, dtype=None,
                 backend: str | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.backend = backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device,
                                                  dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, device=device,
                                               dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per expert.
        nn.init.uniform_(self.w_gate_up, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(self.w_down, -1 / math.sqrt(self.intermediate_size), 1 / math.sqrt(self.intermediate_size))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"

    def forward(self, hidden: torch.Tensor, routing: MoERouting) -> torch.Tensor:
        return moe_experts(hidden, routing, self.w_gate_up, self.w_down, backend=self.backend)


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    num_ffn_experts: int
    num_zero_experts: int
    top_k: int
    expert_intermediate_size: int
    routed_scaling_factor: float = 1.0
    target_ffn_per_token: float | None = None  # K_e for the balancer; None: no target given


# specs/longcat_moe.md. K_e = 8 of 12 (about 27B of 560B activated on average).
MOE_PRESETS: dict[str, MoEConfig] = {
    "longcat-flash": MoEConfig(6144, 512, 256, 12, 2048, 6.0, 8.0),
    "longcat-flash-lite": MoEConfig(3072, 256, 128, 12, 1024, 6.0, 8.0),
}


class ZeroComputeMoE(nn.Module):
    """LongCat-Flash MoE block: ``y = sum_k w_k E_{id_k}(x)`` with zero-computation (identity) experts.

    Router: ``Linear(hidden, N+Z, bias=False)`` kept and computed in fp32; softmax over all N+Z experts; the
    top-k of ``scores + bias`` are chosen, weights are the unbiased scores times ``routed_scaling_factor``;
    zero-expert slots contribute ``weight * x`` and are never dispatched to an expert GEMM.

    Balancing: ``self.balancer`` (an :class:`ExpertBiasController`) owns the selection bias. In training mode
    every forward adds its selection counts to ``self.pending_counts`` (on the device, no sync); call
    :meth:`update_bias` (or :func:`update_expert_biases` on the whole model) once per optimizer step. Pass
    ``target_ffn_per_token=None`` to keep the bias fixed (e.g. a loaded HF ``e_score_correction_bias``).

    ``forward(x [..., Dm]) -> [..., Dm]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_ffn_experts: int,
        num_zero_experts: int,
        top_k: int,
        expert_intermediate_size: int,
        *,
        routed_scaling_factor: float = 1.0,
        target_ffn_per_token: float | None = None,
        scoring: str = "softmax",
        renormalize: bool = False,
        balancer_kwargs: dict | None = None,
        device=None,
        dtype=None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        name = "ZeroComputeMoE"
        self.hidden_size = v.integer("hidden_size", hidden_size, op=name, low=1)
        self.num_ffn_experts = v.integer("num_ffn_experts", num_ffn_experts, op=name, low=1)
        self.num_zero_experts = v.integer("num_zero_experts", num_zero_experts, op=name, low=0)
        n_total = self.num_ffn_experts + self.num_zero_experts
        self.top_k = v.integer("top_k", top_k, op=name, low=1, high=n_total)
        self.routed_scaling_factor = v.real("routed_scaling_factor", routed_scaling_factor, op=name)
        self.scoring = v.choice("scoring", scoring, ("softmax", "sigmoid"), op=name)
        self.renormalize = bool(renormalize)
        self.backend = backend
        self.router = nn.Linear(hidden_size, n_total, bias=False, device=device, dtype=torch.float32)
        self.experts = SwiGLUExperts(self.num_ffn_experts, hidden_size, expert_intermediate_size, device=device,
                                     dtype=dtype, backend=backend)
        self.balance = target_ffn_per_token is not None
        self.balancer = ExpertBiasController(
            self.num_ffn_experts, self.num_zero_experts, self.top_k,
            target_ffn_per_token if target_ffn_per_token is not None else 0.0, device=device,
            **(balancer_kwargs or {}),
        )
        self.register_buffer("pending_counts", torch.zeros(n_total, dtype=torch.int64, device=device),
                             persistent=False)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> ZeroComputeMoE:
        """``longcat-flash`` or ``longcat-flash-lite`` (specs/longcat_moe.md); kwargs override or add options."""
        if name not in MOE_PRESETS:
            raise ValueError(f"ZeroComputeMoE: unknown preset {name!r}; have {sorted(MOE_PRESETS)}")
        c = MOE_PRESETS[name]
        args = dict(hidden_size=c.hidden_size, num_ffn_experts=c.num_ffn_experts, num_zero_experts=c.num_zero_experts,
                    top_k=c.top_k, expert_intermediate_size=c.expert_intermediate_size,
                    routed_scaling_factor=c.routed_scaling_factor, target_ffn_per_token=c.target_ffn_per_token)
        return cls(**(args | kwargs))

    @classmethod
    def from_hf(cls, hf_moe: nn.Module, **kwargs) -> ZeroComputeMoE:
        """Build from a Hugging Face ``LongcatFlashMoE`` (weights copied; nothing is downloaded)."""
        from ..models.convert.longcat import moe_from_hf

        return moe_from_hf(hf_moe, **kwargs)

    @property
    def expert_bias(self) -> torch.Tensor:
        """The fp32 [N+Z] selection bias (HF's ``e_score_correction_bias``)."""
        return self.balancer.bias

    def route(self, hidden: torch.Tensor) -> MoERouting:
        """Router logits in fp32 (input upcast, weight kept fp32), then ``moe_route``."""
        logits = F.linear(hidden.float(), self.router.weight.float())
        return moe_route(logits, top_k=self.top_k, num_ffn_experts=self.num_ffn_experts, bias=self.balancer.bias,
                         scoring=self.scoring, routed_scaling_factor=self.routed_scaling_factor,
                         renormalize=self.renormalize, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"ZeroComputeMoE: x must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        hidden = x.reshape(-1, self.hidden_size)
        routing = self.route(hidden)
        if self.training and self.balance:
            with torch.no_grad():
                self.pending_counts.add_(routing.counts)
        y = self.experts(hidden, routing)
        return y.view(x.shape)

    def update_bias(self) -> None:
        """Feed the counts gathered since the last call to the balancer (all-reduced over its process group)."""
        if not self.balance:
            return
        self.balancer.update(self.pending_counts)
        self.pending_counts.zero_()


def update_expert_biases(model: nn.Module) -> None:
    """Call :meth:`ZeroComputeMoE.update_bias` on every MoE block of ``model`` (once per optimizer step)."""
    for module in model.modules():
        if isinstance(module, ZeroComputeMoE):
            module.update_bias()
