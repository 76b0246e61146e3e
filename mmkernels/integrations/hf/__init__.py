"""Use mmkernels inside Hugging Face transformers models: ``patch(model)`` / ``unpatch(model)`` and the
``"mmkernels"`` attention implementation (registered with transformers' ``AttentionInterface`` when this package
is imported, so ``from_pretrained(..., attn_implementation="mmkernels")`` and
``model.set_attn_implementation("mmkernels")`` work). See docs/integrations/hf.md."""

from __future__ import annotations

from ._patching import PatchReport, Replacement, Skipped
from .attention import ATTN_NAME, FALLBACKS, attention_forward, register
from .patch import COVERED, patch, unpatch

__all__ = ["ATTN_NAME", "COVERED", "FALLBACKS", "PatchReport", "Replacement", "Skipped", "attention_forward", "patch",
           "register", "unpatch"]

register()
