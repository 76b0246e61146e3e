"""Batch-invariant products for the batch-invariant mode (:func:`mmkernels.set_batch_invariant`).

A BLAS GEMM picks its algorithm (blocking, vector path, split of the reduction, the matrix-vector kernel for one
row) from the matrix shapes, so the same row of ``x @ w`` can round differently when ``x`` has 1, 7 or 33 rows: on a
2-core x86 CPU with torch 2.14, a row computed alone differs from the same row inside 2 or 7 rows in the last bits
(``tests/test_batch_invariance.py`` keeps the probe). Under the mode, every ``aten.mm`` / ``aten.addmm`` /
``aten.bmm`` (``nn.Linear``, ``torch.matmul``, the backward's input gradients) runs as a loop of products of ONE
shape per weight: ``[BLOCK_ROWS, K] @ [K, N]`` blocks of rows (the last one zero-padded), each on a 64-byte
aligned block, so a row's result depends only on the row and the weight. The reduction over ``K`` is untouched, so a
row's value is what the library's GEMM gives for a block of 64 rows.

Element-wise transcendental functions have a problem of the same kind on a CPU (a scalar tail that rounds
differently): :mod:`mmkernels.batch_invariance_elementwise` pads them while the mode is on; a row's ``sum`` alone is
split across threads where a batch's rows are not: :mod:`mmkernels.batch_invariance_reductions`.

How: the CPU and CUDA kernels of the three products are replaced while the mode is on (``torch.library.Library``
``IMPL`` registrations, removed when it is turned off); the blocks call the ``.out`` overloads, whose kernels are
the library's own. ``bmm`` loops over its batch (its batch count is the batch size in HF attention). Not covered:
``torch.compile``'d graphs (Inductor emits its own GEMM calls), ``mv``/``dot``, ``baddbmm``, convolutions and
``scaled_dot_product_attention`` in code that is not ours (the ops of this library pick their invariant paths
themselves). Weight gradients (``dW = dY^T X``) reduce over the batch by definition: they are not per-row results.

Cost: 64-row products waste up to 63 rows per call and lose the large-GEMM efficiency (about 2.6x on a
``[4096, 768] @ [768, 3072]`` fp32 product on a 2-core CPU); on a GPU this routing is a correctness path, the speed
path there is the Triton kernels' fixed configs (docs/batch_invariance.md).
"""

from __future__ import annotations

import threading

import torch

from . import batch_invariance_elementwise, batch_invariance_reductions

__all__ = ["BLOCK_ROWS", "block_mm", "route_matmuls", "routed"]

BLOCK_ROWS = 64  # rows per product: one GEMM shape per weight, whatever the batch
_ALIGN = 64  # bytes: MKL's results may depend on the alignment of A's rows

_lock = threading.Lock()
_library: torch.library.Library | None = None


def _aligned(t: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """``t`` with a 64-byte aligned base, copied only when it is not (``rows``: also row-major). A view at another
    offset of the same values (the same sequence at another batch position) then gives the same product."""
    if t.data_ptr() % _ALIGN == 0 and (t.is_contiguous() or not rows):
        return t
    if rows:
        return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    return t.clone()  # same strides (a transposed weight stays transposed), fresh aligned storage


def block_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, beta=1, alpha=1) -> torch.Tensor:
    """``beta * bias + alpha * (a @ b)`` for ``a`` [M, K], ``b`` [K, N] in blocks of :data:`BLOCK_ROWS` rows of ``a``:
    every block is one ``[BLOCK_ROWS, K] @ [K, N]`` product (the last block zero-padded), so row ``i`` of the result
    depends only on ``a[i]``, ``b`` and ``bias``. ``bias``: broadcastable to [M, N] (``[N]``, ``[1, N]``, ``[M, N]``,
    ``[M, 1]``)."""
    m = a.shape[0]
    n = b.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    a, b = _aligned(a, rows=True), _aligned(b)
    per_row = bias is not None and bias.dim() == 2 and bias.shape[0] == m and m != 1
    for start in range(0, m, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, m - start)
        blk = _padded_rows(a[start:start + rows])  # the last block zero-padded: one product shape
        target = out[start:start + rows] if rows == BLOCK_ROWS else out.new_empty((BLOCK_ROWS, n))
        if bias is None:
            torch.ops.aten.mm.out(blk, b, out=target)
        else:
            blk_bias = _padded_rows(bias[start:start + rows]) if per_row else bias
            torch.ops.aten.addmm.out(blk_bias, blk, b, beta=beta, alpha=alpha, out=target)
        if rows < BLOCK_ROWS:
            out[start:] = target[:rows]
    return out


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with :data:`BLOCK_ROWS` rows: itself when full, else a zero-padded copy."""
    if t.shape[0] == BLOCK_ROWS:
        return t
    buf = t.new_zeros((BLOCK_ROWS, *t.shape[1:]))
    buf[:t.shape[0]] = t
    return buf


def _mm(a, b):
    return block_mm(a, b)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    return block_mm(a, b, bias, beta, alpha)


def _bmm(a, b):
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    for i in range(a.shape[0]):  # the batch count is the batch size (B * heads): one product per entry
        out[i] = block_mm(a[i], b[i])
    return out


def route_matmuls(enabled: bool) -> None:
    """Turn the blocked ``mm`` / ``addmm`` / ``bmm`` kernels (CPU and CUDA) and the padded element-wise CPU kernels
    on or off; idempotent."""
    global _library
    with _lock:
        if enabled and _library is None:
            lib = torch.library.Library("aten", "IMPL")
            try:
                for key in ("CPU", "CUDA"):
                    lib.impl("mm", _mm, key)
                    lib.impl("addmm", _addmm, key)
                    lib.impl("bmm", _bmm, key)
                batch_invariance_elementwise.register(lib)
                batch_invariance_reductions.register(lib)
            except BaseException:
                lib._destroy()  # all or nothing: no kernel of a failed switch stays in place
                raise
            _library = lib
        elif not enabled and _library is not None:
            _library._destroy()
            _library = None


def routed() -> bool:
    """Whether the blocked products are in place (the mode is on)."""
    return _library is not None
