"""Public functional ops. Each validates its inputs, picks a backend and calls a registered ``torch.ops.mmkernels``
op (or the PyTorch reference)."""

from .attention import attention
from .expert_bias import expert_bias_update_
from .moe import MoEPermutation, MoERouting, moe_experts, moe_grouped_swiglu, moe_permute, moe_route, moe_unpermute
from .patch_embed import patch_embed
from .qformer_attention import qformer_cross_attention

__all__ = [
    "MoEPermutation",
    "MoERouting",
    "attention",
    "expert_bias_update_",
    "moe_experts",
    "moe_grouped_swiglu",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "patch_embed",
    "qformer_cross_attention",
]
