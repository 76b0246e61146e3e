"""Process-wide switches: deterministic kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["deterministic", "is_deterministic", "set_deterministic"]

_DETERMINISTIC = False


def set_deterministic(enabled: bool) -> None:
    """Make every mmkernels op pick kernels whose results are bitwise reproducible (no atomics in reductions).

    ``torch.use_deterministic_algorithms(True)`` turns this on as well. Raises ``TypeError`` unless ``enabled`` is a
    bool.
    """
    global _DETERMINISTIC
    if not isinstance(enabled, bool):  # bool("no") is True: a string or a number here is a mistake
        raise TypeError(f"set_deterministic: enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    _DETERMINISTIC = enabled


def is_deterministic() -> bool:
    return _DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_deterministic`."""
    previous = _DETERMINISTIC
    set_deterministic(enabled)
    try:
        yield
    finally:
        set_deterministic(previous)
