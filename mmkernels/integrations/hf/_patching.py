"""The mechanics every Hugging Face patcher shares: swap a module's ``forward`` for ours, remember the original,
restore it, and record what happened in a :class:`PatchReport`.

Rules (they are what makes ``unpatch`` bit-exact and checkpoints unaffected):
- Only ``forward`` is replaced, as an *instance* attribute; parameters, buffers, sub-modules and their order are
  never touched, so ``state_dict()`` keys, ``parameters()`` order, optimisers, PEFT adapters and ``save_pretrained``
  keep working.
- The original is kept on the module (:data:`ORIGINAL_ATTR`): if the instance had its own ``forward`` attribute
  (another library's patch) it is put back, else the instance attribute is deleted and the class's method shows
  through again.
- Swapping an already swapped module is a no-op (patching twice changes nothing).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["ORIGINAL_ATTR", "PatchReport", "Replacement", "Skipped", "is_swapped", "op_backend", "original_forward",
           "restore", "restore_all", "swap_forward"]

ORIGINAL_ATTR = "_mmkernels_original_forward"  # (had_instance_forward: bool, original forward or None)
KIND_ATTR = "_mmkernels_patch_kind"


@dataclass(frozen=True)
class Replacement:
    """One module whose forward now runs mmkernels ops. ``path`` is its name in ``model.named_modules()``,
    ``kind`` what it got (e.g. ``"attention"``, ``"patch_embed"``, ``"qformer"``, ``"moe"``), ``detail`` a short
    human-readable note (the op and routing it maps to)."""

    path: str
    kind: str
    module_type: str
    detail: str = ""


@dataclass(frozen=True)
class Skipped:
    """A part ``patch`` did not touch, and why (missing class or attribute in this transformers version, a
    configuration our ops do not cover, a kind switched off by the caller)."""

    path: str
    kind: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`mmkernels.integrations.hf.patch` replaced and skipped. ``print(report)`` is a readable table;
    ``bool(report)`` is True when anything was replaced. ``fallbacks`` counts calls that a patched module handed
    back to the model's own implementation because our kernels cannot express them (e.g. an arbitrary 4-D additive
    attention mask), keyed by the reason; it keeps counting after ``patch`` returns."""

    model_type: str = ""
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, kind: str, module: torch.nn.Module, detail: str = "") -> None:
        self.replaced.append(Replacement(path, kind, type(module).__name__, detail))

    def skip(self, path: str, kind: str, reason: str) -> None:
        self.skipped.append(Skipped(path, kind, reason))

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def kinds(self) -> dict[str, int]:
        """Replaced modules per kind, e.g. ``{"attention": 12, "patch_embed": 1}``."""
        out: dict[str, int] = {}
        for r in self.replaced:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def __bool__(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        lines = [f"mmkernels patch report ({self.model_type or 'model'}): {len(self.replaced)} modules replaced"
                 + (f", {len(self.skipped)} parts skipped" if self.skipped else "")]
        for kind, n in sorted(self.kinds().items()):
            lines.append(f"  {kind}: {n}")
        for r in self.replaced:
            lines.append(f"  + {r.path or '<root>'} [{r.kind}] {r.module_type}" + (f": {r.detail}" if r.detail else ""))
        for s in self.skipped:
            lines.append(f"  - {s.path or '<root>'} [{s.kind}] skipped: {s.reason}")
        for reason, n in sorted(self.fallbacks.items()):
            lines.append(f"  ! {n} call(s) fell back to the model's own code: {reason}")
        return "\n".join(lines)


def is_swapped(module: torch.nn.Module) -> bool:
    """True when ``module``'s forward is currently one of ours."""
    return ORIGINAL_ATTR in module.__dict__


def swap_forward(module: torch.nn.Module, forward: Callable, kind: str) -> bool:
    """Make ``forward(module, *args, **kwargs)`` the module's forward (bound to it). Returns False, changing nothing,
    when the module is already swapped. The original stays reachable as ``original_forward(module)``."""
    if is_swapped(module):
        return False
    had = "forward" in module.__dict__
    module.__dict__[ORIGINAL_ATTR] = (had, module.__dict__.get("forward"))
    module.__dict__[KIND_ATTR] = kind
    module.forward = types.MethodType(forward, module)
    return True


def original_forward(module: torch.nn.Module) -> Callable:
    """The forward the module had before :func:`swap_forward` (bound), for fallbacks to the model's own code."""
    had, fn = module.__dict__[ORIGINAL_ATTR]
    # functools.partial rather than a bound method: torch.compile traces it (it cannot build a MethodType).
    return fn if had else functools.partial(type(module).forward, module)


def restore(module: torch.nn.Module) -> bool:
    """Undo :func:`swap_forward` on one module; False when it was not swapped."""
    if not is_swapped(module):
        return False
    had, fn = module.__dict__.pop(ORIGINAL_ATTR)
    module.__dict__.pop(KIND_ATTR, None)
    if had:
        module.forward = fn
    else:
        del module.forward
    return True


def restore_all(model: torch.nn.Module) -> int:
    """Undo every swap under ``model`` (itself included); returns how many modules were restored."""
    return sum(restore(m) for m in model.modules())


def op_backend(backend: str | Mapping[str, str] | None, op: str) -> str | None:
    """The backend ``patch(..., backend=...)`` asks for ``op``: one name for every op, or a mapping ``{op: name}``
    (ops it does not name run on auto)."""
    if isinstance(backend, Mapping):
        return backend.get(op)
    return backend
