"""Run suites: time every provider of every case, derive TFLOP/s, GB/s, percent of ceilings, the lower bound and
the ratio to it, and speed-ups.

Percentages divide by the ceilings measured on this device with the timed code's thread count, the matmul one for the
row's dtype (:meth:`Ceilings.peak_tflops`: the dtype's own, or fp32's when faster for fp16/bf16); a percentage is None
where no ceiling was measured for it (e.g. a dtype without a matmul here).
The lower bound is ``max(FLOPs / matmul ceiling, bytes / copy ceiling)`` (:meth:`Ceilings.lower_bound`); its larger
term is the row's ``limit``: ``memory`` when the case's arithmetic intensity (FLOPs / bytes) is at or below the
ridge point (matmul FLOP/s over copy bytes/s), else ``compute``.

Timing policy per row (:class:`BenchConfig`): an L2 flush before every timed call for memory-bound rows (``l2_flush``
None), all rows (True) or none (False), on CUDA only; CUDA-graph replay times for suites tagged ``MICROSECOND``
(``cuda_graph`` None), all (True) or none (False). A graph that cannot be captured leaves the launch-inclusive time
alone and says why in ``graph_note``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .device import device_name, measure_ceilings
from .results import Row
from .suite import MICROSECOND, BenchConfig, Case, Suite
from .timing import GraphUnavailable, Timing, l2_flusher, time_fn, time_graph

__all__ = ["run_cases", "run_suite", "wants_flush", "wants_graph"]


def _pct(rate: float | None, ceiling: float | None) -> float | None:
    return 100 * rate / ceiling if rate is not None and ceiling else None


def _row(suite: str, case: Case, provider: str, timing: Timing, config: BenchConfig, dtype: torch.dtype, ceilings,
         graph: Timing | str | None = None) -> Row:
    seconds = timing.median_ms * 1e-3
    tflops = case.flops / seconds / 1e12 if case.flops else None
    gbps = case.bytes / seconds / 1e9 if case.bytes else None
    bound_ms, limit = ceilings.lower_bound(case.flops, case.bytes, dtype)
    graph_timing = graph if isinstance(graph, Timing) else None
    if graph_timing is not None:
        graph_note = f"{graph_timing.calls_per_rep} calls per graph, {graph_timing.reps} replays"
    else:
        graph_note = graph  # why there is no graph time, or None: not asked for
    return Row(
        op=suite,
        case=case.name,
        mode=case.mode,
        provider=provider,
        device=device_name(config.device),
        dtype=str(dtype).replace("torch.", ""),
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        reps=timing.reps,
        tflops=tflops,
        gbps=gbps,
        pct_peak_tflops=_pct(tflops, ceilings.peak_tflops(dtype)),
        pct_peak_gbps=_pct(gbps, ceilings.get("gbps")),
        peak_mem_mb=timing.peak_mem_mb,
        speedup=None,
        baseline=case.baseline,
        lower_bound_ms=bound_ms,
        ratio_to_bound=timing.median_ms / bound_ms if bound_ms else None,
        limit=limit,
        l2_flush=timing.flushed,
        graph_ms=graph_timing.median_ms if graph_timing else None,
        graph_p20_ms=graph_timing.p20_ms if graph_timing else None,
        graph_p80_ms=graph_timing.p80_ms if graph_timing else None,
        graph_ratio_to_bound=graph_timing.median_ms / bound_ms if graph_timing and bound_ms else None,
        graph_note=graph_note,
    )


def wants_flush(config: BenchConfig, limit: str | None) -> bool:
    """Whether a row with this ``limit`` gets an L2 flush before each timed call (CUDA; on CPUs it is a no-op)."""
    return config.l2_flush if config.l2_flush is not None else limit == "memory"


def wants_graph(config: BenchConfig, suite: Suite) -> bool:
    """Whether the suite's rows get CUDA-graph replay times: asked for, or by default the MICROSECOND suites on a
    CUDA device (on a CPU nothing can be captured: asked for there, the rows say so)."""
    if config.cuda_graph is not None:
        return config.cuda_graph
    return MICROSECOND in suite.tags and config.device.type == "cuda"


def _graph_calls(median_ms: float) -> int:
    """Calls per captured graph: about a millisecond of launch-inclusive work, 4 to 100 calls."""
    return int(min(100, max(4, 1.0 / max(median_ms, 1e-3))))


def run_cases(
    suite: Suite,
    cases: Sequence[Case],
    config: BenchConfig,
    *,
    warmup_ms: float,
    rep_ms: float,
    on_result: Callable[[Row], None] | None = None,
    on_provider: Callable[[str], None] | None = None,
) -> list[Row]:
    """Time every provider of every case; ``on_provider(name)`` is called as each provider starts (progress),
    ``on_result(row)`` as each row is complete (its speed-up known)."""
    dtype = suite.dtype(config)
    ceilings = measure_ceilings(config.device, quick=config.preset == "quick", dtypes=(dtype,))
    graphs = wants_graph(config, suite)
    rows: list[Row] = []
    for case in cases:
        _, limit = ceilings.lower_bound(case.flops, case.bytes, dtype)
        flush = l2_flusher(config.device) if wants_flush(config, limit) else None
        case_rows: list[Row] = []
        for provider, fn in case.providers.items():
            if on_provider is not None:
                on_provider(provider)
            timing = time_fn(fn, case.make_inputs, device=config.device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                             flush=flush)
            graph: Timing | str | None = None
            if graphs:
                try:
                    graph = time_graph(fn, case.make_inputs, device=config.device, rep_ms=rep_ms,
                                       calls=_graph_calls(timing.median_ms))
                except GraphUnavailable as exc:
                    graph = str(exc)
            row = _row(suite.name, case, provider, timing, config, dtype, ceilings, graph)
            case_rows.append(row)
        base = next((r for r in case_rows if r.provider == case.baseline), None)
        for row in case_rows:
            row.speedup = base.median_ms / row.median_ms if base is not None else None
            if on_result is not None:
                on_result(row)
        rows.extend(case_rows)
    return rows


def run_suite(suite: Suite, config: BenchConfig, *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> list[Row]:
    """Build the suite's cases for ``config`` and time them all."""
    return run_cases(suite, suite.build(config), config, warmup_ms=warmup_ms, rep_ms=rep_ms)
