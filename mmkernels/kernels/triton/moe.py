"""Triton kernels for grouped SwiGLU experts: alignment on the device, gather-GEMMs and grouped weight gradients.

Rows are *slots* (token, k) sorted by expert; zero-expert slots sort last and are covered by no tile, so they
never reach a GEMM. A tile is (expert, BLOCK_M consecutive sorted rows of that expert); the tile map is built
with torch ops on the device (no host sync), sized for the worst case, and unused tiles exit at once.

FLOPs per FFN slot: 2*Dm*2Di (gate/up) + 2*Di*Dm (down) forward; twice that backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Alignment(NamedTuple):
    order: torch.Tensor  # int32 [T*K]: slot ids sorted by expert (zero-expert slots last)
    token: torch.Tensor  # int32 [T*K]: token of each sorted row
    starts: torch.Tensor  # int32 [N]: first sorted row of each FFN expert
    ends: torch.Tensor  # int32 [N]: one past its last row
    tile_expert: torch.Tensor  # int32 [max_tiles]: expert of each tile, -1 for unused tiles
    tile_row: torch.Tensor  # int32 [max_tiles]: first sorted row of each tile
    block_m: int


def align(topk_ids: torch.Tensor, num_ffn_experts: int, block_m: int) -> Alignment:
    t, k = topk_ids.shape
    n = num_ffn_experts
    flat = topk_ids.reshape(-1).long()
    key = torch.where(flat < n, flat, n)  # zero-expert slots share one key past every FFN expert
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=n + 1)[:n]
    ends = counts.cumsum(0)
    starts = ends - counts
    blocks = (counts + block_m - 1) // block_m
    block_ends = blocks.cumsum(0)
    max_tiles = triton.cdiv(t * k, block_m) + n  # worst case; no device value is read on the host
    tile = torch.arange(max_tiles, device=topk_ids.device)
    expert = torch.searchsorted(block_ends, tile, right=True)
    safe = expert.clamp(max=n - 1)
    tile_row = starts[safe] + (tile - (block_ends - blocks)[safe]) * block_m
    tile_expert = torch.where(expert < n, expert, -1)
    return Alignment(
        order.to(torch.int32),
        (order // k).to(torch.int32),
        starts.to(torch.int32),
        ends.to(torch.int32),
        tile_expert.to(torch.int32),
        tile_row.to(torch.int32),
        block_m,
    )


@triton.jit
def _rows(index_ptr, rows, mask, GATHER: tl.constexpr):
    """The source row of each sorted row: ``index[r]`` when GATHER (e.g. the token of a slot), else r itself."""
    if GATHER:
        return tl.load(index_ptr + rows, mask=mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_index_ptr, stride_am, stride_ak,
    b_ptr, stride_be, stride_bk, stride_bn,
    c_ptr, c_index_ptr, stride_cm, stride_cn,
    scale_ptr,
    tile_expert_ptr, tile_row_ptr, expert_end_ptr,
    N, K, up_offset,
    A_GATHER: tl.constexpr, C_SCATTER: tl.constexpr, SCALE: tl.constexpr, GATED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[rows] (=|+=) A[rows] @ B_e over one tile of one expert.

    A row of sorted row r is ``a_index[r]`` when A_GATHER (tokens gathered straight from ``hidden``), else r.
    B_e[k, n] lives at ``b + e*stride_be + k*stride_bk + n*stride_bn`` (any transpose through the strides).
    GATED: B_e has gate columns [0, N) and up columns [up_offset, up_offset + N); C = silu(A@gate) * (A@up).
    SCALE multiplies row r by scale[r]; C_SCATTER atomically adds row r into C row ``c_index[r]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(expert_end_ptr + e)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    a_rows = _rows(a_index_ptr, rows, row_mask, A_GATHER)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if GATED:
            b_up = tl.load(b_base + ks[:, None] * stride_bk + (cols[None, :] + up_offset) * stride_bn,
                           mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if IEEE:
                acc_up += tl.dot(a, b_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up)
    if GATED:
        out = acc * tl.sigmoid(acc) * acc_up
    else:
        out = acc
    if SCALE:
        out = out * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    if C_SCATTER:
        c_rows = tl.load(c_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.atomic_add(c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=mask)
    else:
        tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn,
                 out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_index_ptr, stride_am, stride_ak,
    b_ptr, b_index_ptr, stride_bm, stride_bn,
    c_ptr, stride_ce, stride_cm, stride_cn,
    scale_ptr, expert_start_ptr, expert_end_ptr,
    M, N,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C_e[m, n] = sum over expert e's sorted rows r of (scale[r] *) A[r, m] * B[r, n]. Experts with no rows
    get zeros. Rows are gathered through the index arrays like the forward GEMM."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    ms = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    start = tl.load(expert_start_ptr + e)
    end = tl.load(expert_end_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < end
        a_rows = _rows(a_index_ptr, rs, r_mask, A_GATHER)
        b_rows = _rows(b_index_ptr, rs, r_mask, B_GATHER)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ms[None, :] * stride_ak,
                    mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + ns[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if SCALE:
            a = (a * tl.load(scale_ptr + rs, mask=r_mask, other=0.0)[:, None]).to(b.dtype)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    tl.store(c_ptr + e.to(tl.int64) * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Fixed, untuned choices: fp32 tiles are smaller."""
    if dtype == torch.float32:
        return 32, 64, 32, 4, 2
    return 64, 128, 64, 8, 3


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    b_strides: tuple[int, int, int],
    out: torch.Tensor,
    al: Alignment,
    *,
    n: int,
    k: int,
    a_index: torch.Tensor | None = None,
    c_index: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    up_offset: int | None = None,
    launch=None,
) -> torch.Tensor:
    """Launch ``_grouped_gemm_kernel`` over every tile of ``al``; see the kernel for the arguments."""
    kernel = launch(_grouped_gemm_kernel) if launch is not None else _grouped_gemm_kernel
    block_m, block_n, block_k, warps, stages = _blocks(a.dtype)
    assert block_m == al.block_m, "alignment built for another BLOCK_M"
    dummy = al.tile_expert  # any int32 tensor: stands in for unused pointer arguments
    grid = (al.tile_expert.numel(), triton.cdiv(n, block_n))
    kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), a.stride(1),
        b, *b_strides,
        out, c_index if c_index is not None else dummy, out.stride(0), out.stride(1),
        scale if scale is not None else a,
        al.tile_expert, al.tile_row, al.ends,
        n, k, up_offset or 0,
        A_GATHER=a_index is not None, C_SCATTER=c_index is not None, SCALE=scale is not None,
        GATED=up_offset is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    al: Alignment,
    *,
    a_index: torch.Tensor | None = None,
    b_index: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    launch=None,
) -> torch.Tensor:
    """out[e] = A_e^T @ B_e (rows of expert e, optionally gathered and scaled); out is [N, M, Ncols]."""
    kernel = launch(_grouped_wgrad_kernel) if launch is not None else _grouped_wgrad_kernel
    m, n = out.shape[1], out.shape[2]
    block_m, block_n, block_r, warps, stages = _blocks(a.dtype)
    dummy = al.tile_expert
    grid = (out.shape[0], triton.cdiv(m, block_m) * triton.cdiv(n, block_n))
    kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), a.stride(1),
        b, b_index if b_index is not None else dummy, b.stride(0), b.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        scale if scale is not None else a, al.starts, al.ends,
        m, n,
        A_GATHER=a_index is not None, B_GATHER=b_index is not None, SCALE=scale is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
    )
    return out
