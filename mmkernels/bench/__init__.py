"""Benchmark harness and the ``mmkernels-bench`` CLI.

``time_fn`` (the clock borrowed: ``triton.testing.do_bench`` on CUDA, ``timeit`` on CPUs; ours: a pool of fresh
inputs, the L2-flush policy, median/p20/p80, peak memory), ``measure_ceilings`` (the device's real copy bandwidth and
matmul rate per dtype), suites of cases per op (a suite declares shapes, providers and analytic FLOPs/bytes; the base
owns modes, probes and backends; every module of ``bench/suites`` is found and registers itself), and writers for
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
