"""Built-in benchmark suites; importing this package registers them."""

from . import expert_bias, patch_embed, vit  # noqa: F401
