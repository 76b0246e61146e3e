"""The MoE step protocol: route -> dispatch -> experts -> combine, at every expert-parallel size.

Modelled on Megatron-Core's ``MoELayer`` + ``MoETokenDispatcher``: an MoE block (:class:`mmkernels.nn.moe.RoutedMoE`)
routes its tokens, then hands them to its ``dispatcher``:

- ``dispatcher.dispatch(moe, routed) -> handle``: the tokens travel to the experts' owners; ``handle.send()`` issues
  what can be issued (idempotent), ``handle.wait() -> dispatched`` waits for the rows, ``handle.routed`` (the
  :class:`RoutedTokens`: this rank's routing and router logits) is there at once;
- ``dispatcher.run_experts(moe, dispatched) -> expert_out``: the experts this rank owns, on the rows it received;
- ``dispatcher.combine(moe, expert_out, dispatched) -> handle``: the results travel back; ``handle.wait() -> y``
  applies the routing weights and the zero-expert term and gives ``y`` in the shape of the block's input.

:class:`LocalDispatcher` (the default of every block) owns every expert: its handles are complete when returned and
``run_experts`` is the fused ``moe_experts`` (weights and zero-expert term included; ``combine`` only reshapes), so
the single-process numerics are those of one ``moe_experts`` call. The all-to-all dispatcher of expert parallelism
lives in :mod:`mmkernels.distributed` (``AllToAllDispatcher``, used by ``ExpertParallelMoE``), which registers its
factory here on import (:func:`register_expert_parallel`); model code asks :func:`expert_parallel` for an
expert-parallel block and so never imports :mod:`mmkernels.distributed` (``import mmkernels`` imports it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from ..ops.moe import MoERouting

__all__ = ["CompletedHandle", "LocalDispatched", "LocalDispatcher", "MoEDispatcher", "RoutedTokens",
           "expert_parallel", "expert_parallel_group", "phase", "register_expert_parallel"]


def phase(name: str):
    """A ``torch.profiler.record_function(name)`` range marking a phase of the MoE step (a profiler trace shows
    them; ``mmkernels.distributed.bench`` reads its timeline from them). Nothing is recorded, and nothing syncs,
    without an active profiler; under ``torch.compile`` it is no range at all (Dynamo would drop it with a
    warning)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else record_function(name)


@dataclass
class RoutedTokens:
    """What the route step gives the dispatcher: ``hidden`` [T, Dm] token rows (padding rows zeroed), the
    ``routing`` (after the padding mask), the fp32 ``router_logits`` [T, N+Z] (on the autograd graph: auxiliary
    losses read them, so the router runs once per step) and the ``shape`` of the block's input."""

    hidden: torch.Tensor
    routing: MoERouting
    router_logits: torch.Tensor
    shape: tuple


class CompletedHandle:
    """A handle whose work is done: ``send()`` returns it, ``wait()`` the result, ``is_completed()`` is True."""

    def __init__(self, result, routed: RoutedTokens | None = None) -> None:
        self._result = result
        self.routed = routed

    def send(self) -> CompletedHandle:
        return self

    def is_completed(self) -> bool:
        return True

    def wait(self):
        return self._result


class MoEDispatcher:
    """How an MoE block's tokens reach its experts and come back (see the module notes). Subclasses implement
    :meth:`dispatch`, :meth:`run_experts` and :meth:`combine`; :meth:`refuse` is called instead of :meth:`dispatch`
    when this rank's input failed its checks (a dispatcher whose peers wait in a collective tells them first)."""

    def dispatch(self, moe: nn.Module, routed: RoutedTokens):
        raise NotImplementedError

    def run_experts(self, moe: nn.Module, dispatched) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, moe: nn.Module, expert_out: torch.Tensor, dispatched):
        raise NotImplementedError

    def refuse(self, moe: nn.Module, error: Exception) -> None:
        """This rank's input was rejected with ``error`` (the caller raises it afterwards)."""


@dataclass
class LocalDispatched:
    """The local dispatcher's "received rows": every token of the block (``routed.hidden``) with its routing."""

    routed: RoutedTokens

    @property
    def rows(self) -> torch.Tensor:
        return self.routed.hidden

    @property
    def routing(self) -> MoERouting:
        return self.routed.routing

    @property
    def router_logits(self) -> torch.Tensor:
        return self.routed.router_logits


class LocalDispatcher(MoEDispatcher):
    """Every expert is on this process: nothing travels. ``dispatch`` and ``combine`` return completed handles;
    ``run_experts`` is ``moe.experts(hidden, routing)`` (the fused ``moe_experts``: weights and the zero-expert term
    included), so a block's output is exactly one ``moe_experts`` call's. No host sync."""

    def dispatch(self, moe: nn.Module, routed: RoutedTokens) -> CompletedHandle:
        return CompletedHandle(LocalDispatched(routed), routed)

    def run_experts(self, moe: nn.Module, dispatched: LocalDispatched) -> torch.Tensor:
        return moe.experts(dispatched.rows, dispatched.routing)

    def combine(self, moe: nn.Module, expert_out: torch.Tensor, dispatched: LocalDispatched) -> CompletedHandle:
        return CompletedHandle(expert_out.view(dispatched.routed.shape))

    def __repr__(self) -> str:
        return "LocalDispatcher()"


# ---- expert parallelism, plugged in by mmkernels.distributed ------------------------------------------------------

_EXPERT_PARALLEL: dict[str, Callable] = {}


def register_expert_parallel(*, resolve_group: Callable, shard: Callable) -> None:
    """Called by :mod:`mmkernels.distributed` on import: ``resolve_group(group, owner=name) -> ProcessGroup``
    (a ProcessGroup, a 1-D DeviceMesh or None for the default group) and ``shard(moe, group, backend=...) ->`` an
    expert-parallel block built from a ``ZeroComputeMoE`` (``ExpertParallelMoE.from_moe``)."""
    _EXPERT_PARALLEL["resolve_group"] = resolve_group
    _EXPERT_PARALLEL["shard"] = shard


def _registered(owner: str) -> dict[str, Callable]:
    if not _EXPERT_PARALLEL:
        raise RuntimeError(f"{owner}: expert parallelism is not available: mmkernels.distributed did not load "
                           "(torch.distributed missing from this build of PyTorch?)")
    return _EXPERT_PARALLEL


def expert_parallel_group(group, *, owner: str):
    """The expert-parallel ProcessGroup for ``group`` (a ProcessGroup, a 1-D DeviceMesh or None: the default group
    when torch.distributed is initialised), or None for a world of one (no group, or a group of one rank)."""
    dist = torch.distributed
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    pg = _registered(owner)["resolve_group"](group, owner=owner)
    return pg if dist.get_world_size(pg) > 1 else None


def expert_parallel(moe: nn.Module, group, *, backend=None, owner: str = "expert_parallel") -> nn.Module:
    """``moe`` (a ``ZeroComputeMoE``) sharded over ``group`` (a ProcessGroup) by the registered factory: an
    ``ExpertParallelMoE`` whose dispatcher is the all-to-all one."""
    return _registered(owner)["shard"](moe, group, backend=backend)
