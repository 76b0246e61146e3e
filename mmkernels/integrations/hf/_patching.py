"""The mechanics every Hugging Face patcher shares: swap a module's forward for ours, remember the original,
restore it, and record what happened in a :class:`PatchReport`.

Rules (they are what makes ``unpatch`` bit-exact and checkpoints unaffected):
- Only the forward is redirected; parameters, buffers, sub-modules and their order are never touched, so
  ``state_dict()`` keys, ``parameters()`` order, optimisers, PEFT adapters and ``save_pretrained`` keep working.
- The module's forward slot gets a *dispatcher*, ``functools.partial(_dispatch, module)``, that calls the
  replacement stored on the module (:data:`IMPL_ATTR`). The slot is the instance's ``forward`` attribute, or, when an
  accelerate hook already wraps the module (``_hf_hook`` + ``_old_forward``), the ``_old_forward`` its wrapper calls,
  so accelerate's pre/post-forward (device placement, offloaded weights) still run around ours. A hook added after
  the swap wraps the dispatcher as it wraps any forward.
- Everything we store is picklable: the dispatcher is a partial of a module-level function, and a replacement must be
  a module-level function or a partial of one (pickled by reference; :func:`swap_forward` refuses anything else,
  e.g. a closure). ``torch.save``/``torch.load``, pickle and ``copy.deepcopy`` of a patched model give a patched
  model, and ``unpatch`` works on it.
- The original is kept on the module (:data:`ORIGINAL_ATTR`) and put back by :func:`restore` in whichever slot the
  dispatcher sits at that time (``forward``, or ``_old_forward`` after an accelerate hook was added or removed).
- Swapping an already swapped module is a no-op (patching twice changes nothing).

Under accelerate, a swapped module that has a hook runs its replacement with the weights of every hooked
sub-module loaded (:func:`materialized`), since a replacement may read a child's weights without calling the child
(a fused op reading ``conv.weight``, a router reading its classifier's weight). Replacements that read a child's
weights also check :func:`plain_forward` first (a child whose forward another library replaced is not ours to skip)
and may wrap the read in :func:`materialized` themselves (a child hooked while its parent is not).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..._backends import BackendError
from ..._config import is_batch_invariant

__all__ = ["IMPL_ATTR", "ORIGINAL_ATTR", "PatchReport", "Replacement", "Skipped", "is_swapped", "materialized",
           "op_backend", "original_forward", "plain_forward", "restore", "restore_all",
           "swap_forward", "weights_recorded"]

ORIGINAL_ATTR = "_mmkernels_original_forward"  # (slot, had the slot as an instance attribute, original or None)
IMPL_ATTR = "_mmkernels_impl"  # the replacement forward, fn(module, *args, **kwargs)
KIND_ATTR = "_mmkernels_patch_kind"
_HOOK_SLOT = "_old_forward"  # accelerate's: its hooked wrapper calls ``module._old_forward``


def refuse_fallback_in_batch_invariant_mode(reason: str) -> None:
    """In the batch-invariant mode a call our ops cannot take would run the model's own code (SDPA, eager, HF's
    experts), which does not honour the mode: ``BackendError`` naming the reason instead of a silent fallback."""
    if is_batch_invariant():
        raise BackendError(f"mmkernels.integrations.hf: this call would run the model's own code ({reason}), which "
                           "does not honour the batch-invariant mode (mmkernels.set_batch_invariant); change the "
                           "call (see docs/batch_invariance.md) or leave the mode")


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
        refuse_fallback_in_batch_invariant_mode(reason)
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
        if not self.replaced and not self.skipped:
            lines.append("  nothing here is a part patch() covers (docs/integrations/hf.md lists the families); a MoE "
                         "model whose experts use transformers' ExpertsInterface (e.g. Qwen3-MoE, OLMoE) takes "
                         "from_pretrained(..., experts_implementation=\"mmkernels\") instead")
        for kind, n in sorted(self.kinds().items()):
            lines.append(f"  {kind}: {n}")
        for r in self.replaced:
            lines.append(f"  + {r.path or '<root>'} [{r.kind}] {r.module_type}" + (f": {r.detail}" if r.detail else ""))
        for s in self.skipped:
            lines.append(f"  - {s.path or '<root>'} [{s.kind}] skipped: {s.reason}")
        for reason, n in sorted(self.fallbacks.items()):
            lines.append(f"  ! {n} call(s) fell back to the model's own code: {reason}")
        return "\n".join(lines)


# ---- the replacement and its dispatcher ---------------------------------------------------------------------------

def _picklable(fn) -> bool:
    try:
        pickle.dumps(fn)
    except Exception:  # noqa: BLE001 - any failure means: a patched model holding it could not be saved
        return False
    return True


def _dispatch(module: torch.nn.Module, *args, **kwargs):
    fn = module.__dict__[IMPL_ATTR]
    if "_hf_hook" in module.__dict__:
        # Offloaded by accelerate: a replacement may read any sub-module's weights without calling it (a fused op),
        # so every hooked sub-module's weights are loaded for the call (the module's own are, by its hook).
        with materialized(*[m for m in module.modules() if m is not module and "_hf_hook" in m.__dict__]):
            return fn(module, *args, **kwargs)
    return fn(module, *args, **kwargs)


def _is_dispatcher(fn, module) -> bool:
    return isinstance(fn, functools.partial) and fn.func is _dispatch and fn.args[:1] == (module,)


def is_swapped(module: torch.nn.Module) -> bool:
    """True when ``module``'s forward is currently one of ours."""
    return ORIGINAL_ATTR in module.__dict__


def _hooked(module: torch.nn.Module) -> bool:
    return getattr(module, "_hf_hook", None) is not None and _HOOK_SLOT in module.__dict__


def swap_forward(module: torch.nn.Module, forward: Callable, kind: str,
                 state: tuple[str, object] | None = None) -> bool:
    """Make ``forward(module, *args, **kwargs)`` the module's forward. Returns False, changing nothing, when the
    module is already swapped. The original stays reachable as ``original_forward(module)``. Under an accelerate hook
    the hook's ``_old_forward`` is swapped, so the hook keeps running around ours. ``state``: ``(attribute, value)``
    the replacement reads (its report, its backend), set only when this call swaps: a module patched before (through
    a part of the model) keeps reporting to the patch that swapped it."""
    if is_swapped(module):
        return False
    if state is not None:
        module.__dict__[state[0]] = state[1]
    if not _picklable(forward):
        raise TypeError(f"swap_forward: the replacement for {type(module).__name__} must be a module-level function or "
                        f"a functools.partial of one (a patched model must pickle), got {forward!r}")
    slot = _HOOK_SLOT if _hooked(module) else "forward"
    had = slot in module.__dict__
    module.__dict__[ORIGINAL_ATTR] = (slot, had, module.__dict__.get(slot))
    module.__dict__[KIND_ATTR] = kind
    module.__dict__[IMPL_ATTR] = forward
    module.__dict__[slot] = functools.partial(_dispatch, module)
    return True


def original_forward(module: torch.nn.Module) -> Callable:
    """The forward the module had before :func:`swap_forward`, for fallbacks to the model's own code (the class's
    forward bound to the module, or the instance forward another library had installed; never accelerate's hooked
    wrapper: a fallback runs inside the hook already)."""
    _, had, fn = module.__dict__[ORIGINAL_ATTR]
    # functools.partial rather than a bound method: torch.compile traces it (it cannot build a MethodType).
    return fn if had else functools.partial(type(module).forward, module)


def restore(module: torch.nn.Module) -> bool:
    """Undo :func:`swap_forward` on one module; False when it was not swapped. The original goes back into whichever
    slot holds our dispatcher now (``forward``, or accelerate's ``_old_forward`` when a hook was added since)."""
    if not is_swapped(module):
        return False
    slot, had, fn = module.__dict__.pop(ORIGINAL_ATTR)
    module.__dict__.pop(KIND_ATTR, None)
    module.__dict__.pop(IMPL_ATTR, None)
    for where in ("forward", _HOOK_SLOT):
        if not _is_dispatcher(module.__dict__.get(where), module):
            continue
        if had and fn is not None:
            module.__dict__[where] = fn
        elif where == "forward":
            del module.__dict__["forward"]  # the class's method shows through again
        else:  # accelerate wraps the class's forward, bound, as it does for any module
            module.__dict__[where] = types.MethodType(type(module).forward, module)
    return True


def restore_all(model: torch.nn.Module) -> int:
    """Undo every swap under ``model`` (itself included); returns how many modules were restored."""
    return sum(restore(m) for m in model.modules())


# ---- helpers for replacements ---------------------------------------------------------------------------------------


def _class_forward(fn, module: torch.nn.Module) -> bool:
    """``fn`` is the module's class ``forward`` bound to it (what accelerate leaves after removing its hook)."""
    return getattr(fn, "__func__", None) is type(module).forward and getattr(fn, "__self__", None) is module


def plain_forward(module: torch.nn.Module) -> bool:
    """True when calling ``module`` runs exactly its class's ``forward``: no torch hooks, no instance ``forward`` of
    another library (the class's own, bound, is fine); an accelerate hook wrapping the class's own forward is allowed
    (use :func:`materialized` to load its offloaded weights when reading them directly)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    forward = module.__dict__.get("forward")
    if forward is None or _class_forward(forward, module):
        return True
    return _hooked(module) and ORIGINAL_ATTR not in module.__dict__ and _class_forward(module.__dict__[_HOOK_SLOT],
                                                                                       module)


@contextlib.contextmanager
def materialized(*modules: torch.nn.Module) -> Iterator[None]:
    """Run each module's accelerate hook (``_hf_hook.pre_forward`` / ``post_forward``) around a block that reads the
    module's parameters without calling the module: offloaded (meta) weights are loaded for the block and offloaded
    again after it. A no-op for modules without a hook."""
    entered = []
    try:
        for m in modules:
            hook = getattr(m, "_hf_hook", None)
            if hook is not None:
                hook.pre_forward(m)
                entered.append((m, hook))
        yield
    finally:
        for m, hook in reversed(entered):
            hook.post_forward(m, None)


_COLLECTOR: list = []  # [transformers' active output collector, or None on releases without output recorders]


def _collector():
    if not _COLLECTOR:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:
            _active_collector = None
        _COLLECTOR.append(_active_collector)
    return _COLLECTOR[0]


def _recording_keys(module: torch.nn.Module) -> set | None:
    """The keys HF's output recorders (transformers >= 5, ``capture_outputs``) record from this module's output in
    the call in progress, or None when none is active."""
    active = _collector()
    collected = active.get() if active is not None else None
    if not collected or not module._forward_hooks:
        return None
    keys = set()
    for hook in module._forward_hooks.values():
        if getattr(hook, "__name__", "") != "output_capturing_hook" or hook.__closure__ is None:
            continue
        cells = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__)))
        key = cells.get("key")
        if key in collected:
            keys.add(key)
    return keys or None


def weights_recorded(module: torch.nn.Module, kwargs: Mapping | None = None) -> bool:
    """True when the caller wants this attention module's weights: ``output_attentions=True`` reached it (HF 4 and
    the models that pass it down), or HF 5's output recorder records an attention-like output (``attentions``,
    ``cross_attentions``, ...) of this module in this call (``output_attentions`` on the config or given at call
    time to a model whose attention modules never see it)."""
    if kwargs is not None and kwargs.get("output_attentions"):
        return True
    keys = _recording_keys(module)
    return bool(keys and any(k != "hidden_states" for k in keys))


def family_classes(module_name: str, names, report: PatchReport, kind: str) -> dict[str, type]:
    """The classes of ``names`` that this transformers has; the missing ones are reported as skipped. An entry
    ``"A|B"`` names alternatives (a class renamed between releases): reported only when none exists."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        report.skip("", kind, f"{module_name} cannot be imported ({exc})")
        return {}
    found = {}
    for entry in names:
        hits = {n: c for n in entry.split("|") if isinstance(c := getattr(mod, n, None), type)}
        if hits:
            found.update(hits)
        else:
            report.skip("", kind, f"{module_name}.{entry} does not exist in this transformers version: not patched")
    return found


def op_backend(backend: str | Mapping[str, str] | None, op: str) -> str | None:
    """The backend ``patch(..., backend=...)`` asks for ``op``: one name for every op, or a mapping ``{op: name}``
    (ops it does not name run on auto)."""
    if isinstance(backend, Mapping):
        return backend.get(op)
    return backend
