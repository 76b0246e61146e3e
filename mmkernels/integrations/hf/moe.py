"""Hugging Face sparse MoE blocks through mmkernels: Mixtral, LongCat-Flash (zero-computation experts) and
DeepSeek-V3 (sigmoid, group-limited routing, shared experts), and the ``"mmkernels"`` experts implementation.

``patch_moe(model, report)`` swaps, per recognised block, three forwards (nothing else):

- the block's **router** (``gate`` / ``router``), where it returns HF 5's ``(router_logits, topk_weights,
  topk_indices)`` or, as transformers 5.17's LongCat router, ``(topk_weights, topk_indices)``: computes the router
  logits with the very same lines as HF (bit-identical logits; HF's output recorder hooks the router module, so
  ``output_router_logits`` and the auxiliary loss still get them), then routes with ``mmkernels.ops.moe_route`` using
  the family's exact semantics and returns HF's tuple (fp32 weights, int64 ids). A router that returns only its
  logits (found by probing one dummy token at patch time) is left alone and the block routes its logits instead;
- the **experts** module: :func:`experts_forward` (HF's experts signature ``(hidden_states, top_k_index,
  top_k_weights)``) runs ``mmkernels.ops.moe_experts`` on the module's fused 3-D parameters ``gate_up_proj``
  ``[E, 2*Di, Dm]`` (rows ``[:Di]`` gate, ``[Di:]`` up: HF's concatenated layout is ours, no copy; LongCat's extra rows
  for its zero experts in transformers < 5.25 are sliced off, a view) and ``down_proj`` ``[N, Dm, Di]``. Slots whose
  id is outside ``[0, N)`` are not dispatched (HF's expert-parallel sentinel, LongCat's zero experts);
- the **block**: routes (through its router module), calls its experts *module* (so adapters wrapped around it, e.g.
  PEFT's ``ParamWrapper`` LoRA on ``experts.gate_up_proj``, and hooks still apply), and adds what HF adds (the
  zero-expert identity term, shared experts). It returns what HF's block returns: the ``[B, L, Dm]`` hidden states
  (``(hidden, router_logits)`` where HF's block returned that).

The same :func:`experts_forward` is registered with transformers' ``ExpertsInterface`` as ``"mmkernels"``
(:func:`register_experts`, done when :mod:`mmkernels.integrations.hf` is imported), so
``from_pretrained(..., experts_implementation="mmkernels")`` runs every experts module that uses the interface
(Mixtral, DeepSeek-V3, Qwen-MoE, LongCat-Flash from transformers 5.25, ...) through ``moe_experts`` without a
``patch`` call; routing then stays HF's own (``patch`` also routes with ``moe_route``). An experts module whose
layout ``moe_experts`` cannot take (biases, interleaved gate/up, no gate, an activation other than SiLU) or whose
weights differ in dtype from the hidden states outside autocast runs HF's own eager code for that call, counted in
:data:`EXPERTS_FALLBACKS` (and in the ``PatchReport`` of a patched model).

Structure (expert counts, top-k, scaling, groups) is read by :func:`mmkernels.models.convert._hf_moe.moe_layout`:
config first, then the modules' attributes of every supported transformers release, checked against the tensors'
shapes; a release that moved or renamed them gives a skipped block with its reason, never an ``AttributeError``.
At call time, routing constants are read from the modules where HF's forward reads them (a value changed on the
module after patching is followed), with the layout's value when a release does not have the attribute.

Precision: router logits exactly as HF computes them; scores, selection and weights in fp32 inside ``moe_route``
(also under autocast, where HF's fp32 router lines are recast to the autocast dtype); exact ties between biased
scores go to the lower expert id (``torch.topk`` makes no promise; ties are common with bf16 logits). Experts: in
the hidden states' dtype, or in the autocast dtype inside an autocast region (as HF's Linears), accumulated in fp32.

Routing mapping (``moe_route`` arguments per family):

========================  ===========================================================================================
Mixtral                   logits = Linear(x) in the model dtype; ``scoring="softmax"`` (fp32), ``renormalize=True``;
                          no zero experts, no bias
LongCat-Flash             logits = fp32 Linear *without* the classifier bias (as HF); ``scoring="softmax"``,
                          ``bias=e_score_correction_bias`` (fp32, selection only), ``routed_scaling_factor``,
                          ``num_ffn_experts=N``: ids ``>= N`` are the zero (identity) experts
DeepSeek-V3               logits = fp32 Linear; ``scoring="sigmoid"``, ``bias=e_score_correction_bias``,
                          ``n_groups=n_group``, ``topk_groups=topk_group`` (groups ranked by the sum of their two best
                          biased scores), ``renormalize=norm_topk_prob`` (``sum + 1e-20``),
                          ``routed_scaling_factor``; shared experts added by the model's own ``shared_experts`` MLP
========================  ===========================================================================================

Blocks whose layout our ops cannot take (per-expert ``nn.Linear`` modules of older transformers, interleaved
gate/up, expert biases, an activation other than SiLU, an invalid group configuration, sizes that cannot be read or
contradict the tensors) are left alone and listed as skipped in the report; a family whose classes this
transformers version lacks is skipped, never a crash. Undo with
:func:`mmkernels.integrations.hf._patching.restore_all` (``unpatch``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._backends import resolve_backends
from ...models.convert._common import ConversionError
from ...models.convert._hf_moe import MoELayout, base_module, lookup, moe_layout
from ...ops.moe import moe_experts, moe_route
from ._patching import (
    PatchReport,
    is_swapped,
    materialized,
    original_forward,
    refuse_fallback_in_batch_invariant_mode,
    restore,
    swap_forward,
)

__all__ = ["EXPERTS_FALLBACKS", "EXPERTS_NAME", "FAMILIES", "MoEFamily", "experts_forward", "patch_moe",
           "register_experts"]

KIND = "moe"
ROUTER_KIND = "moe_router"
EXPERTS_KIND = "moe_experts"
EXPERTS_NAME = "mmkernels"  # the name in transformers' ExpertsInterface
_OPS = ("moe_route", "moe_experts")
EXPERTS_FALLBACKS: Counter = Counter()  # reason -> experts calls handed back to HF's own code (all models)


@dataclass(frozen=True)
class MoEFamily:
    """One model family: where its classes live in transformers and which attribute holds the router."""

    name: str
    model_type: str  # config.model_type of models that carry these blocks
    module: str  # transformers module path
    block: str  # sparse MoE block class name
    router: str  # router class name
    router_attr: str  # the block's attribute holding the router


FAMILIES: tuple[MoEFamily, ...] = (
    MoEFamily("mixtral", "mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
              "MixtralTopKRouter", "gate"),
    MoEFamily("longcat_flash", "longcat_flash", "transformers.models.longcat_flash.modeling_longcat_flash",
              "LongcatFlashMoE", "LongcatFlashTopkRouter", "router"),
    MoEFamily("deepseek_v3", "deepseek_v3", "transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE",
              "DeepseekV3TopkRouter", "gate"),
)


def _load(family: MoEFamily) -> tuple[type, type] | str:
    """(block class, router class) from the installed transformers, or why not."""
    try:
        mod = importlib.import_module(family.module)
    except Exception as exc:  # noqa: BLE001 - any import failure means: this transformers cannot give us the family
        return f"cannot import {family.module}: {type(exc).__name__}: {exc}"
    missing = [c for c in (family.block, family.router) if not hasattr(mod, c)]
    if missing:
        return f"this transformers has no {', '.join(missing)} in {family.module}"
    return getattr(mod, family.block), getattr(mod, family.router)


def _backends(backend) -> dict[str, str | None]:
    """Per-op backends for the MoE ops. A mapping may name other ops too (``patch`` passes one choice for the whole
    model): only ours are taken from it. A single name must be implemented by both ops (raises ``BackendError``)."""
    if isinstance(backend, Mapping):
        backend = {op: backend[op] for op in _OPS if op in backend}
    return resolve_backends("mmkernels.integrations.hf (moe)", backend, _OPS)


# ---- experts --------------------------------------------------------------------------------------------------------


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _experts_reason(experts: torch.nn.Module) -> str | None:
    """Why the experts module cannot run through ``moe_experts`` as is, or None."""
    gu, down = lookup((experts,), ("gate_up_proj",), None), lookup((experts,), ("down_proj",), None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor):
        return "experts are not stored as fused 3-D gate_up_proj/down_proj parameters (older transformers layout)"
    if lookup((experts,), ("has_bias",), False) or lookup((experts,), ("gate_up_proj_bias",), None) is not None:
        return "experts have biases (moe_experts has none)"
    if not lookup((experts,), ("is_concatenated",), True) or not lookup((experts,), ("has_gate",), True):
        return "experts store gate and up interleaved or have no gate (moe_experts takes [gate; up] rows)"
    if lookup((experts,), ("has_post_expert_norm",), False):
        return "experts apply a norm after each expert (moe_experts has none)"
    act = lookup((experts,), ("act_fn",), None)
    if not _is_silu(act):
        return f"expert activation is {type(act).__name__}, moe_experts computes SiLU"
    if gu.dim() != 3 or down.dim() != 3:
        return f"gate_up_proj/down_proj are {gu.dim()}-D/{down.dim()}-D, expected 3-D"
    if lookup((experts,), ("is_transposed",), False):
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    n, dm = down.shape[0], down.shape[1]
    if gu.shape[0] < n or gu.shape[1] % 2 or gu.shape[2] != dm or down.shape[2] != gu.shape[1] // 2:
        return f"unexpected expert shapes gate_up_proj {tuple(gu.shape)}, down_proj {tuple(down.shape)}"
    return None


def _expert_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the module's own parameters (through any parametrization an adapter put on them) in ``moe_experts``'
    layout: no copy for HF's default layout (a first-dim slice for LongCat < 5.25, whose gate_up_proj also carries
    unused rows for the zero experts)."""
    gu, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # [E, Dm, 2*Di]: a strided view (the Triton path copies it)
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    return gu[: down.shape[0]], down


def _compute_dtype(hidden: torch.Tensor, experts: torch.nn.Module) -> torch.dtype | None:
    """The dtype the experts run in: the autocast dtype inside an autocast region (as HF's Linears), else the common
    dtype of the hidden states and the expert weights; None when they differ outside autocast (HF's own code then
    decides: its grouped_mm path casts, its eager path raises)."""
    dev = hidden.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    gu, down = lookup((experts,), ("gate_up_proj",), None), lookup((experts,), ("down_proj",), None)
    if isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and hidden.dtype == gu.dtype == down.dtype:
        return hidden.dtype
    return None


_DTYPE_FALLBACK = "moe: hidden states and expert weights in different dtypes outside autocast"
_FUNCTORCH_FALLBACK = "moe: inside a torch.func transform (vmap / grad / jacrev): our MoE ops have no batching rules"


def _functorch_active() -> bool:
    """True inside ``torch.func.vmap`` / ``grad`` / ``jacrev`` ...: our routing and expert ops have data-dependent
    shapes and no batching rules, so such calls run HF's own code (which the transforms can batch)."""
    return torch._C._are_functorch_transforms_active()


def _experts_call(experts, hidden_states, top_k_index, top_k_weights, backend, report, fallback: Callable):
    """``moe_experts`` with HF's experts arguments, or ``fallback`` (counted) when it cannot compute this call."""
    reason = _FUNCTORCH_FALLBACK if _functorch_active() else _experts_reason(experts)
    dtype = _compute_dtype(hidden_states, experts) if reason is None else None
    if reason is None and dtype is None:
        reason = _DTYPE_FALLBACK
    if reason is not None:
        refuse_fallback_in_batch_invariant_mode(reason)
        EXPERTS_FALLBACKS[reason] += 1
        if report is not None:
            report.fallback(reason)
        return fallback(hidden_states, top_k_index, top_k_weights)
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    ids = top_k_index.reshape(flat.shape[0], -1)
    weights = top_k_weights.reshape(ids.shape).float()
    w_gu, w_down = _expert_weights(experts)
    zero = torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device)  # ids outside [0, N): not dispatched
    out = moe_experts(flat.to(dtype), (ids, weights, zero), w_gu.to(dtype), w_down.to(dtype), backend=backend)
    return out.to(hidden_states.dtype).view(shape)


def _eager_experts(experts: torch.nn.Module) -> Callable:
    """HF's own eager experts code (under ``use_experts_implementation``'s dispatch, kept as ``__wrapped__``)."""
    fn = type(experts).forward
    return functools.partial(getattr(fn, "__wrapped__", fn), experts)


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"mmkernels"`` experts implementation (transformers' ``ExpertsInterface`` signature): ``hidden_states``
    ``[T, Dm]``, ``top_k_index`` ``[T, K]`` (ids outside ``[0, N)`` are not dispatched), ``top_k_weights`` ``[T, K]``
    -> ``[T, Dm]`` in ``hidden_states``' dtype, through :func:`mmkernels.ops.moe_experts` (auto backend). A layout
    ``moe_experts`` cannot take, or weights in another dtype than the hidden states outside autocast, runs HF's eager
    experts code for that call, counted in :data:`EXPERTS_FALLBACKS`; inside a ``torch.func`` transform, HF's default
    ``grouped_mm`` experts (also counted)."""
    fallback = _default_experts(self) if _functorch_active() else _eager_experts(self)
    return _experts_call(self, hidden_states, top_k_index, top_k_weights, None, None, fallback)


def _default_experts(experts: torch.nn.Module) -> Callable:
    """HF's default experts implementation (``grouped_mm``, which ``torch.func.vmap`` can batch; its eager code calls
    ``nonzero`` and cannot be), or its eager code where this transformers has no ``grouped_mm``."""
    try:
        from transformers.integrations.moe import ExpertsInterface

        fn = ExpertsInterface._global_mapping.get("grouped_mm")
    except Exception:  # noqa: BLE001 - a release without the interface or the mapping
        fn = None
    return functools.partial(fn, experts) if fn is not None else _eager_experts(experts)


def _patched_experts_forward(backend, report, self, hidden_states, top_k_index, top_k_weights):
    """A patched experts module's forward (bound with ``functools.partial``: picklable, no closure)."""
    return _experts_call(self, hidden_states, top_k_index, top_k_weights, backend, report, original_forward(self))


def register_experts() -> bool:
    """Register ``"mmkernels"`` (:func:`experts_forward`) with transformers' ``ExpertsInterface``, so
    ``from_pretrained(..., experts_implementation="mmkernels")`` and ``model.set_experts_implementation("mmkernels")``
    work. Returns False (registering nothing) when this transformers has no ``ExpertsInterface``; idempotent."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception:  # noqa: BLE001 - no transformers, or a release without the interface
        return False
    ExpertsInterface.register(EXPERTS_NAME, experts_forward)
    return True


# ---- routers ------------------------------------------------------------------------------------------------------
#
# Routing constants are read at call time where HF reads them (the router, then the block), with the layout's value
# (config first) where this release has no such attribute.


def _mixtral_logits(router, x):
    return F.linear(x, router.weight)  # model dtype, as HF; softmax in fp32 happens in moe_route


def _longcat_logits(router, x):  # fp32 router without the classifier bias, exactly as HF's lines
    classifier = router.classifier
    if getattr(classifier, "_hf_hook", None) is None:
        return F.linear(x.type(torch.float32), classifier.weight.type(torch.float32))
    # HF reads the classifier's weight without calling it: under accelerate offload load it first (HF's own line
    # would read the offloaded placeholder)
    with materialized(classifier):
        return F.linear(x.type(torch.float32), classifier.weight.type(torch.float32))


def _deepseek_logits(router, x):  # fp32 router, exactly as HF's lines
    return F.linear(x.type(torch.float32), router.weight.type(torch.float32))


def _mixtral_route(owners, logits, lay: MoELayout, backend):
    return moe_route(logits, top_k=int(lookup(owners, ("top_k",), lay.top_k)), num_ffn_experts=lay.num_ffn_experts,
                     scoring="softmax", renormalize=True, backend=backend)


def _longcat_route(owners, logits, lay: MoELayout, backend):
    # No renormalisation (HF's LongCat router has none); ids >= N are the zero (identity) experts.
    return moe_route(logits, top_k=int(lookup(owners, ("top_k",), lay.top_k)), num_ffn_experts=lay.num_ffn_experts,
                     bias=lookup(owners, ("e_score_correction_bias",)).float(), scoring="softmax",
                     routed_scaling_factor=float(lookup(owners, ("routed_scaling_factor",), lay.routed_scaling_factor)),
                     backend=backend)


def _deepseek_route(owners, logits, lay: MoELayout, backend):
    return moe_route(logits, top_k=int(lookup(owners, ("top_k",), lay.top_k)), num_ffn_experts=lay.num_ffn_experts,
                     bias=lookup(owners, ("e_score_correction_bias",)).float(), scoring="sigmoid",
                     routed_scaling_factor=float(lookup(owners, ("routed_scaling_factor",), lay.routed_scaling_factor)),
                     renormalize=bool(lookup(owners, ("norm_topk_prob",), lay.norm_topk_prob)),
                     n_groups=int(lookup(owners, ("num_group", "n_group"), lay.n_group)),
                     topk_groups=int(lookup(owners, ("topk_group",), lay.topk_group)), backend=backend)


def _router_forward(logits_fn, route_fn, lay: MoELayout, backend, with_logits: bool, self, hidden_states):
    """The router's forward for HF's ``(router_logits, topk_weights, topk_indices)`` convention (``with_logits``) or
    transformers 5.17 LongCat's ``(topk_weights, topk_indices)``. Bound with ``functools.partial`` (picklable)."""
    if _functorch_active():  # HF's own routing (the experts module counts the fallback)
        return original_forward(self)(hidden_states)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    router_logits = logits_fn(self, x)
    r = route_fn((self,), router_logits, lay, backend)
    weights, ids = r.topk_weights, r.topk_ids.long()  # fp32 weights and int64 ids, as HF
    return (router_logits, weights, ids) if with_logits else (weights, ids)


# ---- blocks -------------------------------------------------------------------------------------------------------


def _block_forward(spec: _Spec, route_backend, self, hidden_states):
    """The block's forward: route (through the router module, swapped, or on its logits when this transformers'
    router returns logits only), call the experts module, add the family's extra terms. Bound with
    ``functools.partial`` (picklable: ``torch.save`` / deepcopy of a patched model keep it)."""
    router, experts = getattr(self, spec.family.router_attr), self.experts
    if _functorch_active() or _compute_dtype(hidden_states, base_module(experts)) is None:
        # Before routing and jitter: HF's forward sees the call untouched. It calls the (patched) experts module, which
        # hands the call to HF's own experts code and counts it there, once.
        return original_forward(self)(hidden_states)
    shape = hidden_states.shape
    if spec.jitter and self.training and getattr(self, "jitter_noise", 0) > 0:  # as HF (Mixtral), in place
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    flat = hidden_states.reshape(-1, shape[-1])
    if spec.router_returns == "triple":
        _, weights, ids = router(flat)
    elif spec.router_returns == "pair":
        weights, ids = router(flat)
    else:
        router_logits = router(flat)
        r = spec.route((base_module(router), self), router_logits, spec.layout, route_backend)
        weights, ids = r.topk_weights, r.topk_ids
    out = experts(flat, ids, weights)  # the module: adapters (PEFT) and hooks on it apply
    if spec.layout.num_zero_experts:  # zero-computation experts: weight * x, as HF adds its identity term
        zero = torch.where(ids >= spec.layout.num_ffn_experts, weights.float(), 0.0).sum(-1, keepdim=True)
        out = out + (flat * zero).to(out.dtype)
    out = out.view(shape)
    if spec.shared:
        out = out + self.shared_experts(hidden_states.view(shape))
    if spec.router_returns == "logits" and spec.block_returns_logits:
        return out, router_logits
    return out


# ---- per family ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How one patched block runs (fixed at patch time from the family, its layout and the probed conventions)."""

    family: MoEFamily
    layout: MoELayout
    route: Callable
    router_returns: str  # "triple" (logits, weights, ids), "pair" (weights, ids: 5.17 LongCat), "logits"
    block_returns_logits: bool  # the block returns (hidden, router_logits) (logits-only routers only)
    shared: bool = False
    jitter: bool = False


# (logits fn, route fn, shared experts, jitter)
_ROUTING: dict[str, tuple[Callable, Callable, bool, bool]] = {
    "mixtral": (_mixtral_logits, _mixtral_route, False, True),
    "longcat_flash": (_longcat_logits, _longcat_route, False, False),
    "deepseek_v3": (_deepseek_logits, _deepseek_route, True, False),
}


def _check(family: MoEFamily, block, router, experts, config) -> MoELayout | str:
    """The block's layout, or why it cannot run through our ops."""
    try:
        lay = moe_layout(block, family.name, config=config)
    except ConversionError as exc:
        return f"router/experts layout of this transformers is not the one supported ({exc})"
    if _ROUTING[family.name][2] and not isinstance(getattr(block, "shared_experts", None), torch.nn.Module):
        return "block has no shared_experts module"
    if family.name != "mixtral" and not isinstance(lookup((router,), ("e_score_correction_bias",), None),
                                                   torch.Tensor):
        return "router has no e_score_correction_bias tensor"
    if lay.num_ffn_experts == 0:
        return "no FFN experts (only zero experts): nothing for moe_experts to run"
    if family.name == "deepseek_v3":
        e, groups, kept, top_k = lay.num_experts, lay.n_group, lay.topk_group, lay.top_k
        if not groups or not kept or e % groups or kept > groups or top_k > kept * (e // groups):
            return (f"group configuration n_group={groups}, topk_group={kept}, top_k={top_k} over {e} experts is "
                    "not a valid group-limited choice")
    return _experts_reason(experts) or lay


def _probe(block, router, lay: MoELayout) -> tuple[str, bool] | str:
    """(what the router returns: "triple" | "pair" | "logits", block returns (hidden, router_logits)) from one dummy
    token through the unpatched forwards (module hooks do not fire: ``.forward`` is called, not the module), or why
    not."""
    down = base_module(block.experts).down_proj
    x = torch.zeros(1, 1, lay.hidden_size, dtype=down.dtype, device=_execution_device(router, down))
    try:
        with torch.no_grad():
            out = router.forward(x.view(1, -1))
            if isinstance(out, torch.Tensor):
                return "logits", isinstance(block.forward(x), tuple)
    except Exception as exc:  # noqa: BLE001 - a forward we cannot probe is a layout we do not know
        return f"probing the router/block failed ({type(exc).__name__}: {exc})"
    if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out) and len(out) in (2, 3):
        return ("triple" if len(out) == 3 else "pair"), False
    return f"router returns {type(out).__name__} of unknown layout"


def _execution_device(router, down: torch.Tensor) -> torch.device:
    """Where the router computes: its accelerate hook's execution device when its weights are offloaded (meta until
    the hook, which ``router.forward`` runs, loads them), else where its parameters are."""
    hooks = [getattr(router, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()) or ())  # accelerate's SequentialHook
    for hook in hooks:
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, torch.device) else device
    for t in (*router.parameters(recurse=True), down):
        if t.device.type != "meta":
            return t.device
    return down.device


def _detail(family: MoEFamily, router, lay: MoELayout) -> str:
    owners = (router,)
    k, n = lookup(owners, ("top_k",), lay.top_k), lay.num_ffn_experts
    if family.name == "mixtral":
        return f"moe_route(softmax, top_k={k}, renormalize) + moe_experts(N={n})"
    scale = lookup(owners, ("routed_scaling_factor",), lay.routed_scaling_factor)
    if family.name == "longcat_flash":
        return (f"moe_route(softmax, top_k={k}, fp32 bias, scale={scale}) + moe_experts(N={n}, "
                f"Z={lay.num_zero_experts} zero experts)")
    return (f"moe_route(sigmoid, top_k={k}, fp32 bias, groups {lay.topk_group}/{lay.n_group}, "
            f"renormalize={lay.norm_topk_prob}, scale={scale}) + moe_experts(N={n}) + shared experts")


def _sub_path(path: str, attr: str, wrapper, base) -> str:
    """The ``named_modules`` path of ``base``, found under ``path.attr`` through adapter wrappers' ``base_layer``."""
    p, m = f"{path}.{attr}" if path else attr, wrapper
    while m is not base:
        p, m = f"{p}.base_layer", m.base_layer
    return p


def _model_config(model, family: MoEFamily):
    """The model's (text) config when it is the family's own, for :func:`moe_layout` (config first)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and callable(getattr(cfg, "get_text_config", None)):
        with contextlib.suppress(Exception):  # a config without a usable text config: use the config itself
            cfg = cfg.get_text_config()
    return cfg if getattr(cfg, "model_type", None) == family.model_type else None


def patch_moe(model: torch.nn.Module, report: PatchReport, *, backend=None) -> int:
    """Route every recognised Hugging Face sparse MoE block of ``model`` through ``moe_route`` + ``moe_experts``,
    in place. Returns the number of blocks patched now.

    Recognised blocks (exact classes of the installed transformers): ``MixtralSparseMoeBlock``, ``LongcatFlashMoE``,
    ``DeepseekV3MoE``. Each gets its block forward and its experts module's forward swapped, and its router's too
    where the router returns HF 5's ``(router_logits, topk_weights, topk_indices)`` or 5.17 LongCat's
    ``(topk_weights, topk_indices)`` (see the module docstring for the routing mapping); parameters, buffers and
    sub-modules are untouched, so ``state_dict()`` keys and ``parameters()`` are unchanged and
    :func:`~mmkernels.integrations.hf._patching.restore_all` undoes it bit for bit. Adapter wrappers already around
    the router or the experts (PEFT) are looked through: the module under them is swapped and the block still calls
    the wrapper. Blocks already patched are left as they are (patching twice is a no-op). Each block is probed once
    with one dummy token (router and, for routers that return logits only, block) to learn this transformers' return
    conventions.

    Report entries: ``report.add(path, "moe", ...)`` per block, ``report.add(path, "moe_experts", ...)`` per experts
    module, ``report.add(path, "moe_router", ...)`` per swapped router; ``report.skip(path, "moe", reason)`` for a
    block whose layout our ops cannot take, an already patched block, or a family whose classes this transformers
    lacks while ``model``'s ``config.model_type`` names it (path ``""``). ``report.fallback`` counts calls handed back
    to HF's own forward (hidden states and expert weights in different dtypes outside autocast, where HF's own code
    decides).

    Args:
        model: any ``torch.nn.Module`` (a ``PreTrainedModel`` or a bare block).
        report: the :class:`PatchReport` to fill.
        backend: ``None`` (auto), one backend name for ``moe_route`` and ``moe_experts``, or a mapping
            ``{op: backend}`` (other ops' keys are ignored here).

    Raises:
        mmkernels.BackendError: a backend that ``moe_route`` or ``moe_experts`` does not implement (checked before
            anything is swapped).
    """
    chosen = _backends(backend)
    backends = (chosen["moe_route"], chosen["moe_experts"])
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    classes: dict[type, MoEFamily] = {}
    for family in FAMILIES:
        loaded = _load(family)
        if isinstance(loaded, str):
            if model_type == family.model_type:
                report.skip("", KIND, f"{family.name}: {loaded}")
            continue
        classes[loaded[0]] = family
    patched = 0
    for path, block in list(model.named_modules()):
        family = classes.get(type(block))  # exact class: a subclass may have changed the forward
        if family is None:
            continue
        router_w, experts_w = getattr(block, family.router_attr, None), getattr(block, "experts", None)
        if not isinstance(router_w, torch.nn.Module) or not isinstance(experts_w, torch.nn.Module):
            report.skip(path, KIND, f"{family.name}: block has no {family.router_attr}/experts")
            continue
        router, experts = base_module(router_w), base_module(experts_w)
        if is_swapped(block) or is_swapped(router):
            report.skip(path, KIND, "already patched")
            continue
        if is_swapped(experts):  # ours, left over without its block (e.g. only the block was restored): redo it
            restore(experts)
        lay = _check(family, block, router, experts, _model_config(model, family))
        conventions = _probe(block, router, lay) if isinstance(lay, MoELayout) else lay
        if isinstance(conventions, str):
            report.skip(path, KIND, f"{family.name}: {conventions}")
            continue
        logits_fn, route_fn, shared, jitter = _ROUTING[family.name]
        spec = _Spec(family, lay, route_fn, *conventions, shared=shared, jitter=jitter)
        swapped_router = spec.router_returns in ("triple", "pair")
        # module-level functions bound with partial: picklable, so a saved / deep-copied patched model keeps them
        if swapped_router:
            forward = functools.partial(_router_forward, logits_fn, route_fn, lay, backends[0],
                                        spec.router_returns == "triple")
            swap_forward(router, forward, ROUTER_KIND)
        swap_forward(experts, functools.partial(_patched_experts_forward, backends[1], report), EXPERTS_KIND)
        swap_forward(block, functools.partial(_block_forward, spec, backends[0]), KIND)
        report.add(path, KIND, block, _detail(family, router, lay))
        report.add(_sub_path(path, "experts", experts_w, experts), EXPERTS_KIND, experts,
                   f"moe_experts on gate_up_proj[:{lay.num_ffn_experts}] / down_proj (no copy)")
        if swapped_router:
            report.add(_sub_path(path, family.router_attr, router_w, router), ROUTER_KIND, router,
                       "logits computed as HF's (recorded for output_router_logits), choice and weights by moe_route")
        patched += 1
    return patched
