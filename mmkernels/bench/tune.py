"""``mmkernels-bench tune``: sweep the Triton kernels' configuration spaces on this card and write its config file.

Examples:
  mmkernels-bench tune all --budget 90              every kernel, at most ~90 s, into the user file
  mmkernels-bench tune attention --out configs/     one op's kernels, into configs/<device>.json
  mmkernels-bench tune all --dry-run                the pruned space per kernel and bucket (no GPU needed)

Per bucket: the hand default runs first (reference output and time); each candidate must agree with it before it
is timed; the fastest is kept when it beats the default by more than 2%. The file is rewritten after every bucket,
so a run cut short keeps what it finished; buckets already in the file are skipped unless --retune.
Exit status: 0 done, 2 a usage error or no GPU to tune on (one line on stderr). See docs/tuning.md.
"""

# The tuning core (kernels/triton/tuning.py) knows no kernel: the spaces come from the kernel modules, the problems
# are declared by the suites (Suite.tune_cases, gathered in tune_cases.py), and :func:`tune` (here) drives
# tuning.sweep over them.

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._backends import registered_ops
from . import _args

MAX_BUDGET_S = 86400.0  # --budget stops at one day
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the dtypes with buckets (fp32: fixed default configs)
_NOT_TUNED = {"fp32": "fp32 is not tuned: no kernel has fp32 buckets (fp32 launches run fixed default configs); "
                      "tune fp16 or bf16"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the main CLI
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _dtype(text: str) -> str:
    if text in _NOT_TUNED:
        raise argparse.ArgumentTypeError(_NOT_TUNED[text])
    return text


def _budget(text: str) -> float:
    value = _args.finite(text)
    if value is None or not 0 < value <= MAX_BUDGET_S:
        raise argparse.ArgumentTypeError(f"must be a finite positive number of seconds, at most {MAX_BUDGET_S:.0f} "
                                         f"(one day), got {text!r}")
    return value


def _parser(ops: Sequence[str], kernels: Sequence[str]) -> argparse.ArgumentParser:
    p = _Parser(prog="mmkernels-bench tune", description=__doc__.split("\n\n", 1)[0],
                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", metavar="OP",
                   help=f"all, an op ({', '.join(ops)}) or a kernel ({', '.join(kernels)})")
    p.add_argument("--budget", type=_budget, default=300.0,
                   help="seconds to spend, compiles included (default 300; a candidate in flight finishes)")
    p.add_argument("--out", default=None,
                   help="the JSON file to write or merge into, or a folder for <device>.json (default: the user "
                        "file, ~/.cache/mmkernels/tuning/<device>.json or $MMKERNELS_TUNING_DIR)")
    p.add_argument("--dtype", nargs="+", type=_dtype, choices=sorted(DTYPES), default=None,
                   help="tune these input dtypes (default: bf16 and fp16; fp32 is not tuned: it runs fixed default "
                        "configs)")
    p.add_argument("--retune", action="store_true", help="tune buckets the file already has, too")
    p.add_argument("--dry-run", action="store_true",
                   help="list the pruned space of every kernel and bucket, time nothing (works without a GPU)")
    p.add_argument("--target", choices=("sm_80", "sm_90"), default=None,
                   help="--dry-run: prune for this target (default: this GPU, else sm_90)")
    p.add_argument("--device", default=None, help="cuda or cuda:N (default: the current CUDA device)")
    return p


def _kernels(targets: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    from ..kernels.triton.tuning import OPS, SPACES

    chosen: list[str] = []
    for t in targets:
        if t == "all":
            chosen += list(SPACES)
        elif t in OPS:
            chosen += OPS[t]
        elif t in SPACES:
            chosen.append(t)
        else:
            why = ("an op with no tunable Triton kernel (no tuning.register space)" if t in registered_ops()
                   else "unknown op or kernel")
            parser.error(f"{why} {t!r}; tunable ops: {', '.join(OPS)}; kernels: {', '.join(SPACES)}")
    return list(dict.fromkeys(chosen))


def _dry_run(kernels: Sequence[str], target, dtypes) -> int:
    from ..kernels.triton.tuning import SPACES, _prune_reason, bucket_key, candidates
    from .tune_cases import cases

    print(f"pruned configuration spaces for {target.name} (shared memory <= {target.shared_per_block} bytes per "
          f"block, <= {target.regs_per_thread} registers per thread; estimates, before any compile)")
    rows = [("kernel", "bucket", "space", "kept", "default kept", "dropped")]
    for kernel in kernels:
        space = SPACES[kernel]
        seen = set()
        for shape in cases(kernel):
            if dtypes is not None and shape["dtype"] not in dtypes:
                continue
            key = bucket_key(kernel, shape)
            if key in seen:
                continue
            seen.add(key)
            default = space.default_params(shape)
            kept, dropped, total = candidates(kernel, shape, target, default)
            reason = _prune_reason(space, default, space.bucket(shape), target)
            why = ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())) or "-"
            rows.append((kernel, key, str(total), str(len(kept)), "yes" if reason is None else f"no ({reason})",
                         why))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    return 0


def _check_flags(args, parser: argparse.ArgumentParser) -> None:
    """What can be checked on any machine, before the GPU check: --device names a CUDA device, --out is a regular
    file, a folder or a new path in a writable folder (a FIFO or device is never opened: it could block or never
    end)."""
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            parser.error(f"--device {args.device!r} is not a device (expected cuda or cuda:N)")
        if device.type != "cuda":
            parser.error(f"--device {args.device}: tuning runs on CUDA devices only")
    if args.out == "":
        parser.error("--out '': an empty path (name a file or a folder)")
    if args.out is not None:
        out = Path(args.out)
        if not out.is_dir() and not args.out.endswith(("/", "\\")) and out.parent.is_dir():
            try:  # a file in an existing folder: the check every writer makes (regular or new, folder writable)
                _args.out_file(args.out, "--out")
            except _args.UsageError as exc:
                parser.error(str(exc))
        if out.exists() and not (out.is_dir() or out.is_file()):
            parser.error(f"--out {args.out}: exists and is neither a regular file nor a folder")
        folder = out if out.is_dir() or args.out.endswith(("/", "\\")) else out.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:  # a real write (os.access says yes to root anywhere, /proc included), removed at once
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            parser.error(f"--out {args.out}: cannot write in {folder} ({exc.strerror or exc})")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tune`` subcommand. Returns the exit status (0 done, 2 usage error or no GPU)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        return exc.code or 0


def _main(argv: list[str]) -> int:
    from .._backends import triton_available

    if not triton_available():
        print("mmkernels-bench tune: triton is not installed: there are no Triton kernels to tune", file=sys.stderr)
        return 2
    from ..kernels.triton import tuning

    parser = _parser(list(tuning.OPS), list(tuning.SPACES))
    args = parser.parse_args(argv)
    kernels = _kernels(args.targets, parser)
    try:
        _args.check_env()
    except _args.UsageError as exc:
        parser.error(str(exc))
    _check_flags(args, parser)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else [torch.bfloat16, torch.float16]
    if args.dry_run:
        if args.target:
            target = {"sm_80": tuning.SM80, "sm_90": tuning.SM90}[args.target]
        else:
            target = tuning.Target.of() if torch.cuda.is_available() else tuning.SM90
        return _dry_run(kernels, target, dtypes)
    if args.target:
        parser.error("--target applies to --dry-run only: a real run tunes for the card it runs on")
    if not torch.cuda.is_available():
        print("mmkernels-bench tune: no CUDA GPU here: tuning times each candidate on the card it tunes for. "
              "`mmkernels-bench tune all --dry-run` lists the pruned spaces on any machine.", file=sys.stderr)
        return 2
    from .._env import triton_interpreting

    if triton_interpreting():
        print("mmkernels-bench tune: TRITON_INTERPRET=1 is set: the interpreter times nothing real; unset it",
              file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda", torch.cuda.current_device())
    except (RuntimeError, ValueError):
        parser.error(f"--device {args.device!r} is not a device")
    if device.type != "cuda":
        parser.error(f"--device {args.device}: tuning runs on CUDA devices only")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    name = tuning.device_name(device)
    out = Path(args.out) if args.out else tuning.user_path(name)
    if out.is_dir() or (args.out and args.out.endswith(("/", "\\"))):
        out = out / f"{tuning.device_slug(name)}.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: cannot create its folder ({exc.strerror or exc})")
    try:  # the device's file, now that its name is known: a regular file or a new one (never a FIFO or device)
        _args.out_file(out, "--out")
    except _args.UsageError as exc:
        parser.error(str(exc))
    torch.cuda.set_device(device)
    print(f"tuning {', '.join(kernels)} on {name} ({device}) for at most ~{args.budget:.0f} s; writing {out}",
          flush=True)
    results = tune(kernels, device=device, budget=args.budget, out=out, name=name, dtypes=dtypes,
                   retune=args.retune, report=lambda line: print(line, flush=True))
    better = sum(r.ms < r.default_ms for _, r in results)
    print(f"tuned {len(results)} bucket(s), {better} faster than the default; wrote {out}")
    return 0


def tune(kernels: Sequence[str], *, device: torch.device, budget: float, out: Path, name: str | None = None,
         dtypes: Sequence[torch.dtype] | None = None, retune: bool = False,
         timer: Callable[[Callable[[], Any]], float] | None = None, small: bool = False,
         report: Callable[[str], None] = print) -> list:
    """Sweep ``kernels`` on ``device`` for at most about ``budget`` seconds, writing ``out`` after every bucket (a run
    cut short keeps what it finished). Buckets (the problems of :mod:`.tune_cases`) go round-robin over the kernels,
    each kernel's most important case first, so a short budget still gives every kernel its main bucket; a bucket's
    share of the time left is the time left over the buckets left. Buckets already in ``out`` are skipped unless
    ``retune``. Each bucket is one ``tuning.sweep`` (timer: ``timer``, default ``do_bench``). Returns the
    ``(kernel, tuning.BucketResult)`` pairs."""
    from ..kernels.triton import tuning
    from .tune_cases import CASES

    name = name or tuning.device_name(device) or "cpu"
    existing = tuning.entries(Path(out)) if Path(out).exists() and not retune else {}
    per_kernel = []
    for kernel in kernels:
        if kernel not in CASES:
            report(f"{kernel}: no tune cases in any suite (Suite.tune_cases): skipped")
            continue
        shapes = [s for s in CASES[kernel]() if dtypes is None or s["dtype"] in dtypes]
        seen, todo = set(), []
        for s in shapes:
            key = tuning.bucket_key(kernel, s)
            if key in seen or key in existing.get(kernel, {}):
                continue
            seen.add(key)
            todo.append(s)
        per_kernel.append([(kernel, s) for s in todo])
    plan = [item for rnd in itertools.zip_longest(*per_kernel) for item in rnd if item is not None]
    if device.type == "cuda" and plan and not hasattr(tuning.SPACES[plan[0][0]].jit, "device_caches"):
        report("note: this Triton keeps no JITFunction.device_caches: spilling candidates are not detected")
    end = time.monotonic() + budget
    results: list = []
    target = tuning.Target.of(device) if device.type == "cuda" else tuning.SM90
    for i, (kernel, shape) in enumerate(plan):
        now = time.monotonic()
        if now >= end:
            report(f"budget spent: {len(plan) - i} bucket(s) left untuned")
            break
        space = tuning.SPACES[kernel]
        share = (end - now) / (len(plan) - i)
        default = space.default_params(shape)
        result = tuning.sweep(space, shape, device, default=default, target=target, deadline=now + share,
                              timer=timer, small=small)
        results.append((kernel, result))
        tuning.save(out, name, [(kernel, result)])
        report(f"{kernel:22s} {result.key:40s} {result.describe()}")
    return results


if __name__ == "__main__":
    sys.exit(main())
