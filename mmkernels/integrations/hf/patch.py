"""``patch(model)`` / ``unpatch(model)``: put mmkernels ops into an existing Hugging Face model, reversibly.

What ``patch`` changes, and nothing else:
- ``attention``: every covered attention module (vision towers and Q-Formers: ViT, CLIP vision, SigLIP vision,
  BLIP-2 / InstructBLIP vision and Q-Former, InternVL's InternViT; and LongCat-Flash's multi-head latent attention,
  whose 192-wide queries/keys and 128-wide values run as one call of the op, unpadded) gets a private copy of its
  config whose ``_attn_implementation`` is ``"mmkernels"`` (its ``config`` attribute; ``unpatch`` puts the model's
  config back).
  The model's configs are not changed, so they save, validate and accept flags (``config.output_attentions =
  True``) exactly as before, and a call our kernels cannot take runs what the model's config names. Other language
  models (LLaVA's, BLIP-2's OPT/T5) keep their attention (``attn_implementation="mmkernels"`` opts one in by name).
- ``patch_embed`` / ``qformer`` / ``moe``: the forward of the covered modules is redirected (see ``_patching``);
  parameters, buffers and sub-modules are never touched.
- the packed native-resolution towers of Qwen2-VL / Qwen2.5-VL / Qwen3-VL (``qwen_vl``): their vision attention
  (rotary + one varlen call per block, under ``attention``), their Conv3d patch embedding (one GEMM, under
  ``patch_embed``) and the tower itself (packed lengths once per forward, under ``attention``) are redirected
  forwards too.

A patched model pickles (``torch.save``/``torch.load``, ``copy.deepcopy``) as a patched model, and ``unpatch`` works
on the copy; ``save_pretrained`` and state dicts are the plain HF ones. accelerate hooks (``cpu_offload``,
``device_map`` with offload) added before or after ``patch`` keep running around our replacements.

The family tables name transformers classes; a class this transformers version does not have is skipped and named
in the report (only for the families the model uses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from ... import ops as _ops  # noqa: F401  (registers every op's backends before names are checked)
from ..._backends import BACKENDS, BackendError, resolve_backends
from ...ops._validate import flag
from . import attention as _attention
from ._patching import PatchReport, family_classes, is_swapped, restore_all
from .idefics import patch_idefics
from .qformer import patch_qformer
from .qwen_vl import patch_packed_towers
from .vision import patch_vision_embeddings

__all__ = ["COVERED", "PATCH_OPS", "patch", "unpatch"]

# modeling module -> (attention classes (config must be a vision/Q-Former config), embedding classes, Q-Former layers)
COVERED: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "transformers.models.vit.modeling_vit": (("ViTAttention|ViTSelfAttention",), ("ViTEmbeddings",), ()),
    "transformers.models.clip.modeling_clip": (("CLIPAttention",), ("CLIPVisionEmbeddings",), ()),
    "transformers.models.siglip.modeling_siglip": (("SiglipAttention",), ("SiglipVisionEmbeddings",), ()),
    "transformers.models.blip_2.modeling_blip_2": (
        ("Blip2Attention", "Blip2QFormerMultiHeadAttention"), ("Blip2VisionEmbeddings",), ("Blip2QFormerLayer",)),
    "transformers.models.instructblip.modeling_instructblip": (
        ("InstructBlipAttention", "InstructBlipQFormerMultiHeadAttention"), ("InstructBlipVisionEmbeddings",),
        ("InstructBlipQFormerLayer",)),
    "transformers.models.longcat_flash.modeling_longcat_flash": (("LongcatFlashMLA",), (), ()),
    "transformers.models.internvl.modeling_internvl": (("InternVLVisionAttention",), ("InternVLVisionEmbeddings",), ()),
    "transformers.models.idefics.vision": (("IdeficsVisionAttention",), ("IdeficsVisionEmbeddings",), ()),
}
# Attention classes covered in a language model too (the rest are covered only under a vision / Q-Former config).
DECODER_ATTENTION = frozenset({"LongcatFlashMLA"})
# The ops ``patch`` can run (the keys a ``backend`` mapping may use), and the op behind each kind of replacement
# that does not check its own backend (the MoE part checks moe_route / moe_experts when it patches a block).
PATCH_OPS = ("attention", "patch_embed", "qformer_cross_attention", "rotary_embedding", "media_cross_attention",
             "moe_route", "moe_experts")
_KIND_OPS = {"attention": "attention", "patch_embed": "patch_embed", "qformer": "qformer_cross_attention",
             "rotary": "rotary_embedding", "media_cross_attention": "media_cross_attention"}
_OWNER = "mmkernels.integrations.hf.patch"
_STATE = "_mmkernels_hf_patch"  # on the root module: {"report", "backend", "moe"}
_DETAIL = "ops.attention via attn_implementation='mmkernels' (padding -> varlen; other masks fall back)"


def _is_vision_or_qformer(config) -> bool:
    name = type(config).__name__
    return "Vision" in name or "QFormer" in name or name == "ViTConfig"


def patch(model: nn.Module, *, attention: bool = True, patch_embed: bool = True, qformer: bool = True,
          moe: bool = True, backend: str | Mapping[str, str] | None = None) -> PatchReport:
    """Run mmkernels ops inside an existing Hugging Face model, in place; returns what was replaced.

    Args:
        model: any ``nn.Module`` holding HF modules (a ``PreTrainedModel`` or a part of one).
        attention: vision-tower and Q-Former attention through ``"mmkernels"`` (:func:`mmkernels.ops.attention`);
            in Qwen2-VL / Qwen2.5-VL / Qwen3-VL towers also the rotary (:func:`mmkernels.ops.rotary_embedding`).
        patch_embed: ViT / CLIP / SigLIP / BLIP-2 / InstructBLIP / InternVL patch embeddings through
            :func:`mmkernels.ops.patch_embed` (``interpolate_pos_encoding`` included), and the Qwen-VL Conv3d over
            flattened patches (one GEMM).
        qformer: BLIP-2 / InstructBLIP Q-Former cross-attention through :func:`mmkernels.ops.qformer_cross_attention`.
        moe: Mixtral / LongCat-Flash / DeepSeek-V3 MoE blocks through ``moe_route`` / ``moe_experts``
            (:mod:`mmkernels.integrations.hf.moe`).
        backend: ``None`` (auto per device), one backend name for every op the patch runs, or a mapping
            ``{op: name}`` (e.g. ``{"attention": "triton", "moe_route": "cpp"}``; ops it does not name run on auto).
            Names are checked before anything is patched: an unknown backend, a mapping key that is not one of
            :data:`PATCH_OPS`, or an op that lacks the named backend raises :class:`mmkernels.BackendError`
            (``TypeError`` for any other type). A backend that cannot run on the tensors' device raises
            :class:`mmkernels.BackendError` at the first call.

    Returns:
        :class:`PatchReport`: modules replaced (path, kind, class), parts skipped and why, and (growing as the
        model runs) calls that fell back to the model's own code. Patching a patched model is a no-op that returns
        the first report; call :func:`unpatch` first to change the options. If a part of it was unpatched since
        (``unpatch(model.visual)``), the whole model is unpatched and patched afresh, with a new report. A part
        patched on its own before keeps its options; the whole's report lists its modules too.

    Raises ``TypeError`` when ``model`` is not an ``nn.Module`` or a switch (``attention``, ...) is not a bool,
    and :class:`mmkernels.BackendError` when ``backend`` names an unknown backend or op, or one that an op this
    model would run does not implement (e.g. ``"cpp"`` for a ViT: attention has no C++ backend); the model is then
    left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    attention, patch_embed, qformer, moe = (flag(name, value, op="patch") for name, value in (
        ("attention", attention), ("patch_embed", patch_embed), ("qformer", qformer), ("moe", moe)))
    _check_backend_names(backend)
    state = model.__dict__.get(_STATE)
    if state is not None:
        if _still_patched(model, state["report"]):
            return state["report"]
        unpatch(model)  # a part was unpatched since (``unpatch(model.visual)``): patch the whole model afresh
    config = getattr(model, "config", None)
    report = PatchReport(model_type=getattr(config, "model_type", "") or type(model).__name__)
    state = {"report": report, "backend": backend}
    model.__dict__[_STATE] = state
    try:
        _patch(model, state, attention=attention, patch_embed=patch_embed, qformer=qformer, moe=moe, backend=backend)
        _list_parts_patched_before(model, report)
        if isinstance(backend, str):  # one name for every op: each op this model now runs must implement it
            used = sorted({_KIND_OPS[r.kind] for r in report.replaced if r.kind in _KIND_OPS})
            resolve_backends(_OWNER, backend, used)
    except BaseException:
        unpatch(model)  # all or nothing: an error (e.g. a BackendError from the MoE part) leaves the model as it was
        raise
    return report


def _list_parts_patched_before(model: nn.Module, report: PatchReport) -> None:
    """A part patched on its own before (``patch(model.vision_model)``, then ``patch(model)``) keeps its options and
    its report; the whole's report lists its modules too, under their full paths, so that ``unpatch`` of that part
    is noticed by the next ``patch(model)`` (which then patches the whole afresh)."""
    listed = {(r.path, r.kind) for r in report.replaced}
    for path, part in model.named_modules():
        state = part.__dict__.get(_STATE) if path else None
        for r in state["report"].replaced if state is not None else ():
            full = f"{path}.{r.path}" if r.path else path
            if (full, r.kind) not in listed:
                listed.add((full, r.kind))
                note = f"patched before by patch() of {path!r}"
                report.replaced.append(dataclasses.replace(r, path=full, detail=f"{r.detail} ({note})"
                                                           if r.detail else note))


def _still_patched(model: nn.Module, report: PatchReport) -> bool:
    """Whether every module the report names still runs our code (swapped forward or switched attention)."""
    for r in report.replaced:
        try:
            module = model.get_submodule(r.path)
        except AttributeError:
            return False
        if not (is_swapped(module) or _attention.ENTRY_ATTR in module.__dict__):
            return False
    return True


def _check_backend_names(backend) -> None:
    """Reject a misspelt backend or op name before anything is patched (``BackendError``; ``TypeError`` for a
    value that is neither a name nor a mapping). A mapping's backends are checked against each op it names."""
    if backend is None:
        return
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise BackendError(f"{_OWNER}: unknown backend {backend!r}; expected one of {BACKENDS}")
    elif isinstance(backend, Mapping):
        resolve_backends(_OWNER, dict(backend), PATCH_OPS)
    else:
        raise TypeError(f"{_OWNER}: backend must be None, a backend name or a mapping {{op: backend}}, "
                        f"got {type(backend).__name__}")


def _patch(model: nn.Module, state: dict, *, attention: bool, patch_embed: bool, qformer: bool, moe: bool,
           backend: str | Mapping[str, str] | None) -> None:
    report, config = state["report"], getattr(model, "config", None)
    used = {type(m).__module__ for m in model.modules()}
    families = {name: spec for name, spec in COVERED.items() if name in used}

    if attention:
        _attention.register()
        attn_classes: dict[str, type] = {}
        for module_name, (attn, _, _) in families.items():
            attn_classes.update(family_classes(module_name, attn, report, "attention"))
        views: dict[int, object] = {}
        for path, module in model.named_modules():
            cls = attn_classes.get(type(module).__name__)
            if cls is None or type(module) is not cls:
                continue
            cfg = getattr(module, "config", None)
            if cfg is None or not hasattr(cfg, "_attn_implementation"):
                continue  # e.g. an older release's wrapper around the module that calls the attention function
            if not (_is_vision_or_qformer(cfg) or cls.__name__ in DECODER_ATTENTION):
                continue  # a text encoder's attention (CLIP text): not covered
            if _attention.switch(module, report, backend, views):
                report.add(path, "attention", module, _DETAIL)
        for module_name in families:
            if attn_classes and not any(type(m).__module__ == module_name and type(m) in attn_classes.values()
                                        and hasattr(getattr(m, "config", None), "_attn_implementation")
                                        for m in model.modules()):
                report.skip("", "attention", f"no attention module of {module_name} reads a config with "
                            "_attn_implementation in this transformers version: attention not patched")
    # Packed native-resolution towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): their attention, rotary and Conv3d patch
    # embedding are swapped forwards (see qwen_vl), not an attention implementation.
    patch_packed_towers(model, report, attention=attention, patch_embed=patch_embed, backend=backend)
    if attention:  # IDEFICS (v1): its perceiver resampler's attention and its gated cross-attention layers

        patch_idefics(model, report, backend=backend)
    if patch_embed:
        emb_classes: dict[str, type] = {}
        for module_name, (_, emb, _) in families.items():
            emb_classes.update(family_classes(module_name, emb, report, "patch_embed"))
        patch_vision_embeddings(model, report, emb_classes, backend=backend)
    if qformer:
        layer_classes: dict[str, type] = {}
        for module_name, (_, _, layers) in families.items():
            layer_classes.update(family_classes(module_name, layers, report, "qformer"))
        patch_qformer(model, report, layer_classes, backend=backend)
        # A cross-attention module whose forward is now ours no longer reaches the attention function.
        ours = {r.path for r in report.replaced if r.kind == "qformer"}
        report.replaced[:] = [r for r in report.replaced if not (r.kind == "attention" and r.path in ours)]
    if moe:
        try:
            from .moe import FAMILIES, patch_moe
        except ImportError as exc:
            report.skip("", "moe", f"mmkernels.integrations.hf.moe cannot be imported ({exc})")
        else:
            # Only models built from a MoE family's modeling file: a vision model with backend="triton" must not be
            # refused because the MoE ops have no Triton router.
            if any(f.module in used or getattr(config, "model_type", None) == f.model_type for f in FAMILIES):
                patch_moe(model, report, backend=backend)


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch` bit for bit: every swapped forward is restored and every switched attention module reads
    the model's config again, for patches of ``model`` or of any of its sub-modules (and of a pickled or deep-copied
    patched model).

    Returns the number of modules whose ``forward`` was restored (patch embeddings, Q-Former layers, MoE blocks,
    experts and routers, Qwen-VL towers and their vision attention); attention switched through configs is not
    counted. An unpatched model is left alone
    (0). The model's configs were never changed: a ``set_attn_implementation`` call made while patched takes effect
    for the attention modules at ``unpatch`` (and for fallbacks at once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    # ``patch`` may have been called on a part (``patch(model.vision_model)``): undo every patch found below.
    for m in model.modules():
        m.__dict__.pop(_STATE, None)
    n = restore_all(model)
    for module in model.modules():
        _attention.unswitch(module)
        for key in [k for k in module.__dict__ if k.startswith("_mmkernels_")]:
            del module.__dict__[key]
    return n
