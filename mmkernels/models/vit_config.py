"""``ViTConfig`` and the ViT presets: the shapes of a :class:`mmkernels.models.ViT`. A module of its own so that the
model (:mod:`mmkernels.models.vit`) and its converters (:mod:`mmkernels.models.convert.vit`) both import it and
neither imports the other back; ``mmkernels.models.vit`` re-exports both names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..nn.patch_embed import POS_INTERPOLATIONS
from ..ops import _validate as check

__all__ = ["ACTIVATIONS", "PRESETS", "ViTConfig"]

_NAME = "ViTConfig"

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT encoder. ``head_dim = hidden_size // num_heads``."""

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    act: str = "gelu"  # "gelu" (erf), "gelu_tanh", "quick_gelu" (CLIP)
    class_token: bool = True
    pre_norm: bool = False  # a LayerNorm after the embeddings (CLIP-style)
    pos_interpolation: str = "hf"  # how the position embedding is resized for other image sizes
    attention_dropout: float = 0.0  # on the attention probabilities, in training mode (HF attention_probs_dropout_prob)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, tuple | list):
            if len(self.image_size) != 2:
                raise ValueError(f"{_NAME}: image_size must be an int or (height, width), got {self.image_size!r}")
            for i, size in enumerate(self.image_size):
                check.integer(f"image_size[{i}]", size, op=_NAME, low=1)
        else:
            check.integer("image_size", self.image_size, op=_NAME, low=1)
        for field in ("patch_size", "in_channels", "hidden_size", "num_heads", "mlp_dim"):
            check.integer(field, getattr(self, field), op=_NAME, low=1)
        check.integer("num_layers", self.num_layers, op=_NAME, low=0)
        for field in ("qkv_bias", "class_token", "pre_norm"):  # NumPy bools become Python bools
            object.__setattr__(self, field, check.flag(field, getattr(self, field), op=_NAME))
        check.real("layer_norm_eps", self.layer_norm_eps, op=_NAME, low=0.0)
        check.real("attention_dropout", self.attention_dropout, op=_NAME, low=0.0)
        if self.attention_dropout >= 1.0:
            raise ValueError(f"{_NAME}: attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig: act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"ViTConfig: pos_interpolation must be one of {POS_INTERPOLATIONS}, "
                             f"got {self.pos_interpolation!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> ViTConfig:
        """``"vit_b_16"``, ``"vit_l_14"``, ``"vit_h_14"`` or ``"vit_g_14"``."""
        if name not in PRESETS:
            raise ValueError(f"{_NAME}: unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, ViTConfig] = {
    # ViT-B/16 (Dosovitskiy et al.; google/vit-base-patch16-224)
    "vit_b_16": ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    # ViT-L/14 (CLIP ViT-L/14 shapes, LLaVA's vision tower; at 336 px: image_size=336)
    "vit_l_14": ViTConfig(image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    # ViT-H/14 (OpenCLIP ViT-H/14)
    "vit_h_14": ViTConfig(image_size=224, patch_size=14, hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120),
    # ViT-g/14 as used by BLIP-2 (EVA-CLIP g, first 39 layers): head dim 1408/16 = 88
    "vit_g_14": ViTConfig(image_size=224, patch_size=14, hidden_size=1408, num_layers=39, num_heads=16, mlp_dim=6144),
}
