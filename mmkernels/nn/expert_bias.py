"""``ExpertBiasController``: owns a router's expert bias and keeps FFN load balanced and on budget.

Feed it each step's selection counts; it all-reduces them over the data-parallel group (one async all-reduce)
and applies :func:`mmkernels.ops.expert_bias_update_` on the device. Nothing on the update path reads a device
value on the host, so it runs without host synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as v
from ..ops.expert_bias import MODES, expert_bias_update_
from ._fp32 import keep_fp32

__all__ = ["ExpertBiasController", "PendingBiasUpdate"]

MAX_STEPS = 2**62  # the step counter a checkpoint may hold (_extra_state)
_NAME = "ExpertBiasController"


class PendingBiasUpdate:
    """A bias update whose count all-reduce is in flight. ``wait()`` applies it (no host sync on NCCL)."""

    def __init__(self, controller: ExpertBiasController, counts: torch.Tensor, work) -> None:
        self._controller = controller
        self._counts = counts
        self._work = work
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        if self._work is not None:
            self._work.wait()  # on NCCL this orders the current stream after the all-reduce; the host does not block
        self._controller._apply_update(self._counts)
        self._done = True


class ExpertBiasController(nn.Module):
    """PID (or sign-rule) controller of a MoE router's per-expert selection bias.

    Args:
        num_ffn_experts: N, real (FFN) experts; their ids are ``0..N-1``.
        num_zero_experts: Z, zero-computation experts (ids ``N..N+Z-1``); their biases are never changed.
        top_k: K, experts picked per token.
        target_ffn_per_token: K_e, the wanted mean number of FFN experts per token (LongCat: about 8 of 12).
        kp, ki, kd: PID gains (``ki`` is gamma in ``mode="sign"``).
        mode: ``"pid"`` (LongCat-Flash, velocity form) or ``"sign"`` (DeepSeek-V3).
        max_abs: optional clamp on the FFN biases (anti-windup).
        gain_schedule: optional callable ``step -> scale``; the gains used at step ``t`` are
            ``scale(t) * (kp, ki, kd)`` (e.g. a decay of mu over training). ``scale(t)`` must be a finite Python
            (or NumPy) number, not a tensor, and the scaled gains finite as float32; otherwise the update raises
            ``TypeError``/``ValueError`` naming ``gain_schedule``. Computed on the host from a step counter: no
            device read. Under CUDA-graph replay the gains captured are reused.
        process_group: group to sum counts over; ``None`` uses the default group when torch.distributed is
            initialised with more than one rank.
        reduce_counts: set False when the counts you pass are already global.
        backend: backend for the update op: ``None`` (auto), a name or ``{"expert_bias_update_": name}``.

    Buffers ``bias`` ``[N+Z]`` and ``state`` ``[2, N]`` and the step counter (``_extra_state``, an int64 0-d
    tensor) are in ``state_dict()``, so a checkpoint restores the controller exactly; the state dict holds tensors
    only (safetensors, ``weights_only`` loading). Checkpoints with the older ``{"steps": n}`` extra state still load.
    A checkpoint's step counter must be an integer in ``[0, 2**62]`` (``ValueError`` naming ``_extra_state`` on load).
    """

    backend = ModuleBackend("expert_bias_update_")

    def __init__(
        self,
        num_ffn_experts: int,
        num_zero_experts: int,
        top_k: int,
        target_ffn_per_token: float,
        kp: float = 0.0,
        ki: float = 1e-3,
        kd: float = 0.0,
        mode: str = "pid",
        max_abs: float | None = None,
        gain_schedule: Callable[[int], float] | None = None,
        process_group: dist.ProcessGroup | None = None,
        reduce_counts: bool = True,
        device: torch.device | str | None = None,
        backend: BackendChoice = None,
    ) -> None:
        super().__init__()
        self.num_ffn_experts = v.integer("num_ffn_experts", num_ffn_experts, op=_NAME, low=1)
        self.num_zero_experts = v.integer("num_zero_experts", num_zero_experts, op=_NAME, low=0)
        n_total = self.num_ffn_experts + self.num_zero_experts
        self.top_k = v.integer("top_k", top_k, op=_NAME, low=1, high=n_total)
        self.target_ffn_per_token = v.real("target_ffn_per_token", target_ffn_per_token, op=_NAME, low=0.0,
                                           high=float(self.top_k))
        self.kp, self.ki, self.kd = (v.real(n, g, op=_NAME, float32=True) for n, g in (("kp", kp), ("ki", ki),
                                                                                         ("kd", kd)))
        self.mode = v.choice("mode", mode, MODES, op=_NAME)
        self.max_abs = None if max_abs is None else v.real("max_abs", max_abs, op=_NAME, low=0.0, float32=True)
        if gain_schedule is not None and not callable(gain_schedule):
            raise TypeError(f"{_NAME}: gain_schedule must be a callable step -> scale (or None), got "
                            f"{type(gain_schedule).__name__}")
        self.gain_schedule = gain_schedule
        self.process_group = process_group
        self.reduce_counts = v.flag("reduce_counts", reduce_counts, op=_NAME)
        self.backend = backend
        self.steps = 0
        self.register_buffer("bias", torch.zeros(n_total, dtype=torch.float32, device=device))
        self.register_buffer("state", torch.zeros(2, self.num_ffn_experts, dtype=torch.float32, device=device))
        # The last global counts, for metrics(); not checkpointed.
        self.register_buffer("last_counts", torch.zeros(n_total, dtype=torch.int64, device=device), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.num_ffn_experts + self.num_zero_experts

    def extra_repr(self) -> str:
        return (
            f"num_ffn_experts={self.num_ffn_experts}, num_zero_experts={self.num_zero_experts}, top_k={self.top_k}, "
            f"target_ffn_per_token={self.target_ffn_per_token}, mode={self.mode!r}, kp={self.kp}, ki={self.ki}, "
            f"kd={self.kd}, max_abs={self.max_abs}"
        )

    def get_extra_state(self) -> torch.Tensor:
        """The step counter as an int64 0-d CPU tensor: a state dict of tensors only (safetensors, ``torch.load(...,
        weights_only=True)``, ``{k: v.clone()}`` all take it). The counter itself stays a host int (the gain
        schedule reads it with no device sync)."""
        return torch.tensor(self.steps, dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        if isinstance(state, dict):  # checkpoints written before the counter became a tensor: {"steps": n}
            state = state["steps"]
        if isinstance(state, torch.Tensor):
            if state.numel() != 1 or state.is_floating_point() or state.is_complex() or state.dtype == torch.bool:
                raise ValueError(f"{_NAME}: the checkpoint's step counter (_extra_state) must be one integer, got "
                                 f"a {state.dtype} tensor of shape {tuple(state.shape)}")
            state = state.item()
        # Bounded well inside int64, so that counting on (and get_extra_state's int64 tensor) never overflows.
        self.steps = v.integer("_extra_state (the step counter)", state, op=_NAME, low=0, high=MAX_STEPS)

    def gains(self, step: int | None = None) -> tuple[float, float, float]:
        """The (kp, ki, kd) used at ``step`` (default: the next update)."""
        if self.gain_schedule is None:
            return self.kp, self.ki, self.kd
        step = self.steps if step is None else step
        # A Python number (a tensor would be a host read), finite, and the scaled gains finite as float32.
        scale = v.real(f"gain_schedule (its value at step {step})", self.gain_schedule(step), op=_NAME)
        out = (self.kp * scale, self.ki * scale, self.kd * scale)
        for name, g in zip(("kp", "ki", "kd"), out):
            if not abs(g) <= v.FLOAT32_MAX:
                raise ValueError(f"{_NAME}: gain_schedule (its value at step {step}) = {scale} makes {name} * scale = "
                                 f"{g}, not finite as a float32 (the kernels compute in float32)")
        return out

    def _group(self):
        if not self.reduce_counts or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def start_update(self, counts: torch.Tensor) -> PendingBiasUpdate:
        """Launch the count all-reduce (async) and return a handle; ``handle.wait()`` applies the update.

        Lets the all-reduce overlap with other work (e.g. the optimizer step). ``counts``: this rank's int32 or
        int64 ``[N+Z]`` selections per expert; it is not modified.
        """
        v.tensor("counts", counts, dtypes=(torch.int32, torch.int64), dim=1, op=_NAME)
        if counts.numel() != self.num_experts:
            raise ValueError(
                f"{_NAME}: counts must have N+Z = {self.num_ffn_experts}+{self.num_zero_experts} = "
                f"{self.num_experts} entries, got {counts.numel()}"
            )
        v.same_device(_NAME, counts=counts, bias=self.bias)
        global_counts = counts.to(torch.int64, copy=True)  # int64: the global sum can outgrow int32
        group = self._group()
        work = dist.all_reduce(global_counts, group=group, async_op=True) if group is not None else None
        return PendingBiasUpdate(self, global_counts, work)

    def update(self, counts: torch.Tensor) -> None:
        """Sum ``counts`` over the process group and update the bias in place."""
        self.start_update(counts).wait()

    def _apply(self, fn, recurse: bool = True):
        # nn.Module._apply carries .to()/.cuda()/.half()/to_empty(): move the state with the module but keep it fp32
        # (the update's error terms are differences of shares of order 1/N; fp16 would round them away).
        return super()._apply(keep_fp32(fn), recurse)

    def _apply_update(self, global_counts: torch.Tensor) -> None:
        kp, ki, kd = self.gains()
        with torch.no_grad():
            expert_bias_update_(
                self.bias,
                global_counts,
                self.state,
                num_ffn_experts=self.num_ffn_experts,
                top_k=self.top_k,
                target_ffn_per_token=self.target_ffn_per_token,
                kp=kp,
                ki=ki,
                kd=kd,
                mode=self.mode,
                max_abs=self.max_abs,
                backend=self._backends["expert_bias_update_"],
            )
            self.last_counts.copy_(global_counts)
        self.steps += 1

    @torch.no_grad()
    def metrics(self) -> dict[str, torch.Tensor]:
        """What to log, as 0-d device tensors (call ``.item()`` when logging, off the hot path).

        From the counts of the last update: ``ffn_experts_per_token`` (mean FFN experts per token, aim: K_e),
        ``max_over_mean_ffn_load`` (1.0 is perfect balance), ``zero_share`` (share of selections on zero
        experts), and ``bias_min`` / ``bias_max`` over the FFN experts.
        """
        n = self.num_ffn_experts
        counts = self.last_counts.to(torch.float32)
        total = counts.sum().clamp_min(1.0)
        ffn = counts[:n]
        return {
            "ffn_experts_per_token": self.top_k * ffn.sum() / total,
            "max_over_mean_ffn_load": ffn.max() / ffn.mean().clamp_min(torch.finfo(torch.float32).tiny),
            "zero_share": counts[n:].sum() / total,
            "bias_min": self.bias[:n].min(),
            "bias_max": self.bias[:n].max(),
        }
