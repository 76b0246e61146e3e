"""Process-wide switches: deterministic kernels, batch-invariant kernels, and debug checks of index values."""

from __future__ import annotations

import contextlib
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
_BATCH_INVARIANT = False


def set_batch_invariant(enabled: bool) -> None:
    """Batch-invariant mode: every op's result for a row (a token, a sequence, an image) is bitwise the same whatever
    else is in the call: alone, in a batch of any size, padded, packed varlen with other sequences, at any position.

    On, each op picks kernels whose reduction order depends only on the row's own data and the model's sizes (head
    dim, expert width): fixed tile shapes and launch configs (never the tuned per-shape tables), no split-K that
    depends on the batch, no packed varlen tiles shared between sequences, per-sequence reference paths, and no
    atomics (it implies :func:`is_deterministic`). The products of the rest of the model (``nn.Linear``,
    ``torch.matmul``: ``aten.mm`` / ``addmm`` / ``bmm``) run in fixed 64-row blocks (``mmkernels.batch_invariance``).
    A backend that cannot honour the mode is skipped by automatic selection and raises ``BackendError`` when asked
    for by name; no op silently runs its fast path. What it guarantees and costs: docs/batch_invariance.md.

    Raises ``TypeError`` unless ``enabled`` is a bool.
    """
    global _BATCH_INVARIANT
    from .ops._validate import flag

    enabled = flag("enabled", enabled, op="set_batch_invariant")
    from . import batch_invariance

    batch_invariance.route_matmuls(enabled)
    _BATCH_INVARIANT = enabled


def is_batch_invariant() -> bool:
    """Whether the batch-invariant mode is on (see :func:`set_batch_invariant`)."""
    return _BATCH_INVARIANT


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_batch_invariant`: restores the previous setting on exit. Composes with
    :func:`deterministic` (either order)."""
    previous = _BATCH_INVARIANT
    set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(previous)


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
