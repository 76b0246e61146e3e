"""Input checks shared by the public functions: clear ``TypeError``/``ValueError`` naming the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def tensor(name: str, value, *, dtypes: Iterable[torch.dtype] | None = None, dim: int | None = None,
           contiguous: bool = False, op: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must be {expected}, got {str(value.dtype).replace('torch.', '')}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimension(s), got shape {tuple(value.shape)}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (it is updated in place); call .contiguous() first")
    return value


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return first


def integer(name: str, value, *, op: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{op}: {name} must be in {bounds}, got {value}")
    return value


def real(name: str, value, *, op: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Python number, not a tensor (reading a device tensor would "
                        "synchronise with the host)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return value


def choice(name: str, value, options: Iterable[str], *, op: str) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value
