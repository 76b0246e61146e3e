"""``mmkernels-bench``: time mmkernels ops against what you would otherwise run, on this machine's device.

Examples:
  mmkernels-bench --quick                 every op, small shapes, whatever device is here (seconds)
  mmkernels-bench list                    the ops that have benchmarks, and their presets
  mmkernels-bench expert_bias_update --shapes default --out results/ --plot
  mmkernels-bench all --backends cuda triton --dtype bf16
  mmkernels-bench attention patch_embed --out results/

Each row names the device; "speedup" is the baseline's median time over the row's, measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from .. import BACKENDS
from .results import Row, run_metadata, write_results
from .runner import run_cases
from .suite import BenchConfig, registered_suites

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmkernels-bench",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="*", metavar="OP",
                   help="op names (see `list`), `all`, or `list`; default with --quick: all")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing: a whole run in seconds")
    p.add_argument("--shapes", default=None,
                   help="shape preset: quick, default, or gpu (the GPU suite's budgeted subset; ops without one "
                        "use default); some ops have more, see `list`")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="input dtype (default: each op's own)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="only time these mmkernels backends (baselines always run)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="write results.json and results.csv (and plots) to this folder")
    p.add_argument("--plot", action="store_true", help="also save speed-up plots (needs matplotlib; with --out)")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per provider (default 25, quick 5)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed time per provider (default 100, quick 20)")
    return p


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


COLUMNS = ("op", "case", "mode", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "GB/s", "%peak", "mem MB",
           "speedup")


def _cells(r: Row) -> list[str]:
    pct = max((x for x in (r.pct_peak_tflops, r.pct_peak_gbps) if x is not None), default=None)
    return [
        r.op, r.case, r.mode, r.provider, _fmt(r.median_ms, ".4f"), f"{r.p20_ms:.4f}-{r.p80_ms:.4f}",
        _fmt(r.tflops, ".3g"), _fmt(r.gbps, ".3g"), _fmt(pct, ".2g"), _fmt(r.peak_mem_mb, ".1f"),
        _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
    ]


def _print_table(rows: Sequence[Row], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        cells = [list(COLUMNS)] + [_cells(r) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        print(title)
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
        return
    table = Table(title=title, show_lines=False)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col not in ("op", "case", "mode", "provider") else "left")
    for r in rows:
        table.add_row(*(Text(c) for c in _cells(r)))  # Text: no markup parsing of 'mmkernels[cpp]'
    Console(width=200).print(table)


class _Progress:
    """A rich progress bar when rich is installed, one line per case otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._rich = None
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True)
        except ImportError:
            pass
        self._done = 0

    def __enter__(self):
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("benchmarking", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def advance(self, label: str) -> None:
        self._done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1, description=label)
        else:
            print(f"[{self._done}/{self.total}] {label}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    all_suites = registered_suites()
    targets = args.targets or (["all"] if args.quick else [])
    if not targets:
        _parser().print_help()
        return 2
    if targets == ["list"]:
        for name, s in sorted(all_suites.items()):
            print(f"{name:28s} {s.description}  [presets: {', '.join(s.presets)}]")
        return 0
    unknown = [t for t in targets if t != "all" and t not in all_suites]
    if unknown:
        print(f"mmkernels-bench: unknown op {unknown[0]!r}; `mmkernels-bench list` shows the ops", file=sys.stderr)
        return 2
    chosen = list(all_suites.values()) if "all" in targets else [all_suites[t] for t in dict.fromkeys(targets)]

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.shapes or ("quick" if args.quick else "default")
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (5.0 if args.quick else 25.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (20.0 if args.quick else 100.0)
    config = BenchConfig(device=device, dtype=DTYPES.get(args.dtype), preset=preset, backends=args.backends)

    plan = []
    for s in chosen:
        suite_preset = preset if preset in s.presets or preset != "gpu" else "default"  # "gpu": budgeted subset
        if suite_preset not in s.presets:
            print(f"mmkernels-bench: {s.name} has no preset {preset!r} (it has {', '.join(s.presets)})",
                  file=sys.stderr)
            return 2
        plan.append((s, s.build(dataclasses.replace(config, preset=suite_preset))))
    total = sum(len(cases) for _, cases in plan)

    from .device import device_name, measure_ceilings

    print(f"mmkernels-bench on {device_name(device)} ({device}), preset {preset!r}", flush=True)
    ceilings = measure_ceilings(str(device), quick=preset == "quick")
    print(f"measured ceilings: copy {ceilings['gbps']:.1f} GB/s, {ceilings['dtype']} matmul "
          f"{ceilings['tflops']:.2f} TFLOP/s", flush=True)
    metadata = run_metadata(device, ceilings)
    rows: list[Row] = []
    failures: list[str] = []
    with _Progress(total) as progress:
        for s, cases in plan:
            for case in cases:
                try:
                    rows += run_cases(s, [case], config, warmup_ms=warmup_ms, rep_ms=rep_ms)
                except Exception as exc:  # keep timing the other cases; report and fail at the end
                    failures.append(f"{s.name} {case.name} [{case.mode}]: {type(exc).__name__}: {exc}")
                if args.out:  # after every case, so a run cut short by a time limit keeps what it measured
                    write_results(args.out, rows, metadata)
                progress.advance(f"{s.name} {case.name}")
    _print_table(rows, f"mmkernels-bench — {device_name(device)}")
    if args.out:
        paths = write_results(args.out, rows, metadata)
        if args.plot:
            from .plot import plot_speedups

            paths += plot_speedups(rows, args.out)
        print("wrote " + ", ".join(str(p) for p in paths))
    elif args.plot:
        print("mmkernels-bench: --plot needs --out DIR", file=sys.stderr)
    for failure in failures:
        print(f"mmkernels-bench: FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
