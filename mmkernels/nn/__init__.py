"""nn.Modules built on ``mmkernels.ops``, for model code."""

from .attention import Attention
from .expert_bias import ExpertBiasController
from .moe import SwiGLUExperts, ZeroComputeMoE, update_expert_biases
from .patch_embed import PatchEmbed
from .qformer_attention import QFormerCrossAttention

__all__ = [
    "Attention",
    "ExpertBiasController",
    "PatchEmbed",
    "QFormerCrossAttention",
    "SwiGLUExperts",
    "ZeroComputeMoE",
    "update_expert_biases",
]
