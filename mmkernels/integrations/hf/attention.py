"""The ``"mmkernels"`` attention implementation for Hugging Face transformers (``AttentionInterface``).

HF attention modules call ``attention_forward(module, query, key, value, attention_mask, dropout=, scaling=, ...)``
with ``query`` ``[B, Hq, Lq, D]`` and ``key``/``value`` ``[B, Hkv, Lk, D]`` and expect ``([B, Lq, Hq, D], weights)``.
We map each call onto :func:`mmkernels.ops.attention`:

- no mask: dense, causal when the module is causal and ``Lq > 1`` (SDPA's rule; keys past ``Lq`` are cropped first,
  as SDPA does for a prefill into an empty static cache, so top-left and bottom-right alignment agree);
- a 4-D mask (boolean, or additive with only ``0`` and ``-inf``/``finfo.min`` entries) is *verified* against the
  patterns our kernels compute exactly: full attention, key padding (any set of keys per sample: the kept keys are
  packed and run varlen), causal (bottom-right), causal with key padding that packs into a varlen causal call
  (e.g. left padding of a cache prefix), right-padded causal self-attention (a padded training batch: padding
  queries attend to every valid key of their sample, as HF's mask has them);
- anything else (arbitrary additive biases, fully masked query rows, heads with different masks, ``softcap``,
  ``position_bias``, sinks, attention weights asked for, query and key head dims that differ, head dim > 256) runs
  the implementation the model's config names (SDPA or its eager code) for that call, and is counted in
  :data:`FALLBACKS` and in the ``PatchReport`` of the model (``report.fallbacks``). Never a silently wrong answer.

Attention weights are "asked for" when ``output_attentions=True`` reaches the function (transformers 4, and models
that pass it down) or when transformers 5's output recorder records this module's weights in the call in progress
(``output_attentions`` on the config or at call time, which some models never pass to the attention function):
the call then gives exactly what the unpatched model gives (eager: the weights; SDPA: none, as SDPA returns none).

``patch`` does not change the model's configs: each covered attention module gets a private copy of its config
whose ``_attn_implementation`` is ``"mmkernels"`` (the module's ``config`` attribute, put back by ``unpatch``), so
``model.config`` keeps its implementation and accepts what it accepted before (``config.output_attentions = True``
on an eager model), and a fallback runs what ``model.config`` names at the time of the call.

Host syncs: a mask is checked with one host read per mask tensor, not per call: the plan it gives (which call, the
packed key indices and ``cu_seqlens`` with their sizes as host ints) is cached on the mask tensor's identity and
version, so the layers of one forward (which share the mask HF builds once) reuse it and launch without a sync
(integer gathers, ``max_seqlen_*`` given). Vision towers pass no mask: no sync. Not cached (one read per call):
inside ``torch.compile`` and for inference-mode masks (no version counter to see an in-place change).
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from ...ops.attention import MAX_HEAD_DIM, attention
from ._patching import op_backend, refuse_fallback_in_batch_invariant_mode, weights_recorded

__all__ = ["ATTN_NAME", "FALLBACKS", "attention_forward", "register", "switch", "unswitch"]

ATTN_NAME = "mmkernels"
# Fallback reasons that HF's SDPA path cannot compute: for a config switched to "mmkernels" outside ``patch`` (no
# implementation of its own to go back to) these go to the modeling file's eager function.
_WEIGHTS = "output_attentions=True needs the attention weights"
_SDPA_CANNOT = frozenset({_WEIGHTS, "softcap", "position_bias", "attention sinks"})
FALLBACKS: Counter = Counter()  # reason -> calls handed back to the model's own implementation (all models)
ENTRY_ATTR = "_mmkernels_attention"  # on a patched attention module: (the model's own config, report, backend)


def _entry(module: torch.nn.Module):
    """(the model's config, report, backend) of an attention module ``patch`` switched, else None (a config
    switched with ``attn_implementation="mmkernels"`` outside ``patch``)."""
    return module.__dict__.get(ENTRY_ATTR)


def _fallback(module, query, key, value, attention_mask, reason: str, **kwargs):
    """Run the implementation the model's own config names (SDPA or the modeling file's eager function)."""
    refuse_fallback_in_batch_invariant_mode(reason)
    FALLBACKS[reason] += 1
    hit = _entry(module)
    previous = getattr(hit[0], "_attn_implementation", None) if hit is not None else None
    if hit is not None and hasattr(hit[1], "fallback"):
        hit[1].fallback(reason)
    if previous in (None, ATTN_NAME):
        # No implementation of its own (a config switched outside ``patch``): SDPA when it computes this call, else
        # the modeling file's eager code (softcap, sinks, position bias and attention weights are eager-only).
        previous = "eager" if reason in _SDPA_CANNOT else "sdpa"
    elif previous == "sdpa" and reason in _SDPA_CANNOT - {_WEIGHTS}:
        previous = "eager"  # SDPA would silently drop these; attention weights: SDPA gives none, as unpatched
    if previous == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", False) if causal is None else causal
            if attention_mask is None and causal and query.shape[2] > 1:
                # SDPA's mask function skips a purely causal mask (SDPA applies is_causal itself); eager code applies
                # only the mask it is given, so give it the causal one (bottom-right, as SDPA and our kernels).
                attention_mask = _causal_br(query.shape[2], key.shape[2], query.device)[None, None]
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                # Eager code adds the mask: turn our boolean mask back into an additive one.
                attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            return fn(module, query, key, value, attention_mask, **kwargs)
        previous = "sdpa"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[previous](module, query, key, value, attention_mask, **kwargs)


def _keep_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(keep, binary)``: the boolean keep-mask equal to ``mask`` and a 0-d bool tensor, true when ``mask`` holds
    only ``0`` and ``-inf``/``finfo.min``-like values (always for a bool mask); None for a mask of another dtype. No
    host read: the caller reads ``binary`` with everything else it needs (an additive mask with other values is a
    bias our kernels cannot add)."""
    if mask.dtype == torch.bool:
        return mask, mask.new_ones((), dtype=torch.bool)
    if not mask.is_floating_point():
        return None
    keep = mask == 0
    # finfo(dtype).min / 2 and below: masked (exp underflows to exactly 0 next to any kept score of a normal range).
    drop = mask <= torch.finfo(mask.dtype).min / 2
    return keep, (keep | drop).all()


def _causal_br(lq: int, lk: int, device) -> torch.Tensor:
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


_ADDITIVE = "additive attention mask with values other than 0 and -inf (an arbitrary 4-D bias)"


@dataclass(frozen=True)
class _Plan:
    """What one attention mask asks for, worked out once per mask (:func:`_analyse`, cached by
    :func:`cached_mask_plan`): ``kind`` is ``"dense"``, ``"causal"``, ``"padded"``, ``"padded_causal"``,
    ``"right_padded_causal"`` or ``"fallback"`` (``reason`` says why). For the varlen kinds, the kept keys packed in
    order as ``(batch, position)`` index tensors (``keys``) with their ``cu_k``/``max_k``, and the dense ``cu_q`` of
    every query; for ``"right_padded_causal"`` also the padding queries' indices (``pad``) with their
    ``cu_pad``/``max_pad``. Every size is a host int: no layer that reuses the plan reads the device."""

    kind: str
    reason: str = ""
    keys: tuple[torch.Tensor, torch.Tensor] | None = None
    cu_k: torch.Tensor | None = None
    max_k: int = 0
    cu_q: torch.Tensor | None = None
    pad: tuple[torch.Tensor, torch.Tensor] | None = None
    cu_pad: torch.Tensor | None = None
    max_pad: int = 0


def _analyse(mask: torch.Tensor, batch: int, lq: int, lk: int) -> _Plan:
    """Which exact call computes ``mask``, with at most one host read (every test's verdict and the key counts'
    max/min/sum come back in one transfer). The patterns: full attention, key padding (any set of keys per sample:
    packed, varlen), causal (bottom-right), causal over packed keys (left padding of a cache prefix), right-padded
    causal self-attention (padding queries attend to every valid key of their sample, as HF's mask has them)."""
    found = _keep_mask(mask)
    if found is None:
        return _Plan("fallback", _ADDITIVE)
    keep, binary = found
    if keep.dim() != 4 or keep.shape[-2:] != (lq, lk) or keep.shape[0] not in (1, batch):
        if not bool(binary):
            return _Plan("fallback", _ADDITIVE)
        return _Plan("fallback", "attention mask shape is not [B or 1, H or 1, Lq, Lk]")
    device = keep.device
    if batch * lq == 0:
        return _Plan("dense") if bool(binary) else _Plan("fallback", _ADDITIVE)
    true = torch.ones((), dtype=torch.bool, device=device)
    same_heads = (keep == keep[:, :1]).all() if keep.shape[1] > 1 else true
    m = keep[:, 0].expand(batch, lq, lk)
    kp = m.any(1)  # [B, Lk]: keys some query sees
    counts = kp.sum(1)
    verdicts = [binary, same_heads, m.any(-1).all(), m.all(), (m == kp[:, None, :]).all(),
                (m == _causal_br(lq, lk, device)).all()]
    # Varlen causal over the packed keys and all Lq queries: query i sees packed key p iff p <= i + n_b - Lq.
    packed = torch.cumsum(kp.to(torch.int32), 1) - 1
    i = torch.arange(lq, device=device)
    sees = kp[:, None, :] & (packed[:, None, :] <= i[None, :, None] + counts[:, None, None] - lq)
    verdicts.append((m == sees).all())
    if lq == lk:
        # Right-padded causal self-attention (a padded training batch): valid tokens are a prefix [0, n_b); query i
        # sees keys j <= min(i, n_b - 1): causal for the valid queries, every valid key for the padding ones.
        last = torch.minimum(i[None, :], counts[:, None] - 1)
        j = torch.arange(lk, device=device)
        prefix = j[None, :] < counts[:, None]
        verdicts.append((kp == prefix).all() & (m == (j[None, None, :] <= last[:, :, None])).all())
    else:
        verdicts.append(~true)
    stats = torch.cat([torch.stack(verdicts).to(torch.int64),
                       torch.stack([counts.max(), counts.min(), counts.sum()]).to(torch.int64)])
    (is_binary, heads_ok, rows_ok, full, padded, causal, padded_causal, right_padded,
     longest, shortest, total) = stats.tolist()  # the one host read
    if not is_binary:
        return _Plan("fallback", _ADDITIVE)
    if not heads_ok:
        return _Plan("fallback", "attention mask differs between heads")
    if not rows_ok:
        return _Plan("fallback", "attention mask has a fully masked query row")
    if full:
        return _Plan("dense")
    if not (padded or causal or padded_causal or right_padded):
        return _Plan("fallback", "attention mask is not key padding or causal (an arbitrary 4-D mask)")
    if causal and not padded:
        return _Plan("causal")
    kind = "padded" if padded else "padded_causal" if padded_causal else "right_padded_causal"
    # The kept keys in order (batch-major), as gathers: no boolean-mask index (a host sync each) in any layer.
    order = torch.argsort((~kp).flatten().to(torch.uint8), stable=True)
    kept = order[:total]
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu_k = torch.cat([zero, torch.cumsum(counts, 0, dtype=torch.int32)])
    cu_q = torch.arange(0, (batch + 1) * lq, lq, dtype=torch.int32, device=device)
    plan = dict(kind=kind, keys=(kept // lk, kept % lk), cu_k=cu_k, max_k=longest, cu_q=cu_q)
    if kind == "right_padded_causal":
        rest = order[total:]
        plan.update(pad=(rest // lk, rest % lk), cu_pad=torch.cat([zero, torch.cumsum(lk - counts, 0,
                                                                                       dtype=torch.int32)]),
                    max_pad=lk - shortest)
    return _Plan(**plan)


# Plans of recent masks, by the mask tensor's identity (checked through a weak reference, so a freed mask's id that
# a new tensor reuses never matches) and version (an in-place change makes a new plan): the mask HF builds once per
# forward is read on the host once, by the first layer, and every other layer reuses the plan.
_PLANS: OrderedDict[tuple, tuple] = OrderedDict()
_MAX_PLANS = 16


def _forget(key: tuple, ref) -> None:
    """A cached mask was freed: drop its plan (the weak reference's callback)."""
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is ref:
        del _PLANS[key]


def cached_mask_plan(mask: torch.Tensor, what: tuple, analyse):
    """``analyse()`` for ``mask``, computed once per mask tensor, version and ``what`` (the caller's name and the
    call's sizes) and reused by every later call with the same tensor: the layers of one forward. Not cached inside
    ``torch.compile`` (no host read there) or for inference-mode tensors (they have no version counter)."""
    if torch.compiler.is_compiling() or mask.is_inference():
        return analyse()
    key = (id(mask), *what)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        _PLANS.move_to_end(key)
        return hit[2]
    plan = analyse()
    _PLANS[key] = (weakref.ref(mask, functools.partial(_forget, key)), mask._version, plan)
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def _gather(t: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rows ``t[b, l]`` of ``t`` ``[B, L, ...]`` at the plan's ``(batch, position)`` indices (integer gathers: no
    host sync, unlike a boolean-mask index)."""
    return t[index[0], index[1]]


def _varlen(q, k, v, plan: _Plan, causal, scale, dropout, backend):
    """q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hkv, D]``: the plan's kept keys packed, every query kept."""
    B, lq = q.shape[:2]
    out = attention(q.reshape(B * lq, *q.shape[2:]), _gather(k, plan.keys), _gather(v, plan.keys), causal=causal,
                    softmax_scale=scale, cu_seqlens_q=plan.cu_q, cu_seqlens_k=plan.cu_k, max_seqlen_q=lq,
                    max_seqlen_k=plan.max_k, backend=backend, dropout_p=dropout)
    return out.view(B, lq, *out.shape[1:])


def _right_padded_causal(q, k, v, plan: _Plan, scale, dropout, backend):
    """Causal varlen over each sample's valid prefix for the valid queries, and the padding queries over all of their
    sample's valid keys (what HF's mask gives them): two varlen calls on the same packed keys."""
    B, L = q.shape[:2]
    k, v = _gather(k, plan.keys), _gather(v, plan.keys)
    valid = attention(_gather(q, plan.keys), k, v, causal=True, softmax_scale=scale, cu_seqlens_q=plan.cu_k,
                      cu_seqlens_k=plan.cu_k, max_seqlen_q=plan.max_k, max_seqlen_k=plan.max_k, backend=backend,
                      dropout_p=dropout)
    padding = attention(_gather(q, plan.pad), k, v, causal=False, softmax_scale=scale, cu_seqlens_q=plan.cu_pad,
                        cu_seqlens_k=plan.cu_k, max_seqlen_q=plan.max_pad, max_seqlen_k=plan.max_k, backend=backend,
                        dropout_p=dropout)
    out = valid.new_zeros((B, L, *valid.shape[1:]))
    out = out.index_put(plan.keys, valid)
    return out.index_put(plan.pad, padding)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention function: ``query`` ``[B, Hq, Lq, D]``, ``key`` ``[B, Hkv, Lk, D]``, ``value`` ``[B, Hkv, Lk, Dv]``
    (``Hq % Hkv == 0``; ``Dv`` may differ from ``D``: MLA's 192 / 128), ``attention_mask`` None or 4-D (bool keep-mask
    or additive float). Returns ``([B, Lq, Hq, Dv], None)`` in the
    query's dtype. Calls our kernels cannot express exactly run the model's previous implementation (see the
    module docstring); the call is counted."""
    every = dict(kwargs, dropout=dropout, scaling=scaling)
    if is_causal is not None:
        every["is_causal"] = is_causal
    why = None
    if weights_recorded(module, kwargs):
        why = _WEIGHTS
    elif kwargs.get("softcap") is not None:
        why = "softcap"
    elif kwargs.get("position_bias") is not None:
        why = "position_bias"
    elif kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        why = "attention sinks"
    elif query.dim() != 4 or key.dim() != 4 or key.shape[:-1] != value.shape[:-1]:
        why = "key and value shapes differ"
    elif query.shape[-1] != key.shape[-1]:
        why = "query and key head dims differ"
    elif max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        why = f"head dim {max(query.shape[-1], value.shape[-1])} > {MAX_HEAD_DIM}"
    elif query.shape[1] % key.shape[1] != 0:
        why = "query heads are not a multiple of key/value heads"
    elif key.dtype != query.dtype or value.dtype != query.dtype:
        why = "query, key and value dtypes differ"
    if why is not None:
        return _fallback(module, query, key, value, attention_mask, why, **every)

    hit = _entry(module)
    backend = op_backend(hit[2], "attention") if hit is not None else None
    B, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    if key.shape[0] != B:  # learned queries of batch 1 over a batch of keys (Q-Former): SDPA broadcasts
        if B == 1:
            query, B = query.expand(key.shape[0], -1, -1, -1), key.shape[0]
        elif key.shape[0] == 1:
            key, value = key.expand(B, -1, -1, -1), value.expand(B, -1, -1, -1)
        else:
            return _fallback(module, query, key, value, attention_mask, "query and key batch sizes differ", **every)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, L, H, D] views
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and lq > 1
        if causal and lk > lq:  # as SDPA: a prefill into an empty static cache
            k, v = k[:, :lq], v[:, :lq]
        out = attention(q, k, v, causal=causal, softmax_scale=scaling, backend=backend, dropout_p=dropout)
        return out, None

    plan = cached_mask_plan(attention_mask, ("attention", B, lq, lk),
                            functools.partial(_analyse, attention_mask, B, lq, lk))
    if plan.kind == "fallback":
        return _fallback(module, query, key, value, attention_mask, plan.reason, **every)
    if plan.kind in ("dense", "causal"):
        out = attention(q, k, v, causal=plan.kind == "causal", softmax_scale=scaling, backend=backend,
                        dropout_p=dropout)
    elif plan.kind == "right_padded_causal":
        out = _right_padded_causal(q, k, v, plan, scaling, dropout, backend)
    else:
        out = _varlen(q, k, v, plan, plan.kind == "padded_causal", scaling, dropout, backend)
    return out, None


def register() -> bool:
    """Register ``"mmkernels"`` with transformers' ``AttentionInterface`` (and SDPA's boolean masks with its
    ``AttentionMaskInterface``, so padding reaches us as a 4-D keep-mask). Returns False when transformers is not
    importable; idempotent."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_NAME, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: masks are built per model, 4-D additive; we read those as well
        return True
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return True


def switch(module: torch.nn.Module, report, backend, views: dict) -> bool:
    """Route one attention module to ``"mmkernels"``: its ``config`` attribute becomes a private copy of its config
    (one per config, kept in ``views``) whose ``_attn_implementation`` is ``"mmkernels"``; the model's config is not
    touched. False when it is switched already."""
    if ENTRY_ATTR in module.__dict__:
        return False
    config = module.config
    view = views.get(id(config))
    if view is None:
        view = views[id(config)] = copy.copy(config)
        view.__dict__["_attn_implementation_internal"] = ATTN_NAME
    module.__dict__[ENTRY_ATTR] = (config, report, backend)
    module.__dict__["config"] = view
    return True


def unswitch(module: torch.nn.Module) -> bool:
    """Undo :func:`switch`: the module reads the model's config again. False when it was not switched."""
    hit = module.__dict__.pop(ENTRY_ATTR, None)
    if hit is None:
        return False
    module.__dict__["config"] = hit[0]
    return True
