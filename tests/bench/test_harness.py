"""mmkernels.bench: timing, ceilings, runner arithmetic, result files, the CLI."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from mmkernels.bench import BenchConfig, Case, Suite, registered_suites, run_cases, time_fn, write_results
from mmkernels.bench.cli import main

CPU = torch.device("cpu")


def test_time_fn_measures_sleep_and_uses_fresh_inputs():
    seen = []
    t = time_fn(lambda x: (seen.append(x), time.sleep(0.002)), iter(range(100)).__next__, device=CPU,
                warmup_ms=1, rep_ms=20, pool=3)
    assert 1.9 <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.reps >= 5 and set(seen) == {0, 1, 2}, "inputs rotate through the pool of fresh sets"
    assert t.peak_mem_mb is None  # CPU: not measured


def test_runner_derives_rates_and_speedups():
    def slow(_):
        time.sleep(0.004)

    def fast(_):
        time.sleep(0.001)

    case = Case("toy", lambda: None, {"ours": fast, "base": slow}, baseline="base", flops=2e9, bytes=4e9)
    suite = Suite("toy", "toy", build=lambda c: [case])
    rows = run_cases(suite, [case], BenchConfig(CPU, None, "quick", None), warmup_ms=1, rep_ms=15)
    ours, base = rows
    assert base.speedup == 1.0 and 2.0 < ours.speedup < 5.0
    assert ours.tflops == pytest.approx(2e9 / (ours.median_ms * 1e-3) / 1e12)
    assert ours.gbps == pytest.approx(4e9 / (ours.median_ms * 1e-3) / 1e9)
    assert ours.pct_peak_gbps is not None and ours.device.startswith("CPU")


def test_write_results(tmp_path):
    case = Case("c", lambda: None, {"p": lambda _: None}, baseline="p")
    rows = run_cases(Suite("s", "s", build=lambda c: [case]), [case], BenchConfig(CPU, None, "quick", None),
                     warmup_ms=1, rep_ms=2)
    json_path, csv_path = write_results(tmp_path, rows, {"device": "cpu"})
    data = json.loads(json_path.read_text())
    assert data["metadata"] == {"device": "cpu"} and data["rows"][0]["provider"] == "p"
    assert list(csv.DictReader(csv_path.open()))[0]["op"] == "s"


def test_every_suite_builds_quick_cases_on_cpu():
    for name, suite in registered_suites().items():
        cases = suite.build(BenchConfig(CPU, None, "quick", None))
        assert cases, name
        for case in cases:
            assert case.baseline in case.providers, (name, case.name)


def test_cli_list(capsys):
    assert main(["list"]) == 0
    assert "expert_bias_update" in capsys.readouterr().out


def test_cli_runs_an_op_and_writes_files(tmp_path, capsys):
    rc = main(["expert_bias_update", "--quick", "--backends", "reference", "--out", str(tmp_path),
               "--warmup-ms", "1", "--rep-ms", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mmkernels[reference]" in out and "torch-host-sync" in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"mmkernels[reference]", "torch-host-sync"}
    assert all(r["device"].startswith("CPU") for r in rows)


def test_cli_rejects_unknown_op(capsys):
    assert main(["no_such_op"]) == 2
    assert "unknown op" in capsys.readouterr().err
