"""The device under test: its name and its measured ceilings (copy bandwidth, matmul rate)."""

from __future__ import annotations

import functools
import platform

import torch

from .timing import time_fn

__all__ = ["Ceilings", "device_name", "measure_ceilings"]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{torch.get_num_threads()} threads"


class Ceilings(dict):
    """``{"gbps": copy bandwidth (bytes read + written), "tflops": matmul rate, "dtype": matmul dtype}``."""


@functools.cache
def measure_ceilings(device: str, quick: bool = False) -> Ceilings:
    """Measure, once per process, what this device really does: a large device-to-device copy and a large matmul
    (bf16 on GPUs, fp32 on CPUs). Percent-of-peak columns divide by these, not by datasheet numbers."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n_bytes = (256 if quick else 1024) * 2**20 if cuda else (32 if quick else 128) * 2**20
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda _: dst.copy_(src), lambda: None, device=dev, pool=1, warmup_ms=10, rep_ms=50)
    dtype = torch.bfloat16 if cuda else torch.float32
    n = (4096 if quick else 8192) if cuda else (512 if quick else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t_mm = time_fn(lambda _: a @ b, lambda: None, device=dev, pool=1, warmup_ms=10, rep_ms=100)
    return Ceilings(
        gbps=2 * n_bytes / (t_copy.median_ms * 1e-3) / 1e9,
        tflops=2 * n**3 / (t_mm.median_ms * 1e-3) / 1e12,
        dtype=str(dtype).replace("torch.", ""),
    )
