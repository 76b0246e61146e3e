"""The process environment mmkernels reads: one parser per ``MMKERNELS_*`` variable (and ``TRITON_INTERPRET``), each
raising :class:`EnvVarError` (a ``ValueError``) that names the variable, its value and what it accepts.

No torch or triton import here: the backend registry uses it whether or not triton is installed. Every parser reads
``os.environ`` on each call (tests and benchmarks switch variables with ``monkeypatch.setenv``).

The command-line tools (``mmkernels-bench``, ``python -m mmkernels.info``, the examples) call :func:`check` before
any work and stop with one line and exit status 2 on a bad value; a library call that reads a bad variable raises
the same error at that point.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "BACKEND_CHOICES",
    "VARIABLES",
    "EnvVarError",
    "attention_packed_override",
    "autotune",
    "backend_override",
    "check",
    "debug_checks",
    "no_extension",
    "triton_interpreting",
    "tuning_device",
    "tuning_dir",
]

# The backend names MMKERNELS_BACKEND accepts: the same as mmkernels._backends.BACKENDS (that module checks the two
# agree at import; it cannot be imported from here without torch).
BACKEND_CHOICES = ("cuda", "cpp", "triton", "reference")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class EnvVarError(ValueError):
    """An environment variable mmkernels reads holds a value it does not accept."""


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def _bad(name: str, value: str, expected: str) -> EnvVarError:
    return EnvVarError(f"{name}={value!r} is not valid: expected {expected}")


def _flag(name: str) -> bool:
    """A 0/1 switch: unset or empty is off; ``1/true/yes/on`` and ``0/false/no/off`` (any case) are accepted."""
    value = _raw(name)
    if value == "" or value.lower() in _FALSE:
        return False
    if value.lower() in _TRUE:
        return True
    raise _bad(name, os.environ[name], "1 or 0 (or true/false, yes/no, on/off), or unset")


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set by the tests before triton is
    imported). Read on every call, not cached: the tests switch it with ``monkeypatch.setenv``.

    The one source of this answer: the backend registry (triton runs on CPU tensors only then), the op registration
    (an opaque ``custom_op`` instead of a traceable ``triton_op``) and the launchers (interpreter-sized tiles, via
    ``kernels.triton.tuning.target_of``) all call it. Triton owns this variable (it reads it itself), so any
    value other than ``1`` means "not interpreting" here, as it does for Triton."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def attention_packed_override() -> bool | None:
    """``MMKERNELS_ATTENTION_PACKED``: ``1`` forces the packed varlen attention kernels, ``0`` the per-sequence ones;
    unset, empty or ``auto`` leaves the choice to the launchers' rule (``kernels/triton/attention_varlen.packed_pays``).
    Any other value raises :class:`EnvVarError`."""
    value = _raw("MMKERNELS_ATTENTION_PACKED")
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise _bad("MMKERNELS_ATTENTION_PACKED", os.environ["MMKERNELS_ATTENTION_PACKED"], "0, 1, auto or unset")
    return value == "1"


def autotune() -> bool:
    """``MMKERNELS_AUTOTUNE``: on (``1``), a Triton launch whose shape bucket has no tuned entry tunes it once per
    process and saves it to the user file (docs/tuning.md); off (``0`` or unset) by default."""
    return _flag("MMKERNELS_AUTOTUNE")


def debug_checks() -> bool:
    """``MMKERNELS_DEBUG_CHECKS``: on (``1``), the public ops also check the *values* of their index tensors on the
    host (``cu_seqlens`` monotone, within the tensor, ``max_seqlen_*`` at least the longest sequence; ``kv_lens`` in
    ``[1, Lk]``), one device-to-host read per call; off (``0`` or unset, the default) they take no host sync for them
    and guard on the device instead (docs/ops/attention.md, "Host syncs and debug checks"). Parsed once per process
    by :func:`mmkernels.debug_checks_enabled` (:func:`mmkernels.set_debug_checks` overrides it at run time)."""
    return _flag("MMKERNELS_DEBUG_CHECKS")


def no_extension() -> bool:
    """``MMKERNELS_NO_EXTENSION``: on (``1``), the compiled extension ``mmkernels._C`` is not loaded (the Triton and
    PyTorch backends run); read once, when the extension is first asked for."""
    return _flag("MMKERNELS_NO_EXTENSION")


def backend_override() -> str | None:
    """``MMKERNELS_BACKEND``: a backend name (``cuda``, ``cpp``, ``triton``, ``reference``) that replaces the automatic
    choice for every op implementing it; unset or empty: auto."""
    value = _raw("MMKERNELS_BACKEND")
    if value == "":
        return None
    if value not in BACKEND_CHOICES:
        raise _bad("MMKERNELS_BACKEND", os.environ["MMKERNELS_BACKEND"],
                   f"one of {', '.join(BACKEND_CHOICES)}, or unset")
    return value


def tuning_device() -> str | None:
    """``MMKERNELS_TUNING_DEVICE``: look tuned Triton configs up as if on this device name (e.g. ``NVIDIA H100 80GB
    HBM3``); unset or empty: the CUDA device's own name."""
    value = _raw("MMKERNELS_TUNING_DEVICE")
    if value == "":
        return None
    if any(not ch.isprintable() for ch in value):
        raise _bad("MMKERNELS_TUNING_DEVICE", os.environ["MMKERNELS_TUNING_DEVICE"],
                   "a device name without control characters, or unset")
    return value


def tuning_dir() -> Path | None:
    """``MMKERNELS_TUNING_DIR``: the folder of the user tuning files (default ``~/.cache/mmkernels/tuning``); it need
    not exist yet (it is created on the first write). A path to something that is not a folder is an error."""
    value = os.environ.get("MMKERNELS_TUNING_DIR", "")
    if value.strip() == "":
        return None
    if "\0" in value:
        raise _bad("MMKERNELS_TUNING_DIR", value, "a folder path, or unset")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise _bad("MMKERNELS_TUNING_DIR", value, "a folder (or a path where one can be created), or unset; "
                   "this path exists and is not a folder")
    return path


VARIABLES: dict[str, Callable[[], object]] = {
    "MMKERNELS_BACKEND": backend_override,
    "MMKERNELS_ATTENTION_PACKED": attention_packed_override,
    "MMKERNELS_AUTOTUNE": autotune,
    "MMKERNELS_DEBUG_CHECKS": debug_checks,
    "MMKERNELS_NO_EXTENSION": no_extension,
    "MMKERNELS_TUNING_DEVICE": tuning_device,
    "MMKERNELS_TUNING_DIR": tuning_dir,
}
"""Every run-time variable mmkernels reads, with its parser (the build-time ones live in setup.py)."""


def check() -> list[str]:
    """One message per set variable of :data:`VARIABLES` whose value its parser rejects (empty: all fine)."""
    problems = []
    for parse in VARIABLES.values():
        try:
            parse()
        except EnvVarError as exc:
            problems.append(str(exc))
    return problems
