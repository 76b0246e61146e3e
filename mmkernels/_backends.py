"""Backend registry: which implementation of an op runs for given tensors.

Backends:
- ``"cuda"``: CUDA kernels of the compiled extension ``mmkernels._C`` (CUDA tensors).
- ``"cpp"``: C++ CPU kernels of the compiled extension (CPU tensors).
- ``"triton"``: our Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests).
- ``"reference"``: plain PyTorch, any device. Also the tests' and the benchmarks' baseline.

``backend=None`` means auto: the op's preference order for the device, first available wins; an unavailable
auto choice falls back quietly (logged at debug). ``MMKERNELS_BACKEND=<name>`` replaces auto for every op that
implements that backend. An explicit choice (argument or environment) that cannot run raises ``BackendError``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ._extension import extension_status

__all__ = ["BACKENDS", "BackendError", "OpBackends", "available_backends", "registered_ops", "triton_available"]

logger = logging.getLogger("mmkernels")

BACKENDS = ("cuda", "cpp", "triton", "reference")


def _debug(msg: str, *args) -> None:
    # Backend selection runs inside torch.compile'd code too; a logging call there is a graph break, which
    # fullgraph=True turns into an error. Log in eager mode only.
    if not torch.compiler.is_compiling():
        logger.debug(msg, *args)


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the op for these tensors."""


_TRITON_AVAILABLE: bool | None = None


def triton_available() -> bool:
    # A plain module-level cache (not functools.cache, which torch.compile warns about when it traces a caller).
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_AVAILABLE


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a human-readable reason."""
    if name == "reference":
        return None
    if name in ("cuda", "cpp"):
        ext = extension_status()
        if not ext.loaded:
            return f"the compiled extension is not loaded ({ext.reason})"
        if name == "cuda":
            if device.type != "cuda":
                return f"backend 'cuda' needs CUDA tensors, got {device.type} tensors"
            if not ext.cuda:
                return f"the extension was built without CUDA kernels ({ext.cuda_skip_reason or 'CPU-only build'})"
            return None
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {device.type} tensors"
        return None
    if name == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreting():
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), got {device.type} tensors"
    return f"unknown backend {name!r}"


@dataclass
class OpBackends:
    """The implementations of one op, and its auto-selection order per device type."""

    op: str
    auto_order: dict[str, Sequence[str]] = field(
        default_factory=lambda: {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
    )
    impls: dict[str, Callable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _REGISTRY[self.op] = self

    def register(self, name: str) -> Callable[[Callable], Callable]:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")

        def deco(fn: Callable) -> Callable:
            self.impls[name] = fn
            return fn

        return deco

    def available(self, device: torch.device) -> list[str]:
        return [n for n in self.impls if backend_unavailable_reason(n, device) is None]

    def select(self, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
        """Resolve ``backend`` (None = auto) for tensors on ``device``; returns (name, implementation)."""
        device = torch.device(device)
        source = "backend="
        if backend is None:
            env = os.environ.get("MMKERNELS_BACKEND", "").strip()
            if env and env in self.impls:
                backend, source = env, "MMKERNELS_BACKEND="
            elif env and env not in BACKENDS:
                raise BackendError(f"MMKERNELS_BACKEND={env!r} is not a backend; expected one of {BACKENDS}")
            elif env:
                _debug("%s: has no %r backend; MMKERNELS_BACKEND ignored, using auto", self.op, env)
        if backend is not None:
            if backend not in self.impls:
                raise BackendError(
                    f"{self.op}: {source}{backend!r} is not implemented; this op has {sorted(self.impls)}"
                )
            reason = backend_unavailable_reason(backend, device)
            if reason is not None:
                raise BackendError(f"{self.op}: {source}{backend!r} cannot run: {reason}")
            return backend, self.impls[backend]
        for name in self.auto_order.get(device.type, ("reference",)):
            if name not in self.impls:
                continue
            reason = backend_unavailable_reason(name, device)
            if reason is None:
                return name, self.impls[name]
            _debug("%s: auto skips %r: %s", self.op, name, reason)
        if "reference" in self.impls:
            return "reference", self.impls["reference"]
        raise BackendError(f"{self.op}: no backend can run on {device}")


_REGISTRY: dict[str, OpBackends] = {}


def registered_ops() -> dict[str, OpBackends]:
    """Every public op with its backends, by op name."""
    return dict(_REGISTRY)


def available_backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """The backends of ``op`` that can run on ``device`` right now."""
    return _REGISTRY[op].available(torch.device(device))
