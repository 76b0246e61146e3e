"""Benchmark harness and the ``mmkernels-bench`` CLI.

``time_fn`` (CUDA events or perf_counter; median, p20, p80; warm-up; a pool of fresh inputs; peak memory),
``measure_ceilings`` (the device's real copy bandwidth and matmul rate per dtype), suites of cases per op (a
suite declares shapes, providers and analytic FLOPs/bytes; the base owns modes, probes and backends), and writers for
JSON/CSV results and plots. Every row names the device.
"""

from .device import device_name, measure_ceilings
from .results import Row, write_results
from .runner import run_cases, run_suite
from .suite import BenchConfig, Case, Inputs, Shape, Suite, register_suite, registered_suites
from .timing import Timing, time_fn

__all__ = [
    "BenchConfig",
    "Case",
    "Inputs",
    "Row",
    "Shape",
    "Suite",
    "Timing",
    "device_name",
    "measure_ceilings",
    "register_suite",
    "run_cases",
    "run_suite",
    "registered_suites",
    "time_fn",
    "write_results",
]
