"""MoE modules: ``SwiGLUExperts`` (grouped expert FFNs) and ``ZeroComputeMoE`` (LongCat-Flash's MoE block:
fp32 router over N FFN + Z zero-computation experts, biased top-k, experts, identity term, bias balancer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as v
from ..ops.moe import MoERouting, moe_experts, moe_route
from ._fp32 import FP32Linear
from .expert_bias import ExpertBiasController
from .moe_config import MOE_PRESETS, MoEConfig
from .moe_dispatch import LocalDispatcher, MoEDispatcher, RoutedTokens, phase

__all__ = ["MOE_PRESETS", "MoEConfig", "RoutedMoE", "SwiGLUExperts", "ZeroComputeMoE", "mask_padding",
           "update_expert_biases"]


class SwiGLUExperts(nn.Module):
    """N SwiGLU FFNs without bias, stored grouped: ``w_gate_up`` [N, 2*Di, Dm] (gate rows first, the HF LongCat
    layout) and ``w_down`` [N, Dm, Di]. ``forward(hidden [T, Dm], routing) -> [T, Dm]`` via ``moe_experts``."""

    backend = ModuleBackend("moe_experts")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, device=None, dtype=None,
                 backend: BackendChoice = None) -> None:
        super().__init__()
        v.module_dtype("SwiGLUExperts", dtype)
        name = "SwiGLUExperts"
        self.num_experts = v.integer("num_experts", num_experts, op=name, low=0)
        self.hidden_size = v.integer("hidden_size", hidden_size, op=name, low=1)
        self.intermediate_size = v.integer("intermediate_size", intermediate_size, op=name, low=1)
        self.backend = backend
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device,
                                                  dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, device=device,
                                               dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per expert.
        nn.init.uniform_(self.w_gate_up, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(self.w_down, -1 / math.sqrt(self.intermediate_size), 1 / math.sqrt(self.intermediate_size))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"

    def forward(self, hidden: torch.Tensor, routing: MoERouting) -> torch.Tensor:
        w_gate_up, w_down = self.w_gate_up, self.w_down
        v.tensor("hidden", hidden, op="SwiGLUExperts")
        v.module_input("SwiGLUExperts", "hidden", hidden, w_gate_up)
        if not isinstance(routing, tuple) or len(routing) not in (3, 4):
            raise TypeError("SwiGLUExperts: routing must be a MoERouting (or a (topk_ids, topk_weights, zero_weight) "
                            f"tuple), got {type(routing).__name__}")
        device = hidden.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            # As nn.Linear under autocast: the expert GEMMs run in the autocast dtype (weights cast per call).
            dtype = torch.get_autocast_dtype(device)
            hidden, w_gate_up, w_down = hidden.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        return moe_experts(hidden, routing, w_gate_up, w_down, backend=self._backends["moe_experts"])


_MOE_OPS = ("moe_route", "moe_experts", "expert_bias_update_")


def _in_checkpoint_recompute() -> bool:
    """True while autograd's engine runs a backward pass, i.e. when a forward runs again as the recompute of
    ``torch.utils.checkpoint`` (reentrant or not). Statistics gathered in forward must not be counted twice."""
    return torch._C._current_graph_task_id() != -1


@torch.library.custom_op("mmkernels::accumulate_counts_", mutates_args=("pending",))
def _accumulate_counts(pending: torch.Tensor, counts: torch.Tensor) -> None:
    """``pending += counts`` unless this forward is a checkpoint recompute. A registered op, so the check runs when the
    graph runs: a compiled forward replayed by ``torch.utils.checkpoint`` during backward counts nothing either."""
    if not _in_checkpoint_recompute():
        pending.add_(counts)


@_accumulate_counts.register_fake
def _(pending, counts) -> None:
    return None


class RoutedMoE(nn.Module):
    """What every MoE block with zero experts shares (:class:`ZeroComputeMoE`,
    ``mmkernels.distributed.ExpertParallelMoE``): the fp32 ``router``, the ``balancer`` that owns the selection bias,
    the biased top-k choice, the token/padding set-up, and the one step protocol (:mod:`mmkernels.nn.moe_dispatch`):
    route -> ``dispatcher.dispatch`` -> ``dispatcher.run_experts`` -> ``dispatcher.combine``. Subclasses set
    ``router``, ``balancer``, ``experts``, ``dispatcher``, ``hidden_size``, ``top_k``, ``num_ffn_experts``,
    ``scoring``, ``routed_scaling_factor``, ``renormalize``, ``balance``, ``pending_counts`` and a ``backend``.

    The step, split so that a layer can schedule other work between its parts (``ScMoEDecoderLayer`` does):
    ``h = moe.dispatch(x, padding_mask=...)`` (``h.routed``: the routing and router logits, at once),
    ``h.send()`` (issue what can be issued), ``d = h.wait()``, ``out = moe.run_experts(d)``,
    ``y = moe.combine(out, d).wait()``. ``forward`` runs them in that order. With the default
    :class:`~mmkernels.nn.moe_dispatch.LocalDispatcher` every handle is complete when returned and the experts are one
    fused ``moe_experts`` call. Each part is a ``torch.profiler.record_function`` range (``mmkernels.moe.*``).
    """

    _name = "RoutedMoE"

    @property
    def dispatcher(self) -> MoEDispatcher:
        """How tokens reach the experts (:mod:`mmkernels.nn.moe_dispatch`); assignable: an object with callable
        ``dispatch``, ``run_experts`` and ``combine`` (an :class:`~mmkernels.nn.moe_dispatch.MoEDispatcher`
        subclass, usually), checked on assignment."""
        return self.__dict__["_dispatcher"]

    @dispatcher.setter
    def dispatcher(self, value: MoEDispatcher) -> None:
        missing = [m for m in ("dispatch", "run_experts", "combine") if not callable(getattr(value, m, None))]
        if missing or isinstance(value, nn.Module):
            raise TypeError(f"{self._name}: dispatcher must implement the MoEDispatcher protocol (callable dispatch, "
                            f"run_experts and combine; not a module), got {type(value).__name__}"
                            + (f" without {missing}" if missing else ""))
        self.__dict__["_dispatcher"] = value

    def __setattr__(self, name: str, value) -> None:
        if name == "dispatcher":  # nn.Module.__setattr__ would file a module value under _modules, past the check
            type(self).dispatcher.fset(self, value)
        else:
            super().__setattr__(name, value)

    @property
    def expert_bias(self) -> torch.Tensor:
        """The fp32 [N+Z] selection bias (HF's ``e_score_correction_bias``)."""
        return self.balancer.bias

    def route(self, hidden: torch.Tensor) -> MoERouting:
        """Router logits in fp32 (input upcast, weight kept fp32, autocast off), then ``moe_route``."""
        return self._route(self.router(hidden))

    def _tokens(self, name: str, x: torch.Tensor, padding_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [..., Dm]`` as token rows ``[T, Dm]`` and the checked ``padding_mask`` flattened to ``[T]`` (or None).
        Padding rows may hold anything (NaN included): they are zeroed before any product, so nothing reaches the
        router's or the experts' weight gradients (0 * NaN would)."""
        hidden = x.reshape(-1, self.hidden_size)
        if padding_mask is None:
            return hidden, None
        v.tensor("padding_mask", padding_mask, dtypes=(torch.bool,), op=name)
        if tuple(padding_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"{name}: padding_mask must have x.shape[:-1] = {tuple(x.shape[:-1])}, got "
                             f"{tuple(padding_mask.shape)}")
        v.same_device(name, x=x, padding_mask=padding_mask)
        pad = padding_mask.reshape(-1)
        return torch.where(pad[:, None], 0.0, hidden), pad

    def _route(self, logits: torch.Tensor) -> MoERouting:
        return moe_route(logits, top_k=self.top_k, num_ffn_experts=self.num_ffn_experts, bias=self.balancer.bias,
                         scoring=self.scoring, routed_scaling_factor=self.routed_scaling_factor,
                         renormalize=self.renormalize, backend=self._backends["moe_route"])

    def _check_input(self, x: torch.Tensor) -> None:
        """``x`` [..., Dm] of a dtype and device the experts take (``TypeError`` / ``ValueError`` naming ``x``)."""
        name = self._name
        v.tensor("x", x, op=name)
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: x must be [..., {self.hidden_size}], got {tuple(x.shape)}")
        v.module_input(name, "x", x, self.experts.w_gate_up)

    def _route_tokens(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> RoutedTokens:
        """Checks, then router (fp32) + ``moe_route`` + the padding mask; counts the selections (training, balancer
        on; once per forward, not again in a checkpoint recompute). No host sync."""
        self._check_input(x)
        with phase("mmkernels.moe.route"):
            hidden, pad = self._tokens(self._name, x, padding_mask)
            logits = self.router(hidden)
            routing = self._route(logits)
            if pad is not None:
                routing = mask_padding(routing, pad)
            if self.training and self.balance:
                torch.ops.mmkernels.accumulate_counts_(self.pending_counts, routing.counts)
        return RoutedTokens(hidden, routing, logits, tuple(x.shape))

    def dispatch(self, x: torch.Tensor, *, padding_mask: torch.Tensor | None = None):
        """Route ``x`` [..., Dm] (``padding_mask`` bool of ``x.shape[:-1]``, True = padding) and hand the tokens to
        the dispatcher; returns its handle (``send()``, ``wait() -> dispatched``, ``is_completed()``, ``routed``).

        Raises:
            TypeError / ValueError: ``x`` or ``padding_mask`` of the wrong type, dtype, shape or device (an
                expert-parallel dispatcher first tells the other ranks, which raise ``RuntimeError``).
        """
        try:
            routed = self._route_tokens(x, padding_mask)
        except (TypeError, ValueError) as err:
            self.dispatcher.refuse(self, err)
            raise
        return self.dispatcher.dispatch(self, routed)

    def run_experts(self, dispatched) -> torch.Tensor:
        """The experts this process owns, on the rows ``dispatched`` (``dispatch(...).wait()``) holds."""
        with phase("mmkernels.moe.experts"):
            return self.dispatcher.run_experts(self, dispatched)

    def combine(self, expert_out: torch.Tensor, dispatched):
        """Bring ``expert_out`` (from :meth:`run_experts`) home; ``handle.wait()`` returns ``y`` (``x``'s shape)."""
        return self.dispatcher.combine(self, expert_out, dispatched)

    def forward(self, x: torch.Tensor, *, padding_mask: torch.Tensor | None = None,
                return_router_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return_router_logits = v.flag("return_router_logits", return_router_logits, op=self._name)
        handle = self.dispatch(x, padding_mask=padding_mask)
        dispatched = handle.wait()
        y = self.combine(self.run_experts(dispatched), dispatched).wait()
        return (y, handle.routed.router_logits) if return_router_logits else y

    def update_bias(self) -> None:
        """Feed the counts gathered since the last call to the balancer (all-reduced over its process group); once
        per optimizer step (on every rank under expert parallelism)."""
        if not self.balance:
            return
        self.balancer.update(self.pending_counts)
        self.pending_counts.zero_()


class ZeroComputeMoE(RoutedMoE):
    """LongCat-Flash MoE block: ``y = sum_k w_k E_{id_k}(x)`` with zero-computation (identity) experts.

    Router: ``Linear(hidden, N+Z, bias=False)`` kept and computed in fp32; softmax over all N+Z experts; the
    top-k of ``scores + bias`` are chosen, weights are the unbiased scores times ``routed_scaling_factor``;
    zero-expert slots contribute ``weight * x`` and are never dispatched to an expert GEMM.

    Balancing: ``self.balancer`` (an :class:`ExpertBiasController`) owns the selection bias. In training mode
    every forward adds its selection counts to ``self.pending_counts`` (on the device, no sync); call
    :meth:`update_bias` (or :func:`update_expert_biases` on the whole model) once per optimizer step. Pass
    ``target_ffn_per_token=None`` to keep the bias fixed (e.g. a loaded HF ``e_score_correction_bias``).

    ``forward(x [..., Dm], *, padding_mask=None, return_router_logits=False) -> [..., Dm]``:

    - ``padding_mask``: optional bool tensor of ``x.shape[:-1]``, True = padding. Padding tokens are not routed to
      any expert, give zero output and zero gradients (whatever they hold, NaN included), and are left out of the
      balancer's counts (and of the balance losses, which take the same mask).
    - ``return_router_logits=True`` returns ``(y, router_logits)``, the float32 ``[T, N+Z]`` logits (T = tokens of
      ``x`` flattened), for :mod:`mmkernels.nn.moe_losses`.

    Tokens are counted once per forward, not again when ``torch.utils.checkpoint`` recomputes the forward. The
    router weight, the selection bias and the balancer state stay float32 under ``.half()``, ``.to(dtype)`` and
    autocast (as HF keeps ``e_score_correction_bias`` in fp32).

    ``backend``: ``None`` (auto), one name for every op (``moe_route``, ``moe_experts``, ``expert_bias_update_``)
    or a mapping per op, e.g. ``{"moe_experts": "triton"}``; a choice an op does not implement raises
    :class:`mmkernels.BackendError` here, at construction.

    Runs the step protocol of :class:`RoutedMoE` with ``dispatcher`` (default: a
    :class:`~mmkernels.nn.moe_dispatch.LocalDispatcher`; any object with the protocol's ``dispatch`` /
    ``run_experts`` / ``combine``, checked here; ``ExpertParallelMoE.from_moe`` shards the block over a process
    group and plugs in the all-to-all dispatcher): ``dispatch`` / ``run_experts`` / ``combine`` are available for
    scheduling.
    """

    _name = "ZeroComputeMoE"
    backend = ModuleBackend(*_MOE_OPS)

    def __init__(
        self,
        hidden_size: int,
        num_ffn_experts: int,
        num_zero_experts: int,
        top_k: int,
        expert_intermediate_size: int,
        *,
        routed_scaling_factor: float = 1.0,
        target_ffn_per_token: float | None = None,
        scoring: str = "softmax",
        renormalize: bool = False,
        balancer_kwargs: dict | None = None,
        dispatcher: MoEDispatcher | None = None,
        device=None,
        dtype=None,
        backend: BackendChoice = None,
    ) -> None:
        super().__init__()
        v.module_dtype("ZeroComputeMoE", dtype)
        name = "ZeroComputeMoE"
        self.hidden_size = v.integer("hidden_size", hidden_size, op=name, low=1)
        self.num_ffn_experts = v.integer("num_ffn_experts", num_ffn_experts, op=name, low=1)
        self.num_zero_experts = v.integer("num_zero_experts", num_zero_experts, op=name, low=0)
        v.integer("expert_intermediate_size", expert_intermediate_size, op=name, low=1)
        n_total = self.num_ffn_experts + self.num_zero_experts
        self.top_k = v.integer("top_k", top_k, op=name, low=1, high=n_total)
        self.routed_scaling_factor = v.real("routed_scaling_factor", routed_scaling_factor, op=name)
        self.scoring = v.choice("scoring", scoring, ("softmax", "sigmoid"), op=name)
        self.renormalize = v.flag("renormalize", renormalize, op=name)
        if balancer_kwargs is not None and "backend" in balancer_kwargs:
            raise ValueError(f"{name}: pass the balancer's backend as backend={{'expert_bias_update_': ...}}")
        self.router = FP32Linear(hidden_size, n_total, bias=False, device=device)
        self.experts = SwiGLUExperts(self.num_ffn_experts, hidden_size, expert_intermediate_size, device=device,
                                     dtype=dtype)
        self.balance = target_ffn_per_token is not None
        self.balancer = ExpertBiasController(
            self.num_ffn_experts, self.num_zero_experts, self.top_k,
            target_ffn_per_token if target_ffn_per_token is not None else 0.0, device=device,
            **(balancer_kwargs or {}),
        )
        self.register_buffer("pending_counts", torch.zeros(n_total, dtype=torch.int64, device=device),
                             persistent=False)
        self.dispatcher = LocalDispatcher() if dispatcher is None else dispatcher
        self.backend = backend  # last: checks the choice and hands the experts and the balancer their share

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> ZeroComputeMoE:
        """``longcat-flash`` or ``longcat-flash-lite`` (docs/design/longcat_moe.md); kwargs override or add options."""
        if name not in MOE_PRESETS:
            raise ValueError(f"ZeroComputeMoE: unknown preset {name!r}; have {sorted(MOE_PRESETS)}")
        c = MOE_PRESETS[name]
        args = dict(hidden_size=c.hidden_size, num_ffn_experts=c.num_ffn_experts, num_zero_experts=c.num_zero_experts,
                    top_k=c.top_k, expert_intermediate_size=c.expert_intermediate_size,
                    routed_scaling_factor=c.routed_scaling_factor, target_ffn_per_token=c.target_ffn_per_token)
        return cls(**(args | kwargs))

    @classmethod
    def from_hf(cls, hf_moe: nn.Module, *, config=None, **kwargs) -> ZeroComputeMoE:
        """Build from a Hugging Face ``LongcatFlashMoE`` (weights copied; nothing is downloaded; same device and
        dtype as its experts).

        Works on every supported transformers release: sizes are read config first (the block's ``config``, or
        ``config=`` — a ``LongcatFlashConfig`` — for releases whose block has none), then from the modules and the
        tensors' shapes; what cannot be read is a ``ConversionError`` (a ``ValueError``), never an ``AttributeError``.
        Other keyword arguments go to the ``ZeroComputeMoE`` constructor (e.g. ``backend=``,
        ``target_ffn_per_token=``; without it the HF bias is loaded and kept fixed). The converter
        (:func:`mmkernels.models.convert.longcat.moe_config_from_hf`) returns a :class:`MoEConfig` and a state dict,
        and ``load_converted`` loads it (checked); it is imported here on call, so importing ``mmkernels.nn`` never
        imports the model stacks.
        """
        from ..models.convert.longcat import load_converted, moe_config_from_hf

        config_, state, device, dtype = moe_config_from_hf(hf_moe, config=config)
        moe = cls(config_.hidden_size, config_.num_ffn_experts, config_.num_zero_experts, config_.top_k,
                  config_.expert_intermediate_size, routed_scaling_factor=config_.routed_scaling_factor,
                  device=device, dtype=dtype, **kwargs)
        return load_converted(moe, state)


def mask_padding(routing: MoERouting, padding: torch.Tensor) -> MoERouting:
    """Drop padding tokens (``padding`` bool ``[T]``, True = padding) from a routing: their slots get id -1 (not
    dispatched), weight 0 and no zero-expert term, and ``counts`` leaves them out. No host sync."""
    ids, weights, zero_weight, counts = routing
    pad_slots = padding[:, None].expand_as(ids)
    dropped = torch.zeros(counts.shape, dtype=torch.int32, device=counts.device)
    dropped.scatter_add_(0, ids.reshape(-1).long().clamp_min(0), pad_slots.reshape(-1).to(torch.int32))
    return MoERouting(
        torch.where(pad_slots, -1, ids),
        torch.where(pad_slots, 0.0, weights),
        torch.where(padding, 0.0, zero_weight),
        counts - dropped,
    )


def update_expert_biases(model: nn.Module) -> None:
    """Call ``update_bias()`` once on every MoE block of ``model`` — every module that owns a ``balancer`` (an
    :class:`ExpertBiasController`): :class:`ZeroComputeMoE`, ``mmkernels.distributed.ExpertParallelMoE`` — once per
    optimizer step."""
    for module in model.modules():
        # A MoE block is what owns a balancer; stacks that forward update_bias() to their blocks are skipped, so each
        # balancer steps exactly once.
        if isinstance(getattr(module, "balancer", None), ExpertBiasController) and callable(
                getattr(module, "update_bias", None)):
            module.update_bias()
