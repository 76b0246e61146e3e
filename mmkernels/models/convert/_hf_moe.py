"""The structure of a Hugging Face sparse MoE block (Mixtral, LongCat-Flash, DeepSeek-V3), read the same way on every
transformers release we support: the one tolerant layer that :mod:`mmkernels.models.convert.longcat` and
:mod:`mmkernels.integrations.hf.moe` both use.

Releases move and rename what describes a block: transformers 5.17's ``LongcatFlashMoE`` keeps its ``config`` and its
experts module counts ``num_routed_experts`` / ``total_experts`` with ``gate_up_proj`` allocated for N+Z experts; 5.25's
has no ``config``, the block counts ``num_routed_experts`` / ``zero_expert_num``, the experts module counts
``num_experts`` (N) and its ``config`` comes from ``use_experts_implementation``, with ``gate_up_proj`` for N experts
only. So every number is looked up in order: the model config (an explicit one, else the ``config`` of the block, its
experts or its router), then the modules' attributes (HF's names of every supported release), then the tensors'
shapes, which must agree with what was found. A missing attribute is never an ``AttributeError``: what cannot be
found or does not agree is a :class:`~mmkernels.models.convert._common.ConversionError` naming the block and the
value. What HF's forward reads from the modules at call time (the activation module) is taken from the modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import ConversionError

__all__ = ["MoELayout", "base_module", "lookup", "moe_layout"]

_MISSING = object()  # lookup(): no default given
_NOT_FOUND = object()  # moe_layout(): looked for, not found

# family -> field -> config attribute names, in order (config first)
_CONFIG_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"num_ffn_experts": ("num_local_experts",), "top_k": ("num_experts_per_tok",),
                "intermediate_size": ("intermediate_size",)},
    "longcat_flash": {"num_ffn_experts": ("n_routed_experts",), "num_zero_experts": ("zero_expert_num",),
                      "top_k": ("moe_topk", "num_experts_per_tok"), "intermediate_size": ("expert_ffn_hidden_size",),
                      "routed_scaling_factor": ("routed_scaling_factor",)},
    "deepseek_v3": {"num_ffn_experts": ("n_routed_experts", "num_local_experts"), "top_k": ("num_experts_per_tok",),
                    "intermediate_size": ("moe_intermediate_size",),
                    "routed_scaling_factor": ("routed_scaling_factor",), "n_group": ("n_group",),
                    "topk_group": ("topk_group",), "norm_topk_prob": ("norm_topk_prob",)},
}
# family -> field -> (module role, attribute) pairs, in order. Roles: "block", "router", "experts". Careful with the
# names releases reuse: LongCat's router.n_routed_experts counts N+Z, its experts.num_experts (5.25) counts N.
_MODULE_NAMES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "mixtral": {"num_ffn_experts": (("experts", "num_experts"), ("router", "num_experts")),
                "top_k": (("router", "top_k"), ("block", "top_k"))},
    "longcat_flash": {"num_ffn_experts": (("block", "num_routed_experts"), ("experts", "num_routed_experts"),
                                          ("experts", "num_experts")),
                      "num_zero_experts": (("block", "zero_expert_num"), ("experts", "zero_expert_num")),
                      "top_k": (("router", "top_k"), ("block", "top_k")),
                      "routed_scaling_factor": (("router", "routed_scaling_factor"),)},
    "deepseek_v3": {"num_ffn_experts": (("experts", "num_experts"), ("router", "num_experts"),
                                        ("router", "n_routed_experts")),
                    "top_k": (("router", "top_k"), ("block", "top_k")),
                    "routed_scaling_factor": (("router", "routed_scaling_factor"),),
                    "n_group": (("router", "num_group"), ("router", "n_group"), ("block", "n_group")),
                    "topk_group": (("router", "topk_group"), ("block", "topk_group")),
                    "norm_topk_prob": (("router", "norm_topk_prob"), ("block", "norm_topk_prob"))},
}
ROUTER_ATTR = {"mixtral": "gate", "longcat_flash": "router", "deepseek_v3": "gate"}


@dataclass(frozen=True)
class MoELayout:
    """What one HF MoE block computes, whatever the release: sizes, routing constants and where its tensors are.

    ``gate_up_proj`` / ``down_proj`` are the experts module's own parameters (``None`` when a LongCat block has no FFN
    experts); ``router_weight`` the router's ``[N+Z, Dm]`` weight. ``transposed``: the experts store ``[E, Dm, 2*Di]``
    / ``[E, Di, Dm]`` (HF's ``is_transposed``)."""

    family: str
    hidden_size: int
    num_ffn_experts: int
    num_zero_experts: int
    top_k: int
    intermediate_size: int
    routed_scaling_factor: float
    hidden_act: str | None
    n_group: int | None
    topk_group: int | None
    norm_topk_prob: bool | None
    transposed: bool

    @property
    def num_experts(self) -> int:
        return self.num_ffn_experts + self.num_zero_experts


def base_module(module):
    """The module under adapter wrappers (PEFT's ``ParamWrapper`` / LoRA layers keep it as ``base_layer``)."""
    seen = 0
    while isinstance(getattr(module, "base_layer", None), nn.Module) and seen < 64:
        module, seen = module.base_layer, seen + 1
    return module


def lookup(owners, names, default=_MISSING):
    """The first value that is not None among ``getattr(owner, name)`` for each owner, then each name (owners that
    are None or lack the name are passed over; a property that raises counts as missing). ``default`` when none has
    it; without a default, ``KeyError`` naming what was looked for."""
    for owner in owners:
        if owner is None:
            continue
        for name in names:
            try:
                value = getattr(owner, name)
            except Exception:  # noqa: BLE001 - an attribute that cannot be read is an attribute we do not have
                continue
            if value is not None:
                return value
    if default is _MISSING:
        raise KeyError(f"none of {tuple(names)} on {[type(o).__name__ for o in owners if o is not None]}")
    return default


def _config_of(block, router, experts, config):
    if config is not None:
        return config
    for owner in (block, experts, router):
        cfg = owner.__dict__.get("config") if owner is not None else None
        if cfg is not None and not isinstance(cfg, (nn.Module, torch.Tensor)):
            return cfg
    return None


def _tensor(owner, name) -> torch.Tensor | None:
    value = lookup((owner,), (name,), None)
    return value if isinstance(value, torch.Tensor) else None


def moe_layout(block: nn.Module, family: str, *, config=None) -> MoELayout:
    """Read the layout of an HF MoE ``block`` of ``family`` (``"mixtral"``, ``"longcat_flash"``, ``"deepseek_v3"``).

    ``config``: the model's (text) config when the caller has it; else the ``config`` of the block, its experts or
    its router, if any. Adapter wrappers around the router or the experts (PEFT) are looked through.

    Raises:
        ConversionError: a number found nowhere, values that contradict each other or the tensors' shapes, or a
            block without router / experts.
    """
    if family not in _CONFIG_NAMES:
        raise ConversionError(f"moe_layout: unknown family {family!r}; expected one of {sorted(_CONFIG_NAMES)}")
    name = type(block).__name__
    router = base_module(getattr(block, ROUTER_ATTR[family], None))
    experts = base_module(getattr(block, "experts", None))
    if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
        raise ConversionError(f"{name}: no {ROUTER_ATTR[family]} / experts sub-modules")
    cfg = _config_of(block, router, experts, config)
    roles = {"block": block, "router": router, "experts": experts}

    def find(field, default=_MISSING):
        names = _CONFIG_NAMES[family].get(field, ())
        value = lookup((cfg,), names, _NOT_FOUND) if cfg is not None and names else _NOT_FOUND
        if value is _NOT_FOUND:
            for role, attr in _MODULE_NAMES[family].get(field, ()):
                value = lookup((roles[role],), (attr,), _NOT_FOUND)
                if value is not _NOT_FOUND:
                    break
        if value is _NOT_FOUND:
            if default is not _MISSING:
                return default
            where = [f"config.{n}" for n in names] + [f"{r}.{a}" for r, a in _MODULE_NAMES[family].get(field, ())]
            raise ConversionError(f"{name}: cannot find {field} (looked for {', '.join(where)})")
        return value

    holder = getattr(router, "classifier", None) if family == "longcat_flash" else router
    w_router = _tensor(holder, "weight")
    if w_router is None or w_router.dim() != 2:
        raise ConversionError(f"{name}: the router weight is not a 2-D tensor")
    gate_up, down = _tensor(experts, "gate_up_proj"), _tensor(experts, "down_proj")
    transposed = bool(lookup((experts,), ("is_transposed",), False))

    n_ffn = find("num_ffn_experts", down.shape[0] if down is not None else _MISSING)
    # LongCat's Z, when no config or attribute says: the router's rows beyond the N FFN experts
    n_zero = find("num_zero_experts", max(w_router.shape[0] - int(n_ffn), 0)) if family == "longcat_flash" else 0
    n_ffn, n_zero = int(n_ffn), int(n_zero or 0)
    hidden = int(lookup((cfg,), ("hidden_size",), w_router.shape[1]) if cfg is not None else w_router.shape[1])
    inter_default = _MISSING
    if down is not None and down.dim() == 3:
        inter_default = down.shape[1] if transposed else down.shape[2]
    inter = int(find("intermediate_size", inter_default))
    top_k = int(find("top_k"))
    scale = float(find("routed_scaling_factor", 1.0))
    act_fn = lookup((experts,), ("act_fn",), None)
    act = lookup((cfg,), ("hidden_act",), None) if cfg is not None else None
    if act_fn is not None:  # what HF's forward calls wins over the config's name
        act = "silu" if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLU", "SiLUActivation") else (
            type(act_fn).__name__)
    grouped = family == "deepseek_v3"
    n_group = int(find("n_group")) if grouped else None
    topk_group = int(find("topk_group")) if grouped else None
    norm = bool(find("norm_topk_prob")) if grouped else None

    # the tensors must agree with what was read
    if w_router.shape != (n_ffn + n_zero, hidden):
        raise ConversionError(f"{name}: router weight is {tuple(w_router.shape)}, expected ({n_ffn + n_zero}, "
                              f"{hidden}) for {n_ffn} FFN + {n_zero} zero experts of hidden size {hidden}")
    if n_ffn > 0:
        if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
            raise ConversionError(f"{name}: experts are not stored as fused 3-D gate_up_proj / down_proj parameters")
        gu_rows, gu_in = (gate_up.shape[2], gate_up.shape[1]) if transposed else (gate_up.shape[1], gate_up.shape[2])
        d_out, d_in = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
        if down.shape[0] != n_ffn or gate_up.shape[0] not in (n_ffn, n_ffn + n_zero):
            raise ConversionError(f"{name}: expected {n_ffn} FFN experts, got gate_up_proj {tuple(gate_up.shape)} "
                                  f"and down_proj {tuple(down.shape)}")
        if (gu_rows, gu_in, d_out, d_in) != (2 * inter, hidden, hidden, inter):
            raise ConversionError(f"{name}: expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj "
                                  f"{tuple(down.shape)} do not match hidden size {hidden}, intermediate size {inter}")
    if not 1 <= top_k <= n_ffn + n_zero:
        raise ConversionError(f"{name}: top_k={top_k} outside [1, {n_ffn + n_zero}]")
    return MoELayout(family, hidden, n_ffn, n_zero, top_k, inter, scale, act, n_group, topk_group, norm, transposed)
