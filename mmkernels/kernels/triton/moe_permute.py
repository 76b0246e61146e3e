"""Triton kernels that move MoE rows between token order and expert order: the gather of ``moe_permute`` (and of
``moe_unpermute``'s backward) and the combine of ``moe_unpermute`` (and of ``moe_permute``'s backward).

A row ``r`` of the expert-ordered side names its slot ``index[r]`` (slot = t*K + k). It is *read* when ``r <
end[0]`` (``end`` a 1-element device tensor, ``offsets[-1:]``: no host sync) and ``index[r] >= 0`` (callers map
slots out of range to -1). Rows not read are never loaded (NaN there stays out) and their weights never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import wrapped

__all__ = ["gather_rows", "scatter_rows", "token_sums"]

_BLOCK_R = 32
_BLOCK_C = 64


@triton.jit
def _read_rows(index_ptr, end_ptr, rows, M):
    in_range = rows < M
    idx = tl.load(index_ptr + rows, mask=in_range, other=-1).to(tl.int64)
    read = in_range & (rows < tl.load(end_ptr).to(tl.int64)) & (idx >= 0)
    return tl.where(read, idx, 0), read, in_range


@triton.jit
def _gather_rows_kernel(
    src_ptr, stride_s, index_ptr, end_ptr, scale_ptr, dst_ptr, stride_d, M, C, DIV,
    SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[r] = src[index[r] // DIV] (* scale[index[r]], in fp32) for rows read, else 0; every row < M written."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    idx, read, in_range = _read_rows(index_ptr, end_ptr, rows, M)
    v = tl.load(src_ptr + (idx // DIV)[:, None] * stride_s + cols[None, :], mask=read[:, None] & col_mask[None, :],
                other=0.0)
    if SCALE:
        w = tl.load(scale_ptr + idx, mask=read, other=0.0)
        v = v.to(tl.float32) * w[:, None]
    v = tl.where(read[:, None], v, 0.0)
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * stride_d + cols[None, :], v.to(dst_ptr.dtype.element_ty),
             mask=in_range[:, None] & col_mask[None, :])


@triton.jit
def _scatter_rows_kernel(
    src_ptr, stride_s, index_ptr, end_ptr, scale_ptr, dst_ptr, stride_d, M, C, DIV,
    SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[index[r] // DIV] += (scale[index[r]] *) src[r] in fp32 (atomics) for the rows read."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    idx, read, _ = _read_rows(index_ptr, end_ptr, rows, M)
    mask = read[:, None] & col_mask[None, :]
    v = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    if SCALE:
        v = v * tl.load(scale_ptr + idx, mask=read, other=0.0)[:, None]
    tl.atomic_add(dst_ptr + (idx // DIV)[:, None] * stride_d + cols[None, :], v, mask=mask)


def _launch(kernel, src, index, end, scale, dst, m, div, launch):
    c = src.shape[1]
    grid = (triton.cdiv(m, _BLOCK_R), triton.cdiv(c, _BLOCK_C))
    if grid[0] == 0 or grid[1] == 0:
        return dst
    wrapped(kernel, launch)[grid](
        src, src.stride(0), index, end, scale if scale is not None else src, dst, dst.stride(0), m, c, div,
        SCALE=scale is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
    )
    return dst


def gather_rows(src: torch.Tensor, index: torch.Tensor, end: torch.Tensor, out: torch.Tensor, *, div: int,
                scale: torch.Tensor | None = None, launch=None) -> torch.Tensor:
    """``out[r] = src[index[r] // div] (* scale[index[r]])`` for the rows read (see the module), zero elsewhere.
    ``src`` [*, C] and ``out`` [M, C] row-major in their last dim; ``index`` int32 [>= M]; ``scale`` fp32 flat."""
    return _launch(_gather_rows_kernel, src, index, end, scale, out, out.shape[0], div, launch)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, end: torch.Tensor, out: torch.Tensor, *, div: int,
                 scale: torch.Tensor | None = None, launch=None) -> torch.Tensor:
    """``out[index[r] // div] += (scale[index[r]] *) src[r]`` over the rows ``r < src.shape[0]`` read; ``out`` fp32."""
    return _launch(_scatter_rows_kernel, src, index, end, scale, out, src.shape[0], div, launch)


def token_sums(rows: torch.Tensor, index: torch.Tensor, end: torch.Tensor, t: int, k: int, *,
               weights: torch.Tensor | None = None, init: torch.Tensor | None = None, deterministic: bool = False,
               launch=None) -> torch.Tensor:
    """fp32 [T, C]: ``init`` plus, per token, the sum over its read rows of (weight *) the row (the combine).

    Deterministic: each read row lands alone on its slot of a zeroed [T*K, C] buffer, then each token sums its K
    slots in slot order (bitwise reproducible; a slot named by several rows, which no plan produces, gets their
    atomic sum); otherwise the rows are added straight into the tokens with atomics."""
    c = rows.shape[1]
    out = init if init is not None else rows.new_zeros((t, c), dtype=torch.float32)
    if rows.shape[0] == 0 or t == 0:
        return out
    w = weights.reshape(-1) if weights is not None else None
    if deterministic:
        buf = rows.new_zeros((t * k, c), dtype=torch.float32)
        scatter_rows(rows, index, end, buf, div=1, scale=w, launch=launch)
        return out + buf.view(t, k, c).sum(1)
    return scatter_rows(rows, index, end, out, div=k, scale=w, launch=launch)
