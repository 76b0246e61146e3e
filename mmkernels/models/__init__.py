"""Reference model stacks built from mmkernels modules, with converters from Hugging Face / timm weights."""

from .qformer import QFormer, QFormerConfig
from .scmoe import KVCache, ScMoEConfig, ScMoEDecoder, ScMoEDecoderLayer
from .vit import ViT, ViTConfig
from .vlm import VisionLanguageModel, VLMConfig

__all__ = ["KVCache", "QFormer", "QFormerConfig", "ScMoEConfig", "ScMoEDecoder", "ScMoEDecoderLayer", "ViT",
           "ViTConfig", "VLMConfig", "VisionLanguageModel"]
