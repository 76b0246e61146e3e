"""``mmkernels-bench``: time mmkernels ops against what you would otherwise run, on this machine's device.

Examples:
  mmkernels-bench --quick                 every op, small shapes, whatever device is here (seconds)
  mmkernels-bench list                    the ops that have benchmarks, and their presets
  mmkernels-bench expert_bias_update --shapes default --out results/ --plot
  mmkernels-bench all --backends cuda triton --dtype bf16
  mmkernels-bench attention patch_embed --out results/
  mmkernels-bench tune all --budget 90      tune the Triton kernels' configs for this card (tune --help)
  mmkernels-bench hf --model clip           a Hugging Face model patched vs unpatched (hf --help)

Each row names the device; "speedup" is the baseline's median time over the row's, measured in the same run;
"%peak" divides by ceilings measured here (a value above 100 is marked * and explained under the table);
"bound ms" is the least time those ceilings allow (max of FLOPs / matmul rate and bytes / copy rate) and "x bound"
the median over it; "graph ms" (--cuda-graph; default for microsecond ops on CUDA) is the per-call time replayed
from a CUDA graph. An L2 flush precedes each timed call of memory-bound rows on CUDA (--l2-flush / --no-l2-flush).
--shapes default is sized for the device: on a CPU each op's CPU-sized shapes (a line says which); --shapes full
runs the GPU-sized default shapes anywhere. Progress: a rich bar on a terminal, one line per provider otherwise.
Exit status: 0 done, 1 a case failed, 2 a usage error (one line; checked before anything is timed: an unknown op,
device or preset, `list` with op names, a --backends entry that cannot run here, an --out that is empty or cannot
be written or holds a results.json/results.csv/plot that is not a regular file (a FIFO or device is never opened),
--plot without an importable matplotlib, a time outside 0 ms...1 hour, a bad MMKERNELS_* environment variable).
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

import torch

from .. import BACKENDS
from .._backends import backend_unavailable_reason
from . import _args
from .results import RESULTS, Row, run_metadata, write_results
from .runner import run_cases
from .suite import BenchConfig, has_module, registered_suites

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the line says what is wrong and how to find help
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mmkernels-bench",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("targets", nargs="*", metavar="OP",
                   help="op names (see `list`), `all`, or `list`; default with --quick: all")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing: a whole run in seconds")
    p.add_argument("--shapes", default=None,
                   help="shape preset: quick; default (sized for the device: on a CPU each op's CPU-sized shapes); "
                        "full (the GPU-sized default shapes on any device); gpu (the GPU suite's budgeted subset; "
                        "ops without one use default); some ops have more, see `list`")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="input dtype (default: each op's own)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="time exactly these mmkernels backends (baselines always run); one that cannot run here "
                        "is an error")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="write results.json and results.csv (and plots) to this folder")
    p.add_argument("--plot", action="store_true", help="also save speed-up plots (needs matplotlib; with --out)")
    p.add_argument("--warmup-ms", type=_args.milliseconds, default=None,
                   help="warm-up time per provider (default 25, quick 5)")
    p.add_argument("--rep-ms", type=_args.milliseconds, default=None,
                   help="timed time per provider (default 100, quick 20)")
    p.add_argument("--l2-flush", action=argparse.BooleanOptionalAction, default=None,
                   help="write a buffer twice the GPU's L2 size before every timed call, outside the timed region "
                        "(default: memory-bound rows only; a no-op on CPUs)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="also time calls replayed from a CUDA graph (the 'graph ms' column; default: the "
                        "microsecond ops, moe_route and expert_bias_update; CUDA only)")
    return p


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


COLUMNS = ("op", "case", "mode", "provider", "median ms", "p20-p80 ms", "graph ms", "TFLOP/s", "GB/s", "%peak",
           "bound ms", "limit", "x bound", "mem MB", "speedup")
OVER_CEILING = "*"  # marks a %peak above 100: explained by the footnote under the table


def _pct_cell(r: Row) -> str:
    pct = max((x for x in (r.pct_peak_tflops, r.pct_peak_gbps) if x is not None), default=None)
    if pct is None:
        return "-"
    if pct > 100:
        return f"{pct:.0f}{OVER_CEILING}"
    return f"{pct:.0f}" if pct >= 10 else f"{pct:.2g}"


def _bound_cell(r: Row) -> str:
    """Median over the lower bound; below 1 (faster than the estimated ceilings allow) marked like a %peak over 100."""
    if r.ratio_to_bound is None:
        return "-"
    if r.ratio_to_bound < 1:
        return f"{r.ratio_to_bound:.2f}{OVER_CEILING}"
    return f"{r.ratio_to_bound:.0f}x" if r.ratio_to_bound >= 100 else f"{r.ratio_to_bound:.3g}x"


def _graph_notes(rows: Sequence[Row]) -> dict[str, int]:
    """Footnote numbers for the reasons rows have no graph time (one per distinct reason)."""
    notes: dict[str, int] = {}
    for r in rows:
        if r.graph_ms is None and r.graph_note and r.graph_note not in notes:
            notes[r.graph_note] = len(notes) + 1
    return notes


def _graph_cell(r: Row, notes: dict[str, int]) -> str:
    if r.graph_ms is not None:
        return f"{r.graph_ms:.4f}"
    return f"n/a[{notes[r.graph_note]}]" if r.graph_note in notes else "-"


def _cells(r: Row, notes: dict[str, int] | None = None) -> list[str]:
    return [
        r.op, r.case, r.mode, r.provider, _fmt(r.median_ms, ".4f"), f"{r.p20_ms:.4f}-{r.p80_ms:.4f}",
        _graph_cell(r, notes or {}), _fmt(r.tflops, ".3g"), _fmt(r.gbps, ".3g"), _pct_cell(r),
        _fmt(r.lower_bound_ms, ".3g"), {"memory": "mem", "compute": "flops"}.get(r.limit, "-"), _bound_cell(r),
        _fmt(r.peak_mem_mb, ".1f"), _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
    ]


def _print_table(rows: Sequence[Row], title: str, ceilings: dict) -> None:
    notes = _graph_notes(rows)
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        cells = [list(COLUMNS)] + [_cells(r, notes) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        print(title)
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
    else:
        table = Table(title=title, show_lines=False)
        for col in COLUMNS:
            table.add_column(col, justify="right" if col not in ("op", "case", "mode", "provider") else "left")
        for r in rows:
            table.add_row(*(Text(c) for c in _cells(r, notes)))  # Text: no markup parsing of 'mmkernels[cpp]'
        Console(width=240).print(table)
    if any(_pct_cell(r).endswith(OVER_CEILING) for r in rows):
        print(f"{OVER_CEILING} above 100% of the measured ceiling: the ceilings are estimates ({ceilings['method']}); "
              "data that stays in cache, or work the analytic count leaves out, can beat them. Read such a row as "
              "at the ceiling, not past it.")
    if any(_bound_cell(r).endswith(OVER_CEILING) for r in rows):
        print(f"{OVER_CEILING} in 'x bound': faster than the lower bound from the measured ceilings, which are "
              "estimates (cache-resident data, or work the analytic count leaves out); read it as at the limit.")
    for note, k in notes.items():
        providers = ", ".join(dict.fromkeys(f"{r.op} {r.provider}" for r in rows if r.graph_note == note))
        print(f"graph ms n/a[{k}]: {note} ({providers}); their median is launch-inclusive only")


class _Progress:
    """Progress of a run: a rich progress bar (case count, elapsed time, the case and provider running now) when
    stderr is a terminal and rich is installed; otherwise one line on stderr as each provider starts, so a log shows
    where a long run is (rich draws nothing into a file until it ends)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._rich = None
        self._start = time.monotonic()
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), transient=True, console=Console(stderr=True))
            except ImportError:
                pass
        self._done = 0
        self._case = ""

    def __enter__(self):
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("benchmarking", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def case(self, label: str) -> None:
        """A case starts (``label``: op, shape, mode)."""
        self._case = label

    def provider(self, name: str) -> None:
        """One provider of the current case starts: its warm-up and timed calls follow."""
        label = f"{self._case}: {name}"
        if self._rich is not None:
            self._rich.update(self._task, description=label)
        else:
            print(f"[{self._done + 1}/{self.total} {time.monotonic() - self._start:.0f}s] {label}", file=sys.stderr,
                  flush=True)

    def advance(self) -> None:
        self._done += 1
        if self._rich is not None:
            self._rich.update(self._task, advance=1)


def _usage_error(message: str):
    _parser().error(message)


def _device(text: str | None) -> torch.device:
    try:
        return _args.device(text)
    except _args.UsageError as exc:
        _usage_error(str(exc))


def _check_out(out: str, files: Sequence[str]) -> None:
    """--out must be a folder we can write in (created if missing) and each file the run writes there a regular file
    or a new one (never a FIFO, device, socket or folder), checked before anything is timed."""
    try:
        _args.out_dir(out, files=files)
    except _args.UsageError as exc:
        _usage_error(str(exc))


def _check_backends(requested: Sequence[str], device: torch.device, plan, named: bool) -> str | None:
    """Refuse requested backends that cannot run (exit 2 before timing); returns a note for ops that lack one."""
    for b in requested:
        reason = backend_unavailable_reason(b, device)
        if reason is not None:
            if b in ("cuda", "triton") and not torch.cuda.is_available() and "CUDA device" not in reason:
                reason += "; there is no CUDA device here"
            _usage_error(f"--backends {b} cannot run on {device}: {reason}")
    lacking = []
    for s, config in plan:
        for b in requested:
            problem = s.backend_problem(b, config)
            if problem is not None and (named or b in s.implemented()):
                _usage_error(f"--backends {b}: {problem}")
        if not any(b in s.implemented() for b in requested):
            lacking.append(s.name)
    if lacking:
        return (f"note: {', '.join(lacking)} implement none of --backends {' '.join(requested)}: their rows are "
                "baselines only")
    return None


FULL = "full"  # --shapes full: each op's default (GPU-sized) shapes on any device
CPU_DEFAULT = "cpu"  # the preset a suite may declare for --shapes default on a CPU (else its quick shapes)
# presets sized for a GPU: on a CPU they run, but the run says so first
GPU_SIZED = ("default", FULL, "gpu", "sweep", "vision", "varlen", "mla")


def _suite_preset(suite, preset: str, device: torch.device) -> str:
    """The suite's own preset for the ``--shapes`` value on ``device``.

    ``default`` fits the device: on a CUDA device the suite's default shapes (the ones the docs quote), on a CPU its
    ``cpu`` preset where it has one, else its ``quick`` shapes (timed with the default warm-up and repetitions):
    the GPU-sized defaults take minutes to hours per op on a CPU and many GB of memory. ``full`` is the default
    shapes on any device; ``gpu`` (the GPU suite's budgeted subset) falls back to ``default`` for ops without one."""
    if preset == "default" and device.type == "cpu":
        return CPU_DEFAULT if CPU_DEFAULT in suite.presets else "quick"
    if preset == FULL or (preset == "gpu" and "gpu" not in suite.presets):
        return "default"
    return preset


def _preset_note(preset: str, device: torch.device, plan) -> str | None:
    """One line saying what a preset means on this device, where that is not what its name says."""
    if device.type != "cpu":
        return None
    if preset == "default":
        picked = ", ".join(f"{s.name}: {c.preset}" for s, c in plan)
        return (f"on a CPU, --shapes default runs CPU-sized shapes ({picked}) with the default timing; "
                f"--shapes {FULL} times the GPU-sized default shapes here anyway (minutes to hours per op)")
    if preset in GPU_SIZED:
        return (f"note: --shapes {preset} is sized for a GPU: on this CPU expect minutes per case and several GB of "
                "memory (--shapes default picks CPU-sized shapes)")
    return None


def _cpu_note(plan_cases, device: torch.device) -> str:
    """One line saying what a CPU run times: our C++ kernels, our references, and not the Triton kernels."""
    from .._backends import registered_ops
    from .._extension import extension_status

    cpp, ref, ref_rows, triton, interpreted = [], [], {}, [], []
    for s, cases in plan_cases:
        names = {p for c in cases for p in c.providers if p.startswith("mmkernels")}
        for p in sorted(names):
            auto = "[" not in p  # a model suite's automatic choice per op
            if p.endswith("[reference]") or (auto and all(
                    registered_ops()[op].select(device)[0] == "reference" for op in s.ops)):
                ref.append(s.name)
                ref_rows[p if s.model else "mmkernels[reference]"] = None
        if "mmkernels[cpp]" in names:
            cpp.append(s.name)
        if any(p.endswith("[triton]") for p in names):
            interpreted.append(s.name)
        if s.model:  # the model's Triton kernels are those of its ops
            triton += [op.rstrip("_") for op in s.ops if "triton" in registered_ops()[op].impls]
        elif "triton" in s.implemented():
            triton.append(s.name)
    head = "no GPU here" if not torch.cuda.is_available() else "CPU run (--device cpu)"
    parts = []
    if cpp:
        parts.append(f"mmkernels[cpp] rows time our C++ CPU kernels ({', '.join(cpp)})")
    elif not extension_status().loaded:
        parts.append(f"our C++ CPU kernels are not timed: {extension_status().reason}")
    if ref:
        parts.append(f"{', '.join(ref_rows)} rows run our plain-PyTorch references ({', '.join(dict.fromkeys(ref))})")
    if triton:
        timed = f"; the {', '.join(interpreted)} [triton] rows time the interpreter, not the kernels" if interpreted \
            else ""
        parts.append(f"the Triton kernels ({', '.join(dict.fromkeys(triton))}) are verified for correctness by "
                     "`make test` (it runs them under the Triton interpreter, TRITON_INTERPRET=1) but not timed "
                     f"here{timed}")
    return f"{head}: " + "; ".join(parts) + "."


def _timing_note(device: torch.device, config: BenchConfig, ceilings: dict, suites) -> str:
    """What 'bound ms', the L2 flush and 'graph ms' mean in this run (printed under the ceilings)."""
    from .runner import wants_graph

    where = "this CPU's" if device.type == "cpu" else "these"
    lines = [f"bound ms = max(FLOPs / matmul ceiling in the row's dtype, bytes / copy ceiling), from {where} measured "
             "ceilings; limit = the larger term (mem: intensity at or below the ridge point); x bound = median / bound"]
    if device.type != "cuda":
        lines.append("L2 flush: a no-op on CPU (nothing is flushed; inputs rotate through 4 fresh sets)")
    else:
        which = {None: "memory-bound rows", True: "every row", False: "off"}[config.l2_flush]
        l2 = ceilings.get("l2_bytes")
        size = f"{2 * l2 / 2**20:.0f} MiB, twice the {l2 / 2**20:.0f} MiB L2" if l2 else "256 MiB (L2 size unknown)"
        lines.append(f"L2 flush before each timed call, outside the events: {which} ({size})")
    graphed = [s.name for s in suites if wants_graph(config, s)]
    if device.type != "cuda":
        lines.append("graph ms: CUDA graphs are CUDA only (--cuda-graph on a CPU says so per row)")
    elif graphed:
        lines.append(f"graph ms = per call, from a CUDA graph of many calls replayed (no launch gaps): "
                     f"{', '.join(graphed)}; median ms stays launch-inclusive")
    return "\n".join(lines)


# The flags that only change what is timed or written, as the user spells them: `list` rejects them (it does neither).
_RUN_ONLY_FLAGS = (("out", "--out"), ("plot", "--plot"), ("warmup_ms", "--warmup-ms"), ("rep_ms", "--rep-ms"),
                   ("l2_flush", "--l2-flush/--no-l2-flush"), ("cuda_graph", "--cuda-graph/--no-cuda-graph"),
                   ("backends", "--backends"), ("dtype", "--dtype"), ("shapes", "--shapes"))


def _list_ignores(args: argparse.Namespace) -> list[str]:
    """The run-only flags given to `list` (``--device`` is checked, ``--quick`` changes nothing and is accepted)."""
    given = []
    for attr, flag in _RUN_ONLY_FLAGS:
        value = getattr(args, attr)
        if (value is True) if attr == "plot" else (value is not None):  # --no-l2-flush is False: given, too
            given.append(flag)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Returns the exit status: 0 done, 1 some case failed, 2 a usage error (one line on stderr, nothing
    timed)."""
    try:
        return _main(argv)
    except SystemExit as exc:  # usage errors and --help: their status, no traceback
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        return exc.code or 0


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # every subcommand: a bad MMKERNELS_* variable stops it before any work (one line, exit 2)
        _args.check_env()
    except _args.UsageError as exc:
        prog = "mmkernels-bench" + (f" {argv[0]}" if argv[:1] and argv[0] in ("tune", "ep", "hf") else "")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["tune"]:  # per-device kernel configurations: a CLI of its own (bench/tune.py)
        from .tune import main as tune_main

        return tune_main(argv[1:])
    if argv[:1] == ["ep"]:  # expert parallelism spawns its own worker processes: a CLI of its own
        from ..distributed.bench import main as ep_main

        return ep_main(argv[1:]) or 0
    if argv[:1] == ["hf"]:  # a Hugging Face model patched vs unpatched: a CLI of its own
        from .hf import main as hf_main

        return hf_main(argv[1:]) or 0
    parser = _parser()
    args = parser.parse_args(argv)
    all_suites = registered_suites()
    targets = args.targets or (["all"] if args.quick else [])
    if not targets:
        parser.print_help()
        return 2
    if "list" in targets and targets != ["list"]:
        _usage_error(f"`list` takes no op names (got {' '.join(t for t in targets if t != 'list')}); run "
                     "`mmkernels-bench list` alone")
    if targets == ["list"]:
        _device(args.device)  # flags that make no difference to `list` are still checked, never ignored when wrong
        ignored = _list_ignores(args)
        if ignored:  # `list` writes no files and times nothing: a flag that would do either is a mistake, said so
            _usage_error(f"`list` times nothing and writes no files: {', '.join(ignored)} "
                         f"{'does' if len(ignored) == 1 else 'do'} not apply (run an op to use "
                         f"{'it' if len(ignored) == 1 else 'them'})")
        for name, s in sorted(all_suites.items()):
            print(f"{name:28s} {s.description}  [presets: {', '.join(s.presets)}]")
        return 0
    unknown = [t for t in targets if t != "all" and t not in all_suites]
    if unknown:
        _usage_error(f"unknown op {unknown[0]!r}; `mmkernels-bench list` shows the ops")
    chosen = list(all_suites.values()) if "all" in targets else [all_suites[t] for t in dict.fromkeys(targets)]

    device = _device(args.device)
    preset = args.shapes or ("quick" if args.quick else "default")
    known = {p for s in all_suites.values() for p in s.presets} | {FULL}
    if preset not in known:
        _usage_error(f"--shapes {preset!r}: no such preset (known: {', '.join(sorted(known))}; `list` shows each "
                     "op's)")
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (5.0 if args.quick else 25.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (20.0 if args.quick else 100.0)
    config = BenchConfig(device=device, dtype=DTYPES.get(args.dtype), preset=preset, backends=args.backends,
                         l2_flush=args.l2_flush, cuda_graph=args.cuda_graph)

    plan = []
    for s in chosen:
        suite_preset = _suite_preset(s, preset, device)
        if suite_preset not in s.presets:
            _usage_error(f"--shapes {preset}: {s.name} has no such preset (it has {', '.join(s.presets)})")
        plan.append((s, dataclasses.replace(config, preset=suite_preset)))
    preset_note = _preset_note(preset, device, plan)
    note = _check_backends(args.backends, device, plan, "all" not in targets) if args.backends else None
    if args.plot and args.out is None:
        _usage_error("--plot needs --out DIR")
    if args.plot and not has_module("matplotlib"):
        _usage_error("--plot needs matplotlib: pip install 'mmkernels[bench]'")
    if args.plot:
        problem = _args.matplotlib_problem()
        if problem:
            _usage_error(f"--plot {problem}")
    if args.out is not None:
        from .plot import plot_name

        _check_out(args.out, [f"{RESULTS}.json", f"{RESULTS}.csv"] + ([plot_name(s.name) for s in chosen]
                                                                      if args.plot else []))

    plan_cases = [(s, s.build(c)) for s, c in plan]
    total = sum(len(cases) for _, cases in plan_cases)

    from .device import device_name, measure_ceilings

    print(f"mmkernels-bench on {device_name(device)} ({device}), preset {preset!r}", flush=True)
    if preset_note:
        print(preset_note, flush=True)
    if device.type == "cpu":
        print(_cpu_note(plan_cases, device), flush=True)
    if note:
        print(note, flush=True)
    ceilings = measure_ceilings(device, quick=preset == "quick", dtypes=tuple(s.dtype(config) for s in chosen))
    matmuls = ", ".join(f"{dt} matmul {v:.3g} TFLOP/s" for dt, v in ceilings["tflops_by_dtype"].items())
    print(f"measured ceilings (%peak divides by these; {ceilings['method']}): copy {ceilings['gbps']:.1f} GB/s, "
          f"{matmuls}", flush=True)
    print(_timing_note(device, config, ceilings, chosen), flush=True)
    metadata = run_metadata(device, ceilings)
    rows: list[Row] = []
    failures: list[str] = []
    with _Progress(total) as progress:
        for (s, cases), (_, suite_config) in zip(plan_cases, plan):
            for case in cases:
                progress.case(f"{s.name} {case.name} [{case.mode}]")
                try:
                    rows += run_cases(s, [case], suite_config, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                      on_provider=progress.provider)
                except Exception as exc:  # keep timing the other cases; report and fail at the end
                    failures.append(f"{s.name} {case.name} [{case.mode}]: {type(exc).__name__}: {exc}")
                if args.out is not None:  # after every case, so a run cut short by a time limit keeps what it measured
                    try:
                        write_results(args.out, rows, metadata)
                    except OSError as exc:  # e.g. a FIFO put there during the run: never opened; one line
                        print(f"mmkernels-bench: cannot write results: {exc}", file=sys.stderr, flush=True)
                progress.advance()
    _print_table(rows, f"mmkernels-bench — {device_name(device)}", ceilings)
    if args.out is not None:
        try:
            paths = write_results(args.out, rows, metadata)
            if args.plot:
                from .plot import plot_speedups

                paths += plot_speedups(rows, args.out)
        except OSError as exc:  # exit 1, the reason on one line
            failures.append(f"writing --out {args.out}: {exc}")
        else:
            print("wrote " + ", ".join(str(p) for p in paths))
    for failure in failures:
        print(f"mmkernels-bench: FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
