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


def test_bench_usage_errors(capsys):
    assert main(["--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
