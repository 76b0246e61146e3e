"""Argument checks shared by every ``mmkernels-bench`` subcommand (and the examples): each returns the parsed value or
raises :class:`UsageError` with one line naming the flag, the value and what is accepted. The CLIs turn that into
``<prog>: error: <line>`` on stderr and exit status 2, before anything is built or timed."""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["UsageError", "check_env", "device", "milliseconds", "out_dir", "positive_int"]


class UsageError(ValueError):
    """A command-line value that cannot be used (the message is the one line the CLI prints)."""


def check_env() -> None:
    """Every ``MMKERNELS_*`` variable through its parser (``mmkernels._env``); the first bad one is the error."""
    from .._env import check

    problems = check()
    if problems:
        more = f" (and {len(problems) - 1} more bad variable(s))" if len(problems) > 1 else ""
        raise UsageError(f"environment: {problems[0]}{more}")


def device(text: str | None, flag: str = "--device", kinds: Sequence[str] = ("cpu", "cuda")) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (the kinds allowed), checked against this machine; None: cuda when there is
    one, else cpu."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() and "cuda" in kinds else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {text!r} is not a device (expected {' or '.join(kinds)}"
                         f"{', cuda:N' if 'cuda' in kinds else ''})") from None
    if dev.type not in kinds:
        raise UsageError(f"{flag} {text}: this command runs on {' and '.join(kinds)} devices only")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {text}: no CUDA device here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def out_dir(text: str, flag: str = "--out") -> Path:
    """A folder results can be written in: created if missing, proven writable with a temporary file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {text}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {text}: cannot write there ({exc.strerror or exc})") from None
    return path


def milliseconds(text: str) -> float:
    """argparse ``type=``: a finite number of milliseconds >= 0 (``nan``, ``inf`` and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of milliseconds >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
