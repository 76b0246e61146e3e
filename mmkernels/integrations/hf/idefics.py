"""HF IDEFICS (v1, ``IdeficsForVisionText2Text``): its perceiver resampler and its gated cross-attention layers
through mmkernels ops.

IDEFICS is Flamingo on LLaMA: a perceiver resampler (``IdeficsPerceiverResampler``: learned latents attending to
``[image tokens; latents]``) turns each image into ``Nl`` latents, and an ``IdeficsGatedCrossAttentionLayer`` before
every ``cross_layer_interval``-th decoder layer lets each text token attend to the latents of the images its row of
``image_attention_mask`` names, behind ``tanh`` gates (``alpha_cross_attn``, ``alpha_dense``). ``patch`` swaps the
forward of three kinds of module (parameters, buffers and sub-modules are never touched):

- ``IdeficsPerceiverAttention`` (kind ``"attention"``): its own layer norms and projections (the optional q/k layer
  norms included), then one dense :func:`mmkernels.ops.attention` call, latents as queries over
  ``[context; latents]`` (the keys HF concatenates), then its ``output_proj``;
- ``IdeficsGatedCrossAttentionLayer`` (kind ``"media_cross_attention"``): reads the call's 4-D additive
  ``image_attention_mask`` (``[B, 1, Lt, M * Nl]``, HF's expansion of the processor's ``[B, Lt, M]`` mask) and its
  ``cross_attention_gate`` and, when they are a per-token media pattern, runs the layer's own forward (its norms,
  dropout, gate ``masked_fill``, ``tanh(alpha)`` residuals and MLP: HF's code) with its ``cross_attn`` child computing
  through :func:`mmkernels.ops.media_cross_attention` (the plan reaches the child as a private keyword argument);
- its ``cross_attn`` (``IdeficsAttention`` used as cross-attention): the module's own ``q_proj``/``k_proj``/
  ``v_proj``, its q/k RMS norms when ``qk_layer_norms``, one ``media_cross_attention`` call, its ``o_proj``. Called
  without the layer's plan (directly, or by a layer that fell back) it runs its own forward.

The media patterns (one verdict per mask): each text token sees the ``Nl`` latents of one image (the processor's
"latest image at or before the token", ``only_immediate=True``; images in any order, skipped or repeated: the
media are gathered into the order the text uses them) or of the images ``0..m`` (``only_immediate=False``), or no
image at all. Rows that see no image must have ``cross_attention_gate == 0`` (HF builds the gate that way): the
unpatched layer's attention output there is a softmax over nothing but masked keys (uniform over every key in fp32,
the plain unmasked softmax for fp16/bf16 masks), which the gate then zeroes; the op gives zeros to rows before the
first image and the latest image's attention to rows after an end-of-document, and the same gate zeroes those.
``Nl`` is read off the mask (the run length of a row), so ``perceiver_embeddings`` and no-resampler models are
covered too.

A call the ops cannot take runs the module's own forward and is counted in the report: no mask (a layer called
directly with ``image_attention_mask=None``: HF's SDPA path then applies the module's ``is_causal``, eager does
not), an additive mask with
values other than ``0`` and ``finfo.min``, a mask that is not one of the patterns above (a token seeing two
non-adjacent images, an image seen by part of its latents, ...), a gate that is nonzero on a token that sees no
image, the cross-attention weights recorded by transformers' output recorder (``output_attentions=True`` alone
is not a fallback: the layer drops those weights and HF records only the decoder's ``self_attn``), attention
dropout in training, a head dim above 256, a ``cross_attn`` whose
forward another library replaced after ``patch``.

Host syncs: one per mask (and gate) tensor, cached on their identity and version like the attention masks of
:mod:`.attention`: the layers of one forward share the mask and gate HF builds once, so one forward reads the device
once (each generation step builds a new mask: one read per step; under ``torch.inference_mode`` the tensors have
no version counter and nothing is cached: one read per layer). Inside ``torch.compile`` the verdict is a graph
break (the number of latents and of media are shapes); IDEFICS declares ``_can_compile_fullgraph = False`` anyway.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ...ops.attention import MAX_HEAD_DIM, attention
from ...ops.media_cross_attention import media_cross_attention
from ._patching import (
    IMPL_ATTR,
    PatchReport,
    _is_dispatcher,
    family_classes,
    op_backend,
    original_forward,
    swap_forward,
    weights_recorded,
)
from .attention import _keep_mask, cached_mask_plan

__all__ = ["IDEFICS_MODULES", "patch_idefics"]

# modeling module -> class names (perceiver attention, gated cross-attention layer, attention used as cross_attn)
IDEFICS_MODULES = {
    "perceiver": ("transformers.models.idefics.perceiver", "IdeficsPerceiverAttention"),
    "layer": ("transformers.models.idefics.modeling_idefics", "IdeficsGatedCrossAttentionLayer"),
    "cross_attn": ("transformers.models.idefics.modeling_idefics", "IdeficsAttention"),
}
_STATE = "_mmkernels_idefics"  # (report, backend) on each patched module
_PLAN_KW = "_mmkernels_media_plan"  # the private keyword the patched layer hands its cross_attn
_PERCEIVER_DETAIL = "one dense ops.attention per block: latents over [context; latents]"
_LAYER_DETAIL = ("image_attention_mask + cross_attention_gate -> media_locations (one host read per mask); "
                 "other masks fall back")
_CROSS_DETAIL = "ops.media_cross_attention between its own projections (with the layer's plan)"
_CACHE_KW = ("cache", "past_key_values", "past_key_value")


# ---- the perceiver resampler's attention --------------------------------------------------------------------------

def _perceiver_forward(self, context, latents, *args, **kwargs):
    report, backend = self.__dict__[_STATE]

    def own():
        return original_forward(self)(context, latents, *args, **kwargs)

    if args or kwargs or not isinstance(context, torch.Tensor) or not isinstance(latents, torch.Tensor) \
            or context.dim() != 3 or latents.dim() != 3 or context.shape[0] != latents.shape[0]:
        return own()  # not the resampler's call: the module's own code (and its own errors)
    heads, dim = self.n_heads, self.head_dim
    if dim > MAX_HEAD_DIM:
        report.fallback(f"{type(self).__name__}: head dim {dim} > {MAX_HEAD_DIM}")
        return own()
    context = self.context_layer_norm(context)
    latents = self.latents_layer_norm(latents)
    B, n = latents.shape[:2]
    q = self.q_proj(latents)
    both = torch.cat([context, latents], dim=-2)
    k, v = self.k_proj(both), self.v_proj(both)
    q = q.reshape(B, n, heads, dim)
    k, v = k.reshape(B, both.shape[1], heads, dim), v.reshape(B, both.shape[1], heads, dim)
    if self.qk_layer_norms:  # LayerNorm over the head dim: the same in [B, L, H, D] as in HF's [B, H, L, D]
        q, k = self.q_layer_norm(q), self.k_layer_norm(k)
    if not (q.dtype == k.dtype == v.dtype):
        report.fallback(f"{type(self).__name__}: query, key and value dtypes differ")
        return own()
    out = attention(q, k, v, softmax_scale=self.qk_scale, backend=op_backend(backend, "attention"))
    return self.output_proj(out.reshape(B, n, heads * dim))


# ---- the media plan: which images each text token sees, from HF's mask --------------------------------------------

@dataclass(frozen=True)
class _MediaPlan:
    """What one ``image_attention_mask`` (with its ``cross_attention_gate``) asks for: ``kind`` ``"media"`` or
    ``"fallback"`` (``reason``). For ``"media"``: ``latents`` (``Nl``, a host int), ``media`` (how many media the op
    gets per sample), ``locations`` (bool ``[B, Lt]``), ``index`` (int64 ``[B, media]``: the images to gather, in
    the order the text uses them; None when that order is the images' own), and the gate the verdict was made with
    (a weak reference and its version: a plan cached on the mask is reused only with the same gate)."""

    kind: str
    reason: str = ""
    only_immediate: bool = True
    latents: int = 0
    media: int = 0
    locations: torch.Tensor | None = None
    index: torch.Tensor | None = None
    gate: object = None
    gate_version: int | None = None


_ADDITIVE = "image_attention_mask is an additive mask with values other than 0 and -inf (an arbitrary bias)"
_NOT_MEDIA = ("image_attention_mask is not a per-token media pattern (each token seeing the latents of one image, "
              "or of images 0..m)")
_GATE = "cross_attention_gate is nonzero on a token that sees no image"


def _gate_stamp(gate: torch.Tensor):
    return weakref.ref(gate), gate._version


def _media_plan(mask: torch.Tensor, gate: torch.Tensor, batch: int, lt: int, keys: int, stamp: bool = True
                ) -> _MediaPlan:
    """The media pattern of ``mask`` (4-D, ``[B or 1, 1, Lt, K]``, bool or additive) with one host read: every
    verdict and the sizes come back in one transfer; the gather index is built on the device after it. ``stamp``:
    record the gate (for a plan that will be cached)."""
    found = _keep_mask(mask)
    if found is None:
        return _MediaPlan("fallback", _ADDITIVE)
    keep, binary = found
    if keep.dim() != 4 or tuple(keep.shape[-2:]) != (lt, keys) or keep.shape[0] not in (1, batch):
        if not bool(binary):
            return _MediaPlan("fallback", _ADDITIVE)
        return _MediaPlan("fallback", f"image_attention_mask shape {tuple(keep.shape)} is not [B, 1, Lt, K] = "
                                      f"[{batch}, 1, {lt}, {keys}]")
    device = keep.device
    true = torch.ones((), dtype=torch.bool, device=device)
    same_heads = (keep == keep[:, :1]).all() if keep.shape[1] > 1 else true
    m = keep[:, 0].expand(batch, lt, keys)
    row = m.any(-1)  # [B, Lt]: the token sees some image
    count = m.sum(-1)
    j = torch.arange(keys, device=device)
    t = torch.arange(lt, device=device)
    first = m.to(torch.uint8).argmax(-1)  # the first key a row sees (0 for an empty row)
    # Immediate: every non-empty row is one run of Nl keys starting at a multiple of Nl.
    nl_i = count.max().clamp(min=1)
    run = (j >= first[..., None]) & (j < (first + nl_i)[..., None])
    immediate = (((m == run).all(-1) | ~row).all() & ((count == nl_i) | ~row).all()
                 & ((first % nl_i == 0) | ~row).all() & (keys % nl_i == 0))
    # All previous: every row is a prefix of (m + 1) * Nl keys.
    nl_p = torch.where(row, count, keys).min().clamp(min=1)
    previous = (m == (j < count[..., None])).all() & (count % nl_p == 0).all() & (keys % nl_p == 0)
    # Empty rows (before the first image, or after an end of document: the gate zeroes them) carry the last image.
    last = torch.where(row, t, -1).cummax(1).values
    seen = last >= 0
    start = torch.full((batch, 1), -1, dtype=torch.int64, device=device)

    def carried(media):
        return torch.where(seen, media.gather(1, last.clamp(min=0)), -1)

    f_i = carried(torch.where(row, first // nl_i, -1))
    loc_i = (f_i != torch.cat([start, f_i[:, :-1]], 1)) & (f_i >= 0)  # a new image starts here
    pos_i = loc_i.cumsum(1) - 1
    in_order = ((f_i == pos_i) | ~loc_i).all()  # the j-th image the text turns to is image j: no gather
    f_p = carried(count // nl_p - 1)
    step = f_p - torch.cat([start, f_p[:, :-1]], 1)
    previous = previous & ((step == 0) | (step == 1)).all()
    gate_ok = ~((gate != 0) & ~row).any()
    stats = torch.stack([binary, same_heads, immediate, previous, in_order, gate_ok]).to(torch.int64)
    stats = torch.cat([stats, torch.stack([nl_i, nl_p, loc_i.sum(1).max()]).to(torch.int64)])
    (is_binary, heads_ok, is_immediate, is_previous, ordered, gate_fine,
     n_i, n_p, most) = stats.tolist()  # the one host read
    if not is_binary:
        return _MediaPlan("fallback", _ADDITIVE)
    if not heads_ok:
        return _MediaPlan("fallback", "image_attention_mask differs between heads")
    if not (is_immediate or is_previous):
        return _MediaPlan("fallback", _NOT_MEDIA)
    if not gate_fine:
        return _MediaPlan("fallback", _GATE)
    ref, version = _gate_stamp(gate) if stamp else (None, None)
    if is_immediate:
        index = None
        if not ordered:  # the image each new run turns to, gathered in that order (repeats allowed)
            cum = loc_i.to(torch.int32).cumsum(1, dtype=torch.int32).contiguous()
            want = torch.arange(1, most + 1, device=device, dtype=torch.int32).expand(batch, most).contiguous()
            at = torch.searchsorted(cum, want).clamp(max=lt - 1)
            index = f_i.gather(1, at).clamp(min=0)
        return _MediaPlan("media", only_immediate=True, latents=n_i, media=keys // n_i if index is None else most,
                          locations=loc_i, index=index, gate=ref, gate_version=version)
    return _MediaPlan("media", only_immediate=False, latents=n_p, media=keys // n_p, locations=step == 1,
                      gate=ref, gate_version=version)


def _plan(mask, gate, batch: int, lt: int, keys: int) -> _MediaPlan:
    """The plan of ``(mask, gate)``: cached on the mask tensor (identity and version) for the layers of a forward,
    and reused only with the gate it was made with."""
    if torch.compiler.is_compiling() or mask.is_inference() or gate.is_inference():
        # Nothing cached: under compile (a graph break) and for inference-mode tensors (no version counter to see an
        # in-place change), a verdict per call.
        return _media_plan(mask, gate, batch, lt, keys, stamp=False)
    analyse = functools.partial(_media_plan, mask, gate, batch, lt, keys)
    plan = cached_mask_plan(mask, ("idefics_media", batch, lt, keys, id(gate)), analyse)
    if plan.kind == "media" and (plan.gate() is not gate or plan.gate_version != gate._version):
        plan = analyse()  # another gate tensor, or this one changed in place: a verdict for this call
    return plan


# ---- the gated cross-attention layer and its cross_attn ----------------------------------------------------------

def _cross_is_ours(cross) -> bool:
    d = cross.__dict__
    return d.get(IMPL_ATTR) is _cross_forward and (_is_dispatcher(d.get("forward"), cross)
                                                   or _is_dispatcher(d.get("_old_forward"), cross))


def _layer_forward(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
                   cross_attention_gate=None, *args, **kwargs):
    report, _ = self.__dict__[_STATE]

    def own(**extra):
        return original_forward(self)(hidden_states, attention_mask, image_hidden_states, image_attention_mask,
                                      cross_attention_gate, *args, **kwargs, **extra)

    def fallback(reason: str):
        report.fallback(f"{type(self).__name__}: {reason}")
        return own()

    cross = getattr(self, "cross_attn", None)
    if args or any(kwargs.get(k) is not None for k in _CACHE_KW) or not isinstance(hidden_states, torch.Tensor) \
            or not isinstance(image_hidden_states, torch.Tensor) or not isinstance(cross_attention_gate, torch.Tensor):
        return own()  # the layer's own code raises its own errors (no images, no gate, a cache)
    if hidden_states.dim() != 3 or image_hidden_states.dim() != 3 or cross is None:
        return own()
    B, lt = hidden_states.shape[:2]
    keys = image_hidden_states.shape[1]
    if image_hidden_states.shape[0] != B or tuple(cross_attention_gate.shape) != (B, lt) or B * lt * keys == 0:
        return own()
    if not _cross_is_ours(cross):
        return fallback("its cross_attn's forward is not the patched one (replaced after patch)")
    # The layer drops its cross_attn's weights (``hidden_states, _ = self.cross_attn(...)``): only an output recorder
    # on cross_attn itself could see them (HF records the decoder's self_attn only), so ``output_attentions`` in
    # kwargs alone is no reason to leave the op.
    if weights_recorded(cross):
        return fallback("the cross-attention weights are recorded (output_attentions)")
    if cross.training and cross.dropout > 0:
        return fallback("attention dropout in training (ops.media_cross_attention has none)")
    if cross.head_dim > MAX_HEAD_DIM:
        return fallback(f"head dim {cross.head_dim} > {MAX_HEAD_DIM}")
    if image_attention_mask is None:  # IdeficsModel always builds one; HF's answer here depends on its
        # implementation (SDPA applies the module's is_causal to an unmasked call, eager does not): not ours to guess
        return fallback("no image_attention_mask")
    plan = _plan(image_attention_mask, cross_attention_gate, B, lt, keys)
    if plan.kind == "fallback":
        return fallback(plan.reason)
    return own(**{_PLAN_KW: plan})


def _cross_forward(self, hidden_states, key_value_states=None, attention_mask=None, *args, **kwargs):
    report, backend = self.__dict__[_STATE]
    plan = kwargs.pop(_PLAN_KW, None)
    if plan is None or args or key_value_states is None:  # not called by its patched layer: HF's code
        return original_forward(self)(hidden_states, key_value_states, attention_mask, *args, **kwargs)
    heads, dim = self.num_heads, self.head_dim
    B, lt = hidden_states.shape[:2]
    media, nl = key_value_states.shape[1] // plan.latents, plan.latents
    q = self.q_proj(hidden_states).view(B, lt, heads, dim)
    k = self.k_proj(key_value_states).view(B, media, nl, heads, dim)
    v = self.v_proj(key_value_states).view(B, media, nl, heads, dim)
    if plan.index is not None:  # the images in the order the text turns to them
        rows = torch.arange(B, device=plan.index.device)[:, None]
        k, v = k[rows, plan.index], v[rows, plan.index]
    if self.qk_layer_norms:  # RMS norm over the head dim: the same in any layout
        q, k = self.q_layer_norm(q), self.k_layer_norm(k)
    if not (q.dtype == k.dtype == v.dtype):  # e.g. fp32 image latents into a half model outside autocast
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = media_cross_attention(q, k, v, plan.locations, only_immediate=plan.only_immediate,
                                softmax_scale=self.scaling, backend=op_backend(backend, "media_cross_attention"))
    return self.o_proj(out.reshape(B, lt, heads * dim)), None


# ---- patching ----------------------------------------------------------------------------------------------------

def _class(key: str, report: PatchReport, kind: str) -> type | None:
    module_name, name = IDEFICS_MODULES[key]
    return family_classes(module_name, (name,), report, kind).get(name)


_PERCEIVER_NEEDS = ("context_layer_norm", "latents_layer_norm", "q_proj", "k_proj", "v_proj", "output_proj",
                    "n_heads", "head_dim", "qk_scale", "qk_layer_norms")
_CROSS_NEEDS = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "scaling", "dropout",
                "qk_layer_norms")


def patch_idefics(model: nn.Module, report: PatchReport, *, backend=None) -> None:
    """Swap the forwards of IDEFICS's perceiver attention and gated cross-attention layers (and their
    ``cross_attn``) in ``model`` (see the module docstring). A model without IDEFICS modules is left alone."""
    if not any(type(m).__module__.startswith("transformers.models.idefics.") for m in model.modules()):
        return
    perceiver = _class("perceiver", report, "attention")
    layer = _class("layer", report, "media_cross_attention")
    cross_cls = _class("cross_attn", report, "media_cross_attention")
    for path, module in model.named_modules():
        if perceiver is not None and type(module) is perceiver:
            missing = [a for a in _PERCEIVER_NEEDS if not hasattr(module, a)]
            if missing:
                report.skip(path, "attention", f"{perceiver.__name__} has no {', '.join(missing)} in this "
                            "transformers version")
                continue
            if swap_forward(module, _perceiver_forward, "attention", state=(_STATE, (report, backend))):
                report.add(path, "attention", module, _PERCEIVER_DETAIL)
        elif layer is not None and cross_cls is not None and type(module) is layer:
            cross = getattr(module, "cross_attn", None)
            missing = ["cross_attn"] if type(cross) is not cross_cls else [
                f"cross_attn.{a}" for a in _CROSS_NEEDS if not hasattr(cross, a)]
            if missing:
                report.skip(path, "media_cross_attention", f"{layer.__name__} has no {', '.join(missing)} in this "
                            "transformers version")
                continue
            if swap_forward(cross, _cross_forward, "media_cross_attention", state=(_STATE, (report, backend))):
                report.add(f"{path}.cross_attn", "media_cross_attention", cross, _CROSS_DETAIL)
            if swap_forward(module, _layer_forward, "media_cross_attention", state=(_STATE, (report, backend))):
                report.add(path, "gated_cross_attention", module, _LAYER_DETAIL)
