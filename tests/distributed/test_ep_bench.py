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


def test_bench_usage_errors(capsys):
    assert main(["--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
