"""Use mmkernels inside Hugging Face transformers models: ``patch(model)`` / ``unpatch(model)`` and the
``"mmkernels"`` attention implementation (registered with transformers' ``AttentionInterface`` when this package
is imported, so ``from_pretrained(..., attn_implementation="mmkernels")`` and
``model.set_attn_implementation("mmkernels")`` work), and the ``"mmkernels"`` experts implementation (registered with
transformers' ``ExpertsInterface`` where the release has it, so ``from_pretrained(..., experts_implementation=
"mmkernels")`` runs MoE experts through ``moe_experts``). See docs/integrations/hf.md."""

from __future__ import annotations

from ._patching import PatchReport, Replacement, Skipped
from .attention import ATTN_NAME, FALLBACKS, attention_forward, register
from .moe import EXPERTS_FALLBACKS, EXPERTS_NAME, experts_forward, register_experts
from .patch import COVERED, PATCH_OPS, patch, unpatch

__all__ = ["ATTN_NAME", "COVERED", "EXPERTS_FALLBACKS", "EXPERTS_NAME", "FALLBACKS", "PATCH_OPS", "PatchReport",
           "Replacement", "Skipped", "attention_forward", "experts_forward", "patch", "register", "register_experts",
           "unpatch"]

register()
register_experts()
