"""Reference model stacks built from mmkernels modules, with converters from Hugging Face / timm weights."""

from .qformer import QFormer
from .vit import ViT

__all__ = ["QFormer", "ViT"]
