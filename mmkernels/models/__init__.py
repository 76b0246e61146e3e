"""Reference model stacks built from mmkernels modules, with converters from Hugging Face / timm weights."""

from .qformer import QFormer
from .scmoe import KVCache, ScMoEConfig, ScMoEDecoder, ScMoEDecoderLayer
from .vit import ViT
from .vlm import VisionLanguageModel, VLMConfig

__all__ = ["KVCache", "QFormer", "ScMoEConfig", "ScMoEDecoder", "ScMoEDecoderLayer", "ViT", "VLMConfig",
           "VisionLanguageModel"]
