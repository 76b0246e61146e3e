"""nn.Modules built on ``mmkernels.ops``, for model code."""

from .attention import Attention
from .expert_bias import ExpertBiasController
from .mla import MultiHeadLatentAttention
from .moe import SwiGLUExperts, ZeroComputeMoE, mask_padding, update_expert_biases
from .moe_losses import device_balance_loss, load_balancing_loss, sequence_balance_loss
from .patch_embed import PatchEmbed
from .qformer_attention import QFormerCrossAttention

__all__ = [
    "Attention",
    "ExpertBiasController",
    "MultiHeadLatentAttention",
    "PatchEmbed",
    "QFormerCrossAttention",
    "SwiGLUExperts",
    "ZeroComputeMoE",
    "device_balance_loss",
    "load_balancing_loss",
    "mask_padding",
    "sequence_balance_loss",
    "update_expert_biases",
]
