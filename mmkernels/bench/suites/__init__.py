"""Built-in benchmark suites; importing this package registers them."""

from . import attention, expert_bias, moe, patch_embed, qformer, vit, vlm  # noqa: F401
