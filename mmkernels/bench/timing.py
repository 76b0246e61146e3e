"""Timing primitives: CUDA events on GPUs, ``perf_counter`` on CPUs; median with p20/p80; peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Timing", "time_fn"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_mem_mb: float | None  # extra device memory allocated during one call (CUDA only)
    min_ms: float | None = None  # the fastest timed call (what the ceilings use: a peak, not a typical call)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _peak_memory_mb(fn: Callable[[object], object], inputs: object, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(inputs)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_fn(
    fn: Callable[[object], object],
    make_inputs: Callable[[], object],
    *,
    device: torch.device,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
    pool: int = 4,
) -> Timing:
    """Time ``fn(inputs)``. Inputs come from a pool of ``pool`` fresh sets, used in turn, so repeated calls do not
    measure a warm cache over one buffer (and in-place ops do not keep updating one tensor forever).

    Warm-up runs until ``warmup_ms`` has passed (compilation, autotuning, allocator growth stay out of the
    numbers); then as many timed calls as fit in ``rep_ms`` (between ``min_reps`` and ``max_reps``).
    """
    device = torch.device(device)
    inputs = [make_inputs() for _ in range(max(1, pool))]
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    fn(inputs[0])
    sync()
    start = time.perf_counter()
    i = 0
    while (time.perf_counter() - start) * 1e3 < warmup_ms or i < 2:
        fn(inputs[i % len(inputs)])
        i += 1
        sync()
    per_call_ms = max((time.perf_counter() - start) * 1e3 / i, 1e-4)
    reps = int(min(max_reps, max(min_reps, rep_ms / per_call_ms)))

    times: list[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            x = inputs[r % len(inputs)]
            starts[r].record()
            fn(x)
            ends[r].record()
        sync()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for r in range(reps):
            x = inputs[r % len(inputs)]
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        reps=reps,
        peak_mem_mb=_peak_memory_mb(fn, inputs[0], device),
        min_ms=times[0],
    )
