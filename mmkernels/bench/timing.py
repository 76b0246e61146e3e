"""Timing primitives: CUDA events on GPUs, ``perf_counter`` on CPUs; median with p20/p80; peak memory; an L2 flush
between timed calls; per-call times from CUDA-graph replays.

Two times per call on a GPU, for two questions:
- launch-inclusive (:func:`time_fn`): events around each call as a user makes it, host launch cost included where
  the device waits for it. With an L2 flush, each call starts on an idle device (flush, synchronize, then the
  events and the call), so the call's own launch latency is always inside its time and the flush never is.
- graph-replayed (:func:`time_graph`): ``calls`` calls captured in one CUDA graph and replayed; events around each
  replay, divided by ``calls``: the device time of a call with the launch gaps gone (what a captured training step
  would see). The calls inside one replay run back to back (no flush between them).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["GraphUnavailable", "Timing", "l2_flusher", "time_fn", "time_graph"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_mem_mb: float | None  # extra device memory allocated during one call (CUDA only)
    min_ms: float | None = None  # the fastest timed call (what the ceilings use: a peak, not a typical call)
    flushed: bool = False  # an L2 flush ran before every timed call (outside the timed region)
    calls_per_rep: int = 1  # graph timing: calls captured in one replayed graph (the times are per call)


class GraphUnavailable(RuntimeError):
    """No graph-replayed time for this call; the message says why (shown in the row; the launch-inclusive time
    stands alone)."""


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
    flush: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn(inputs)``. Inputs come from a pool of ``pool`` fresh sets, used in turn, so repeated calls do not
    measure a warm cache over one buffer (and in-place ops do not keep updating one tensor forever).

    Warm-up runs until ``warmup_ms`` has passed (compilation, autotuning, allocator growth stay out of the
    numbers); then as many timed calls as fit in ``rep_ms`` (between ``min_reps`` and ``max_reps``).

    ``flush`` (e.g. :func:`l2_flusher`'s): called before every warm-up and timed call, outside the timed region
    (on CUDA the device is synchronized after it, so the call's events time the call alone, from an idle device).
    The warm-up includes it so that the rep count keeps the run within about ``rep_ms`` of calls plus flushes.
    """
    device = torch.device(device)
    inputs = [make_inputs() for _ in range(max(1, pool))]
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def before_call() -> None:
        if flush is not None:
            flush()
            sync()

    before_call()
    fn(inputs[0])
    sync()
    start = time.perf_counter()
    i = 0
    while (time.perf_counter() - start) * 1e3 < warmup_ms or i < 2:
        before_call()
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
            before_call()
            starts[r].record()
            fn(x)
            ends[r].record()
        sync()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for r in range(reps):
            x = inputs[r % len(inputs)]
            before_call()
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
        flushed=flush is not None,
    )


@functools.cache
def _flush_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.int32, device=device)


def l2_flusher(device: torch.device | str) -> Callable[[], object] | None:
    """A function that evicts the GPU's L2 cache by writing a buffer twice its size (the size from the device
    properties; 256 MiB when they give none), for :func:`time_fn`'s ``flush``. None on CPUs: there the flush is a
    no-op (a CPU's caches cannot be emptied this way, and the pool of fresh inputs is what keeps them honest)."""
    from .device import l2_cache_bytes

    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    l2 = l2_cache_bytes(device)
    buf = _flush_buffer(device, 2 * l2 if l2 else 256 * 2**20)
    return buf.zero_


def _root_cause(exc: BaseException) -> str:
    """The first error of a chain (a failed capture raises again when the capture is ended), on one line."""
    while exc.__context__ is not None:
        exc = exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


# Per-call replay time below which a graph cannot hold a kernel: a kernel node costs on the order of a microsecond.
_NO_WORK_MS = 1e-4


def _capture(fn: Callable[[object], object], inputs: Sequence[object], calls: int,
             device: torch.device) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` (rotating through ``inputs``) captured in one CUDA graph, replayed once."""
    with torch.cuda.device(device):
        prev = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(prev)
        with torch.cuda.stream(side):  # warm-up on a side stream before the capture, as torch's CUDA-graph docs ask
            for x in inputs:
                fn(x)
        prev.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.cuda.graph(graph, stream=side):
                    for i in range(calls):
                        fn(inputs[i % len(inputs)])
        finally:
            torch.cuda.set_stream(prev)  # a capture that failed to end leaves its stream current
        if any("Graph is empty" in str(w.message) for w in caught):
            raise GraphUnavailable("the capture recorded no device work (the call runs on the host)")
        graph.replay()
        torch.cuda.synchronize(device)
    return graph


def time_graph(
    fn: Callable[[object], object],
    make_inputs: Callable[[], object],
    *,
    device: torch.device,
    calls: int = 20,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 200,
    pool: int = 4,
) -> Timing:
    """Per-call time of ``fn`` replayed from a CUDA graph: ``calls`` calls (inputs rotating through a pool of
    ``pool`` fresh sets) captured once, the graph replayed as often as fits in ``rep_ms`` (``min_reps`` to
    ``max_reps``), events around each replay; the times are per call (replay time / ``calls``).

    Raises :class:`GraphUnavailable` (message: why) instead of a number it cannot stand behind: on a CPU device;
    when the capture fails (a call that synchronizes with the host, e.g. ``.item()``, ``.cpu()``, a data-dependent
    output size, or anything else CUDA graphs cannot record); when the capture records no device work; when a
    replay fails. After a failed capture the previous stream is current again and the device is synchronized, so
    the caller can go on timing.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise GraphUnavailable(f"CUDA graphs need a CUDA device; this run is on {device.type}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    inputs = [make_inputs() for _ in range(max(1, pool))]
    try:
        graph = _capture(fn, inputs, calls, device)
    except GraphUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001  (whatever the capture raised: the row says it and goes on)
        with contextlib.suppress(Exception):  # a capture error is not sticky; if this one were, the next call says so
            torch.cuda.synchronize(device)
        raise GraphUnavailable(f"capture failed: {_root_cause(exc)}") from exc
    try:
        with torch.cuda.device(device):
            probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            probe_start.record()
            graph.replay()
            probe_end.record()
            torch.cuda.synchronize(device)
            per_replay_ms = max(probe_start.elapsed_time(probe_end), 1e-4)
            reps = int(min(max_reps, max(min_reps, rep_ms / per_replay_ms)))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for r in range(reps):
                starts[r].record()
                graph.replay()
                ends[r].record()
            torch.cuda.synchronize(device)
            times = sorted(s.elapsed_time(e) / calls for s, e in zip(starts, ends))
    except Exception as exc:  # noqa: BLE001
        raise GraphUnavailable(f"replay failed: {_root_cause(exc)}") from exc
    finally:
        del graph
    if statistics.median(times) < _NO_WORK_MS:  # the empty-graph warning is the first check; this one backs it up
        raise GraphUnavailable("the replayed graph did no measurable device work (the call runs on the host)")
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        reps=reps,
        peak_mem_mb=None,
        min_ms=times[0],
        calls_per_rep=calls,
    )
