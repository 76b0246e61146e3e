"""The expert-parallel benchmark runs end to end on 2 gloo processes and writes a complete results file."""

from __future__ import annotations

import json
import math

import pytest

from mmkernels.distributed.bench import PHASES, main


@pytest.mark.distributed
def test_bench_writes_every_number(tmp_path):
    rc = main(["--nproc", "2", "--out", str(tmp_path), "--preset", "tiny", "--batch", "1", "--seq-len", "16",
               "--iters", "2", "--warmup", "1", "--timeout", "240"])
    assert rc == 0
    report = json.loads((tmp_path / "ep.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["device"]
    for phase in PHASES:
        assert report["phases_sequential_ms"][phase] >= 0
    for key in ("t_sequential_ms", "t_overlapped_ms", "t_comm_ms", "hidden_fraction", "dispatch_gbps",
                "combine_gbps", "row_a2a_hidden_fraction_from_waits"):
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
    assert report["t_comm_ms"] > 0 and report["bytes_sent_off_rank_per_rank"] > 0
    assert (tmp_path / "ep_timeline.png").stat().st_size > 1000
    # One hidden fraction: the median paired saving over the transport time, its spread, and a plotted timeline
    # (the median iteration, slowest rank of each schedule) whose two lengths differ by exactly that saving.
    hf, saved, t_comm = report["hidden_fraction"], report["t_saved_paired_ms"], report["t_comm_ms"]
    assert hf == pytest.approx(saved / t_comm)
    assert report["hidden_fraction_p20"] <= hf <= report["hidden_fraction_p80"]
    lines = report["timeline_median_iteration"]
    ends = {k: 1e3 * lines[k]["marks"][-1][1] for k in ("False", "True")}
    assert ends["False"] - ends["True"] == pytest.approx(saved, abs=1e-6)
    assert lines["False"]["iteration"] == lines["True"]["iteration"] < report["iters"]
    # gloo on one host: the cores the transport keeps busy and the best hidden fraction those cores allow
    assert report["cores"] >= 1 and report["transport_cpu_seconds_all_ranks"] >= 0
    assert report["cpu_seconds_all_ranks_sequential"] > 0
    bound = report["hidden_fraction_cpu_bound"]
    assert isinstance(bound, float) and math.isfinite(bound) and bound >= 0.0


def test_cpu_bound_is_work_conservation():
    """Two ranks whose compute fills both cores, a transport that keeps one core busy: at most half of it hides."""
    from mmkernels.distributed import bench

    # per rank and iteration: 100 ms of compute CPU + 10 ms of transport CPU (gloo threads), t_comm 20 ms wall
    run = {"cpu_total": 0.110, "cpu_comm": 0.010}
    per_rank = [{"runs": {"False": [run], "synced": [run]}}] * 2
    cores = bench.os.cpu_count
    try:
        bench.os.cpu_count = lambda: 2
        r = bench._cpu_bound(per_rank, 1, t_seq=0.120, t_comm=0.020, t_compute=0.100)
    finally:
        bench.os.cpu_count = cores
    assert r["transport_cores_busy"] == pytest.approx(1.0)
    # t_min = max(0.100, 0.220 / 2) = 0.110 -> (0.120 - 0.110) / 0.020
    assert r["hidden_fraction_cpu_bound"] == pytest.approx(0.5)


@pytest.mark.parametrize("argv, flag", [
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "1"], "--nproc"),  # one rank is no expert parallelism (once a KeyError: 'permute')
    (["--nproc", "3"], "--nproc"),  # 3 does not divide the small preset's 16 experts
    (["--preset", "tiny", "--nproc", "16"], "--nproc"),
    (["--preset", "bogus"], "--preset"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-5"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--iters", "0"], "--iters"),
    (["--batch", "0"], "--batch"),  # once "hidden fraction -34.7%"
    (["--seq-len", "0"], "--seq-len"),
    (["--warmup", "-1"], "--warmup"),
    (["--threads", "0"], "--threads"),
    (["--threads", "1000000"], "--threads"),  # once a segfault in hf; capped per CPU everywhere
    (["--timeout", "1e300"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--nproc", "two"], "--nproc"),
    (["--device", "tpu"], "--device"),
    (["--frobnicate"], "--frobnicate"),
])
def test_bench_usage_errors(capsys, tmp_path, monkeypatch, argv, flag):
    """Every bad flag: exit status 2 and one line naming the flag, before any process starts or folder is made."""
    from mmkernels.distributed import launch

    monkeypatch.setattr(launch, "run_local_world", lambda *a, **k: pytest.fail("started processes"))
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err and err.startswith("mmkernels-bench ep:"), err
    assert not out.exists()


def test_bench_out_must_be_a_folder(capsys, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["--out", str(path)]) == 2
    assert "--out" in capsys.readouterr().err


def test_bench_usage_errors_through_the_cli(capsys):
    from mmkernels.bench.cli import main as cli_main

    assert cli_main(["ep", "--nproc", "1"]) == 2
    assert "--nproc" in capsys.readouterr().err


@pytest.mark.parametrize("public", [False, True])
def test_timeline_is_read_from_the_profiler_ranges(monkeypatch, public):
    """The layer's marks come from its record_function ranges (user scopes only, or the public profiler where that
    entry point is missing): a range's start, or its end for the "done" marks."""
    import torch

    from mmkernels.distributed import bench

    if public:
        def refuse(*args, **kwargs):
            raise TypeError("no scopes here")

        monkeypatch.setattr(torch.autograd, "_enable_profiler", refuse)
    with bench._Timeline() as timeline, torch.profiler.record_function("mmkernels.scmoe.layer"):
        with torch.profiler.record_function("mmkernels.scmoe.attn0"):
            torch.ones(4).sum()
        with torch.profiler.record_function("mmkernels.moe.dispatch_wait"):
            torch.ones(4).sum()
    assert (timeline._public is not None) == public
    marks = bench._marks(timeline.spans)
    assert [name for name, _ in marks] == ["attn0", "dispatch_done", "end"]
    times = [t for _, t in marks]
    assert times == sorted(times) and times[-1] > times[0]
