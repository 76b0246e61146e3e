"""Sum and product reductions without ATen's single-output split, for the batch-invariant mode
(:func:`mmkernels.set_batch_invariant`).

ATen reduces a CPU tensor with several threads in one of two ways: when the result has several elements (a batch
of rows), each thread takes whole rows and reduces each row serially; when it has ONE element (a row alone, e.g.
``logits.sum(-1)`` for a batch of 1 over a 50k vocabulary), the threads split that row and the partial sums are
added at the end, another order of additions. So a row's sum, and what is built on it (an entropy, a KL term),
depends on whether it is alone (found by the fresh-user trial at 4 threads: ``426.285614`` alone vs ``426.2854`` in a
batch of 7; ``mean`` at 3 threads, hence ``var``'s gradient). Under the mode, a single-output ``sum`` / ``nansum``
/ ``prod`` / ``mean`` / ``linalg_vector_norm`` that ATen would split (at least 32768 elements, more than one thread)
runs as two rows of the same data (a stride-0 view: no copy), so it takes the per-row serial path of a batch; the
others run ATen's kernel as they are. ``max``/``min``/``argmax`` are exact in any order; ``var``, ``std``,
``logsumexp``, softmax and the norms' own kernels were found to take the per-row path alone
(``tests/test_batch_invariance_reductions.py`` sweeps a model's row-wise reductions at 1, 3 and 4 threads).
"""

from __future__ import annotations

import math

import torch

from .batch_invariance_elementwise import _out_overload

__all__ = ["GRAIN", "REDUCTIONS", "register"]

GRAIN = 32768  # ATen's internal::GRAIN_SIZE: below it a reduction runs serially on one thread
# functional overloads with dims: (name, whether dims is a list (None or [] reduces every dim) or one int); sum.default
# and prod.default (every dim) go through them, mean.default through mean.dim
REDUCTIONS = (("sum.dim_IntList", "list"), ("nansum", "list"), ("prod.dim_int", "int"), ("mean.dim", "list"),
              ("linalg_vector_norm", "list"))
_REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _reduced_dims(dims, ndim: int, kind: str) -> list[int]:
    if dims is None or (kind == "list" and len(dims) == 0):
        return list(range(ndim))
    dims = [dims] if kind == "int" else list(dims)
    return [d % ndim if ndim else 0 for d in dims]


def _result_dtype(packet: str, x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The result dtype ATen gives (its ``out=`` kernel wants it): ``dtype=`` if given; sums and products of integers
    and bools are int64; a norm is real."""
    if dtype is not None:
        return _REAL.get(dtype, dtype) if packet == "linalg_vector_norm" else dtype
    if packet == "linalg_vector_norm":
        return _REAL.get(x.dtype, x.dtype)
    if packet in ("sum", "nansum", "prod") and not (x.is_floating_point() or x.is_complex()):
        return torch.int64
    return x.dtype


def _kernel(name: str, kind: str):
    packet, _, overload = name.partition(".")
    op = getattr(getattr(torch.ops.aten, packet), overload or "default")
    out_op, out_name = _out_overload(op)
    names = [a.name for a in op._schema.arguments]

    def run(*args, **kwargs):
        bound = dict(zip(names, args)) | kwargs
        x = bound["self"]
        reduced = _reduced_dims(bound.get("dim"), x.dim(), kind)
        out = torch.empty(0, dtype=_result_dtype(packet, x, bound.get("dtype")), device=x.device)  # out= resizes it
        single = math.prod(s for i, s in enumerate(x.shape) if i not in reduced) == 1
        if not (single and x.numel() >= GRAIN and torch.get_num_threads() > 1):
            return out_op(**bound, **{out_name: out})
        # two rows, one storage (a stride-0 view): ATen's per-row path, as for a row of a batch
        bound["self"] = x.unsqueeze(0).expand(2, *x.shape)
        bound["dim"] = reduced[0] + 1 if kind == "int" else [d + 1 for d in reduced]
        out_op(**bound, **{out_name: out})
        return out[0]

    return run


def register(lib: torch.library.Library) -> None:
    """Register the reductions' CPU kernels on ``lib`` (an ``aten`` ``IMPL`` library)."""
    kernels = {name: _kernel(name, kind) for name, kind in REDUCTIONS}
    for name, kernel in kernels.items():
        lib.impl(name, kernel, "CPU")
    every_dim = kernels["sum.dim_IntList"]
    lib.impl("sum", lambda self, *, dtype=None: every_dim(self, [], False, dtype=dtype), "CPU")
    average = kernels["mean.dim"]
    lib.impl("mean", lambda self, *, dtype=None: average(self, [], False, dtype=dtype), "CPU")
    product = kernels["prod.dim_int"]
    lib.impl("prod", lambda self, *, dtype=None: product(self.reshape(-1), 0, False, dtype=dtype), "CPU")
