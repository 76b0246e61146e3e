"""Guarded loading of the optional compiled extension ``mmkernels._C``.

The extension holds the C++ CPU and CUDA kernels. It is optional: when it is missing, was built for another
torch, or fails to load, mmkernels warns once and every op keeps working on its Triton and PyTorch backends.
Set ``MMKERNELS_NO_EXTENSION=1`` to skip loading it on purpose (tests use this to prove the fallback). A value other
than 1/0 (true/false, yes/no, on/off) or empty leaves the extension unloaded with an ``ExtensionWarning`` naming the
variable, and the command-line tools refuse to start (``mmkernels._env.check``).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from ._env import EnvVarError, no_extension

__all__ = ["ExtensionStatus", "ExtensionWarning", "extension_status"]


class ExtensionWarning(UserWarning):
    """The compiled extension could not be used; ops fall back to their other backends."""


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    cuda: bool  # the CUDA kernels were compiled in (they still need a CUDA device to run)
    reason: str  # why it is not loaded, or "" when it is
    built_with_torch: str | None
    cuda_archs: str | None
    cuda_skip_reason: str | None
    module: ModuleType | None = None


def _load() -> ExtensionStatus:
    def unavailable(reason: str, *, warn: bool, info=None, rebuild: bool = True) -> ExtensionStatus:
        if warn:
            warnings.warn(
                f"mmkernels: compiled extension not used ({reason}); ops run on their Triton/PyTorch backends."
                + (" Rebuild with `pip install --no-build-isolation -e .` to get the C++/CUDA kernels." if rebuild
                   else ""),
                ExtensionWarning,
                stacklevel=4,  # the line that imported mmkernels
            )
        return ExtensionStatus(
            False,
            False,
            reason,
            getattr(info, "TORCH_VERSION", None),
            getattr(info, "CUDA_ARCHS", None),
            getattr(info, "CUDA_SKIP_REASON", None),
        )

    try:
        disabled = no_extension()  # the one parser of MMKERNELS_NO_EXTENSION (mmkernels._env)
    except EnvVarError as exc:
        # Read while `import mmkernels` runs: raising here would leave no package to report with, so the extension
        # stays unloaded (what the variable is set for) and the warning says why; the CLIs refuse to start (exit 2).
        return unavailable(f"{exc}; not loading it until the variable is fixed", warn=True, rebuild=False)
    if disabled:
        return unavailable("disabled by MMKERNELS_NO_EXTENSION=1", warn=False)
    try:
        info = importlib.import_module("mmkernels._build_info")
    except ImportError:
        info = None
    if info is not None and torch.__version__ != info.TORCH_VERSION:
        # Loading a library built against another torch can crash the process, so check before importing it.
        return unavailable(f"built for torch {info.TORCH_VERSION}, running torch {torch.__version__}", warn=True,
                           info=info)
    try:
        module = importlib.import_module("mmkernels._C")
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "mmkernels._C"
        return unavailable("not built" if missing else f"failed to load: {exc}", warn=True, info=info)
    except OSError as exc:
        return unavailable(f"failed to load: {exc}", warn=True, info=info)
    return ExtensionStatus(
        True,
        bool(module.has_cuda_kernels()),
        "",
        getattr(info, "TORCH_VERSION", module.built_with_torch()),
        getattr(info, "CUDA_ARCHS", None),
        getattr(info, "CUDA_SKIP_REASON", None),
        module,
    )


_STATUS: ExtensionStatus | None = None


def extension_status() -> ExtensionStatus:
    """Load the extension on first use (once per process) and say what loaded."""
    global _STATUS
    if _STATUS is None:
        _STATUS = _load()
    return _STATUS
