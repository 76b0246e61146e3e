"""Timing: launch-inclusive per-call times from the standard timing cores, graph-replayed per-call times from CUDA
graphs; median with p20/p80; peak memory; an L2 flush between timed calls.

What the harness adds is the policy, not the clock: a pool of fresh inputs used in turn, a flush hook outside the
timed region, a floor on the number of timed calls, peak memory, and the :class:`Timing` record the rows are made
from. The clock is borrowed:

- CUDA: :func:`triton.testing.do_bench` (CUDA events around each call, its warm-up and rep count from ``warmup_ms``
  / ``rep_ms`` over an estimated call time). Its per-call L2 clear is routed to this harness's flush policy: the
  ``flush`` given (e.g. :func:`l2_flusher`'s) followed by a synchronize, or nothing, so each timed call starts on an
  idle device with its own launch latency inside its time and the flush never inside it.
- CPU: :mod:`timeit` (the core ``torch.utils.benchmark.Timer`` wraps; garbage collection off while a call is
  timed): one call per sample, its ``setup`` (the flush and the next input) untimed. torch.utils.benchmark's own
  ``blocked_autorange`` times blocks of many calls and reports block means, which would change what p20/p80 and
  ``reps`` mean, so it is not used for the rows.

Two times per call on a GPU, for two questions:
- launch-inclusive (:func:`time_fn`): events around each call as a user makes it, host launch cost included where
  the device waits for it.
- graph-replayed (:func:`time_graph`): ``calls`` calls captured in one CUDA graph and replayed; events around each
  replay, divided by ``calls``: the device time of a call with the launch gaps gone (what a captured training step
  would see). The calls inside one replay run back to back (no flush between them). Ours rather than
  ``triton.testing.do_bench_cudagraph``: the rows report the calls per graph and the replays, rotate fresh inputs
  inside the graph, and turn a capture that cannot work into a reason (:class:`GraphUnavailable`), none of which
  ``do_bench_cudagraph`` exposes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
import time
import timeit
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["GraphUnavailable", "Timing", "l2_cache_bytes", "l2_flusher", "time_fn", "time_graph"]


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


def _summary(times: Sequence[float], **fields) -> Timing:
    """Median, p20 and p80 (linear interpolation between the sorted samples, as ``torch.quantile``), the fastest."""
    times = sorted(times)
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return Timing(median_ms=statistics.median(times), p20_ms=p20, p80_ms=p80, reps=len(times), min_ms=times[0],
                  **fields)


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

    Warm-up first (compilation, autotuning, allocator growth stay out of the numbers), then as many timed calls as
    fit in ``rep_ms``, at least ``min_reps``: on CUDA :func:`triton.testing.do_bench` picks both counts from its
    estimate of the call time (re-run with a longer ``rep`` when it would time fewer than ``min_reps`` calls); on a
    CPU the warm-up runs for ``warmup_ms`` and the timed calls number ``rep_ms`` over the warm-up's mean, between
    ``min_reps`` and ``max_reps``. (A CUDA device without Triton installed is timed the CPU way, a synchronize
    after each call.)

    ``flush`` (e.g. :func:`l2_flusher`'s): called before every timed call (and the CPU warm-up's), outside the timed
    region; on CUDA the device is synchronized after it, so the call's events time the call alone, from an idle
    device.
    """
    device = torch.device(device)
    inputs = [make_inputs() for _ in range(max(1, pool))]
    rotation = itertools.cycle(inputs)
    if device.type == "cuda" and _has_triton():
        times = _do_bench(lambda: fn(next(rotation)), device, warmup_ms, rep_ms, min_reps, flush)
    else:
        times = _timeit_calls(fn, rotation, device, warmup_ms, rep_ms, min_reps, max_reps, flush)
    return _summary(times, peak_mem_mb=_peak_memory_mb(fn, inputs[0], device), flushed=flush is not None)


def _has_triton() -> bool:
    from .._backends import triton_available

    return triton_available()


@contextlib.contextmanager
def _l2_policy(flush: Callable[[], object] | None, device: torch.device) -> Iterator[None]:
    """Route ``do_bench``'s per-call L2 clear to ``flush`` then a synchronize (or to nothing), and skip its own
    256 MiB buffer; restored on exit."""
    import triton
    from triton.runtime import driver

    active = driver.active
    missing = [name for name in ("clear_cache", "get_empty_cache_for_benchmark") if not hasattr(active, name)]
    if missing:  # a Triton whose do_bench clears L2 another way: refuse rather than time with the wrong flush policy
        raise RuntimeError(f"triton {triton.__version__}: its driver has no {missing}; "
                           "the harness cannot route do_bench's L2 clear to its flush policy")
    saved = {name: active.__dict__[name] for name in ("clear_cache", "get_empty_cache_for_benchmark")
             if name in active.__dict__}

    def before_call(_cache) -> None:
        if flush is not None:
            flush()
            torch.cuda.synchronize(device)

    active.clear_cache = before_call
    active.get_empty_cache_for_benchmark = lambda: None
    try:
        yield
    finally:
        for name in ("clear_cache", "get_empty_cache_for_benchmark"):
            if name in saved:
                setattr(active, name, saved[name])
            else:
                delattr(active, name)


def _do_bench(call: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float, min_reps: int,
              flush: Callable[[], object] | None) -> list[float]:
    from triton.testing import do_bench

    with torch.cuda.device(device), _l2_policy(flush, device):
        times = do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        if len(times) < min_reps:  # a call slower than rep_ms / min_reps: time enough of them for p20/p80
            longer = rep_ms * min_reps / max(len(times), 1) * 1.25
            times = max(times, do_bench(call, warmup=0, rep=longer, return_mode="all"), key=len)
    return list(times)


def _timeit_calls(fn: Callable[[object], object], rotation: Iterator[object], device: torch.device,
                  warmup_ms: float, rep_ms: float, min_reps: int, max_reps: int,
                  flush: Callable[[], object] | None) -> list[float]:
    """Per-call times in ms from :mod:`timeit`: the setup (flush, next input) untimed, one call timed per sample,
    a synchronize inside the timed region on a CUDA device (only when Triton is missing there)."""

    def take():
        if flush is not None:
            flush()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return next(rotation)

    stmt = "fn(x); sync()" if device.type == "cuda" else "fn(x)"
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    timer = timeit.Timer(stmt, setup="x = take()", timer=time.perf_counter,
                         globals={"fn": fn, "take": take, "sync": sync})
    timer.timeit(1)  # the first call (compilation, autotuning) stays out of the estimate
    start, warm = time.perf_counter(), 0
    while (time.perf_counter() - start) * 1e3 < warmup_ms or warm < 2:
        timer.timeit(1)
        warm += 1
    per_call_ms = max((time.perf_counter() - start) * 1e3 / warm, 1e-4)  # flushes included: rep_ms bounds both
    reps = int(min(max_reps, max(min_reps, rep_ms / per_call_ms)))
    return [timer.timeit(1) * 1e3 for _ in range(reps)]


@functools.cache
def _flush_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.int32, device=device)


def l2_flusher(device: torch.device | str) -> Callable[[], object] | None:
    """A function that evicts the GPU's L2 cache by writing a buffer twice its size (the size from the device
    properties; 256 MiB when they give none), for :func:`time_fn`'s ``flush``. None on CPUs: there the flush is a
    no-op (a CPU's caches cannot be emptied this way, and the pool of fresh inputs is what keeps them honest)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    l2 = l2_cache_bytes(device)
    buf = _flush_buffer(device, 2 * l2 if l2 else 256 * 2**20)
    return buf.zero_


def l2_cache_bytes(device: torch.device | str) -> int | None:
    """The GPU's L2 cache size in bytes, from its device properties; None on CPUs or when the property is 0."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)) or None


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
            times = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
    except Exception as exc:  # noqa: BLE001
        raise GraphUnavailable(f"replay failed: {_root_cause(exc)}") from exc
    finally:
        del graph
    if statistics.median(times) < _NO_WORK_MS:  # the empty-graph warning is the first check; this one backs it up
        raise GraphUnavailable("the replayed graph did no measurable device work (the call runs on the host)")
    return _summary(times, peak_mem_mb=None, calls_per_rep=calls)
