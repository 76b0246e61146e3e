"""Reference model stacks built from mmkernels modules, with converters from Hugging Face / timm weights."""

from .flamingo import GatedCrossAttentionBlock, PerceiverResampler
from .qformer import QFormer, QFormerConfig
from .scmoe import KVCache, ScMoEConfig, ScMoEDecoder, ScMoEDecoderLayer
from .vit import ViT, ViTConfig
from .vlm import VisionLanguageModel, VLMConfig

__all__ = ["GatedCrossAttentionBlock", "KVCache", "PerceiverResampler", "QFormer", "QFormerConfig", "ScMoEConfig",
           "ScMoEDecoder", "ScMoEDecoderLayer", "ViT", "ViTConfig", "VLMConfig", "VisionLanguageModel"]
