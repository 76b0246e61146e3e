"""Process-wide switches: deterministic kernels, batch-invariant kernels, and debug checks of index values."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from . import _env

__all__ = ["batch_invariant", "debug_checks", "debug_checks_enabled", "deterministic", "is_batch_invariant",
           "is_deterministic", "set_batch_invariant", "set_debug_checks", "set_deterministic"]

_DETERMINISTIC = False


def set_deterministic(enabled: bool) -> None:
    """Make every mmkernels op pick kernels whose results are bitwise reproducible (no atomics in reductions).

    ``torch.use_deterministic_algorithms(True)`` turns this on as well. Raises ``TypeError`` unless ``enabled`` is a
    bool.
    """
    global _DETERMINISTIC
    from .ops._validate import flag  # bool("no") is True: a string or a number here is a mistake

    _DETERMINISTIC = flag("enabled", enabled, op="set_deterministic")


def is_deterministic() -> bool:
    """Whether the ops pick bitwise-reproducible kernels: :func:`set_deterministic`, ``torch.use_deterministic_
    algorithms(True)``, or the batch-invariant mode (which implies it: no atomics whose order depends on scheduling)."""
    return _DETERMINISTIC or _BATCH_INVARIANT or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_deterministic`."""
    previous = _DETERMINISTIC
    set_deterministic(enabled)
    try:
        yield
    finally:
        set_deterministic(previous)


# ---- batch invariance ------------------------------------------------------------------------------------------
# Process-wide, like torch.use_deterministic_algorithms (a backward may run on autograd's device threads). The value
# is that of the most recently entered batch_invariant() context still open, in any thread, else set_batch_invariant's;
# a context removes its own entry on exit, so one thread leaving its block never turns the mode off inside another's.
_BATCH_INVARIANT_SET = False
_BATCH_INVARIANT = False  # the value in force (read on every op call)
_CONTEXTS: list[list[bool]] = []  # open batch_invariant() contexts, oldest first: [enabled] cells (identity)
_LOCK = threading.Lock()


def _apply_batch_invariant() -> None:
    """Recompute the value in force and route the products accordingly (with ``_LOCK`` held)."""
    global _BATCH_INVARIANT
    value = _CONTEXTS[-1][0] if _CONTEXTS else _BATCH_INVARIANT_SET
    from . import batch_invariance

    batch_invariance.route_matmuls(value)
    _BATCH_INVARIANT = value


def set_batch_invariant(enabled: bool) -> None:
    """Batch-invariant mode: every op's result for a row (a token, a sequence, an image) is bitwise the same whatever
    else is in the call: alone, in a batch of any size, padded, packed varlen with other sequences, at any position.

    On, each op picks kernels whose reduction order depends only on the row's own data and the model's sizes (head
    dim, expert width): fixed tile shapes and launch configs (never the tuned per-shape tables), no split-K that
    depends on the batch, no packed varlen tiles shared between sequences, per-sequence reference paths, and no
    atomics (it implies :func:`is_deterministic`). The products of the rest of the model (``nn.Linear``,
    ``torch.matmul``: ``aten.mm`` / ``addmm`` / ``bmm``) run in fixed 64-row blocks (``mmkernels.batch_invariance``) and
    the CPU's element-wise functions that are not correctly rounded (exp, pow, the activations, ...) without scalar
    tails (``mmkernels.batch_invariance_elementwise``). A backend that cannot honour the
    mode is skipped by automatic selection and raises ``BackendError`` when asked for by name; no op silently runs
    its fast path. What it guarantees and costs: docs/batch_invariance.md.

    Process-wide (every thread), like ``torch.use_deterministic_algorithms``; an open :func:`batch_invariant` context
    takes precedence until it exits. Raises ``TypeError`` unless ``enabled`` is a bool.
    """
    global _BATCH_INVARIANT_SET
    from .ops._validate import flag

    enabled = flag("enabled", enabled, op="set_batch_invariant")
    with _LOCK:
        _BATCH_INVARIANT_SET = enabled
        _apply_batch_invariant()


def is_batch_invariant() -> bool:
    """Whether the batch-invariant mode is on (see :func:`set_batch_invariant`)."""
    return _BATCH_INVARIANT


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """The batch-invariant mode on (or off) inside the block, process-wide. Blocks nest; while several threads are
    inside blocks, the most recently entered one still open decides, and a block's exit removes only its own entry
    (another thread's exit never turns the mode off inside this block). Composes with :func:`deterministic`."""
    from .ops._validate import flag

    cell = [flag("enabled", enabled, op="batch_invariant")]
    with _LOCK:
        _CONTEXTS.append(cell)
        _apply_batch_invariant()
    try:
        yield
    finally:
        with _LOCK:
            for i, c in enumerate(_CONTEXTS):  # remove by identity (equal cells may belong to other blocks)
                if c is cell:
                    del _CONTEXTS[i]
                    break
            _apply_batch_invariant()


# ---- debug checks -----------------------------------------------------------------------------------------------
# None: follow MMKERNELS_DEBUG_CHECKS, parsed on the first question and kept (an op call must not parse the
# environment); True/False: set_debug_checks' override.
_DEBUG_CHECKS: bool | None = None
_DEBUG_FROM_ENV: bool | None = None


def set_debug_checks(enabled: bool | None) -> None:
    """Turn the host-side value checks of the ops' index tensors on (``True``) or off (``False``), or back to what
    ``MMKERNELS_DEBUG_CHECKS`` says (``None``; the variable is read again).

    On: ``attention`` reads ``cu_seqlens_*`` on the host and raises ``ValueError`` for values that are not
    monotone, not within the tensors or longer than ``max_seqlen_*``; ``qformer_cross_attention`` raises for
    ``kv_lens`` outside ``[1, Lk]``. One device-to-host read per call (a synchronisation on CUDA).
    Off (the default): no host read for them when the caller gives the sizes (``max_seqlen_*``); bad values cannot
    crash the process or read out of bounds (they are clamped on the device), but they give unspecified results.
    The test suite runs with them on. Raises ``TypeError`` unless ``enabled`` is a bool or None.
    """
    global _DEBUG_CHECKS, _DEBUG_FROM_ENV
    from .ops._validate import flag

    enabled = flag("enabled", enabled, op="set_debug_checks", none=True)
    _DEBUG_CHECKS = enabled
    if enabled is None:
        _DEBUG_FROM_ENV = None


def debug_checks_enabled() -> bool:
    """Whether the ops check index values on the host (see :func:`set_debug_checks`)."""
    global _DEBUG_FROM_ENV
    if _DEBUG_CHECKS is not None:
        return _DEBUG_CHECKS
    if _DEBUG_FROM_ENV is None:
        _DEBUG_FROM_ENV = _env.debug_checks()  # EnvVarError naming the variable for a bad value
    return _DEBUG_FROM_ENV


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_debug_checks`: restores the previous setting on exit."""
    previous = _DEBUG_CHECKS
    set_debug_checks(enabled)
    try:
        yield
    finally:
        set_debug_checks(previous)
