"""Benchmark rows and their files: JSON (with run metadata), CSV (one row per op/case/provider/device, every field of
:class:`Row` a column)."""

from __future__ import annotations

import csv
import io
import json
import platform
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["RESULTS", "Row", "run_metadata", "write_results"]

RESULTS = "results"  # the default stem of the result files: results.json and results.csv


@dataclass
class Row:
    op: str
    case: str
    mode: str
    provider: str
    device: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    tflops: float | None
    gbps: float | None
    pct_peak_tflops: float | None
    pct_peak_gbps: float | None
    peak_mem_mb: float | None
    speedup: float | None  # baseline median / this median, same case, same run
    baseline: str
    # max(FLOPs / matmul ceiling in this dtype, bytes / copy ceiling), ms: no version can run much faster
    lower_bound_ms: float | None = None
    ratio_to_bound: float | None = None  # median / lower bound (1.0: at the physical limit)
    limit: str | None = None  # "memory" or "compute": the larger term of the bound (intensity below the ridge: memory)
    l2_flush: bool = False  # an L2 flush ran before every timed call (CUDA only: on CPUs the flush is a no-op)
    graph_ms: float | None = None  # per-call median from CUDA-graph replays (no launch gaps); None: not measured
    graph_p20_ms: float | None = None
    graph_p80_ms: float | None = None
    graph_ratio_to_bound: float | None = None  # graph_ms / lower bound: the device time's distance to the limit
    graph_note: str | None = None  # graph mode: calls per replay, or why there is no graph time


def run_metadata(device: torch.device, ceilings: dict) -> dict:
    from .. import __version__
    from .._backends import triton_available
    from .._extension import extension_status
    from .device import device_name

    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "mmkernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "extension_loaded": extension_status().loaded,
        "ceilings": dict(ceilings),
    }


def write_results(out_dir: str | Path, rows: list[Row], metadata: dict, stem: str = RESULTS) -> list[Path]:
    """``<stem>.json`` (metadata and rows) and ``<stem>.csv`` in ``out_dir`` (created if missing), each written to a
    temporary file and moved over the old one (:func:`~mmkernels.bench._args.replace_file`): a FIFO or device there
    is an ``OSError`` naming it, never opened."""
    from ._args import replace_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    text = json.dumps({"metadata": metadata, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    replace_file(json_path, lambda tmp: Path(tmp).write_text(text))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=[fl.name for fl in fields(Row)])
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    csv_path = out / f"{stem}.csv"
    replace_file(csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue(), newline=""))
    return [json_path, csv_path]
