"""Every registered suite's quick cases, every provider that runs here, under pytest-benchmark.

The cases, inputs and baselines are the ones `mmkernels-bench` uses, so the two never drift apart.
"""

from __future__ import annotations

import pytest
import torch

from mmkernels.bench import BenchConfig, registered_suites

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    for name, suite in sorted(registered_suites().items()):
        for case in suite.build(BenchConfig(DEVICE, None, "quick", None)):
            for provider in case.providers:
                yield pytest.param(case, provider, id=f"{name}-{case.name}-{provider}".replace(" ", "_"))


@pytest.mark.parametrize("case,provider", list(_params()))
def test_bench(benchmark, case, provider):
    inputs = case.make_inputs()
    fn = case.providers[provider]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        fn(inputs)
        sync()

    benchmark.extra_info.update(case=case.name, provider=provider, baseline=case.baseline, device=str(DEVICE))
    benchmark(run)
