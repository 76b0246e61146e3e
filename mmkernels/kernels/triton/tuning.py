"""The tuning core: targets, bucket ladders, search spaces, the per-device JSON files, the lookup at launch and the
sweep of one bucket. It knows no kernel: each kernel module declares its :class:`Space` (parameters, bucket key,
estimates, its hand default, an input maker) next to the kernel and registers it with :func:`register` when it is
imported; ``mmkernels-bench tune`` (``mmkernels/bench/tune.py``, with the representative problems of
``mmkernels/bench/tune_cases.py``) drives :func:`sweep` over those spaces.

How a launcher gets its configuration (:func:`pick`, host-side Python on ints, so it runs unchanged inside
``torch.library.triton_op`` bodies that torch.compile traces, with symbolic sizes turned into guards):

1. on an interpreted :class:`Target` (Triton's CPU interpreter, :func:`target_of`): always the launcher's hand
   default;
2. the configuration recorded for this device name and this *shape bucket* (exact bucket first, else the nearest
   tuned bucket with the same dtype / head dim / flags, like vLLM's nearest-M rule), from, in order: configurations
   tuned in this process, the user file (``$MMKERNELS_TUNING_DIR`` or ``~/.cache/mmkernels/tuning``), the file
   shipped in the package (``kernels/triton/configs/<device>.json``);
3. nothing recorded: the hand default. Only with ``MMKERNELS_AUTOTUNE=1`` does a launch with real CUDA tensors
   (not while tracing, not during CUDA-graph capture) tune a bucket that has no exact entry, once per process, and
   save it to the user file: a training step never pauses to tune unless asked to.

Targets (:class:`Target`: arch name, shared memory and registers, SM count, interpreted or not) are explicit: the
launchers ask :func:`target_of` once per launch and pass the answer to their config functions. :func:`assume_target`
makes every launch see another target (``tests/triton_launches.py`` records the GPU configurations from CPU tensors
with it; tests use it instead of patching module functions).

Files are read only when they are regular files of at most :data:`MAX_FILE_BYTES` (a FIFO, a device such as a link to
``/dev/zero``, or a huge file is never opened for reading past that check). A file that cannot be read (any reason:
not regular, too large, an OS error, not JSON, nested too deeply), has another format, or holds an entry for an
unknown kernel, bucket fields that no longer exist, a malformed bucket (a size that is not a positive integer, an
unknown dtype, whitespace), a parameter the kernel no longer takes, an invalid value (a block larger than the space's
largest), or a *stale* entry (its ``_tuned_for`` stamp names another mmkernels, Triton or torch version, or another
kernel source hash: :func:`tuned_for`), is skipped (that entry or the whole file) at load time with one
:class:`TuningConfigWarning` per file, never an error: the default config then runs. Files are read at the first
lookup, when every kernel module has registered its space (``kernels/triton/__init__.py`` imports them all).

Writers (:func:`save`: ``tune`` after every bucket, ``MMKERNELS_AUTOTUNE=1`` launches) take an inter-process lock
on ``<file>.lock``, re-read the file, merge their entries and replace it atomically: concurrent writers keep every
entry. The environment variables (``MMKERNELS_AUTOTUNE``, ``MMKERNELS_TUNING_DIR``, ``MMKERNELS_TUNING_DEVICE``) are
read through their parsers in ``mmkernels._env``; a bad value raises ``EnvVarError`` naming the variable.

Search spaces (:data:`SPACES`): per kernel, the tunable parameters and their candidate values, pruned *before
anything is timed* by the kernel's estimates against the target (shared memory per block, registers per thread,
blocks wider than the bucket). The estimates are deliberately rough (they count the tiles a program holds, not
Triton's exact layouts; :func:`regs_estimate` and :func:`gemm_estimate` are the shared arithmetic); at tune time the
compiled kernel's real spill count (the driver's local-memory size, what ``ptxas -v`` reports) drops any candidate
that spills, and a candidate that fails to compile or launch is dropped too.

Tuning one bucket (:func:`sweep`): inputs from the space's input maker (or an injected one); the default config is
run first as the reference; each candidate must agree with it (relative error per dtype, no NaN) before it is timed;
the fastest candidate is kept only if it beats the default by more than 2% (else the default is recorded, so the
bucket counts as tuned). Times come from an injectable timer (``triton.testing.do_bench`` median by default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import triton.testing
from torch._subclasses.fake_tensor import is_fake

from ... import __version__, _env
from ..._config import is_batch_invariant

# optional: the inter-process lock uses filelock (a torch dependency) where it is installed, else fcntl.flock
filelock = importlib.import_module("filelock") if importlib.util.find_spec("filelock") else None
fcntl = importlib.import_module("fcntl") if importlib.util.find_spec("fcntl") else None

__all__ = [
    "AUTOTUNE_ENV",
    "CONFIG_DIR",
    "DIM_BUCKETS",
    "FORMAT",
    "INTERPRETER",
    "OPS",
    "SEQ_BUCKETS",
    "SM80",
    "SM90",
    "SPACES",
    "TPE_BUCKETS",
    "BucketResult",
    "Space",
    "Target",
    "TuningConfigWarning",
    "assume_target",
    "bucket",
    "bucket_key",
    "candidates",
    "device_name",
    "device_slug",
    "dtype_token",
    "entries",
    "forced",
    "gemm_estimate",
    "pick",
    "register",
    "regs_estimate",
    "reload",
    "shipped_configs",
    "shipped_path",
    "shrink",
    "sweep",
    "target_of",
    "user_path",
]

log = logging.getLogger(__name__)

FORMAT = 2  # the JSON layout (docs/tuning.md); a file with another "format" is ignored with a warning. 2: per-entry
# "_tuned_for" stamps (format-1 files had none, so nothing said which versions they were tuned for)
MAX_FILE_BYTES = 8 << 20  # a tuning file larger than this is not read (the shipped ones are a few KB)
LOCK_TIMEOUT_S = 60.0  # how long a writer waits for another process's lock on the same file
CONFIG_DIR = Path(__file__).with_name("configs")  # shipped files: <device slug>.json
AUTOTUNE_ENV = "MMKERNELS_AUTOTUNE"  # "1": tune a bucket with no entry on its first launch (off by default)
DEVICE_ENV = "MMKERNELS_TUNING_DEVICE"  # look configs up as if on this device name (checks from another machine)
DIR_ENV = "MMKERNELS_TUNING_DIR"  # the user file's folder (default ~/.cache/mmkernels/tuning)
AUTOTUNE_BUDGET_S = 30.0  # most seconds one autotuned bucket may take (a candidate in flight finishes)
IMPROVEMENT = 0.98  # a candidate replaces the default only when at most 98% of its time (beyond timing noise)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative L2 error vs the default

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TuningConfigWarning(UserWarning):
    """A tuning file or entry was skipped (unreadable, another format, stale): the default config runs instead."""


# ---------------------------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """What a launch runs on: the arch ``name`` (``"sm_90"``), the shared memory one block may use (bytes, the opt-in
    limit), registers, the number of SMs (split-K and split-reduction choices) and whether Triton's CPU interpreter
    runs the kernels (``interpreted``: interpreter-sized configurations, one key split)."""

    name: str
    shared_per_block: int
    regs_per_thread: int = 255
    regs_per_sm: int = 65536
    sm_count: int = 132
    interpreted: bool = False

    @staticmethod
    def of(device: torch.device | None = None) -> Target:
        """The current (or given) CUDA device's limits (read off its properties), or :data:`SM90` without a GPU."""
        if device is None and not torch.cuda.is_available():
            return SM90
        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        known = {8: SM80, 9: SM90}.get(props.major, SM90)
        shared = getattr(props, "shared_memory_per_block_optin", 0) or known.shared_per_block
        regs = getattr(props, "regs_per_multiprocessor", 0) or known.regs_per_sm
        return Target(f"sm_{props.major}{props.minor}", int(shared), 255, int(regs), int(props.multi_processor_count))


SM80 = Target("sm_80", 166912, sm_count=108)  # A100: 163 KB opt-in shared memory per block, 108 SMs
SM90 = Target("sm_90", 232448, sm_count=132)  # H100 / H200: 227 KB, 132 SMs
INTERPRETER = Target("interpreter", SM90.shared_per_block, sm_count=1, interpreted=True)  # TRITON_INTERPRET=1 / CPU

_assumed: Target | None = None  # assume_target's override, for every launch of the process


@contextlib.contextmanager
def assume_target(target: Target | None):
    """Every launch (every thread) sees ``target`` from :func:`target_of` while the context is open (None: the real
    one): how configurations are checked or recorded "as on an H100" from CPU tensors. Not for use while other
    threads launch real kernels."""
    global _assumed
    before, _assumed = _assumed, target
    try:
        yield target
    finally:
        _assumed = before


def target_of(t: torch.Tensor) -> Target:
    """The :class:`Target` of a launch on ``t``: :data:`INTERPRETER` when ``t`` is not a CUDA tensor or
    ``TRITON_INTERPRET=1`` (:func:`mmkernels._env.triton_interpreting`), else the CUDA device's (cached per device);
    :func:`assume_target`'s target when one is set. Reads no tensor data (fake tensors and symbolic shapes are
    fine)."""
    if _assumed is not None:
        return _assumed
    if t.device.type != "cuda" or _env.triton_interpreting():
        return INTERPRETER
    return _cuda_target(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> Target:
    return Target.of(torch.device("cuda", index))


# ---------------------------------------------------------------------------------------------------------------
# estimates (the arithmetic the kernels' estimate functions share)
# ---------------------------------------------------------------------------------------------------------------

REG_OVERHEAD = 40  # registers a program spends on pointers, offsets, masks and loop state, beyond its tiles
# Checked against ptxas (kernels/triton/_spills.compile_stats, sm_90, bf16, 36 attention fwd / dQ / dK-dV configs at
# d 64 and 128): no config these estimates drop compiled without spills; they flag 6 of the 17 that spill (the
# d-128 dK/dV ones); the tune-time spill check catches the rest. Real counts run higher than the estimates (layout
# conversions), so the estimates only ever remove hopeless configs.


def element_size(bucket: Mapping) -> int:
    """Bytes per element of a bucket's ``dtype`` token (4 for fp32, 2 for fp16/bf16)."""
    return 4 if bucket["dtype"] == "fp32" else 2


def regs_estimate(words: float, warps: int) -> int:
    """Registers per thread for ``words`` 32-bit values spread over ``warps`` warps, plus the fixed overhead."""
    return math.ceil(words / (32 * warps)) + REG_OVERHEAD


def gemm_estimate(bm: int, bn: int, bk: int, stages: int, warps: int, es: int, b_tiles: int = 1) -> tuple[int, int]:
    """(shared bytes, registers per thread) of a ``bm x bn`` GEMM tile stepping ``bk`` over ``stages`` stages, with
    ``b_tiles`` B operands (and accumulators) per program."""
    shared = max(1, stages) * (bm * bk + b_tiles * bk * bn) * es
    words = b_tiles * bm * bn + (bm * bk + b_tiles * bk * bn) * es / 4
    return shared, regs_estimate(words, warps)


# ---------------------------------------------------------------------------------------------------------------
# buckets and spaces
# ---------------------------------------------------------------------------------------------------------------

SEQ_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # the last one: "and longer"
DIM_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144)  # GEMM sizes
TPE_BUCKETS = (16, 64, 256, 1024, 4096, 16384)  # tokens (rows) per expert
WARPS = (4, 8)  # the num_warps candidates of every space


def bucket(n, ladder: Sequence[int]) -> int:
    """The first rung ``>= n`` (the top rung for anything larger). Comparisons only: a symbolic size (torch.compile
    with dynamic shapes) becomes guards on the rungs, never an error."""
    for rung in ladder[:-1]:
        if n <= rung:
            return rung
    return ladder[-1]


def shrink(block: int, length) -> int:
    """A looked-up block for a shorter problem: halve while the problem fits in half of it (never under 16, the
    smallest ``tl.dot`` tile). The launchers' own defaults follow the same rule."""
    while block > 16 and length <= block // 2:
        block //= 2
    return block


def dtype_token(shape: Mapping) -> str:
    """A launch shape's ``dtype`` as the bucket keys spell it (``fp32``, ``fp16``, ``bf16``)."""
    dt = shape["dtype"]
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", "")) if isinstance(dt, torch.dtype) else str(dt)


@dataclasses.dataclass(frozen=True, eq=False)
class Space:
    """One kernel's search space, declared next to the kernel and registered with :func:`register`.

    ``kernel``: the name files and :func:`pick` use; ``op``: the public op it serves (``mmkernels-bench tune <op>``).
    ``params``: tunable parameter -> candidate values (JSON entries must give exactly these). ``key``: launch shape
    (the dict the launcher passes to :func:`pick`) -> bucket fields, in file order; ``key_fields``: those fields, in
    order (a file entry with others is stale); ``ordered``: the bucket fields that nearest-bucket matching may differ
    on (the rest must be equal); ``flags``: bucket fields that are 0 or 1 (``dtype`` is a dtype token, every other
    field a size >= 1). ``estimate``: (config, bucket) -> (shared bytes, registers per thread). ``make``: the input
    maker, (shape, device, small) -> a function that runs the launcher once on fresh inputs and returns its outputs
    (the sweep and ``MMKERNELS_AUTOTUNE=1`` time it; ``small``: interpreter-sized inputs). ``jit``: the kernel's
    ``@triton.jit`` function (spill checks); ``module``: the kernel module's name (its source hash stamps entries).
    ``fields``: for a launcher whose default is a tuple, the names of its positions (non-tunable positions keep the
    default's value). ``limits``: parameter -> bucket field it must not exceed. ``adapt``: (looked-up config, shape)
    -> config for the exact shape. ``default``: shape -> the launcher's hand-written GPU default (its own config
    function, never a copy)."""

    kernel: str
    op: str
    params: dict[str, tuple[int, ...]]
    key: Callable[[Mapping], dict]
    key_fields: tuple[str, ...]
    ordered: tuple[str, ...]
    estimate: Callable[[Mapping, Mapping], tuple[int, int]]
    make: Callable[[Mapping, torch.device, bool], Callable[[], tuple]]
    module: str
    jit: Any
    default: Callable[[Mapping], Any]
    fields: tuple[str, ...] | None = None
    flags: tuple[str, ...] = ()
    limits: dict[str, str] = dataclasses.field(default_factory=dict)
    adapt: Callable[[dict, Mapping], dict] | None = None

    def bucket(self, shape: Mapping) -> dict:
        return self.key(shape)

    def default_params(self, shape: Mapping) -> dict:
        """The tunable parameters of the launcher's GPU default for ``shape``."""
        return _params_of(self, self.default(shape))


SPACES: dict[str, Space] = {}  # kernel name -> its space, in registration order
OPS: dict[str, list[str]] = {}  # op name -> its kernels


def register(space: Space) -> Space:
    """Add ``space`` to :data:`SPACES` (and its kernel to :data:`OPS`); a kernel module calls this once at import.
    Registering a kernel name again replaces its space (a reloaded module). Raises ``ValueError`` for a space whose
    ``key_fields`` do not start with ``dtype`` or whose ``ordered``/``flags``/``limits`` name fields it lacks, and
    ``TypeError`` for a non-Space."""
    if not isinstance(space, Space):
        raise TypeError(f"tuning.register: space must be a tuning.Space, got {type(space).__name__}")
    fields = set(space.key_fields)
    unknown = sorted((set(space.ordered) | set(space.flags) | set(space.limits.values())) - fields)
    if not space.key_fields or space.key_fields[0] != "dtype" or unknown:
        raise ValueError(f"tuning.register: space {space.kernel!r}: key_fields {space.key_fields} must start with "
                         f"'dtype' and name every ordered/flag/limit field (unknown: {unknown})")
    SPACES[space.kernel] = space
    kernels = OPS.setdefault(space.op, [])
    if space.kernel not in kernels:
        kernels.append(space.kernel)
    with _lock:
        _tables.clear()  # files are validated against the registered spaces: read them again
    return space


def _key_str(bucket: Mapping) -> str:
    return ",".join(f"{k}={v}" for k, v in bucket.items())


def _parse_key(text: str) -> dict | None:
    """``"dtype=bf16,seq=256"`` -> ``{"dtype": "bf16", "seq": 256}``: values written as (ASCII) integers become ints,
    anything else stays a string (:func:`_key_problem` then rejects it where a field needs an integer)."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name:
            return None
        out[name] = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
    return out


# -- attention -------------------------------------------------------------------------------------------------------


def bucket_key(kernel: str, shape: Mapping) -> str:
    """The bucket string of a launch shape, as the JSON files spell it (``"dtype=bf16,d=64,causal=0,seq=256"``)."""
    return _key_str(SPACES[kernel].bucket(shape))


# ---------------------------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------------------------


def _prune_reason(space: Space, cfg: Mapping, bucket: Mapping, target: Target) -> str | None:
    for param, field in space.limits.items():
        if cfg[param] > max(16, bucket[field]):
            return f"{param} > {field} bucket"
    shared, regs = space.estimate(cfg, bucket)
    if shared > target.shared_per_block:
        return "shared memory"
    if regs > target.regs_per_thread or regs * 32 * cfg["num_warps"] > target.regs_per_sm:
        return "registers"
    return None


def _distance(cfg: Mapping, default: Mapping) -> tuple:
    """Sort key: candidates closest to the hand default first (a short budget explores its neighbourhood)."""
    return (sum(cfg[k] != default.get(k) for k in cfg),
            sum(abs(math.log2(cfg[k]) - math.log2(default[k])) for k in cfg if default.get(k)),
            tuple(cfg.values()))


def candidates(kernel: str, shape: Mapping, target: Target | None = None, default: Mapping | None = None
               ) -> tuple[list[dict], dict[str, int], int]:
    """The pruned space of ``kernel`` for the bucket of ``shape``: ``(kept configs, {reason: dropped}, full size)``.
    Kept configs are ordered nearest-to-``default`` first when a default is given."""
    space = SPACES[kernel]
    target = target or SM90
    bucket = space.bucket(shape)
    names = list(space.params)
    kept, dropped, total = [], {}, 0
    for values in itertools.product(*(space.params[n] for n in names)):
        total += 1
        cfg = dict(zip(names, values))
        reason = _prune_reason(space, cfg, bucket, target)
        if reason is None:
            kept.append(cfg)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    kept = compile_prune(space, bucket, kept, target)
    if default is not None:
        kept.sort(key=lambda c: _distance(c, default))
    return kept, dropped, total


def compile_prune(space: Space, bucket: Mapping, configs: list[dict], target: Target) -> list[dict]:
    """The hook for compile-time pruning before timing (one place to plug ``_spills.compile_stats`` in: it needs each
    kernel's full argument signature, which the launch recorder of ``tests/triton_launches.py`` has and this module
    does not yet). Today it keeps every config; at tune time :func:`_spilled` checks the compiled kernel of each
    candidate on the card instead, which is the same number the driver loads."""
    return configs


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    """File stem of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"`` (vLLM's spelling)."""
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name.strip()).strip("_") or "unknown"


def device_name(device: torch.device | None = None) -> str | None:
    """The name configs are looked up under: ``$MMKERNELS_TUNING_DEVICE`` when set, else the CUDA device's name, else
    None (a CPU device has no configs)."""
    override = _env.tuning_device()
    if override:
        return override
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def shipped_path(name: str) -> Path:
    return CONFIG_DIR / f"{device_slug(name)}.json"


def user_dir() -> Path:
    explicit = _env.tuning_dir()  # raises EnvVarError for a path that exists and is not a folder
    if explicit is not None:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmkernels" / "tuning"


def user_path(name: str) -> Path:
    return user_dir() / f"{device_slug(name)}.json"


def _warn(message: str) -> None:
    warnings.warn(message, TuningConfigWarning, stacklevel=3)


def _valid_value(space: Space, param: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if param == "num_warps":
        return value in (1, 2, 4, 8, 16, 32)
    if param == "num_stages":
        return 1 <= value <= 8
    # blocks: powers of two that tl.dot accepts (>= 16, or down to the space's smallest candidate for a kernel
    # without tl.dot, e.g. the rotary embedding's token and head blocks), no larger than the space's largest
    # candidate (a larger tile is past what the estimates and the tuner ever checked: on a card it would fail with
    # OutOfResources or spill)
    return _block_floor(space, param) <= value <= max(space.params[param]) and value & (value - 1) == 0


def _block_floor(space: Space, param: str) -> int:
    return min(16, min(space.params[param]))


_VALID = {"num_warps": "1, 2, 4, 8, 16 or 32", "num_stages": "an integer in 1...8"}


def _key_problem(space: Space, key: str) -> str | None:
    """Why the bucket string ``key`` can never be one :meth:`Space.bucket` produces (None: it can). One rule for the
    fields of every kernel: ``dtype`` a known token, the space's ``flags`` 0 or 1, every other field (sizes such as
    ``d``, ``seq``, ``m``, ``n``, ``k``, ``tpe``) a positive integer; no whitespace; fields in the kernel's order."""
    if any(ch.isspace() for ch in key):
        return "whitespace in the bucket key"
    bucket = _parse_key(key)
    if bucket is None or tuple(bucket) != space.key_fields:
        return f"bucket fields are not {', '.join(space.key_fields)}"
    bad = []
    for name, value in bucket.items():
        if name == "dtype":
            ok, want = value in _DTYPE_NAMES.values(), f"one of {', '.join(sorted(_DTYPE_NAMES.values()))}"
        elif name in space.flags:
            ok, want = value in (0, 1), "0 or 1"
        else:
            ok, want = isinstance(value, int) and value >= 1, "a positive integer"
        if not ok:
            bad.append(f"{name}={value!r} (must be {want})")
    if bad:
        return f"invalid bucket value(s) {', '.join(bad)}"
    canonical = _key_str(bucket)
    if canonical != key:
        return f"bucket not written canonically (expected {canonical!r})"
    return None


class _Unreadable(Exception):
    """A tuning file that is there but cannot be used as a whole (the message says why)."""


def _read_json(path: Path) -> Any:
    """The parsed JSON of the tuning file at ``path``; ``FileNotFoundError`` when there is none, :class:`_Unreadable`
    for anything else that stops it being read: not a regular file (a FIFO would block the first launch forever, a
    link to ``/dev/zero`` never ends), larger than :data:`MAX_FILE_BYTES`, an OS error, not UTF-8 JSON, nested past
    the parser's recursion limit."""
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer (regular files ignore the flag)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Unreadable(f"cannot open it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable("not a regular file (a FIFO, device, socket or folder is never read)")
        if info.st_size > MAX_FILE_BYTES:
            raise _Unreadable(f"{info.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit for tuning files")
        chunks, size = [], 0
        while True:  # bounded even if the file grows while it is read
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise _Unreadable(f"over the {MAX_FILE_BYTES}-byte limit for tuning files")
            chunks.append(chunk)
    except OSError as exc:
        raise _Unreadable(f"cannot read it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except RecursionError:
        raise _Unreadable("cannot read it as JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _Unreadable(f"cannot read it as JSON ({exc})") from None


_WARN_LISTED = 5  # entry problems spelled out in a file's one warning (the rest are counted)


def entries(path: Path) -> dict[str, dict[str, dict]]:
    """``{kernel: {bucket string: config}}`` of one file: only valid, current entries of registered kernels.
    Whatever is skipped (the whole file, or some of its entries) is said in one :class:`TuningConfigWarning` per
    file; nothing here raises."""
    try:
        return _load_entries(path)
    except _Unreadable as exc:
        _warn(f"mmkernels tuning: ignoring {path}: {exc}; the default configs run")
    except Exception as exc:  # noqa: BLE001  (a tuning file must never stop a launch: the default runs)
        _warn(f"mmkernels tuning: ignoring {path}: {type(exc).__name__}: {exc}; the default configs run")
    return {}


def _load_entries(path: Path) -> dict[str, dict[str, dict]]:
    try:
        raw = _read_json(path)
    except FileNotFoundError:
        return {}
    problem = _file_problem(raw)
    if problem:
        raise _Unreadable(problem)
    out: dict[str, dict[str, dict]] = {}
    skipped: list[str] = []
    stale = 0
    for kernel, table in raw["kernels"].items():
        space = SPACES.get(kernel)
        if space is None:
            skipped.append(f"no kernel {kernel!r} in this version (stale file?): its entries are ignored")
            continue
        if not isinstance(table, dict):
            skipped.append(f"kernels.{kernel} is a {_json_type(table)}, not an object of bucket -> config: its "
                           "entries are ignored")
            continue
        for key, cfg in table.items():
            problem = _entry_problem(space, key, cfg)
            if problem is None:
                problem = _stale(space, cfg)
                stale += problem is not None
            if problem:
                skipped.append(f"{kernel} [{key}]: {problem}")
                continue
            out.setdefault(kernel, {})[key] = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if skipped:
        listed = "; ".join(skipped[:_WARN_LISTED])
        more = f"; and {len(skipped) - _WARN_LISTED} more" if len(skipped) > _WARN_LISTED else ""
        hint = (" (stale entries: retune with `mmkernels-bench tune ... --retune`, or delete the file)"
                if stale else "")
        _warn(f"mmkernels tuning: {path}: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} ignored, the "
              f"default config runs for them{hint}: {listed}{more}")
    return out


# ---- what an entry was tuned for ----------------------------------------------------------------------------------

TUNED_FOR = "_tuned_for"  # the entry field: {"mmkernels", "triton", "torch", "source"}; all must match this install


@functools.cache
def _source_hash(module: str) -> str:
    """The first 16 hex digits of the SHA-256 of the kernel module's source file (the ``@triton.jit`` kernels, their
    helpers and launchers): a config tuned for other kernel code is stale even within one version number. The module
    registered the space, so it is loaded: its file is read, never imported here."""
    try:
        origin = sys.modules[module].__file__
        return hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]
    except (OSError, AttributeError, KeyError, ValueError, TypeError):
        return "unknown"


@functools.cache
def _versions() -> dict[str, str]:
    return {"mmkernels": __version__, "triton": triton.__version__, "torch": torch.__version__.split("+")[0]}


def tuned_for(kernel: str) -> dict[str, str]:
    """The stamp every entry of ``kernel`` carries in a tuning file: the mmkernels, Triton and torch versions and the
    kernel source hash it was tuned with. An entry whose stamp differs from this install's is stale: ignored with a
    warning (the default runs, and ``tune`` tunes that bucket again)."""
    return {**_versions(), "source": _source_hash(SPACES[kernel].module)}


def _stale(space: Space, cfg: Mapping) -> str | None:
    stamp = cfg.get(TUNED_FOR)
    if not isinstance(stamp, dict):
        return f"no {TUNED_FOR} stamp (versions and kernel source hash it was tuned for): stale"
    now = tuned_for(space.kernel)
    label = {"source": "kernel source"}
    diff = [f"{label.get(k, k)} {stamp.get(k)!r} (this install: {v!r})" for k, v in now.items() if stamp.get(k) != v]
    if diff:
        return "tuned for another " + ", ".join(diff) + ": stale"
    return None


def _json_type(value: Any) -> str:
    return {dict: "JSON object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _file_problem(raw: Any) -> str | None:
    """Why a parsed JSON document is not a tuning file this version reads (None: it is)."""
    if not isinstance(raw, dict):
        return f"not a tuning file: the top level is a {_json_type(raw)}, not a JSON object"
    if raw.get("format") != FORMAT:
        return (f"not a format-{FORMAT} tuning file (its format is {raw.get('format')!r}; this version reads format "
                f"{FORMAT})")
    if "kernels" not in raw:
        return "no 'kernels' object (kernel -> bucket -> config)"
    if not isinstance(raw["kernels"], dict):
        return f"'kernels' is a {_json_type(raw['kernels'])}, not an object of kernel -> bucket -> config"
    return None


def _entry_problem(space: Space, key: str, cfg: Any) -> str | None:
    problem = _key_problem(space, key)
    if problem:
        return problem
    if not isinstance(cfg, dict):
        return "not an object"
    params = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(params) - set(space.params))
    if unknown:
        return f"unknown parameter(s) {', '.join(unknown)}"
    missing = sorted(set(space.params) - set(params))
    if missing:
        return f"missing parameter(s) {', '.join(missing)}"
    bad = [f"{k}={v!r} (must be "
           f"{_VALID.get(k) or f'a power of two in {_block_floor(space, k)}...{max(space.params[k])}'})"
           for k, v in params.items() if not _valid_value(space, k, v)]
    if bad:
        return f"invalid value(s) {', '.join(bad)}"
    return None


class _Table:
    """Every config known for one device name: tuned in this process > user file > shipped file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.memory: dict[str, dict[str, dict]] = {}
        self.files = [entries(user_path(name)), entries(shipped_path(name))]
        self._cache: dict[tuple[str, str], tuple[dict | None, bool]] = {}

    def remember(self, kernel: str, key: str, cfg: dict) -> None:
        self.memory.setdefault(kernel, {})[key] = cfg
        self._cache.clear()

    def refresh(self) -> None:
        """Read the files again (one was just written); configs tuned in this process stay."""
        self.files = [entries(user_path(self.name)), entries(shipped_path(self.name))]
        self._cache.clear()

    def lookup(self, kernel: str, bucket: Mapping) -> tuple[dict | None, bool]:
        """(config, exact): the exact bucket's entry, else the nearest bucket that differs only in ordered fields."""
        key = _key_str(bucket)
        hit = self._cache.get((kernel, key))
        if hit is None:
            hit = self._cache[(kernel, key)] = self._find(kernel, key, bucket)
        return hit

    def _find(self, kernel: str, key: str, bucket: Mapping) -> tuple[dict | None, bool]:
        merged: dict[str, dict] = {}
        for source in reversed([self.memory, *self.files]):  # later sources win: memory last
            merged.update(source.get(kernel, {}))
        if key in merged:
            return merged[key], True
        ordered = SPACES[kernel].ordered
        best, best_rank = None, None
        for other_key, cfg in merged.items():
            other = _parse_key(other_key)
            if other is None or any(other.get(f) != v for f, v in bucket.items() if f not in ordered):
                continue
            dist = sum(abs(math.log2(max(1, other[f])) - math.log2(max(1, bucket[f]))) for f in ordered)
            rank = (dist, -sum(other[f] for f in ordered))  # ties: the larger bucket
            if best_rank is None or rank < best_rank:
                best, best_rank = cfg, rank
        return best, False


_tables: dict[str, _Table] = {}
_lock = threading.RLock()
_local = threading.local()  # .forced: {kernel: config or _DEFAULT}; .tuning: a sweep is running on this thread
_DEFAULT = object()


def reload() -> None:
    """Forget every loaded file and every config tuned in this process (files are read again on the next lookup)."""
    with _lock:
        _tables.clear()


def _table(name: str) -> _Table:
    table = _tables.get(name)
    if table is None:
        with _lock:
            table = _tables.get(name)
            if table is None:
                table = _tables[name] = _Table(name)
    return table


def shipped_configs() -> Iterable[tuple[str, str, str, dict]]:
    """Every valid entry of every shipped file: ``(device slug, kernel, bucket, config)`` (for spill checks)."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        for kernel, table in entries(path).items():
            for key, cfg in table.items():
                yield path.stem, kernel, key, cfg


# ---------------------------------------------------------------------------------------------------------------
# lookup at launch
# ---------------------------------------------------------------------------------------------------------------


def _params_of(space: Space, default) -> dict:
    if dataclasses.is_dataclass(default):
        values = dataclasses.asdict(default)
    elif isinstance(default, Mapping):
        values = dict(default)
    else:
        values = dict(zip(space.fields, default))
    return {k: values[k] for k in space.params}


def _apply(space: Space, default, cfg: Mapping):
    """``cfg``'s parameters over ``default``, in the default's own type (dataclass, dict or tuple)."""
    if dataclasses.is_dataclass(default):
        return dataclasses.replace(default, **cfg)
    if isinstance(default, Mapping):
        return {**default, **cfg}
    values = dict(zip(space.fields, default)) | dict(cfg)
    return tuple(values[f] for f in space.fields)


@contextlib.contextmanager
def forced(kernel: str, cfg: Mapping | None):
    """Launches of ``kernel`` on this thread use ``cfg`` (None: the launcher's default), interpreter or not, whatever
    the files say: how the tuner runs a candidate through the real launcher."""
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = {}
    before = stack.get(kernel)
    stack[kernel] = _DEFAULT if cfg is None else dict(cfg)
    try:
        yield
    finally:
        if before is None:
            stack.pop(kernel, None)
        else:
            stack[kernel] = before


def autotune_enabled() -> bool:
    """``MMKERNELS_AUTOTUNE`` through its one parser (``mmkernels._env.autotune``): a value other than 1/0 (or
    true/false, yes/no, on/off) raises ``EnvVarError`` naming the variable."""
    return _env.autotune()


def pick(kernel: str, shape: Mapping, default, *, like: torch.Tensor, target: Target | None = None):
    """The launch configuration of ``kernel`` for ``shape`` on ``like``'s device.

    Args:
        kernel: a name in :data:`SPACES` (``"attention_fwd"``, ``"moe_grouped_gemm"``, ...).
        shape: the launch's problem sizes, the fields its space buckets on (plain ints or symbolic sizes; dtypes as
            ``torch.dtype``).
        default: the launcher's hand-written config (a dataclass, dict or tuple); returned as is when nothing is
            recorded, and the type of what is returned otherwise.
        like: a tensor of the launch (its device names the config file; a CPU tensor names none).
        target: the launch's :class:`Target` (default :func:`target_of` ``like``); an interpreted one always gets
            ``default``.

    Never raises for a missing or bad file (see the module docstring); tunes only with ``MMKERNELS_AUTOTUNE=1``.
    """
    space = SPACES[kernel]
    if is_batch_invariant():  # the tables and the tuner key on sizes that grow with the batch (tokens, lengths)
        return default
    forced_cfg = getattr(_local, "forced", {}).get(kernel)
    if forced_cfg is not None:
        return default if forced_cfg is _DEFAULT else _apply(space, default, forced_cfg)
    if (target or target_of(like)).interpreted:
        return default
    name = device_name(like.device)
    if name is None:
        return default
    bucket = space.bucket(shape)
    table = _table(name)
    cfg, exact = table.lookup(kernel, bucket)
    if not exact and autotune_enabled() and _can_autotune(like):
        tuned = _autotune(space, shape, like.device, name, default)
        if tuned is not None:
            cfg = tuned
    if cfg is None:
        return default
    if space.adapt is not None:
        cfg = space.adapt(dict(cfg), shape)
    return _apply(space, default, cfg)


def _can_autotune(like: torch.Tensor) -> bool:
    """Tuning needs real CUDA data: not the interpreter, not a trace (fake tensors, torch.compile), not a CUDA-graph
    capture, not inside another sweep."""
    if like.device.type != "cuda" or target_of(like).interpreted or getattr(_local, "tuning", False):
        return False
    if is_fake(like) or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


def _autotune(space: Space, shape: Mapping, device: torch.device, name: str, default) -> dict | None:
    bucket = space.bucket(shape)
    key = _key_str(bucket)
    with _lock:
        table = _table(name)
        cfg, exact = table.lookup(space.kernel, bucket)
        if exact:  # another thread tuned it meanwhile
            return cfg
        start = time.monotonic()
        result = sweep(space, shape, device, default=_params_of(space, default), target=Target.of(device),
                       deadline=start + AUTOTUNE_BUDGET_S)
        table.remember(space.kernel, key, result.config)
        log.info("mmkernels: tuned %s [%s] in %.1f s: %s", space.kernel, key, time.monotonic() - start,
                 result.describe())
        try:
            save(user_path(name), name, [(space.kernel, result)])
        except OSError as exc:
            _warn(f"mmkernels tuning: could not save to {user_path(name)} ({exc}); the tuned config lives in this "
                  "process only")
        return result.config



# ---------------------------------------------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BucketResult:
    """The outcome of one bucket's sweep. ``config`` is the chosen parameters (the default's when nothing beat it)."""

    key: str
    config: dict
    ms: float
    default_ms: float
    tried: int
    space: int
    rejected: dict[str, int]
    complete: bool

    def entry(self) -> dict:
        return {**self.config, "_ms": round(self.ms, 5), "_default_ms": round(self.default_ms, 5),
                "_tried": self.tried, "_space": self.space}

    def describe(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in self.config.items())
        speed = self.default_ms / self.ms if self.ms > 0 else float("nan")
        rejected = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items()))
        return (f"{self.default_ms:.4f} -> {self.ms:.4f} ms ({speed:.2f}x) {cfg}; tried {self.tried}/{self.space}"
                + ("" if self.complete else " (budget)") + (f"; rejected: {rejected}" if rejected else ""))


def do_bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device (CUDA events, L2 flushed between runs)."""
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def _agrees(got, want, dtype: torch.dtype) -> bool:
    """Every output tensor matches the reference: same non-finite pattern, relative L2 error within the dtype's
    tolerance on the finite part."""
    got = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    want = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        return False
    tol = TOLERANCE.get(dtype, 2e-2)
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False
        g, w = g.double(), w.double()
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)) or not torch.equal(g[~finite], w[~finite]):
            return False
        err = (g[finite] - w[finite]).norm()
        if not bool(err <= tol * w[finite].norm() + 1e-12):
            return False
    return True


def _compiled(space: Space) -> dict[int, Any]:
    """The compiled kernels Triton holds for the space's ``@triton.jit`` function: ``{id: CompiledKernel}``
    (empty when this Triton keeps its cache elsewhere, or under the interpreter)."""
    fn = space.jit
    out: dict[int, Any] = {}
    caches = getattr(fn, "device_caches", None)
    try:
        for entry in (caches or {}).values():
            for compiled in entry[0].values():
                out[id(compiled)] = compiled
    except (TypeError, AttributeError, IndexError, KeyError):
        return {}
    return out


def _spilled(before: Mapping[int, Any], after: Mapping[int, Any]) -> int | None:
    """Local-memory bytes per thread of the kernels compiled between two :func:`_compiled` snapshots (the driver's
    count, what ``ptxas -v`` reports as spill stores/stack), or None when nothing new was compiled."""
    new = [k for i, k in after.items() if i not in before]
    spills = [getattr(k, "n_spills", None) for k in new]
    spills = [s for s in spills if s is not None]
    return max(spills) if spills else None


_spill_memo: dict[tuple[str, str, str], int] = {}


def sweep(space: Space, shape: Mapping, device: torch.device, *, default: Mapping, target: Target | None = None,
          deadline: float | None = None, timer: Callable[[Callable[[], Any]], float] | None = None,
          configs: Sequence[Mapping] | None = None, small: bool = False,
          make: Callable[[Mapping, torch.device, bool], Callable[[], Any]] | None = None) -> BucketResult:
    """Tune one bucket: build inputs for ``shape`` with ``make`` (the input maker: (shape, device, small) -> a
    function that launches once and returns the outputs; default the space's own), run the default (reference output
    and time), then each candidate (``configs``, or the pruned space) until ``deadline`` (``time.monotonic()``): a
    candidate that fails to compile or launch, spills registers, or disagrees with the reference is rejected; the
    rest are timed with ``timer`` (milliseconds; :func:`do_bench_ms` by default)."""
    timer = timer or do_bench_ms
    make = make or space.make
    bucket = space.bucket(shape)
    key = _key_str(bucket)
    exact = _key_str({k: v for k, v in bucket.items() if k not in space.ordered})
    if configs is None:
        configs, _, _ = candidates(space.kernel, shape, target or Target.of(device), default)
    configs = [dict(c) for c in configs if dict(c) != dict(default)]
    prev = getattr(_local, "tuning", False)
    _local.tuning = True
    try:
        run = make(shape, device, small)

        def launch(cfg):
            with forced(space.kernel, cfg):
                return run()

        reference = launch(None)
        default_ms = timer(lambda: launch(None))
        best, best_ms, tried, rejected = dict(default), default_ms, 0, {}
        complete = True
        for cfg in configs:
            if deadline is not None and time.monotonic() > deadline:
                complete = False
                break
            tried += 1
            memo = (space.kernel, exact, json.dumps(cfg, sort_keys=True))
            if _spill_memo.get(memo, 0) > 0:
                rejected["spills"] = rejected.get("spills", 0) + 1
                continue
            before = _compiled(space)
            try:
                out = launch(cfg)
            except Exception as exc:  # compile errors, out of resources: the candidate is out, the sweep goes on
                reason = type(exc).__name__
                rejected[reason] = rejected.get(reason, 0) + 1
                continue
            spill = _spilled(before, _compiled(space))
            if spill is not None:
                _spill_memo[memo] = spill
            if spill:
                rejected["spills"] = rejected.get("spills", 0) + 1
                continue
            if not _agrees(out, reference, shape["dtype"]):
                rejected["wrong result"] = rejected.get("wrong result", 0) + 1
                continue
            ms = timer(lambda cfg=cfg: launch(cfg))
            if ms < best_ms:
                best, best_ms = dict(cfg), ms
        if best_ms > default_ms * IMPROVEMENT:  # within noise of the default: keep the default
            best, best_ms = dict(default), default_ms
        return BucketResult(key, best, best_ms, default_ms, tried, len(configs) + 1, rejected, complete)
    finally:
        _local.tuning = prev


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive inter-process lock on ``<path>.lock`` (``filelock``, which torch depends on; ``fcntl.flock``
    where it is missing), held while a writer reads, merges and replaces the file, so concurrent writers (several
    ``MMKERNELS_AUTOTUNE=1`` ranks, two ``tune`` runs) never lose each other's entries. Waits at most
    :data:`LOCK_TIMEOUT_S` (then ``TimeoutError``, an ``OSError``)."""
    lock_path = path.with_name(path.name + ".lock")
    # Open (create) the lock file ourselves first: filelock takes any error opening it (a read-only folder, a folder
    # in its place) for another process's lock and waits the whole timeout before blaming one.
    try:
        probe = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot create or open the lock file {lock_path} ({exc.strerror or exc})") \
            from None
    try:
        if not stat.S_ISREG(os.fstat(probe).st_mode):
            raise OSError(f"the lock file {lock_path} exists and is not a regular file")
    finally:
        os.close(probe)
    if filelock is not None:
        try:
            with filelock.FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
                yield
        except filelock.Timeout as exc:
            raise TimeoutError(f"another process holds {lock_path} for over {LOCK_TIMEOUT_S:.0f} s") from exc
        return
    if fcntl is None:
        raise OSError(f"cannot lock {lock_path}: neither filelock nor fcntl is available")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process holds {lock_path} for over {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def save(path: Path, name: str, results: Iterable[tuple[str, BucketResult]]) -> Path:
    """Merge ``(kernel, result)`` entries into the tuning file at ``path`` (created if missing) and replace it
    atomically, under an inter-process lock (:func:`_file_lock`): entries other writers saved meanwhile survive.

    Each entry is stamped with what it was tuned for (:func:`tuned_for`). The file's other entries are kept as they
    are (including stale ones, which readers skip); a file that cannot be read as a tuning file is replaced with a
    warning. Raises ``OSError`` naming ``path`` when it exists and is not a regular file (a FIFO or device is never
    read or replaced), when the folder is not writable, at once when the lock file cannot be created (the real
    error, not a wait), or when another process holds the lock past :data:`LOCK_TIMEOUT_S` (``TimeoutError``)."""
    path = Path(path)
    results = list(results)
    try:
        _save(path, name, results)
    except OSError as exc:  # every error names the file being saved
        if str(path) in str(exc):
            raise
        raise type(exc)(exc.errno, f"cannot save {path}: {exc.strerror or exc}") if exc.errno else \
            OSError(f"cannot save {path}: {exc}") from exc
    with _lock:  # the next lookup sees the new file
        if name in _tables:
            _tables[name].refresh()
    return path


def _save(path: Path, name: str, results: list[tuple[str, BucketResult]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        if path.exists() and not path.is_file():
            raise OSError(f"{path} exists and is not a regular file; not replacing it")
        kernels: dict = {}
        try:
            raw = _read_json(path)
        except FileNotFoundError:
            raw = None
        except _Unreadable as exc:
            _warn(f"mmkernels tuning: replacing {path}: {exc}")
            raw = None
        if raw is not None:
            problem = _file_problem(raw)
            if problem:
                _warn(f"mmkernels tuning: replacing {path}: {problem}")
            else:
                kernels = {k: dict(v) for k, v in raw["kernels"].items() if isinstance(v, dict)}
        for kernel, result in results:
            kernels.setdefault(kernel, {})[result.key] = {**result.entry(), TUNED_FOR: tuned_for(kernel)}
        data = {"format": FORMAT, "device": name,
                "kernels": {k: dict(sorted(v.items())) for k, v in sorted(kernels.items())},
                "_meta": {**_versions(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(data, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


