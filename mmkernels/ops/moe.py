"""The MoE ops, one module per op (this module re-exports them, so ``mmkernels.ops.moe`` keeps its names).

- ``moe_route`` (``ops/moe_route.py``): top-k routing with zero-computation experts;
- ``moe_experts`` (``ops/moe_experts.py``): grouped SwiGLU experts, the fused composition of the split pieces;
- ``moe_permute`` / ``moe_unpermute`` (``ops/moe_permute.py``): dispatch and combine for expert parallelism;
- ``moe_grouped_swiglu`` (``ops/moe_swiglu.py``): the grouped FFN over permuted rows;
- ``MoERouting``, ``MoEPermutation`` and the shared checks: ``ops/moe_common.py``.

Semantics and design: docs/design/longcat_moe.md; usage: docs/ops/moe.md.
"""

from __future__ import annotations

from .moe_common import FLOAT_DTYPES, KERNEL_DTYPES, MoEPermutation, MoERouting
from .moe_experts import EXPERTS_BACKENDS, moe_experts
from .moe_permute import MAX_LOCAL_EXPERTS, PERMUTE_BACKENDS, UNPERMUTE_BACKENDS, moe_permute, moe_unpermute
from .moe_route import ROUTE_BACKENDS, SCORINGS, moe_route, route_backward
from .moe_swiglu import SWIGLU_BACKENDS, moe_grouped_swiglu

__all__ = ["EXPERTS_BACKENDS", "FLOAT_DTYPES", "KERNEL_DTYPES", "MAX_LOCAL_EXPERTS", "PERMUTE_BACKENDS",
           "ROUTE_BACKENDS", "SCORINGS", "SWIGLU_BACKENDS", "UNPERMUTE_BACKENDS", "MoEPermutation", "MoERouting",
           "moe_experts", "moe_grouped_swiglu", "moe_permute", "moe_route", "moe_unpermute", "route_backward"]
