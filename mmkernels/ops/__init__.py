"""Public functional ops. Each validates its inputs, picks a backend and calls a registered ``torch.ops.mmkernels``
op (or the PyTorch reference)."""

from .attention import attention
from .expert_bias import expert_bias_update_
from .media_cross_attention import media_cross_attention
from .moe import MoEPermutation, MoERouting, moe_experts, moe_grouped_swiglu, moe_permute, moe_route, moe_unpermute
from .patch_embed import patch_embed
from .qformer_attention import qformer_cross_attention
from .rotary_embedding import rotary_embedding

__all__ = [
    "MoEPermutation",
    "MoERouting",
    "attention",
    "expert_bias_update_",
    "media_cross_attention",
    "moe_experts",
    "moe_grouped_swiglu",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "patch_embed",
    "qformer_cross_attention",
    "rotary_embedding",
]
