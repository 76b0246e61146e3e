"""``VLMConfig`` and the VLM presets: the shapes of a :class:`mmkernels.models.VisionLanguageModel`. A module of its
own so that the model (:mod:`mmkernels.models.vlm`) and the BLIP-2 converter (:mod:`mmkernels.models.convert.blip2`)
both import it and neither imports the other back; ``mmkernels.models.vlm`` re-exports these names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ops import _validate as v
from .qformer_config import QFormerConfig
from .scmoe import ScMoEConfig
from .vit_config import ViTConfig

__all__ = ["VLM_PRESETS", "VLMConfig"]


@dataclass(frozen=True)
class VLMConfig:
    """Shapes of a :class:`VisionLanguageModel`: ``vision`` (ViT), ``qformer`` (its ``encoder_hidden_size`` must be
    the ViT's ``hidden_size``), ``decoder`` (ScMoE language model) and ``num_query_tokens`` (1..128).

    ``VLMConfig.preset("tiny" | "small")``, ``config.replace(...)``. Raises TypeError / ValueError naming the field.
    """

    vision: ViTConfig
    qformer: QFormerConfig
    decoder: ScMoEConfig
    num_query_tokens: int = 32

    def __post_init__(self) -> None:
        name = "VLMConfig"
        for field, cls in (("vision", ViTConfig), ("qformer", QFormerConfig), ("decoder", ScMoEConfig)):
            if not isinstance(getattr(self, field), cls):
                raise TypeError(f"{name}: {field} must be a {cls.__name__}, got {type(getattr(self, field)).__name__}")
        v.integer("num_query_tokens", self.num_query_tokens, op=name, low=1, high=128)
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(f"{name}: qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal "
                             f"vision.hidden_size ({self.vision.hidden_size})")

    @classmethod
    def preset(cls, name: str) -> VLMConfig:
        """``"tiny"`` (trains on a CPU in a couple of minutes) or ``"small"`` (a GPU); docs/models/vlm.md."""
        if name not in VLM_PRESETS:
            raise ValueError(f"VLMConfig: unknown preset {name!r}; presets: {sorted(VLM_PRESETS)}")
        return VLM_PRESETS[name]

    def replace(self, **changes) -> VLMConfig:
        return dataclasses.replace(self, **changes)


VLM_PRESETS: dict[str, VLMConfig] = {
    # 16x16 images in 4x4 patches (16 image tokens + cls), 4 queries, the tiny ScMoE decoder (vocab 128).
    "tiny": VLMConfig(
        vision=ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64),
        qformer=QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              encoder_hidden_size=32, cross_attention_frequency=1, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0),
        decoder=ScMoEConfig.preset("tiny"),
        num_query_tokens=4,
    ),
    # 64x64 images in 8x8 patches (64 image tokens + cls), 16 queries, the small ScMoE decoder (vocab 4096).
    "small": VLMConfig(
        vision=ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_layers=4, num_heads=4, mlp_dim=1024),
        qformer=QFormerConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                              encoder_hidden_size=256, cross_attention_frequency=1, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0),
        decoder=ScMoEConfig.preset("small"),
        num_query_tokens=16,
    ),
}
