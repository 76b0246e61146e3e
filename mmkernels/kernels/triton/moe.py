"""Triton kernels for grouped SwiGLU experts: alignment on the device, gather-GEMMs and grouped weight gradients.

Rows are *slots* (token, k) sorted by expert; slots not dispatched here (zero experts, ids outside the local
expert range, negative or out-of-range ids) sort last and are covered by no tile, so they never reach a GEMM.
Rows are gathered from ``hidden`` by index, or read in place from a permuted copy (``moe_permute``). A tile is
(expert, BLOCK_M consecutive sorted rows of that expert); the tile map is built with torch ops on the device (no
host sync), sized for the worst case, and unused tiles exit at once.

FLOPs per FFN slot: 2*Dm*2Di (gate/up) + 2*Di*Dm (down) forward; twice that backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference.moe import align  # noqa: F401 - the plan the tile map is built on (plain PyTorch)
from . import tuning
from ._common import input_precision, wrapped


class Groups(NamedTuple):
    """Rows grouped by expert, and the tile map the grouped kernels run over (all int32, on the device)."""

    offsets: torch.Tensor  # [E+1]: expert e owns sorted rows [offsets[e], offsets[e+1]); rows past offsets[E] idle
    tile_expert: torch.Tensor  # [max_tiles]: expert of each tile, -1 for unused tiles
    tile_row: torch.Tensor  # [max_tiles]: first sorted row of each tile
    block_m: int

    @property
    def starts(self) -> torch.Tensor:  # [E] first row of each expert (a view)
        return self.offsets[:-1]

    @property
    def ends(self) -> torch.Tensor:  # [E] one past its last row (a view)
        return self.offsets[1:]


def tiles(offsets: torch.Tensor, rows: int, block_m: int) -> Groups:
    """The tile map of ``offsets`` (int [E+1], non-decreasing, within [0, rows]): tile = (expert, BLOCK_M
    consecutive rows of it). Sized for the worst case (every expert's last tile partial), so no device value is
    read on the host; unused tiles get expert -1 and exit at once."""
    e = offsets.numel() - 1
    offs = offsets.long()
    counts = offs[1:] - offs[:-1]
    blocks = (counts + block_m - 1) // block_m
    block_ends = blocks.cumsum(0)
    max_tiles = triton.cdiv(rows, block_m) + e
    tile = torch.arange(max_tiles, device=offs.device)
    expert = torch.searchsorted(block_ends, tile, right=True)
    if e > 0:
        safe = expert.clamp(max=e - 1)
        tile_row = offs[:-1][safe] + (tile - (block_ends - blocks)[safe]) * block_m
    else:
        tile_row = torch.zeros_like(tile)
    tile_expert = torch.where(expert < e, expert, -1)
    # .to() returns int32 offsets as they are (no copy): the tensor the caller passes on is the one it saved.
    return Groups(offsets.to(torch.int32), tile_expert.to(torch.int32), tile_row.to(torch.int32), block_m)


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
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        acc += tl.dot(a, b, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(b_base + ks[:, None] * stride_bk + (cols[None, :] + up_offset) * stride_bn,
                           mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up += tl.dot(a, b_up, input_precision=PRECISION)
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
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
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
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    tl.store(c_ptr + e.to(tl.int64) * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def block_m(dtype: torch.dtype) -> int:
    """Rows per tile of the grouped GEMM for ``dtype`` operands (the tile map of ``tiles`` depends on it)."""
    return _blocks(dtype)[0]


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Untuned, but spill-free for the grouped GEMM and the
    weight-gradient kernel on sm_80 and sm_90a (docs/performance.md): BLOCK_K 64 spilled 164 bytes per thread in the
    gated (two-accumulator) fp16 GEMM on sm_80, and fp32 on 4 warps up to 88. fp32 tiles are smaller."""
    if dtype == torch.float32:
        return 32, 64, 32, 8, 2
    return 64, 128, 32, 8, 3


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    b_strides: tuple[int, int, int],
    out: torch.Tensor,
    al: Groups,
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
    kernel = wrapped(_grouped_gemm_kernel, launch)
    experts = al.offsets.numel() - 1
    block_m, block_n, block_k, warps, stages = tuning.pick(
        "moe_grouped_gemm", dict(dtype=a.dtype, gated=up_offset is not None, block_m=al.block_m, n=n, k=k,
                                 experts=experts, tiles=al.tile_expert.numel()), _blocks(a.dtype), like=a)
    assert block_m == al.block_m, "alignment built for another BLOCK_M"
    dummy = al.tile_expert  # any int32 tensor: stands in for unused pointer arguments
    grid = (al.tile_expert.numel(), triton.cdiv(n, block_n))
    if grid[0] == 0 or grid[1] == 0:  # no rows and no experts, or no output columns: nothing to launch
        return out
    kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), a.stride(1),
        b, *b_strides,
        out, c_index if c_index is not None else dummy, out.stride(0), out.stride(1),
        scale if scale is not None else a,
        al.tile_expert, al.tile_row, al.ends,
        n, k, up_offset or 0,
        A_GATHER=a_index is not None, C_SCATTER=c_index is not None, SCALE=scale is not None,
        GATED=up_offset is not None, PRECISION=input_precision(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def grouped_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    al: Groups,
    *,
    a_index: torch.Tensor | None = None,
    b_index: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    launch=None,
) -> torch.Tensor:
    """out[e] = A_e^T @ B_e (rows of expert e, optionally gathered and scaled); out is [N, M, Ncols]."""
    kernel = wrapped(_grouped_wgrad_kernel, launch)
    m, n = out.shape[1], out.shape[2]
    block_m, block_n, block_r, warps, stages = tuning.pick(
        "moe_grouped_wgrad", dict(dtype=a.dtype, m=m, n=n, experts=out.shape[0], tiles=al.tile_expert.numel(),
                                  block_m=al.block_m), _blocks(a.dtype), like=a)
    dummy = al.tile_expert
    grid = (out.shape[0], triton.cdiv(m, block_m) * triton.cdiv(n, block_n))
    if grid[0] == 0 or grid[1] == 0:
        return out
    kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), a.stride(1),
        b, b_index if b_index is not None else dummy, b.stride(0), b.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        scale if scale is not None else a, al.starts, al.ends,
        m, n,
        A_GATHER=a_index is not None, B_GATHER=b_index is not None, SCALE=scale is not None,
        PRECISION=input_precision(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# tuning: the search spaces of the grouped GEMM and the weight-gradient GEMM (kernels/triton/tuning.py is the core)
# ---------------------------------------------------------------------------------------------------------------


def _tokens_per_expert(shape):
    """Rows per expert, from host-known sizes only (no device read): the tile map has ``ceil(rows / BLOCK_M) + E``
    entries, so ``(tiles - E) * BLOCK_M / E`` is the mean (rounded up to whole tiles)."""
    experts = max(1, shape["experts"])
    return max(0, shape["tiles"] - shape["experts"]) * shape["block_m"] // experts


def _gemm_key(shape) -> dict:
    return {"dtype": tuning.dtype_token(shape), "gated": int(bool(shape["gated"])), "m": int(shape["block_m"]),
            "n": tuning.bucket(shape["n"], tuning.DIM_BUCKETS), "k": tuning.bucket(shape["k"], tuning.DIM_BUCKETS),
            "tpe": tuning.bucket(_tokens_per_expert(shape), tuning.TPE_BUCKETS)}


def _wgrad_key(shape) -> dict:
    return {"dtype": tuning.dtype_token(shape), "m": tuning.bucket(shape["m"], tuning.DIM_BUCKETS),
            "n": tuning.bucket(shape["n"], tuning.DIM_BUCKETS),
            "tpe": tuning.bucket(_tokens_per_expert(shape), tuning.TPE_BUCKETS)}


def _est_gemm(c, key) -> tuple[int, int]:
    return tuning.gemm_estimate(key["m"], c["block_n"], c["block_k"], c["num_stages"], c["num_warps"],
                                tuning.element_size(key), 2 if key["gated"] else 1)


def _est_wgrad(c, key) -> tuple[int, int]:
    return tuning.gemm_estimate(c["block_m"], c["block_n"], c["block_r"], c["num_stages"], c["num_warps"],
                                tuning.element_size(key))


def _make(wgrad: bool):
    def make(shape, device: torch.device, small: bool):
        """Input maker: ``experts`` groups of equal size (the shape's rows per expert) through a real tile map."""
        dt = shape["dtype"]
        bm = block_m(dt)
        experts = 2 if small else int(shape["experts"])
        tpe = 3 if small else max(1, _tokens_per_expert(shape))
        rows = experts * tpe
        offsets = torch.arange(experts + 1, device=device, dtype=torch.int32) * tpe
        al = tiles(offsets, rows, bm)
        if wgrad:
            m, n = (16, 32) if small else (int(shape["m"]), int(shape["n"]))
            a = torch.randn(rows, m, device=device, dtype=dt)
            b = torch.randn(rows, n, device=device, dtype=dt)

            def run():
                out = torch.empty((experts, m, n), device=device, dtype=dt)
                return (grouped_wgrad(a, b, out, al),)

            return run
        n, k = (32, 16) if small else (int(shape["n"]), int(shape["k"]))
        gated = bool(shape["gated"])
        a = torch.randn(rows, k, device=device, dtype=dt)
        w = torch.randn(experts, 2 * n if gated else n, k, device=device, dtype=dt) * k**-0.5
        strides = (w.stride(0), w.stride(2), w.stride(1))

        def run():
            out = torch.empty((rows, n), device=device, dtype=dt)
            return (grouped_gemm(a, w, strides, out, al, n=n, k=k, up_offset=n if gated else None),)

        return run

    return make


# BLOCK_M is fixed by the alignment (the tile map is built for it before the GEMM): a bucket field, not a param
tuning.register(tuning.Space(
    "moe_grouped_gemm", "moe_experts",
    {"block_n": (64, 128, 256), "block_k": (32, 64, 128), "num_warps": tuning.WARPS, "num_stages": (2, 3, 4)},
    _gemm_key, ("dtype", "gated", "m", "n", "k", "tpe"), ("n", "k", "tpe"), _est_gemm, _make(False), __name__,
    _grouped_gemm_kernel, lambda shape: _blocks(shape["dtype"]),
    fields=("block_m", "block_n", "block_k", "num_warps", "num_stages"), flags=("gated",)))
tuning.register(tuning.Space(
    "moe_grouped_wgrad", "moe_experts",
    {"block_m": (32, 64, 128), "block_n": (64, 128), "block_r": (32, 64), "num_warps": tuning.WARPS,
     "num_stages": (2, 3)},
    _wgrad_key, ("dtype", "m", "n", "tpe"), ("m", "n", "tpe"), _est_wgrad, _make(True), __name__,
    _grouped_wgrad_kernel, lambda shape: _blocks(shape["dtype"]),
    fields=("block_m", "block_n", "block_r", "num_warps", "num_stages")))
