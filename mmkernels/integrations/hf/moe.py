"""Hugging Face sparse MoE blocks through mmkernels: Mixtral, LongCat-Flash (zero-computation experts) and
DeepSeek-V3 (sigmoid, group-limited routing, shared experts).

``patch_moe(model, report)`` swaps, per recognised block, two forwards (nothing else):

- the block's **router** (``gate`` / ``router``), where it returns HF 5's ``(router_logits, topk_weights,
  topk_indices)``: computes the router logits with the very same lines as HF (bit-identical logits; HF's output
  recorder hooks the router module, so ``output_router_logits`` and the auxiliary loss still get them), then routes
  with ``mmkernels.ops.moe_route`` using the family's exact semantics and returns HF's tuple (fp32 weights, int64
  ids). A router that returns only its logits (other transformers releases; found by probing one dummy token at
  patch time) is left alone and the block routes its logits instead;
- the **block**: routes, then runs the experts with ``mmkernels.ops.moe_experts`` directly on the experts module's
  fused 3-D parameters ``gate_up_proj`` ``[E, 2*Di, Dm]`` (rows ``[:Di]`` gate, ``[Di:]`` up: HF's concatenated
  layout is ours, no copy; LongCat's extra rows for its zero experts are sliced off, a view) and ``down_proj``
  ``[E, Dm, Di]``, and adds what HF adds (zero-expert identity term, shared experts). It returns what HF's block
  returns: the ``[B, L, Dm]`` hidden states (``(hidden, router_logits)`` where HF's block returned that).

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
                          ``num_ffn_experts=n_routed_experts``: ids ``>= N`` are the zero (identity) experts
DeepSeek-V3               logits = fp32 Linear; ``scoring="sigmoid"``, ``bias=e_score_correction_bias``,
                          ``n_groups=n_group``, ``topk_groups=topk_group`` (groups ranked by the sum of their two best
                          biased scores), ``renormalize=norm_topk_prob`` (``sum + 1e-20``),
                          ``routed_scaling_factor``; shared experts added by the model's own ``shared_experts`` MLP
========================  ===========================================================================================

Blocks whose layout our ops cannot take (per-expert ``nn.Linear`` modules of older transformers, interleaved
gate/up, expert biases, an activation other than SiLU, an invalid group configuration) are left alone and listed as
skipped in the report; a family whose classes this transformers version lacks is skipped, never a crash. Undo with
:func:`mmkernels.integrations.hf._patching.restore_all` (``unpatch``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._backends import resolve_backends
from ...ops.moe import moe_experts, moe_route
from ._patching import PatchReport, is_swapped, original_forward, swap_forward

__all__ = ["FAMILIES", "MoEFamily", "patch_moe"]

KIND = "moe"
ROUTER_KIND = "moe_router"
_OPS = ("moe_route", "moe_experts")


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


# ---- layout checks ------------------------------------------------------------------------------------------------


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _expert_layout(experts: torch.nn.Module, n_ffn: int) -> str | None:
    """Why the experts module cannot run through ``moe_experts`` as is, or None."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor):
        return "experts are not stored as fused 3-D gate_up_proj/down_proj parameters (older transformers layout)"
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        return "experts have biases (moe_experts has none)"
    if not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
        return "experts store gate and up interleaved or have no gate (moe_experts takes [gate; up] rows)"
    if not _is_silu(getattr(experts, "act_fn", None)):
        return f"expert activation is {type(getattr(experts, 'act_fn', None)).__name__}, moe_experts computes SiLU"
    if gu.dim() != 3 or down.dim() != 3:
        return f"gate_up_proj/down_proj are {gu.dim()}-D/{down.dim()}-D, expected 3-D"
    if getattr(experts, "is_transposed", False):
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    e, two_di, dm = gu.shape
    if two_di % 2 or down.shape[0] < n_ffn or e < n_ffn or tuple(down.shape[1:]) != (dm, two_di // 2):
        return f"unexpected expert shapes gate_up_proj {tuple(gu.shape)}, down_proj {tuple(down.shape)}"
    return None


def _expert_weights(experts: torch.nn.Module, n_ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the module's own parameters in ``moe_experts``' layout: no copy for HF's default layout (a
    first-dim slice for LongCat, whose gate_up_proj also carries unused rows for the zero experts)."""
    gu, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # [E, Dm, 2*Di]: a strided view (the Triton path copies it)
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    return gu[:n_ffn], down[:n_ffn]


def _compute_dtype(hidden: torch.Tensor, experts: torch.nn.Module) -> torch.dtype | None:
    """The dtype the experts run in: the autocast dtype inside an autocast region (as HF's Linears), else the common
    dtype of the hidden states and the expert weights; None when they differ outside autocast (HF's own code then
    decides: its grouped_mm path casts, its eager path raises)."""
    dev = hidden.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if hidden.dtype == experts.gate_up_proj.dtype == experts.down_proj.dtype:
        return hidden.dtype
    return None


def _run_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_ffn: int,
                 experts: torch.nn.Module, dtype: torch.dtype, backend: str | None) -> torch.Tensor:
    """``moe_experts`` on ``hidden`` [T, Dm] in ``dtype`` (per-call casts only under autocast, as autocast's own);
    the zero experts' identity term arrives through ``zero_weight``."""
    w_gu, w_down = _expert_weights(experts, n_ffn)
    weights = weights.float()
    zero = torch.where(ids >= n_ffn, weights, 0.0).sum(-1)
    out = moe_experts(hidden.to(dtype), (ids, weights, zero), w_gu.to(dtype), w_down.to(dtype), backend=backend)
    return out.to(hidden.dtype)


# ---- routers ------------------------------------------------------------------------------------------------------
#
# Attributes are looked up at call time (as HF does) on the router first, then on the block: transformers releases
# moved them between the two and renamed some (num_group / n_group, num_experts / n_routed_experts).

_MISSING = object()


def _attr(owners, *names, default=_MISSING):
    for owner in owners:
        for name in names:
            value = getattr(owner, name, _MISSING)
            if value is not _MISSING and value is not None:
                return value
    if default is _MISSING:
        raise AttributeError(f"none of {names} found on {[type(o).__name__ for o in owners]}")
    return default


def _mixtral_logits(router, x):
    return F.linear(x, router.weight)  # model dtype, as HF; softmax in fp32 happens in moe_route


def _fp32_logits(weight):
    def logits(router, x):  # fp32 router, exactly as HF's DeepSeek-V3 / LongCat lines
        return F.linear(x.type(torch.float32), weight(router).type(torch.float32))

    return logits


def _mixtral_route(owners, logits, n_ffn, backend):
    return moe_route(logits, top_k=int(_attr(owners, "top_k")), num_ffn_experts=n_ffn, scoring="softmax",
                     renormalize=True, backend=backend)


def _longcat_route(owners, logits, n_ffn, backend):
    # No renormalisation (HF's LongCat router has none); ids >= n_ffn are the zero (identity) experts.
    return moe_route(logits, top_k=int(_attr(owners, "top_k")), num_ffn_experts=n_ffn,
                     bias=_attr(owners, "e_score_correction_bias").float(), scoring="softmax",
                     routed_scaling_factor=float(_attr(owners, "routed_scaling_factor")), backend=backend)


def _deepseek_route(owners, logits, n_ffn, backend):
    return moe_route(logits, top_k=int(_attr(owners, "top_k")), num_ffn_experts=n_ffn,
                     bias=_attr(owners, "e_score_correction_bias").float(), scoring="sigmoid",
                     routed_scaling_factor=float(_attr(owners, "routed_scaling_factor")),
                     renormalize=bool(_attr(owners, "norm_topk_prob")),
                     n_groups=int(_attr(owners, "num_group", "n_group")), topk_groups=int(_attr(owners, "topk_group")),
                     backend=backend)


def _router_forward(logits_fn, route_fn, n_ffn, backend):
    """The router's forward for HF's ``(router_logits, topk_weights, topk_indices)`` convention."""

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = logits_fn(self, x)
        r = route_fn((self,), router_logits, n_ffn, backend)
        return router_logits, r.topk_weights, r.topk_ids.long()  # fp32 weights and int64 ids, as HF

    return forward


# ---- blocks -------------------------------------------------------------------------------------------------------


def _fallback(block, report: PatchReport, reason: str, *args):
    report.fallback(reason)
    return original_forward(block)(*args)


_DTYPE_FALLBACK = "moe: hidden states and expert weights in different dtypes outside autocast"


def _block_forward(spec: _Spec, backend, report):
    """The block's forward: route (through the swapped router, or on the router's logits when this transformers'
    router returns logits only), ``moe_experts``, plus the family's extra terms."""
    route_backend, experts_backend = backend

    def forward(self, hidden_states):
        router = getattr(self, spec.family.router_attr)
        shape = hidden_states.shape
        dtype = _compute_dtype(hidden_states, self.experts)
        if dtype is None:  # before routing and jitter: HF's forward must see the call untouched
            return _fallback(self, report, _DTYPE_FALLBACK, hidden_states)
        if spec.jitter and self.training and getattr(self, "jitter_noise", 0) > 0:  # as HF (Mixtral), in place
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = hidden_states.reshape(-1, shape[-1])
        if spec.router_returns_tuple:
            _, weights, ids = router(flat)
        else:
            router_logits = router(flat)
            r = spec.route((router, self), router_logits, spec.n_ffn, route_backend)
            weights, ids = r.topk_weights, r.topk_ids
        out = _run_experts(flat, ids, weights, spec.n_ffn, self.experts, dtype, experts_backend).view(shape)
        if spec.shared:
            out = out + self.shared_experts(hidden_states.view(shape))
        if not spec.router_returns_tuple and spec.block_returns_logits:
            return out, router_logits
        return out

    return forward


# ---- per family ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How one patched block runs (fixed at patch time from the family and the probed conventions)."""

    family: MoEFamily
    route: Callable
    n_ffn: int
    router_returns_tuple: bool  # HF >= 5: router returns (logits, weights, ids); else logits only
    block_returns_logits: bool  # the block returns (hidden, router_logits) (logits-only routers only)
    shared: bool = False
    jitter: bool = False


# (logits fn, route fn, attributes the route reads: alternatives per entry, shared experts, jitter)
_ROUTING: dict[str, tuple[Callable, Callable, tuple[tuple[str, ...], ...], bool, bool]] = {
    "mixtral": (_mixtral_logits, _mixtral_route, (("top_k",),), False, True),
    "longcat_flash": (_fp32_logits(lambda r: r.classifier.weight), _longcat_route,
                      (("top_k",), ("e_score_correction_bias",), ("routed_scaling_factor",)), False, False),
    "deepseek_v3": (_fp32_logits(lambda r: r.weight), _deepseek_route,
                    (("top_k",), ("e_score_correction_bias",), ("routed_scaling_factor",), ("norm_topk_prob",),
                     ("num_group", "n_group"), ("topk_group",)), True, False),
}


def _n_ffn(family: MoEFamily, block) -> int:
    experts = block.experts
    if family.name == "longcat_flash":
        return int(_attr((experts,), "num_routed_experts"))
    return int(_attr((experts, getattr(block, family.router_attr)), "num_experts", "n_routed_experts"))


def _router_weight(family: MoEFamily, router) -> torch.Tensor:
    return router.classifier.weight if family.name == "longcat_flash" else router.weight


def _check(family: MoEFamily, block, router) -> str | None:
    """Why this block cannot run through our ops (None: it can)."""
    _, _, needs, shared, _ = _ROUTING[family.name]
    owners = (router, block)
    try:
        weight = _router_weight(family, router)
        for names in needs:
            _attr(owners, *names)
        n_ffn = _n_ffn(family, block)
    except AttributeError as exc:
        return f"router/experts layout of this transformers is not the one supported ({exc})"
    if shared and not isinstance(getattr(block, "shared_experts", None), torch.nn.Module):
        return "block has no shared_experts module"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "router weight is not a 2-D tensor"
    e = weight.shape[0]
    if family.name == "longcat_flash" and (n_ffn == 0 or getattr(block.experts, "gate_up_proj", None) is None):
        return "no FFN experts (only zero experts): nothing for moe_experts to run"
    if family.name != "longcat_flash" and n_ffn != e:
        return f"router has {e} outputs for {n_ffn} experts"
    top_k = int(_attr(owners, "top_k"))
    if not 1 <= top_k <= e:
        return f"top_k={top_k} outside [1, {e}]"
    if family.name == "deepseek_v3":
        groups, kept = _attr(owners, "num_group", "n_group"), _attr(owners, "topk_group")
        if not groups or not kept or e % groups or kept > groups or top_k > kept * (e // groups):
            return (f"group configuration n_group={groups}, topk_group={kept}, top_k={top_k} over {e} experts is "
                    "not a valid group-limited choice")
    return _expert_layout(block.experts, n_ffn)


def _probe(block, router) -> tuple[bool, bool] | str:
    """(router returns HF 5's 3-tuple, block returns (hidden, router_logits)) from one dummy token through the
    unpatched forwards (module hooks do not fire: ``.forward`` is called, not the module), or why not."""
    gu = block.experts.gate_up_proj
    dm = gu.shape[1] if getattr(block.experts, "is_transposed", False) else gu.shape[-1]
    x = torch.zeros(1, 1, dm, dtype=gu.dtype, device=gu.device)
    try:
        with torch.no_grad():
            out = router.forward(x.view(1, -1))
            if isinstance(out, torch.Tensor):
                return False, isinstance(block.forward(x), tuple)
    except Exception as exc:  # noqa: BLE001 - a forward we cannot probe is a layout we do not know
        return f"probing the router/block failed ({type(exc).__name__}: {exc})"
    if isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out):
        return True, False
    return f"router returns {type(out).__name__} of unknown layout"


def _detail(family: MoEFamily, block, router, spec: _Spec) -> str:
    owners = (router, block)
    k, n = _attr(owners, "top_k"), spec.n_ffn
    if family.name == "mixtral":
        return f"moe_route(softmax, top_k={k}, renormalize) + moe_experts(N={n})"
    scale = _attr(owners, "routed_scaling_factor")
    if family.name == "longcat_flash":
        z = _router_weight(family, router).shape[0] - n
        return f"moe_route(softmax, top_k={k}, fp32 bias, scale={scale}) + moe_experts(N={n}, Z={z} zero experts)"
    return (f"moe_route(sigmoid, top_k={k}, fp32 bias, groups {_attr(owners, 'topk_group')}/"
            f"{_attr(owners, 'num_group', 'n_group')}, renormalize={bool(_attr(owners, 'norm_topk_prob'))}, "
            f"scale={scale}) + moe_experts(N={n}) + shared experts")


def patch_moe(model: torch.nn.Module, report: PatchReport, *, backend=None) -> int:
    """Route every recognised Hugging Face sparse MoE block of ``model`` through ``moe_route`` + ``moe_experts``,
    in place. Returns the number of blocks patched now.

    Recognised blocks (exact classes of the installed transformers): ``MixtralSparseMoeBlock``, ``LongcatFlashMoE``,
    ``DeepseekV3MoE``. Each gets its block forward swapped, and its router's too where the router returns HF 5's
    ``(router_logits, topk_weights, topk_indices)`` (see the module docstring for the routing mapping); parameters,
    buffers and sub-modules are untouched, so ``state_dict()`` keys and ``parameters()`` are unchanged and
    :func:`~mmkernels.integrations.hf._patching.restore_all` undoes it bit for bit. Blocks already patched are left
    as they are (patching twice is a no-op). Each block is probed once with one dummy token (router and, for
    routers that return logits only, block) to learn this transformers' return conventions.

    Report entries: ``report.add(path, "moe", ...)`` per block, ``report.add(path, "moe_router", ...)`` per swapped
    router; ``report.skip(path, "moe", reason)`` for a block whose layout our ops cannot take, an already patched
    block, or a family whose classes this transformers lacks while ``model``'s ``config.model_type`` names it
    (path ``""``). ``report.fallback`` counts calls handed back to HF's own forward (hidden states and expert
    weights in different dtypes outside autocast, where HF's own code decides).

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
        router = getattr(block, family.router_attr, None)
        if router is None or not isinstance(getattr(block, "experts", None), torch.nn.Module):
            report.skip(path, KIND, f"{family.name}: block has no {family.router_attr}/experts")
            continue
        if is_swapped(block) or is_swapped(router):
            report.skip(path, KIND, "already patched")
            continue
        reason = _check(family, block, router)
        conventions = _probe(block, router) if reason is None else None
        if isinstance(conventions, str):
            reason = conventions
        if reason is not None:
            report.skip(path, KIND, f"{family.name}: {reason}")
            continue
        logits_fn, route_fn, _, shared, jitter = _ROUTING[family.name]
        spec = _Spec(family, route_fn, _n_ffn(family, block), *conventions, shared=shared, jitter=jitter)
        if spec.router_returns_tuple:
            swap_forward(router, _router_forward(logits_fn, route_fn, spec.n_ffn, backends[0]), ROUTER_KIND)
        swap_forward(block, _block_forward(spec, backends, report), KIND)
        report.add(path, KIND, block, _detail(family, block, router, spec))
        if spec.router_returns_tuple:
            report.add(f"{path}.{family.router_attr}" if path else family.router_attr, ROUTER_KIND, router,
                       "logits computed as HF's (recorded for output_router_logits), choice and weights by moe_route")
        patched += 1
    return patched
