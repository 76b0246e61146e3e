"""State that stays float32 whatever dtype its module is cast to (routers, selection biases, balancer state).

``module.half()`` / ``.bfloat16()`` / ``.to(dtype)`` reach every parameter and buffer through ``nn.Module._apply``.
Modules whose math is documented as fp32 override ``_apply`` and wrap the function with :func:`keep_fp32`: device
moves, ``to_empty`` and ``share_memory`` still apply, dtype casts of float32 tensors do not. This is what
Hugging Face's ``_keep_in_fp32_modules`` does for ``e_score_correction_bias`` and MoE routers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FP32Linear", "autocast_off", "keep_fp32"]


def keep_fp32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap an ``nn.Module._apply`` function so float32 tensors keep their dtype (and are moved only)."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype != torch.float32:
            return t.to(device=out.device)  # the original values, not a float32 copy of the rounded cast
        return out

    return apply


class FP32Linear(nn.Linear):
    """``nn.Linear`` kept and computed in float32: its weights stay fp32 under ``.half()``/``.to(dtype)``, inputs are
    upcast, and autocast is turned off around the product (autocast would otherwise run it in bf16/fp16 and change
    which experts a router picks). Returns float32."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=torch.float32)

    def _apply(self, fn, recurse: bool = True):
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device.type):
            return torch.nn.functional.linear(x.float(), self.weight.float(),
                                              None if self.bias is None else self.bias.float())


def autocast_off(device_type: str):
    """A context that disables autocast for ``device_type`` (a no-op context for devices autocast does not know)."""
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
