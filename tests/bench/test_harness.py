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
import mmkernels.bench.runner as bench_runner
import mmkernels.bench.timing as bench_timing
from mmkernels.bench import BenchConfig, Case, Row, Suite, registered_suites, run_cases, time_fn, write_results
from mmkernels.bench.cli import main
from mmkernels.bench.device import Ceilings
from mmkernels.bench.suite import MICROSECOND, Inputs, Shape
from mmkernels.bench.timing import GraphUnavailable, l2_flusher, time_graph

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


NEW_COLUMNS = ("lower_bound_ms", "ratio_to_bound", "limit", "l2_flush", "graph_ms", "graph_p20_ms", "graph_p80_ms",
               "graph_ratio_to_bound", "graph_note")


def test_write_results(tmp_path):
    case = Case("c", lambda: None, {"p": lambda _: None}, baseline="p", flops=3e6, bytes=5e6)
    rows = run_cases(_toy_suite(), [case], BenchConfig(CPU, None, "quick", None, cuda_graph=True), warmup_ms=1,
                     rep_ms=2)
    json_path, csv_path = write_results(tmp_path, rows, {"device": "cpu"})
    data = json.loads(json_path.read_text())
    assert data["metadata"] == {"device": "cpu"} and data["rows"][0]["provider"] == "p"
    row = data["rows"][0]
    assert set(NEW_COLUMNS) <= set(row)
    assert row["lower_bound_ms"] > 0
    assert row["ratio_to_bound"] == pytest.approx(row["median_ms"] / row["lower_bound_ms"])
    assert row["limit"] in ("memory", "compute") and row["l2_flush"] is False
    assert row["graph_ms"] is None and "CUDA device" in row["graph_note"]
    (csv_row,) = list(csv.DictReader(csv_path.open()))
    assert csv_row["op"] == "toy" and set(NEW_COLUMNS) <= set(csv_row)
    assert float(csv_row["lower_bound_ms"]) == pytest.approx(row["lower_bound_ms"])
    assert csv_row["graph_note"] == row["graph_note"]


# ---- lower bound, memory-bound rows, L2 flush, CUDA-graph timing --------------------------------------------------

# A fake device: 100 GB/s copies, 2 TFLOP/s fp32 and 8 TFLOP/s bf16 matmuls (ridge points 20 and 80 FLOP/byte),
# no fp16 matmul.
FAKE = Ceilings(gbps=100.0, tflops=2.0, dtype="float32", tflops_by_dtype={"float32": 2.0, "bfloat16": 8.0},
                threads=None, l2_bytes=None, source="nominal", method="fake")


def test_lower_bound_arithmetic_on_a_fake_device():
    assert FAKE.ridge(torch.float32) == pytest.approx(20.0) and FAKE.ridge("bfloat16") == pytest.approx(80.0)
    assert FAKE.ridge(torch.float16) is None
    # 4 GFLOP over 100 MB, intensity 40: fp32 compute 2 ms > copy 1 ms; bf16 compute 0.5 ms < copy 1 ms
    ms, limit = FAKE.lower_bound(4e9, 1e8, torch.float32)
    assert ms == pytest.approx(2.0) and limit == "compute"
    ms, limit = FAKE.lower_bound(4e9, 1e8, torch.bfloat16)
    assert ms == pytest.approx(1.0) and limit == "memory"
    # the limit is the arithmetic intensity against the ridge point, for intensities either side of both ridges
    for flops, nbytes in ((1e6, 1e6), (19e6, 1e6), (21e6, 1e6), (79e6, 1e6), (81e6, 1e6), (3e9, 7e5)):
        for dtype in (torch.float32, torch.bfloat16):
            _, limit = FAKE.lower_bound(flops, nbytes, dtype)
            assert limit == ("memory" if flops / nbytes < FAKE.ridge(dtype) else "compute"), (flops, nbytes, dtype)
    assert FAKE.lower_bound(20e6, 1e6, torch.float32) == (pytest.approx(0.01), "memory")  # on the ridge: memory
    # a term without a count, or without a ceiling (no fp16 matmul here), is left out; neither: no bound
    assert FAKE.lower_bound(0.0, 5e8, torch.float32) == (pytest.approx(5.0), "memory")
    assert FAKE.lower_bound(6e9, 0.0, torch.float32) == (pytest.approx(3.0), "compute")
    assert FAKE.lower_bound(6e12, 5e8, torch.float16) == (pytest.approx(5.0), "memory")
    assert FAKE.lower_bound(0.0, 0.0, torch.float32) == (None, None)
    assert Ceilings(gbps=None, tflops_by_dtype={}).lower_bound(1e9, 1e9, torch.float32) == (None, None)


def test_rows_carry_the_bound_and_the_ratio_to_it(monkeypatch):
    monkeypatch.setattr(bench_runner, "measure_ceilings", lambda *a, **k: FAKE)

    def sleep_1ms(_):
        time.sleep(0.001)

    compute = Case("compute", lambda: None, {"p": sleep_1ms}, baseline="p", flops=1e9, bytes=1e6)  # 0.5 ms > 0.01
    memory = Case("memory", lambda: None, {"p": sleep_1ms}, baseline="p", flops=1e6, bytes=2e7)  # 0.2 ms > 0.0005
    unknown = Case("no counts", lambda: None, {"p": sleep_1ms}, baseline="p")
    rows = run_cases(_toy_suite(), [compute, memory, unknown], BenchConfig(CPU, None, "quick", None), warmup_ms=1,
                     rep_ms=5)
    c, m, u = rows
    assert (c.lower_bound_ms, c.limit) == (pytest.approx(0.5), "compute")
    assert (m.lower_bound_ms, m.limit) == (pytest.approx(0.2), "memory")
    assert c.ratio_to_bound == pytest.approx(c.median_ms / 0.5) and c.ratio_to_bound > 1.5  # a 1 ms sleep
    assert m.ratio_to_bound == pytest.approx(m.median_ms / 0.2) and m.ratio_to_bound > 4
    assert (u.lower_bound_ms, u.ratio_to_bound, u.limit) == (None, None, None)


def test_flush_runs_before_every_timed_call_and_outside_the_timed_region():
    log = []

    def flush():
        log.append("flush")
        time.sleep(0.008)  # far slower than the call: any of it inside the timed region would show

    def call(_):
        log.append("call")
        time.sleep(0.001)

    t = time_fn(call, lambda: None, device=CPU, warmup_ms=1, rep_ms=5, min_reps=6, flush=flush)
    assert t.flushed and t.reps >= 6
    assert t.median_ms < 4.0, "the flush's 8 ms must not be in the timed calls' times"
    assert log == ["flush", "call"] * (len(log) // 2), "every call, warm-up and timed, right after a flush"
    assert log.count("call") >= t.reps + 2
    plain = time_fn(call, lambda: None, device=CPU, warmup_ms=1, rep_ms=2)
    assert not plain.flushed


def test_l2_flush_is_a_no_op_on_cpu():
    assert l2_flusher(CPU) is None
    rows = run_cases(_toy_suite(), [Case("c", lambda: None, {"p": lambda _: None}, baseline="p", bytes=1e6)],
                     BenchConfig(CPU, None, "quick", None, l2_flush=True), warmup_ms=1, rep_ms=2)
    assert rows[0].l2_flush is False, "nothing was flushed, and the row says so"


@pytest.mark.parametrize("l2_flush, flushed", [(None, {"memory"}), (True, {"memory", "compute"}), (False, set())])
def test_flush_policy_follows_the_rows_memory_bound_classification(monkeypatch, l2_flush, flushed):
    """Default: memory-bound rows only (intensity below the ridge); --l2-flush every row; --no-l2-flush none."""
    monkeypatch.setattr(bench_runner, "measure_ceilings", lambda *a, **k: FAKE)
    log = []
    monkeypatch.setattr(bench_runner, "l2_flusher", lambda device: lambda: log.append("flush"))

    def call(name):
        return lambda _: log.append(name)

    # intensity 1 and 1000 FLOP/byte against the fp32 ridge of 20
    cases = [Case("memory", lambda: None, {"p": call("memory")}, baseline="p", flops=1e6, bytes=1e6),
             Case("compute", lambda: None, {"p": call("compute")}, baseline="p", flops=1e9, bytes=1e6)]
    config = BenchConfig(CPU, torch.float32, "quick", None, l2_flush=l2_flush)
    rows = run_cases(_toy_suite(), cases, config, warmup_ms=1, rep_ms=2)
    assert {r.case for r in rows if r.l2_flush} == flushed
    assert [r.limit for r in rows] == ["memory", "compute"]
    for name in ("memory", "compute"):
        preceded = {log[i - 1] == "flush" for i, x in enumerate(log) if x == name}
        assert preceded == {name in flushed}, name


def test_graph_timing_falls_back_on_cpu_with_the_reason_in_the_row():
    with pytest.raises(GraphUnavailable, match="CUDA graphs need a CUDA device"):
        time_graph(lambda x: x, lambda: None, device=CPU)
    case = Case("c", lambda: None, {"p": lambda _: time.sleep(0.0005)}, baseline="p", flops=1.0, bytes=1.0)
    micro = _toy_suite(tags=(MICROSECOND,))
    asked = run_cases(micro, [case], BenchConfig(CPU, None, "quick", None, cuda_graph=True), warmup_ms=1, rep_ms=3)
    assert asked[0].graph_ms is None and "CUDA graphs need a CUDA device" in asked[0].graph_note
    assert asked[0].median_ms >= 0.4, "the launch-inclusive time stands"
    default = run_cases(micro, [case], BenchConfig(CPU, None, "quick", None), warmup_ms=1, rep_ms=3)
    assert default[0].graph_ms is None and default[0].graph_note is None, "by default nothing is tried on a CPU"


def test_rows_carry_both_times_when_the_graph_replays(monkeypatch):
    """The runner's side of a capture that works (the capture itself is covered by the gpu tests)."""
    monkeypatch.setattr(bench_runner, "measure_ceilings", lambda *a, **k: FAKE)
    seen = {}

    def fake_graph(fn, make_inputs, *, device, calls, rep_ms):
        seen["calls"] = calls
        return bench_timing.Timing(0.002, 0.001, 0.003, 7, None, min_ms=0.001, calls_per_rep=calls)

    monkeypatch.setattr(bench_runner, "time_graph", fake_graph)
    case = Case("c", lambda: None, {"p": lambda _: time.sleep(0.002)}, baseline="p", flops=0.0, bytes=1e5)
    (row,) = run_cases(_toy_suite(tags=(MICROSECOND,)), [case], BenchConfig(CPU, None, "quick", None, cuda_graph=True),
                       warmup_ms=1, rep_ms=3)
    assert seen["calls"] == 4, "a 2 ms call: the fewest calls per graph"
    assert (row.graph_ms, row.graph_p20_ms, row.graph_p80_ms) == (0.002, 0.001, 0.003)
    assert row.graph_note == "4 calls per graph, 7 replays" and row.median_ms >= 2.0
    assert row.lower_bound_ms == pytest.approx(1e-3) and row.graph_ratio_to_bound == pytest.approx(2.0)


def test_a_failed_capture_becomes_a_reason_not_a_crash(monkeypatch):
    """The capture-failure path, driven on CPU: the capture raises (as an op that syncs does: the op's error, then
    another when the invalidated capture is ended); time_graph reports the first error, never a number."""
    def failing_capture(fn, inputs, calls, device):
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from None

    monkeypatch.setattr(bench_timing, "_capture", failing_capture)
    with pytest.raises(GraphUnavailable) as info:
        time_graph(lambda x: x, lambda: None, device=torch.device("cuda", 0))
    assert str(info.value) == ("capture failed: RuntimeError: CUDA error: operation not permitted when stream is "
                               "capturing")

    def empty_capture(fn, inputs, calls, device):
        raise GraphUnavailable("the capture recorded no device work (the call runs on the host)")

    monkeypatch.setattr(bench_timing, "_capture", empty_capture)
    with pytest.raises(GraphUnavailable, match="no device work"):
        time_graph(lambda x: x, lambda: None, device=torch.device("cuda", 0))


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
            assert case.mode in suite.modes and case.flops > 0 and case.bytes > 0, (name, case.name)
    micro = {name for name, suite in registered_suites().items() if MICROSECOND in suite.tags}
    assert {"moe_route", "expert_bias_update"} <= micro and "attention" not in micro


def test_model_suites_count_every_parameter_once():
    """Bytes of the whole-model suites, from their definition: ViT-B/16 (85,798,656 parameters) in bf16 at batch
    128 reads its weights and the pixels and writes the hidden states; the backward writes every weight gradient."""
    (fwd, both) = [c for c in registered_suites()["vit"].build(BenchConfig(CPU, torch.bfloat16, "default", None))
                   if c.name.startswith("ViT-B/16")]
    weights, pixels, hidden = 85_798_656, 128 * 3 * 224 * 224, 128 * 197 * 768
    assert fwd.bytes == 2 * (weights + pixels + hidden)
    assert both.bytes == fwd.bytes + 2 * (2 * weights + hidden + pixels)
    (qformer, _) = registered_suites()["qformer"].build(BenchConfig(CPU, torch.bfloat16, "default", None))
    weights, queries, image = 105_137_664, 256 * 32 * 768, 256 * 257 * 1408
    assert qformer.bytes == 2 * (weights + 2 * queries + image)


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


def test_every_row_prints_its_bound_and_ratio(capsys):
    assert main(["expert_bias_update", "moe_route", "--backends", "reference", "--no-l2-flush", *QUICK]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert len(rows) >= 10
    col = {name: cli.COLUMNS.index(name) for name in ("median ms", "bound ms", "limit", "x bound", "graph ms")}
    for cells in rows:
        bound, ratio = float(cells[col["bound ms"]]), cells[col["x bound"]]
        assert bound > 0 and cells[col["limit"]] in ("mem", "flops"), cells
        if not ratio.endswith(cli.OVER_CEILING):
            median = float(cells[col["median ms"]])
            rounding = 0.01 + 0.00005 / median  # the printed median has 4 decimals, bound and ratio 3 digits
            assert ratio.endswith("x") and float(ratio[:-1]) == pytest.approx(median / bound, rel=rounding), cells
        if not HAS_CUDA:
            assert cells[col["graph ms"]] == "-", "CPU: no graph times unless asked for"
    if not HAS_CUDA:
        assert "L2 flush: a no-op on CPU" in out and "this CPU's measured ceilings" in out


def test_header_says_what_the_bound_flush_and_graph_columns_mean_on_a_gpu():
    """The lines under the ceilings for a CUDA run (built here without a GPU: they only read the config)."""
    gpu = torch.device("cuda")
    suites = registered_suites()
    chosen = [suites["attention"], suites["moe_route"], suites["expert_bias_update"]]
    ceilings = Ceilings(FAKE, l2_bytes=50 * 2**20)
    note = cli._timing_note(gpu, BenchConfig(gpu, None, "quick", None), ceilings, chosen)
    assert "bound ms = max(FLOPs / matmul ceiling in the row's dtype, bytes / copy ceiling)" in note
    assert "L2 flush before each timed call, outside the events: memory-bound rows (100 MiB, twice the 50 MiB L2)" \
        in note
    assert "graph ms = per call" in note and "moe_route, expert_bias_update;" in note and "attention" not in note
    note = cli._timing_note(gpu, BenchConfig(gpu, None, "quick", None, l2_flush=False, cuda_graph=False), ceilings,
                            chosen)
    assert "L2 flush before each timed call, outside the events: off" in note and "graph ms" not in note
    note = cli._timing_note(gpu, BenchConfig(gpu, None, "quick", None, l2_flush=True, cuda_graph=True), ceilings,
                            chosen)
    assert ": every row" in note and "attention, moe_route, expert_bias_update;" in note


def test_cli_cuda_graph_on_cpu_gives_each_row_the_reason(capsys):
    assert main(["expert_bias_update", "--backends", "reference", "--cuda-graph", "--l2-flush", "--device", "cpu",
                 *QUICK]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert rows and all(c[cli.COLUMNS.index("graph ms")] == "n/a[1]" for c in rows)
    assert "graph ms n/a[1]: CUDA graphs need a CUDA device; this run is on cpu" in out


def test_percentages_above_the_ceiling_are_flagged_with_a_footnote(capsys, monkeypatch):
    # ceilings far below anything real: every row is above 100%, and each must say so
    monkeypatch.setattr(bench_device, "_copy_gbps", lambda *a: 1e-9)
    monkeypatch.setattr(bench_device, "_matmul_tflops", lambda *a: 1e-15)
    assert main(["expert_bias_update", "--backends", "reference", *QUICK]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert rows and all(c[cli.COLUMNS.index("%peak")].endswith(cli.OVER_CEILING) for c in rows)
    assert "above 100% of the measured ceiling: the ceilings are estimates" in out
    # the same ceilings make every lower bound far longer than the call: a ratio below 1, flagged the same way
    assert all(c[cli.COLUMNS.index("x bound")].endswith(cli.OVER_CEILING) for c in rows)
    assert "faster than the lower bound from the measured ceilings" in out


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


# ---- on a GPU: the flush kernel stays outside the events, graphs capture or say why -------------------------------


@pytest.mark.gpu
def test_l2_flush_on_cuda_writes_more_than_l2_outside_the_events():
    dev = torch.device("cuda", torch.cuda.current_device())
    flush = l2_flusher(dev)
    buffer = flush.__self__  # the tensor flush() writes
    assert buffer.numel() * buffer.element_size() >= 2 * torch.cuda.get_device_properties(dev).L2_cache_size
    big = torch.empty(2**28, device=dev)  # 1 GiB more per flush: a flush far slower than the timed call

    def slow_flush():
        flush()
        big.mul_(1.0001)

    def make():
        return torch.randn(4096, device=dev)

    flushed = time_fn(lambda x: x.add_(1), make, device=dev, warmup_ms=2, rep_ms=10, flush=slow_flush)
    flush_alone = time_fn(lambda _: slow_flush(), make, device=dev, warmup_ms=2, rep_ms=10)
    assert flushed.flushed and flushed.median_ms < flush_alone.median_ms / 5, (flushed, flush_alone)


@pytest.mark.gpu
def test_cuda_graph_capture_replays_or_falls_back_with_the_reason():
    dev = torch.device("cuda", torch.cuda.current_device())

    def make():
        return torch.randn(1 << 16, device=dev)

    def add(x):
        return x + 1

    g = time_graph(add, make, device=dev, calls=10, rep_ms=5)
    launch = time_fn(add, make, device=dev, warmup_ms=2, rep_ms=5)
    assert g.calls_per_rep == 10 and 0 < g.p20_ms <= g.median_ms <= g.p80_ms
    assert g.median_ms < 2 * launch.median_ms, "replayed calls have no launch gaps to add"

    stream = torch.cuda.current_stream(dev)
    with pytest.raises(GraphUnavailable, match="capture failed"):
        time_graph(lambda x: (x + 1).sum().item(), make, device=dev, calls=4, rep_ms=5)  # syncs with the host
    assert torch.cuda.current_stream(dev) == stream and not torch.cuda.is_current_stream_capturing()
    assert time_fn(add, make, device=dev, warmup_ms=1, rep_ms=2).median_ms > 0, "the device goes on working"
    with pytest.raises(GraphUnavailable, match="no (measurable )?device work"):
        time_graph(lambda x: None, make, device=dev, calls=4, rep_ms=5)  # host work only


@pytest.mark.gpu
def test_microsecond_suite_on_cuda_has_both_times_and_flushes_memory_bound_rows():
    suite = registered_suites()["expert_bias_update"]
    config = BenchConfig(torch.device("cuda"), None, "quick", None)
    rows = run_cases(suite, suite.build(config), config, warmup_ms=2, rep_ms=5)
    for r in rows:
        assert r.lower_bound_ms > 0 and r.l2_flush == (r.limit == "memory"), r
        if r.provider == "torch-host-sync":  # copies to the host every call: cannot be captured
            assert r.graph_ms is None and r.graph_note.startswith("capture failed"), r
        elif r.provider == "mmkernels[cuda]":  # one kernel, no host sync
            assert r.graph_ms > 0 and "calls per graph" in r.graph_note, r
            assert r.graph_ratio_to_bound == pytest.approx(r.graph_ms / r.lower_bound_ms)


def test_half_precision_bound_uses_the_faster_fp32_ceiling():
    """A CPU without native bf16 matmuls: code that upcasts (SDPA's math path) runs at the fp32 rate, so the bf16
    row's bound and %peak use fp32's ceiling; a device where bf16 is faster keeps bf16's."""
    from mmkernels.bench.device import Ceilings

    slow_bf16 = Ceilings(gbps=10.0, tflops_by_dtype={"float32": 0.1, "bfloat16": 0.001})
    assert slow_bf16.peak_tflops(torch.bfloat16) == 0.1 and slow_bf16.peak_tflops(torch.float32) == 0.1
    ms, limit = slow_bf16.lower_bound(1e9, 1.0, torch.bfloat16)
    assert limit == "compute" and ms == pytest.approx(1e9 / 0.1e12 * 1e3)
    fast_bf16 = Ceilings(gbps=10.0, tflops_by_dtype={"float32": 50.0, "bfloat16": 900.0})
    assert fast_bf16.peak_tflops(torch.bfloat16) == 900.0 and fast_bf16.peak_tflops("float32") == 50.0
    assert Ceilings(gbps=1.0, tflops_by_dtype={"float32": 1.0}).peak_tflops(torch.float16) is None  # no fp16 matmul
