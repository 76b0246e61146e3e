"""mmkernels.bench: timing, ceilings, the suite base (modes, FLOPs, probes, backends), result files, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import mmkernels.bench.cli as cli
import mmkernels.bench.device as bench_device
from mmkernels.bench import BenchConfig, Case, Row, Suite, registered_suites, run_cases, time_fn, write_results
from mmkernels.bench.cli import main
from mmkernels.bench.suite import Inputs, Shape

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
QUICK = ["--quick", "--warmup-ms", "1", "--rep-ms", "2"]


def test_time_fn_measures_sleep_and_uses_fresh_inputs():
    seen = []
    t = time_fn(lambda x: (seen.append(x), time.sleep(0.002)), iter(range(100)).__next__, device=CPU,
                warmup_ms=1, rep_ms=20, pool=3)
    assert 1.9 <= t.min_ms <= t.median_ms < 20 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.reps >= 5 and set(seen) == {0, 1, 2}, "inputs rotate through the pool of fresh sets"
    assert t.peak_mem_mb is None  # CPU: not measured


def _toy_suite(**kw) -> Suite:
    return Suite("toy", "toy", shapes=lambda config, ours: [], **kw)


def test_runner_derives_rates_and_speedups():
    def slow(_):
        time.sleep(0.004)

    def fast(_):
        time.sleep(0.001)

    case = Case("toy", lambda: None, {"ours": fast, "base": slow}, baseline="base", flops=2e9, bytes=4e9)
    rows = run_cases(_toy_suite(), [case], BenchConfig(CPU, None, "quick", None), warmup_ms=1, rep_ms=15)
    ours, base = rows
    assert base.speedup == 1.0 and 1.5 < ours.speedup < 8.0  # 4 ms over 1 ms sleeps, on a possibly busy machine
    assert ours.tflops == pytest.approx(2e9 / (ours.median_ms * 1e-3) / 1e12)
    assert ours.gbps == pytest.approx(4e9 / (ours.median_ms * 1e-3) / 1e9)
    ceilings = bench_device.measure_ceilings(CPU, quick=True, dtypes=(torch.float32,))
    assert ours.pct_peak_gbps == pytest.approx(100 * ours.gbps / ceilings["gbps"])
    assert ours.pct_peak_tflops == pytest.approx(100 * ours.tflops / ceilings.tflops_for(torch.float32))
    assert ours.device.startswith("CPU") and ours.dtype == "float32"


def test_cpu_ceilings_use_the_timed_thread_count():
    threads = torch.get_num_threads()
    c = bench_device.measure_ceilings(CPU, quick=True)
    assert c["threads"] == threads and f"{threads} CPU threads" in c["method"]
    assert c["gbps"] > 0 and c.tflops_for(torch.float32) == c["tflops"] > 0


def test_write_results(tmp_path):
    case = Case("c", lambda: None, {"p": lambda _: None}, baseline="p")
    rows = run_cases(_toy_suite(), [case], BenchConfig(CPU, None, "quick", None), warmup_ms=1, rep_ms=2)
    json_path, csv_path = write_results(tmp_path, rows, {"device": "cpu"})
    data = json.loads(json_path.read_text())
    assert data["metadata"] == {"device": "cpu"} and data["rows"][0]["provider"] == "p"
    assert list(csv.DictReader(csv_path.open()))[0]["op"] == "toy"


# ---- the suite base: modes, FLOP/byte multipliers, probes ------------------------------------------------------


def _scale_shape(calls: list, **kw) -> Shape:
    """y = 3 * x on a [5, 7] input: every gradient is 3."""
    def make_inputs(grad):
        x = torch.randn(5, 7, requires_grad=grad)
        return Inputs((x,), wrt=(x,), grad_out=torch.ones(5, 7) if grad else None)

    def ours(x):
        calls.append(1)
        return 3 * x

    return Shape("s", make_inputs, {"mmkernels[reference]": ours, "base": lambda x: x * 3.0}, baseline="base",
                 flops=10.0, bytes=100.0, **kw)


def test_suite_base_owns_modes_and_multipliers():
    calls = []
    suite = _toy_suite(modes=("fwd", "bwd", "fwd+bwd"), bwd_flop_factor=2.5)
    suite = dataclasses.replace(suite, shapes=lambda config, ours: [_scale_shape(calls)])
    cases = {c.mode: c for c in suite.build(BenchConfig(CPU, None, "quick", None))}
    assert list(cases) == ["fwd", "bwd", "fwd+bwd"]
    assert [cases[m].flops for m in cases] == [10.0, 25.0, 35.0]
    assert [cases[m].bytes for m in cases] == [100.0, 200.0, 300.0]

    run = cases["fwd"].providers["mmkernels[reference]"]
    out = run(cases["fwd"].make_inputs())
    assert not out.requires_grad, "fwd runs under no_grad"

    x = cases["fwd+bwd"].make_inputs()
    (g,) = cases["fwd+bwd"].providers["mmkernels[reference]"](x)
    assert torch.equal(g, torch.full((5, 7), 3.0))

    calls.clear()
    x = cases["bwd"].make_inputs()
    bwd = cases["bwd"].providers["mmkernels[reference]"]
    for _ in range(3):
        (g,) = bwd(x)
        assert torch.equal(g, torch.full((5, 7), 3.0))
    assert len(calls) == 1, "bwd mode runs the forward once per input set, outside the timed calls"


def test_shape_overrides_backward_counts_and_skips():
    shape = _scale_shape([], bwd_flops=1.0, bwd_bytes=7.0, skip=lambda name, mode: name == "base" and mode != "fwd")
    suite = _toy_suite(modes=("fwd", "fwd+bwd"))
    suite = dataclasses.replace(suite, shapes=lambda config, ours: [shape])
    fwd, both = suite.build(BenchConfig(CPU, None, "quick", None))
    assert (both.flops, both.bytes) == (11.0, 107.0)
    assert list(fwd.providers) == ["mmkernels[reference]", "base"]
    assert list(both.providers) == ["mmkernels[reference]"] and both.baseline == "mmkernels[reference]"


def test_probe_leaves_out_baselines_that_cannot_run_but_never_ours():
    def broken(x):
        raise RuntimeError("not on this device")

    def make_inputs(grad):
        x = torch.ones(3, requires_grad=grad)
        return Inputs((x,), wrt=(x,), grad_out=torch.ones(3) if grad else None)

    providers = {"mmkernels[reference]": broken, "works": lambda x: 2 * x, "fails": broken,
                 "no-backward": lambda x: x.detach() * 2}
    probes = []

    def probe(grad):
        probes.append(grad)
        return make_inputs(grad)

    shape = Shape("s", make_inputs, providers, baseline="works", probe=probe, probe_key="odd-shape-13")
    suite = Suite("probe-toy", "toy", shapes=lambda config, ours: [shape], modes=("fwd", "fwd+bwd"))
    fwd, both = suite.build(BenchConfig(CPU, None, "quick", None))
    assert list(fwd.providers) == ["mmkernels[reference]", "works", "no-backward"]
    assert list(both.providers) == ["mmkernels[reference]", "works"]
    # a working backward vouches for the forward (one probe); a failing one sends the forward to its own probe
    assert sorted(probes) == [False, False, True, True, True]
    suite.build(BenchConfig(CPU, None, "quick", None))
    assert len(probes) == 5, "probes are cached"


def test_ours_defaults_and_explicit_backends():
    suites = registered_suites()
    quick = BenchConfig(CPU, None, "quick", None)
    assert suites["moe_experts"].ours(quick) == [], "its baseline is the reference; triton on CPU is not timed"
    assert "triton" not in suites["attention"].ours(quick)
    assert suites["vit"].ours(quick) == [None]  # the model's automatic choice
    explicit = BenchConfig(CPU, None, "quick", ("reference", "cpp"))
    assert suites["moe_experts"].ours(explicit) == ["reference"]
    assert suites["attention"].backend_problem("cpp", explicit).startswith("attention has no 'cpp' backend")
    if os.environ.get("TRITON_INTERPRET") == "1" and not HAS_CUDA:  # triton runs here, but not in bf16
        default_bf16 = BenchConfig(CPU, None, "quick", ("triton",))
        assert "bf16" in suites["attention"].backend_problem("triton", default_bf16)
        assert suites["patch_embed"].backend_problem("triton", default_bf16) is not None
        assert suites["patch_embed"].backend_problem("triton", BenchConfig(CPU, torch.float32, "quick", None)) is None


def test_every_suite_builds_quick_cases_on_cpu():
    for name, suite in registered_suites().items():
        cases = suite.build(BenchConfig(CPU, None, "quick", None))
        assert cases, name
        for case in cases:
            assert case.baseline in case.providers, (name, case.name)
            assert case.mode in suite.modes and case.flops > 0, (name, case.name)


# ---- the CLI --------------------------------------------------------------------------------------------------


def test_cli_list(capsys):
    assert main(["list"]) == 0
    assert "expert_bias_update" in capsys.readouterr().out


def test_cli_runs_an_op_and_writes_files(tmp_path, capsys):
    rc = main(["expert_bias_update", "--backends", "reference", "--out", str(tmp_path), *QUICK])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mmkernels[reference]" in out and "torch-host-sync" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["provider"] for r in data["rows"]} == {"mmkernels[reference]", "torch-host-sync"}
    assert all(r["device"].startswith("CPU") for r in data["rows"])
    assert data["metadata"]["ceilings"]["threads"] == torch.get_num_threads()


def _bad_args(tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    cases = [
        (["expert_bias_update", "--out", str(a_file)], "is not a folder"),
        (["expert_bias_update", "--out", str(a_file / "sub")], "cannot write there"),
        (["expert_bias_update", "--device", "tpu"], "is not a device"),
        (["expert_bias_update", "--device", "cuda:banana"], "is not a device"),
        (["no_such_op"], "unknown op 'no_such_op'"),
        (["expert_bias_update", "no_such_op"], "unknown op 'no_such_op'"),
        (["attention", "--backends", "cpp"], "attention has no 'cpp' backend"),
        (["expert_bias_update", "--plot"], "--plot needs --out"),
        (["expert_bias_update", "--rep-ms", "-3"], "--rep-ms"),
        (["expert_bias_update", "--dtype", "fp64"], "--dtype"),
        (["attention", "--shapes", "huge"], "no such preset"),
    ]
    if not HAS_CUDA:
        cases += [
            (["expert_bias_update", "--backends", "cuda"], "--backends cuda cannot run on cpu"),
            (["expert_bias_update", "--backends", "cpp", "cuda"], "no CUDA device here"),
            (["expert_bias_update", "--device", "cuda"], "--device cuda: no CUDA device here"),
        ]
    return cases


def test_cli_bad_arguments_are_one_line_usage_errors_before_any_timing(tmp_path, capsys, monkeypatch):
    def must_not_time(*args, **kwargs):
        raise AssertionError("a case was timed before the arguments were checked")

    monkeypatch.setattr(cli, "run_cases", must_not_time)
    monkeypatch.setattr(bench_device, "measure_ceilings", must_not_time)
    for argv, expected in _bad_args(tmp_path):
        rc = main([*argv, "--quick"])
        captured = capsys.readouterr()
        assert rc == 2, argv
        assert captured.out == "", argv
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmkernels-bench: error: ") and expected in lines[0], \
            (argv, captured.err)
    assert not (tmp_path / "a_file.txt" / "sub").exists()


def test_cli_explicit_backend_that_cannot_run_exits_2_in_a_subprocess():
    """The installed entry point: exit status 2 and one line naming the backend and why, no traceback."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    backend = "triton" if HAS_CUDA else "cuda"
    device = ["--device", "cpu"] if HAS_CUDA else []
    proc = subprocess.run([sys.executable, "-m", "mmkernels.bench", "expert_bias_update", "--quick", "--backends",
                           backend, *device], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert f"--backends {backend} cannot run on cpu" in line and "Traceback" not in proc.stderr


def _table_rows(out: str) -> list[list[str]]:
    """The data rows of the printed table (rich box drawing or the plain fallback), as cell lists."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == len(cli.COLUMNS) and cells[0] and cells[0] != "op":
            rows.append(cells)
    return rows


def test_quick_cpu_run_prints_no_unflagged_percentage_above_100(capsys):
    assert main(["expert_bias_update", *QUICK]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert len(rows) >= 8
    pct_col = cli.COLUMNS.index("%peak")
    for cells in rows:
        pct = cells[pct_col]
        if pct != "-" and not pct.endswith(cli.OVER_CEILING):
            assert float(pct) <= 100, cells
    if any(c[pct_col].endswith(cli.OVER_CEILING) for c in rows):
        assert "above 100% of the measured ceiling" in out


def test_percentages_above_the_ceiling_are_flagged_with_a_footnote(capsys, monkeypatch):
    # ceilings far below anything real: every row is above 100%, and each must say so
    monkeypatch.setattr(bench_device, "_copy_gbps", lambda *a: 1e-9)
    monkeypatch.setattr(bench_device, "_matmul_tflops", lambda *a: 1e-15)
    assert main(["expert_bias_update", "--backends", "reference", *QUICK]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert rows and all(c[cli.COLUMNS.index("%peak")].endswith(cli.OVER_CEILING) for c in rows)
    assert "above 100% of the measured ceiling: the ceilings are estimates" in out


def test_pct_cell_formatting():
    def row(tflops_pct, gbps_pct):
        return Row("op", "c", "fwd", "p", "CPU", "float32", 1.0, 1.0, 1.0, 5, None, None, tflops_pct, gbps_pct,
                   None, None, "p")

    assert cli._pct_cell(row(None, None)) == "-"
    assert cli._pct_cell(row(3.14159, None)) == "3.1"
    assert cli._pct_cell(row(42.4, 7.0)) == "42"
    assert cli._pct_cell(row(12.0, 250.4)) == "250*"


@pytest.mark.skipif(HAS_CUDA, reason="the header is for machines without a GPU")
def test_no_gpu_header_says_what_was_timed(capsys):
    assert main(["expert_bias_update", "patch_embed", *QUICK]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("no GPU here: ")]
    assert len(header) == 1 and header[0] <= 2, "one line, at the top"
    line = lines[header[0]]
    from mmkernels._extension import extension_status

    if extension_status().loaded:
        assert "mmkernels[cpp] rows time our C++ CPU kernels (expert_bias_update)" in line
    assert "mmkernels[reference] rows run our plain-PyTorch references (expert_bias_update)" in line
    assert "Triton kernels (expert_bias_update, patch_embed) are verified for correctness by `make test`" in line
    assert "Triton interpreter" in line and "not timed here" in line
