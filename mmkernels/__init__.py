"""mmkernels: fast Triton and CUDA kernels for multimodal and mixture-of-experts models.

Public layers: ``mmkernels.ops`` (functions), ``mmkernels.nn`` (modules), ``mmkernels.bench`` (benchmarks).
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._backends import BACKENDS, BackendError, available_backends, registered_ops
from ._config import (
    batch_invariant,
    debug_checks,
    debug_checks_enabled,
    deterministic,
    is_batch_invariant,
    is_deterministic,
    set_batch_invariant,
    set_debug_checks,
    set_deterministic,
)
from ._extension import ExtensionWarning, extension_status

extension_status()  # load mmkernels._C (if built) before the ops, so its kernels are registered

# distributed plugs expert parallelism into nn.moe_dispatch (models never import it): docs/distributed.md
from . import distributed, nn, ops  # noqa: E402
from ._info import info  # noqa: E402

__all__ = [
    "BACKENDS",
    "BackendError",
    "ExtensionWarning",
    "__version__",
    "available_backends",
    "batch_invariant",
    "debug_checks",
    "debug_checks_enabled",
    "deterministic",
    "distributed",
    "extension_status",
    "info",
    "is_batch_invariant",
    "is_deterministic",
    "nn",
    "ops",
    "registered_ops",
    "set_batch_invariant",
    "set_debug_checks",
    "set_deterministic",
]
