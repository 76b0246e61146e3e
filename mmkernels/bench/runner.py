"""Run suites: time every provider of every case, derive TFLOP/s, GB/s, percent of ceilings and speed-ups.

Percentages divide by the ceilings measured on this device with the timed code's thread count, the matmul one in
the row's dtype; a percentage is None where no ceiling was measured for it (e.g. a dtype without a matmul here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .device import device_name, measure_ceilings
from .results import Row
from .suite import BenchConfig, Case, Suite
from .timing import time_fn

__all__ = ["run_cases", "run_suite"]


def _pct(rate: float | None, ceiling: float | None) -> float | None:
    return 100 * rate / ceiling if rate is not None and ceiling else None


def _row(suite: str, case: Case, provider: str, timing, config: BenchConfig, dtype: torch.dtype, ceilings) -> Row:
    seconds = timing.median_ms * 1e-3
    tflops = case.flops / seconds / 1e12 if case.flops else None
    gbps = case.bytes / seconds / 1e9 if case.bytes else None
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
        pct_peak_tflops=_pct(tflops, ceilings.tflops_for(dtype)),
        pct_peak_gbps=_pct(gbps, ceilings.get("gbps")),
        peak_mem_mb=timing.peak_mem_mb,
        speedup=None,
        baseline=case.baseline,
    )


def run_cases(
    suite: Suite,
    cases: Sequence[Case],
    config: BenchConfig,
    *,
    warmup_ms: float,
    rep_ms: float,
    on_result: Callable[[Row], None] | None = None,
) -> list[Row]:
    dtype = suite.dtype(config)
    ceilings = measure_ceilings(config.device, quick=config.preset == "quick", dtypes=(dtype,))
    rows: list[Row] = []
    for case in cases:
        case_rows: list[Row] = []
        for provider, fn in case.providers.items():
            timing = time_fn(fn, case.make_inputs, device=config.device, warmup_ms=warmup_ms, rep_ms=rep_ms)
            row = _row(suite.name, case, provider, timing, config, dtype, ceilings)
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
