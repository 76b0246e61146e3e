"""Public functional ops. Each validates its inputs, picks a backend and calls a registered ``torch.ops.mmkernels``
op (or the PyTorch reference)."""

from .attention import attention
from .expert_bias import expert_bias_update_
from .moe import MoERouting, moe_experts, moe_route
from .patch_embed import patch_embed
from .qformer_attention import qformer_cross_attention

__all__ = [
    "MoERouting",
    "attention",
    "expert_bias_update_",
    "moe_experts",
    "moe_route",
    "patch_embed",
    "qformer_cross_attention",
]
