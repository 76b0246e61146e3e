"""Expert-parallel benchmark: per-phase times of the ScMoE layer's MoE branch, logical all-to-all bandwidth, and how
much of the communication the overlapped schedule hides.

``python -m mmkernels.distributed.bench --nproc 2 --out results/ep`` (``mmkernels-bench ep --nproc 2``) starts
``--nproc`` local processes (gloo on CPU; NCCL with one GPU per process when ``--device cuda`` and enough GPUs), each
with torchrun's environment, runs a :class:`mmkernels.models.ScMoEDecoderLayer` forward under ``torch.no_grad()``
with ``overlap=False``, ``overlap=True`` and a calibration run (below), interleaved, ``--iters`` each after
``--warmup``, and writes
``ep.json`` (and ``ep_timeline.png`` when matplotlib is installed) to ``--out``. Every flag is checked before any
process starts (a bad one: one line on stderr, exit status 2).

Measured per rank and iteration from the layer's timeline, read from ``torch.profiler`` (the ``record_function``
ranges ``mmkernels.scmoe.*`` of the layer and ``mmkernels.moe.*`` of the MoE step, user scopes only; nothing in the
model waits for the device to mark a phase, so on CUDA the per-phase numbers are host times, the totals end with a
device sync):

- ``route``: router + ``moe_route``; ``permute``: ``moe_permute``; ``counts``: the count all-to-all and the one host
  copy of the split sizes; ``dispatch``: the row all-to-all (issue to done); ``experts``: local grouped SwiGLU;
  ``combine``: the inverse all-to-all; ``unpermute``: weights and zero-expert term; ``dense``: Attn_0, FFN_0, Attn_1,
  FFN_1 and the norms;
- ``t_comm`` = counts + dispatch + combine of the **calibration run**: the layer's MoE step on its own input with the
  ranks lined up by a barrier right before the count exchange and before the combine (and the device synchronised
  between the steps), so it is the transport's own time. In the
  plain sequential schedule those phases also hold a fast rank waiting for a slow one (load imbalance: no schedule
  can hide it, the slowest rank sets the layer's time either way); that larger number is ``t_comm_with_waits_ms``.
  ``t_compute`` = sequential total - ``t_comm``;
- ``hidden_fraction`` (the one the CLI prints) = ``t_saved_paired / t_comm``: the median over iterations of the paired
  difference ``t_sequential - t_overlapped`` (the schedules alternate; each total is the slowest rank's), over
  ``t_comm`` (the issue's ``(t_comm + t_compute - t_overlapped) / t_comm`` with the paired saving in place of the
  difference of medians, which is ``hidden_fraction_of_medians``); ``hidden_fraction_p20`` / ``_p80``: its spread
  over iterations. ``ep_timeline.png`` draws that median iteration (the slowest rank of each schedule), so the two
  bars differ by exactly ``t_saved_paired``;
- diagnostics, not the layer's saving: ``hidden_fraction_from_waits = 1 - exposed / t_comm`` with ``exposed`` the
  communication the overlapped schedule still waits for (issuing the count exchange, the host blocked for the split
  sizes after FFN_0, and the time blocked in the two row waits: it counts waiting for a slower rank as exposed, so it
  is the conservative measure), and ``row_a2a_hidden_fraction_from_waits`` the same for the two row all-to-alls;
- ``dispatch_gbps`` / ``combine_gbps``: bytes this rank sends to *other* ranks (rows x hidden x element size) per
  second of the calibrated phase ("logical": what the algorithm must move, not what the transport moves);
- gloo on one host only: ``transport_cores_busy`` (process CPU seconds of all ranks, every thread, during the
  calibrated communication, per second of it) and ``hidden_fraction_cpu_bound``, the most any schedule could hide
  when all ranks share the host's cores (work conservation: ``max(t_compute, CPU seconds of all ranks / cores)``).

Totals of an iteration are the slowest rank's (every rank waits for it); phases are medians over iterations of the
mean over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]

PHASES = ("route", "permute", "counts", "dispatch", "experts", "combine", "unpermute", "dense")


_MAX_TIMEOUT_S = 86400.0  # --timeout: one day; beyond that a typo, not a plan

class _UsageError(Exception):
    """A bad flag: one line on stderr, exit status 2, nothing started."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line and status 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmkernels-bench ep", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks); default 2")
    p.add_argument("--out", default="bench-results/ep", help="folder for ep.json and ep_timeline.png")
    p.add_argument("--preset", default="small", help="ScMoEConfig preset (default small)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--iters", type=int, default=120,
                   help="timed iterations per schedule (default 120, about a minute on 2 CPU cores: the saving is a "
                        "few ms on a layer whose time varies by more between iterations, so fewer give noisy "
                        "hidden fractions)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per schedule")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / nproc)")
    p.add_argument("--timeout", type=float, default=600.0, help="kill the workers after this many seconds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _validate(args) -> None:
    """Every flag checked before any process starts (raises :class:`_UsageError` with a one-line message)."""
    import math

    from ..models.scmoe import SCMOE_PRESETS

    if args.preset not in SCMOE_PRESETS:
        raise _UsageError(f"--preset must be one of {', '.join(sorted(SCMOE_PRESETS))}, got {args.preset!r}")
    if args.nproc < 2:
        raise _UsageError(f"--nproc must be >= 2 (expert parallelism shards the experts over the ranks), got "
                          f"{args.nproc}")
    n = SCMOE_PRESETS[args.preset].num_ffn_experts
    if n % args.nproc:
        raise _UsageError(f"--nproc must divide the {n} FFN experts of preset {args.preset!r}, got {args.nproc}")
    for flag, value, low in (("--batch", args.batch, 1), ("--seq-len", args.seq_len, 1), ("--iters", args.iters, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise _UsageError(f"{flag} must be >= {low}, got {value}")
    from ..bench import _args

    max_threads = _args.MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
    if args.threads is not None and not 1 <= args.threads <= max_threads:
        raise _UsageError(f"--threads must be in 1...{max_threads} ({_args.MAX_THREADS_PER_CPU} per CPU of this "
                          f"machine), got {args.threads}")
    if not math.isfinite(args.timeout) or not 0 < args.timeout <= _MAX_TIMEOUT_S:
        raise _UsageError(f"--timeout must be a number of seconds in (0, {_MAX_TIMEOUT_S:.0f}] (one day), got "
                          f"{args.timeout}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise _UsageError(f"--out must be a folder, {args.out!r} is a file")

    try:  # the folder, and ep.json / ep_timeline.png in it: regular or new files (a FIFO there would hang rank 0)
        _args.out_dir(args.out, files=("ep.json", "ep_timeline.png"))
    except _args.UsageError as exc:
        raise _UsageError(str(exc)) from None
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.nproc:
            raise _UsageError(f"--device cuda needs {args.nproc} GPUs (one per rank), found "
                              f"{torch.cuda.device_count()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with the hidden ``--worker`` flag, one rank of it). Returns the exit status: 0 done,
    1 a rank failed, 2 a usage error (one line on stderr, nothing started)."""
    try:
        args = _parser().parse_args(argv)
        if not args.worker:
            _validate(args)
            os.makedirs(args.out, exist_ok=True)
    except (_UsageError, OSError) as err:
        print(f"mmkernels-bench ep: {err}", file=sys.stderr)
        return 2
    if args.worker:
        return _worker(args)
    from .launch import run_local_world

    cmd = [sys.executable, "-m", "mmkernels.distributed.bench", "--worker", *(argv if argv is not None else
                                                                              sys.argv[1:])]
    results = run_local_world(cmd, args.nproc, timeout=args.timeout)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        for r in failed:
            print(f"--- rank {r.rank} exited with {r.returncode} ---\n{r.output[-4000:]}", file=sys.stderr)
        return 1
    path = os.path.join(args.out, "ep.json")
    with open(path) as f:
        report = json.load(f)
    _print_summary(report)
    png = _plot_timeline(report, os.path.join(args.out, "ep_timeline.png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


# ---- one rank -----------------------------------------------------------------------------------------------------


# The layer's timeline is read from the torch.profiler ranges its modules open (``record_function``; no hook, no
# device sync): ``mmkernels.scmoe.*`` in ScMoEDecoderLayer, ``mmkernels.moe.*`` in the MoE step. A mark is the start
# of a range, or the end of one where the old point marks sat at the end of a step.
_STARTS = {
    "attn0": "scmoe.attn0", "moe_dispatch": "scmoe.moe_dispatch", "route": "moe.route", "permute": "moe.permute",
    "counts": "moe.counts", "counts_wait": "moe.counts_wait", "dispatch_issue": "moe.dispatch_issue",
    "ffn0": "scmoe.ffn0", "send_rows": "scmoe.send_rows", "attn1_proj": "scmoe.attn1_proj", "attn1": "scmoe.attn1",
    "wait_dispatch": "scmoe.wait_dispatch", "experts": "moe.experts", "combine_issue": "moe.combine_issue",
    "wait_combine": "scmoe.wait_combine", "combine_done": "moe.unpermute", "ffn1": "scmoe.ffn1",
}
_ENDS = {"dispatch_done": "moe.dispatch_wait", "unpermute_done": "moe.unpermute", "end": "scmoe.layer"}


class _Timeline:
    """``with _Timeline() as t: layer(x)`` records the ``record_function`` ranges opened inside, as ``t.spans``
    ``[(name, start_s, end_s)]``. torch's profiler restricted to user scopes (``RecordScope.USER_SCOPE``): the ranges
    only, not every aten op, so profiling adds about 1% to the layer instead of about 20%; where that private entry
    point is missing, the public ``torch.profiler.profile`` (every op recorded)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self._public = None

    def __enter__(self) -> _Timeline:
        import torch

        try:
            from torch._C._profiler import RecordScope, _ExperimentalConfig
            from torch.autograd import (
                ProfilerActivity,
                ProfilerConfig,
                ProfilerState,
                _enable_profiler,
                _prepare_profiler,
            )

            config = ProfilerConfig(ProfilerState.KINETO, False, False, False, False, False, _ExperimentalConfig())
            _prepare_profiler(config, {ProfilerActivity.CPU})
            _enable_profiler(config, {ProfilerActivity.CPU}, {RecordScope.USER_SCOPE})
        except (ImportError, AttributeError, TypeError, RuntimeError):
            self._public = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._public.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._public is not None:
            self._public.__exit__(*exc)
            self.spans = [(e.name, e.time_range.start * 1e-6, e.time_range.end * 1e-6) for e in self._public.events()]
            return
        from torch.autograd import _disable_profiler

        result = _disable_profiler()
        self.spans = [(e.name(), e.start_ns() * 1e-9, e.end_ns() * 1e-9) for e in result.events()]


def _marks(spans: list[tuple[str, float, float]]) -> list[tuple[str, float]]:
    """The phase marks of one profiled forward, ``[(name, seconds)]`` in time order, from its ``mmkernels.*`` ranges
    (the first occurrence of each; a range the schedule did not open gives no mark)."""
    first: dict[str, tuple[float, float]] = {}
    for name, start, end in sorted(spans, key=lambda span: span[1]):
        if name.startswith("mmkernels.") and name[len("mmkernels."):] not in first:
            first[name[len("mmkernels."):]] = (start, end)
    at = {mark: first[r][0] for mark, r in _STARTS.items() if r in first}
    at |= {mark: first[r][1] for mark, r in _ENDS.items() if r in first}
    return sorted(at.items(), key=lambda item: item[1])


def _calibrate(layer, u, sync, barrier) -> dict[str, float]:
    """The transport's own time: the MoE step of the layer on its input ``u``, with the ranks lined up (a barrier)
    right before the count exchange and before the combine, and the device synchronised between the steps. Wall
    seconds of ``counts`` (exchange issued -> rows issued), ``dispatch`` (rows issued -> arrived) and ``combine``
    (issued -> arrived, before the weights are applied), and the process CPU seconds (every thread: gloo's transport
    threads too) spent in them (``cpu_comm``)."""
    import torch

    mlp = layer.mlp
    dispatcher = mlp.dispatcher
    with torch.no_grad():
        routed = mlp._route_tokens(u, None)
        plan = dispatcher._plan(mlp, routed)
        sync()
        barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        handle = dispatcher._exchange(mlp, routed, plan).send()
        sync()
        t1 = time.perf_counter()
        dispatched = handle.wait()
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        out = mlp.run_experts(dispatched)
        sync()
        barrier()
        t3, c3 = time.perf_counter(), time.process_time()
        combine = mlp.combine(out, dispatched)
        combine._work.wait()  # the rows are home; the weights are applied in wait() below
        sync()
        t4, c4 = time.perf_counter(), time.process_time()
        combine.wait()
    p = {"counts": t1 - t0, "dispatch": t2 - t1, "combine": t4 - t3, "cpu_comm": (c2 - c0) + (c4 - c3)}
    p["t_comm"] = p["counts"] + p["dispatch"] + p["combine"]
    return p


def _phases(marks: list[tuple[str, float]], overlap: bool) -> dict[str, float]:
    at = {name: t for name, t in marks}  # each mark occurs once per forward
    total = at["end"] - at["attn0"]
    p = {
        "total": total,
        "route": at["permute"] - at["route"],
        "permute": at["counts"] - at["permute"],
        "experts": at["combine_issue"] - at["experts"],
        "unpermute": at["unpermute_done"] - at["combine_done"],
    }
    if not overlap:
        # Mark order: attn0 moe_dispatch route permute counts wait_dispatch counts_wait dispatch_issue dispatch_done
        # ffn0 attn1_proj attn1 experts combine_issue wait_combine combine_done unpermute_done ffn1 end.
        p["counts"] = at["dispatch_issue"] - at["counts"]
        p["dispatch"] = at["dispatch_done"] - at["dispatch_issue"]
        p["combine"] = at["combine_done"] - at["combine_issue"]
        p["dense"] = (at["moe_dispatch"] - at["attn0"]) + (at["experts"] - at["ffn0"]) + (at["end"] - at["ffn1"])
        p["t_comm"] = p["counts"] + p["dispatch"] + p["combine"]
    else:
        # Mark order: attn0 moe_dispatch route permute counts ffn0 send_rows counts_wait dispatch_issue attn1_proj
        # attn1 wait_dispatch dispatch_done experts combine_issue ffn1 wait_combine combine_done unpermute_done end.
        # Exposed: issuing the count exchange, the host blocked for the split sizes, and the two waits for rows.
        p["counts_issue"] = at["ffn0"] - at["counts"]
        p["exposed_counts_wait"] = at["dispatch_issue"] - at["counts_wait"]
        p["exposed_dispatch_wait"] = at["dispatch_done"] - at["wait_dispatch"]
        p["exposed_combine_wait"] = at["combine_done"] - at["wait_combine"]
        p["exposed_comm"] = (p["counts_issue"] + p["exposed_counts_wait"] + p["exposed_dispatch_wait"]
                             + p["exposed_combine_wait"])
    return p


def _worker(args) -> int:
    import torch
    import torch.distributed as dist

    from ..models import ScMoEConfig, ScMoEDecoderLayer

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, cores // world))
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        backend = "nccl"

        def sync():
            torch.cuda.synchronize()
    else:
        device, backend = torch.device("cpu"), "gloo"

        def sync():
            return None
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(60.0, args.timeout / 2)),
                            device_id=device if args.device == "cuda" else None)
    try:
        cfg = ScMoEConfig.preset(args.preset)
        torch.manual_seed(0)
        layer = ScMoEDecoderLayer(cfg, device=device).eval()
        with torch.no_grad():  # a router that spreads tokens over the experts like a trained one
            layer.mlp.router.weight.normal_(0.0, 0.02 * cfg.hidden_size ** 0.5)
        g = torch.Generator(device="cpu").manual_seed(1000 + rank)
        x = torch.randn(args.batch, args.seq_len, cfg.hidden_size, generator=g).to(device)
        with torch.no_grad():
            u = layer.post_attention_layernorm[0](x)  # what the MoE sees (eval, no grad: the same every run)
        runs: dict[bool, list[dict]] = {False: [], True: []}
        timelines: dict[bool, list] = {False: [], True: []}
        synced: list[dict] = []
        bytes_out = None
        for i in range(args.warmup + args.iters):
            # sequential, overlapped, then the calibration run: the MoE step with the ranks lined up (a barrier)
            # right before the count exchange and before the combine, so its communication phases are the
            # transport's own time, not a rank waiting for a slower one (load imbalance, which no schedule can hide).
            for overlap in (False, True):
                layer.overlap = overlap
                dist.barrier()
                cpu0 = time.process_time()
                with torch.no_grad(), _Timeline() as timeline:
                    layer(x)
                    sync()
                cpu1 = time.process_time()
                if i < args.warmup:
                    continue
                marks = _marks(timeline.spans)
                runs[overlap].append(_phases(marks, overlap) | {"cpu_total": cpu1 - cpu0})
                timelines[overlap].append(marks)
            calibration = _calibrate(layer, u, sync, dist.barrier)
            if i >= args.warmup:
                synced.append(calibration)
        # Bytes sent to other ranks by dispatch (the combine sends the same rows back).
        with torch.no_grad():
            u = layer.post_attention_layernorm[0](x)
            d = layer.mlp.dispatch(u).wait()
        off_rank_rows = sum(n for j, n in enumerate(d.send_splits) if j != rank)
        recv_off_rank = sum(n for j, n in enumerate(d.recv_splits) if j != rank)
        elem = torch.empty((), dtype=layer.mlp.experts.w_gate_up.dtype).element_size()
        bytes_out = [off_rank_rows * cfg.hidden_size * elem, recv_off_rank * cfg.hidden_size * elem]
        mine = {"runs": {str(k): v for k, v in runs.items()} | {"synced": synced}, "bytes": bytes_out,
                "timeline": {str(k): v for k, v in timelines.items()}, "rows_sent": d.send_splits}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            report = _report(args, cfg, everyone, device)
            from pathlib import Path

            from ..bench._args import replace_file

            text = json.dumps(report, indent=1)
            replace_file(os.path.join(args.out, "ep.json"), lambda tmp: Path(tmp).write_text(text))
    finally:
        dist.destroy_process_group()
    return 0


def _report(args, cfg, per_rank: list[dict], device) -> dict:
    import torch

    world = len(per_rank)
    iters = len(per_rank[0]["runs"]["False"])

    def median_over_iters(schedule: str, key: str, reduce) -> float:
        return statistics.median(reduce([r["runs"][schedule][i][key] for r in per_rank]) for i in range(iters))

    def mean(xs):
        return sum(xs) / len(xs)

    seq = {k: median_over_iters("False", k, mean) for k in (*PHASES, "t_comm")}
    ovl = {k: median_over_iters("True", k, mean) for k in ("route", "permute", "counts_issue", "experts",
                                                             "unpermute", "exposed_counts_wait",
                                                             "exposed_dispatch_wait", "exposed_combine_wait",
                                                             "exposed_comm")}
    t_seq = median_over_iters("False", "total", max)
    t_ovl = median_over_iters("True", "total", max)
    # The two schedules run alternately: the median of the paired differences is steadier on a busy machine than
    # the difference of the medians.
    pairs = [max(r["runs"]["False"][i]["total"] for r in per_rank)
             - max(r["runs"]["True"][i]["total"] for r in per_rank) for i in range(iters)]
    # The median iteration itself (median_low: a real iteration, so the plotted timeline shows exactly this saving).
    saved = statistics.median_low(pairs)
    median_iter = pairs.index(saved)
    ranked = sorted(pairs)  # nearest-rank p20 / p80: real iterations, p20 <= median_low <= p80
    p20, p80 = ranked[int(0.2 * (iters - 1))], ranked[-1 - int(0.2 * (iters - 1))]
    transport = {k: median_over_iters("synced", k, mean) for k in ("counts", "dispatch", "combine", "t_comm")}
    # The communication time is the transport's, measured with the ranks lined up (the calibration run): the
    # sequential schedule's communication phases also hold a fast rank's wait for a slow one (load imbalance), which
    # no schedule can hide and which would make any overlap look worse than it is.
    t_comm = transport["t_comm"]
    t_compute = t_seq - t_comm
    a2a = transport["dispatch"] + transport["combine"]
    a2a_exposed = ovl["exposed_dispatch_wait"] + ovl["exposed_combine_wait"]
    sent = mean([r["bytes"][0] for r in per_rank])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cpu = {}
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        cpu = _cpu_bound(per_rank, iters, t_seq, t_comm, t_compute)
    return {
        "benchmark": "ep",
        "device": name,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "world_size": world,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": args.preset,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_heads", "num_kv_heads", "dense_intermediate_size",
                                                "num_ffn_experts", "num_zero_experts", "top_k",
                                                "expert_intermediate_size")},
        "tokens_per_rank": args.batch * args.seq_len,
        "iters": iters,
        "unit": "ms",
        "phases_sequential_ms": {k: 1e3 * v for k, v in seq.items()},
        "phases_overlapped_ms": {k: 1e3 * v for k, v in ovl.items()},
        "t_sequential_ms": 1e3 * t_seq,
        "t_overlapped_ms": 1e3 * t_ovl,
        "t_comm_ms": 1e3 * t_comm,
        "transport_phases_ms": {k: 1e3 * v for k, v in transport.items()},
        "t_comm_with_waits_ms": 1e3 * seq["t_comm"],
        "t_compute_ms": 1e3 * t_compute,
        "t_saved_paired_ms": 1e3 * saved,
        "hidden_fraction": saved / t_comm if t_comm > 0 else None,
        "hidden_fraction_p20": p20 / t_comm if t_comm > 0 else None,
        "hidden_fraction_p80": p80 / t_comm if t_comm > 0 else None,
        "hidden_fraction_of_medians": (t_comm + t_compute - t_ovl) / t_comm if t_comm > 0 else None,
        "hidden_fraction_from_waits": 1 - ovl["exposed_comm"] / t_comm if t_comm > 0 else None,
        "row_a2a_hidden_fraction_from_waits": 1 - a2a_exposed / a2a if a2a > 0 else None,
        "saved_over_half_comm": saved / (0.5 * t_comm) if t_comm > 0 else None,
        "bytes_sent_off_rank_per_rank": sent,
        "dispatch_gbps": sent / transport["dispatch"] / 1e9 if transport["dispatch"] > 0 else None,
        "combine_gbps": sent / transport["combine"] / 1e9 if transport["combine"] > 0 else None,
        "rows_sent_per_rank": [r["rows_sent"] for r in per_rank],
        "timeline_median_iteration": _slowest_timelines(per_rank, median_iter),
        **cpu,
    }


def _cpu_bound(per_rank: list[dict], iters: int, t_seq: float, t_comm: float, t_compute: float) -> dict:
    """The best hidden fraction any schedule could reach when every rank shares this machine's cores (gloo on one
    CPU host): a schedule cannot finish before its critical path (``t_compute``) nor before the CPU work of all ranks
    (compute + transport, measured in the sequential schedule) fits on the cores:
    ``t_min = max(t_compute, cpu_all_ranks / cores)``, ``bound = (t_sequential - t_min) / t_comm``. When the ranks'
    compute threads already fill the cores, the transport's copies can only hide in time some core leaves idle."""
    cores = os.cpu_count() or 1
    cpu_all = statistics.median(sum(r["runs"]["False"][i]["cpu_total"] for r in per_rank) for i in range(iters))
    comm_cpu = statistics.median(sum(r["runs"]["synced"][i]["cpu_comm"] for r in per_rank) for i in range(iters))
    t_min = max(t_compute, cpu_all / cores)
    return {
        "cores": cores,
        "cpu_seconds_all_ranks_sequential": cpu_all,
        "transport_cpu_seconds_all_ranks": comm_cpu,
        "transport_cores_busy": comm_cpu / t_comm if t_comm > 0 else None,
        "hidden_fraction_cpu_bound": max(0.0, (t_seq - t_min) / t_comm) if t_comm > 0 else None,
    }


def _slowest_timelines(per_rank: list[dict], i: int) -> dict:
    """Iteration ``i`` of each schedule as the slowest rank lived it (its total is the layer's time in that
    iteration): ``{"False" | "True": {"rank": r, "iteration": i, "marks": [(name, s since its first mark)]}}``.
    With ``i`` the median paired iteration, the two end times differ by exactly ``t_saved_paired_ms``."""
    out = {}
    for key in ("False", "True"):
        rank = max(range(len(per_rank)), key=lambda r: per_rank[r]["runs"][key][i]["total"])
        marks = per_rank[rank]["timeline"][key][i]
        t0 = marks[0][1]
        out[key] = {"rank": rank, "iteration": i, "marks": [(name, t - t0) for name, t in marks]}
    return out


def _print_summary(r: dict) -> None:
    seq = r["phases_sequential_ms"]
    print(f"ep: {r['world_size']} x {r['backend']} on {r['device']}, preset {r['preset']}, "
          f"{r['tokens_per_rank']} tokens/rank, {r['iters']} iters")
    print("  sequential phases (ms): " + ", ".join(f"{k} {seq[k]:.2f}" for k in PHASES))
    print(f"  layer (slowest rank, medians): sequential {r['t_sequential_ms']:.2f} ms, overlapped "
          f"{r['t_overlapped_ms']:.2f} ms; transport t_comm {r['t_comm_ms']:.2f} ms (ranks lined up)")
    hf = r["hidden_fraction"]
    if hf is not None:
        print(f"  hidden fraction {hf:.0%} (p20-p80 {r['hidden_fraction_p20']:.0%} to {r['hidden_fraction_p80']:.0%}):"
              f" the overlapped layer is faster by {r['t_saved_paired_ms']:.2f} ms (median over iterations of "
              f"sequential - overlapped) = that share of t_comm")
    if hf is not None and hf > 1:
        print("  (above 100%: the overlapped layer saved more than the transport's own time, i.e. it also absorbed "
              "rank skew, or the run is noisy: the saving is a few ms on a layer that varies by more; use more "
              "--iters)")
    if r.get("hidden_fraction_cpu_bound") is not None:
        print(f"  the transport keeps {r['transport_cores_busy']:.2f} of {r['cores']} cores busy while it runs: no "
              f"schedule can hide more than {r['hidden_fraction_cpu_bound']:.0%} of it on this machine "
              "(max(t_compute, CPU seconds of all ranks / cores) vs the sequential layer)")
    if r["dispatch_gbps"] is not None:
        print(f"  dispatch {r['dispatch_gbps']:.2f} GB/s, combine {r['combine_gbps']:.2f} GB/s (logical, off-rank)")


def _plot_timeline(report: dict, path: str) -> str | None:
    """The median paired iteration (``timeline_median_iteration``) of each schedule as horizontal bars, from the rank
    that was slowest in it: what the host thread runs, and the all-to-alls in flight. The two bars' lengths differ
    by exactly the reported saving, so the plot and ``hidden_fraction`` agree."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.2), sharex=True)
    colors = {"attn0": "#4c72b0", "attn1_proj": "#4c72b0", "attn1": "#4c72b0", "ffn0": "#55a868", "ffn1": "#55a868",
              "moe_dispatch": "#c44e52", "route": "#c44e52", "permute": "#c44e52", "counts": "#8172b2",
              "counts_wait": "#8172b2", "experts": "#dd8452", "combine_done": "#c44e52", "wait_dispatch": "#bbbbbb",
              "wait_combine": "#bbbbbb"}
    labels = {"counts": "counts", "counts_wait": "sync", "wait_dispatch": "wait", "wait_combine": "wait",
              "combine_done": "unpermute"}
    timelines = report["timeline_median_iteration"]
    for ax, key, title in ((axes[0], "False", "sequential (overlap=False)"), (axes[1], "True", "overlapped")):
        ms = [(n, t * 1e3) for n, t in timelines[key]["marks"]]
        end = ms[-1][1]
        for (name, a), (_, b) in zip(ms, ms[1:]):
            if b > a:  # every segment drawn (unnamed ones, e.g. issuing a send, in light grey): no blank time
                ax.barh(1, b - a, left=a, color=colors.get(name, "#dddddd"), edgecolor="white", linewidth=0.5)
                if b - a > 0.05 * end:
                    ax.text((a + b) / 2, 1, labels.get(name, name), ha="center", va="center", fontsize=7)
        at = dict(ms)
        for label, a, b in (("counts", "counts", "dispatch_issue"),
                            ("dispatch a2a", "dispatch_issue", "dispatch_done"),
                            ("combine a2a", "combine_issue", "combine_done")):
            ax.barh(0, at[b] - at[a], left=at[a], color="#937860", edgecolor="white")
            if at[b] - at[a] > 0.05 * end:  # no label on a bar too short to hold it
                ax.text((at[a] + at[b]) / 2, 0, label, ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks([0, 1], ["in flight", "host"])
        ax.set_title(f"{title}: {end:.1f} ms (rank {timelines[key]['rank']})", fontsize=9, loc="left")
    hf = report["hidden_fraction"]
    axes[1].set_xlabel(f"ms since the layer started (iteration {timelines['True']['iteration']}: the median of the "
                       "paired savings, slowest rank of each schedule)")
    summary = (f"\noverlapped faster by {report['t_saved_paired_ms']:.1f} ms = hidden fraction {hf:.0%} of t_comm "
               f"{report['t_comm_ms']:.1f} ms (p20-p80 {report['hidden_fraction_p20']:.0%} to "
               f"{report['hidden_fraction_p80']:.0%})" if hf is not None else "")
    fig.suptitle(f"ScMoE layer, {report['world_size']} x {report['backend']}, {report['device']}{summary}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
