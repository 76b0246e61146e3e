"""Facts about the process environment that several layers ask about. No torch or triton import here: the backend
registry uses it whether or not triton is installed."""

from __future__ import annotations

import os

__all__ = ["triton_interpreting"]


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set by the tests before triton is
    imported). Read on every call, not cached: the tests switch it with ``monkeypatch.setenv``.

    The one source of this answer: the backend registry (triton runs on CPU tensors only then), the op registration
    (an opaque ``custom_op`` instead of a traceable ``triton_op``) and the launchers (interpreter-sized tiles, via
    ``kernels.triton._common.interpreted``) all call it."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"
