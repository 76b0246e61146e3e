"""nn.Modules built on ``mmkernels.ops``, for model code."""

from .expert_bias import ExpertBiasController
from .patch_embed import PatchEmbed

__all__ = ["ExpertBiasController", "PatchEmbed"]
