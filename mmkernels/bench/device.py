"""The device under test: its name, its measured ceilings (copy bandwidth, matmul rate per dtype) and the lower bound
they give each row, and its L2 size (for the flush between timed calls; :func:`l2_cache_bytes` lives in
:mod:`.timing`, which owns the flush, and is re-exported here). This module imports :mod:`.timing` (its ceilings
are timed calls); :mod:`.timing` imports nothing of the harness."""

from __future__ import annotations

import functools
import platform

import torch

from .timing import l2_cache_bytes, time_fn

__all__ = ["Ceilings", "device_name", "l2_cache_bytes", "measure_ceilings"]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{torch.get_num_threads()} threads"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Ceilings(dict):
    """What this device was measured to do: the divisors of the ``%peak`` columns and the two rates each row's
    lower bound is computed from.

    Keys: ``gbps`` (the best copy rate, bytes read + written, GB/s), ``tflops`` (matmul TFLOP/s in ``dtype``),
    ``dtype``, ``tflops_by_dtype`` (``{dtype name: TFLOP/s}`` for every dtype measured; a dtype whose matmul does
    not run here is absent), ``threads`` (CPU threads used, the timed code's ``torch.get_num_threads()``; None on
    GPUs), ``l2_bytes`` (the GPU's L2 cache size from its device properties; None on CPUs), ``source``
    (``"measured"``: timed on this device in this process; anything else names where the numbers came from, e.g.
    ``"nominal"`` for datasheet values) and ``method`` (one line on how they were measured).
    """

    def tflops_for(self, dtype: torch.dtype | str) -> float | None:
        """The matmul ceiling in ``dtype`` (TFLOP/s), or None when it was not measured."""
        name = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        return self.get("tflops_by_dtype", {}).get(name)

    def peak_tflops(self, dtype: torch.dtype | str) -> float | None:
        """The fastest measured rate at which work on ``dtype`` inputs can run: its own matmul ceiling, or for fp16 /
        bf16 the fp32 one when that is faster (a CPU without native half-precision matmuls: code that upcasts, such
        as SDPA's math path, runs at the fp32 rate). The divisor of ``%peak`` and of the lower bound's compute term,
        so that the bound is one the work cannot beat. None when ``dtype`` has no matmul ceiling here."""
        name = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        rates = self.get("tflops_by_dtype", {})
        own = rates.get(name)
        if own and name in ("float16", "bfloat16") and (rates.get("float32") or 0) > own:
            return rates["float32"]
        return own

    def ridge(self, dtype: torch.dtype | str) -> float | None:
        """The ridge point in ``dtype``: matmul FLOP/s over copy bytes/s (FLOP per byte). A kernel whose arithmetic
        intensity (its FLOPs over its bytes) is below it cannot be limited by arithmetic: it is memory-bound. None
        when either ceiling is missing."""
        tflops, gbps = self.peak_tflops(dtype), self.get("gbps")
        return tflops * 1e12 / (gbps * 1e9) if tflops and gbps else None

    def lower_bound(self, flops: float, nbytes: float, dtype: torch.dtype | str) -> tuple[float | None, str | None]:
        """``(ms, limit)``: the least time ``flops`` and ``nbytes`` can take here, ``max(flops / matmul peak for dtype
        (:meth:`peak_tflops`), bytes / copy bandwidth)`` in milliseconds, and which term is the larger (``"memory"`` or
        ``"compute"``: the row's bound). A term whose count is 0 or whose ceiling was not measured is left out (the
        bound stays a lower bound, only a looser one); ``(None, None)`` when neither term is known."""
        tflops, gbps = self.peak_tflops(dtype), self.get("gbps")
        compute_ms = flops / (tflops * 1e12) * 1e3 if flops > 0 and tflops else None
        memory_ms = nbytes / (gbps * 1e9) * 1e3 if nbytes > 0 and gbps else None
        if compute_ms is None and memory_ms is None:
            return None, None
        if compute_ms is None or (memory_ms is not None and memory_ms >= compute_ms):
            return memory_ms, "memory"  # ties go to memory: intensity exactly at the ridge flushes L2 too
        return compute_ms, "compute"


def _best_ms(fn, device: torch.device, rep_ms: float) -> float:
    # min_reps: on a busy machine a few calls can all be slowed down; the fastest of 20 is a fair peak
    t = time_fn(lambda _: fn(), lambda: None, device=device, pool=1, warmup_ms=10, rep_ms=rep_ms, min_reps=20)
    return t.min_ms if t.min_ms is not None else t.median_ms


@functools.cache
def _copy_gbps(device: str, quick: bool, threads: int | None) -> float:
    dev = torch.device(device)
    if dev.type == "cuda":
        sizes_mb = (256,) if quick else (1024,)
    else:  # cache-resident sizes too: small cases' data stays in cache, and the ceiling must bound them as well
        sizes_mb = (1, 4, 32) if quick else (1, 4, 16, 128)
    best = 0.0
    for mb in sizes_mb:
        src = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=dev).uniform_()
        dst = torch.empty_like(src)
        best = max(best, 2 * mb * 2**20 / (_best_ms(functools.partial(dst.copy_, src), dev, 50) * 1e-3) / 1e9)
    return best


@functools.cache
def _matmul_tflops(device: str, dtype: torch.dtype, quick: bool, threads: int | None) -> float | None:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    max_n = (4096 if quick else 8192) if cuda else (1024 if quick else 2048)
    best, n = 0.0, 256
    try:
        while n <= max_n:
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            ms = _best_ms(functools.partial(torch.matmul, a, b), dev, 100)
            best = max(best, 2 * n**3 / (ms * 1e-3) / 1e12)
            if not cuda and ms > 50:  # large enough to reach the rate; bigger would only cost time
                break
            n *= 2
    except RuntimeError:  # no matmul in this dtype on this device
        return None
    return best or None


def measure_ceilings(device: torch.device | str, quick: bool = False,
                     dtypes: tuple[torch.dtype, ...] = ()) -> Ceilings:
    """Measure what this device really does, once per process per (device, thread count, dtype): a copy and a
    matmul (bf16 on GPUs, fp32 on CPUs, plus each of ``dtypes``). Each rate is the fastest call seen, over a few
    sizes (copies of 1 MiB to 128 MiB on CPUs, so cache-resident data is bounded too; matmuls up to 1024-2048 on
    CPUs, 4096-8192 on GPUs), on CPUs with the timed code's ``torch.get_num_threads()`` threads. Percent-of-peak
    columns divide by these, not by datasheet numbers. They remain estimates: rows can exceed them (the CLI
    flags that)."""
    from ..ops._validate import flag

    quick = flag("quick", quick, op="measure_ceilings")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    threads = None if cuda else torch.get_num_threads()
    primary = torch.bfloat16 if cuda else torch.float32
    by_dtype = {}
    for dt in dict.fromkeys((primary, *dtypes)):
        rate = _matmul_tflops(str(dev), dt, quick, threads)
        if rate is not None:
            by_dtype[_dtype_name(dt)] = rate
    where = f"{threads} CPU threads" if threads is not None else "CUDA events"
    return Ceilings(
        gbps=_copy_gbps(str(dev), quick, threads),
        tflops=by_dtype.get(_dtype_name(primary)),
        dtype=_dtype_name(primary),
        tflops_by_dtype=by_dtype,
        threads=threads,
        l2_bytes=l2_cache_bytes(dev),
        source="measured",
        method=f"fastest copy and matmul calls over a few sizes, {where}",
    )
