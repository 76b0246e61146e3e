"""Facts about the process environment that several layers ask about. No torch or triton import here: the backend
registry uses it whether or not triton is installed."""

from __future__ import annotations

import os

__all__ = ["attention_packed_override", "triton_interpreting"]


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set by the tests before triton is
    imported). Read on every call, not cached: the tests switch it with ``monkeypatch.setenv``.

    The one source of this answer: the backend registry (triton runs on CPU tensors only then), the op registration
    (an opaque ``custom_op`` instead of a traceable ``triton_op``) and the launchers (interpreter-sized tiles, via
    ``kernels.triton._common.interpreted``) all call it."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def attention_packed_override() -> bool | None:
    """``MMKERNELS_ATTENTION_PACKED``: ``1`` forces the packed varlen attention kernels, ``0`` the per-sequence ones;
    unset, empty or ``auto`` leaves the choice to the launchers' rule (``kernels/triton/attention_packed.packed_pays``).
    Read on every call (tests and benchmarks switch it). Any other value raises ``ValueError``."""
    value = os.environ.get("MMKERNELS_ATTENTION_PACKED", "")
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise ValueError(f"MMKERNELS_ATTENTION_PACKED must be 0, 1 or unset, got {value!r}")
    return value == "1"
