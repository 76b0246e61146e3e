"""Public functional ops. Each validates its inputs, picks a backend and calls a registered ``torch.ops.mmkernels``
op (or the PyTorch reference)."""

from .expert_bias import expert_bias_update_
from .moe import MoERouting, moe_experts, moe_route
from .patch_embed import patch_embed

__all__ = ["MoERouting", "expert_bias_update_", "moe_experts", "moe_route", "patch_embed"]
