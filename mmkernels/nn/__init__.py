"""nn.Modules built on ``mmkernels.ops``, for model code."""

from .expert_bias import ExpertBiasController

__all__ = ["ExpertBiasController"]
