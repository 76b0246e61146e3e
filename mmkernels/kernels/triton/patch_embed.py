"""Triton kernels for the ViT patch embedding: a stride-P convolution as a GEMM with an implicit im2col.

Notation: pixels ``x`` ``[B, C, H, W]`` (any strides; contiguous and channels-last are the fast paths), weight
``w`` ``[D, C, P, P]`` viewed as ``[D, K]`` with ``K = C*P*P``, ``Hp = H/P``, ``Wp = W/P``, ``N = Hp*Wp`` patches,
``T = 1 if cls else 0`` and ``L = T + N`` output tokens. Output ``y`` ``[B, L, D]`` (contiguous).

- forward (:func:`patch_embed_fwd`): one kernel. Rows are output tokens (``B*L``); the A tile of a row is the
  patch it covers, gathered straight from ``x`` (never unfolded in memory); the epilogue adds the bias (patch
  rows), the cls token (row 0 of each image) and the position embedding, and stores ``y`` directly.
- pixel gradient (:func:`patch_embed_bwd_input`): ``dY_patches @ W`` with the result scattered straight into the
  image layout of ``dx`` (patches do not overlap, so every pixel is written exactly once, no atomics).
- weight gradient (:func:`patch_embed_bwd_weight`): ``dY_patches^T @ patches`` with the patches gathered again
  from ``x``; the long reduction over ``B*N`` is split into chunks written to an fp32 partial buffer and summed
  (deterministic, no atomics).
- token gradients (:func:`patch_embed_bwd_tokens`): one pass over ``dY`` that sums over the batch (the
  position-embedding / cls gradient, ``[L, D]``) and, in the same pass, per-program partial sums over the patch
  rows (the bias gradient).

The order of the reduction index ``k`` is a compile-time choice: ``(c, py, px)`` (the weight's own order; for
NCHW pixels ``px`` runs are contiguous) or, for channels-last pixels, ``(py, px, c)`` so that each patch row of
``P*C`` values is one contiguous run in memory. The weight is gathered in the same order (it is small and stays in
L2). Only the basic ``tl`` API is used (Triton >= 3.6). Accumulation is fp32; fp32 inputs use IEEE products
(``PRECISION``, :func:`._common.input_precision`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import input_precision, wrapped

__all__ = [
    "is_channels_last_like",
    "patch_embed_bwd_input",
    "patch_embed_bwd_tokens",
    "patch_embed_bwd_weight",
    "patch_embed_fwd",
]


@triton.jit
def _k_offsets(k, sxc, sxh, sxw, swc, swh, sww, C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr):
    """Offsets of reduction index ``k`` inside one patch: (pixel offset, weight offset)."""
    if CL:
        py = k // (P * C)
        r = k % (P * C)  # = px*C + c; contiguous in memory when sxw == C*sxc
        px = r // C
        c = r % C
        x_off = py * sxh + r * sxc
    else:
        c = k // (P * P)
        r = k % (P * P)
        py = r // P
        px = r % P
        x_off = c * sxc + py * sxh + px * sxw
    w_off = c * swc + py * swh + px * sww
    return x_off, w_off


@triton.jit
def _patch_origin(b, n, Wp, sxb, sxh, sxw, P: tl.constexpr):
    """Pixel offset of the top-left corner of patch ``n`` (row-major over the ``Hp x Wp`` patch grid) of image ``b``;
    :func:`_k_offsets` gives the offsets inside the patch."""
    ph = n // Wp
    pw = n % Wp
    return b.to(tl.int64) * sxb + (ph * P) * sxh + (pw * P) * sxw


@triton.jit
def _patch_rows(rows, N, Wp, sdyb, sdyl, sxb, sxh, sxw, P: tl.constexpr, HAS_CLS: tl.constexpr):
    """For patch rows ``rows = b*N + n`` (the backward kernels' rows): (offset of the row's output token in dY,
    offset of its patch in the pixels)."""
    b = rows // N
    n = rows % N
    return b.to(tl.int64) * sdyb + (n + HAS_CLS) * sdyl, _patch_origin(b, n, Wp, sxb, sxh, sxw, P)


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, pos_ptr, cls_ptr, y_ptr,
    M, D, L, Wp,
    sxb, sxc, sxh, sxw,
    swd, swc, swh, sww,
    spl, spd,
    C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    KK: tl.constexpr = C * P * P
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    group = GROUP_M * num_n  # grouped launch order: neighbouring programs share pixel rows and weight tiles in L2
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output token rows, b*L + t
    row_ok = rows < M
    b = rows // L
    t = rows % L
    n = t - HAS_CLS  # patch index, -1 on the cls row
    is_patch = row_ok & (n >= 0)
    x_row = _patch_origin(b, tl.maximum(n, 0), Wp, sxb, sxh, sxw, P)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    w_col = cols * swd

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KK, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < KK
        x_off, w_off = _k_offsets(k, sxc, sxh, sxw, swc, swh, sww, C, P, CL)
        a = tl.load(x_ptr + x_row[:, None] + x_off[None, :], mask=is_patch[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_off[:, None] + w_col[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    if HAS_CLS:
        cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where((t == 0)[:, None], cls[None, :], 0.0)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + t[:, None] * spl + cols[None, :] * spd, mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    MP, D, L, N, Wp,
    sdyb, sdyl, sdyd,
    swd, swc, swh, sww,
    sxb, sxc, sxh, sxw,
    C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr, HAS_CLS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    KK: tl.constexpr = C * P * P
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows, b*N + n
    row_ok = rows < MP
    dy_row, x_row = _patch_rows(rows, N, Wp, sdyb, sdyl, sxb, sxh, sxw, P, HAS_CLS)

    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < KK
    x_off, w_off = _k_offsets(k, sxc, sxh, sxw, swc, swh, sww, C, P, CL)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        g = tl.load(dy_ptr + dy_row[:, None] + d[None, :] * sdyd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + d[:, None] * swd + w_off[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + x_row[:, None] + x_off[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    MP, D, L, N, Wp, rows_per_split,
    sdyb, sdyl, sdyd,
    sxb, sxc, sxh, sxw,
    C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr, HAS_CLS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dw[split, d, k'] = sum over this split's patch rows m of dY[m, d] * patch[m, k]; k' is the weight's own
    contiguous (c, py, px) index, so the partial buffer is laid out like the weight."""
    KK: tl.constexpr = C * P * P
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < KK
    # Contiguous weight strides (P*P*C, P*P, P, 1) give the (c, py, px) index of k.
    x_off, w_off = _k_offsets(k, sxc, sxh, sxw, P * P, P, 1, C, P, CL)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, MP)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        dy_row, x_row = _patch_rows(rows, N, Wp, sdyb, sdyl, sxb, sxh, sxw, P, HAS_CLS)
        g_t = tl.load(dy_ptr + dy_row[None, :] + d[:, None] * sdyd, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        a = tl.load(x_ptr + x_row[:, None] + x_off[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g_t, a, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + split.to(tl.int64) * D * KK + d[:, None] * KK + w_off[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=d_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed_bwd_tokens_kernel(
    dy_ptr, sums_ptr, bias_part_ptr,
    B, L, D, S, b_per_split,
    sdyb, sdyl, sdyd,
    HAS_CLS: tl.constexpr, STORE_SUMS: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For the batch chunk ``split``: sums[split, t, d] = sum_b dY[b, t, d] (t < S) and
    bias_part[split, pid_t, d] = the same sums over this block's patch rows."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    num_t = tl.num_programs(0)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < L
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    mask = t_ok[:, None] & d_ok[None, :]
    b_start = split * b_per_split
    b_end = tl.minimum(b_start + b_per_split, B)
    ptrs = dy_ptr + b_start.to(tl.int64) * sdyb + t[:, None] * sdyl + d[None, :] * sdyd
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for _ in range(b_start, b_end):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += sdyb  # pointer arithmetic is 64-bit: no overflow over large batches
    if STORE_SUMS:
        out = sums_ptr + split.to(tl.int64) * S * D + t[:, None] * D + d[None, :]
        tl.store(out, acc, mask=(t < S)[:, None] & d_ok[None, :])
    if BIAS:
        patch_rows = t_ok & (t >= HAS_CLS)
        part = tl.sum(tl.where(patch_rows[:, None], acc, 0.0), axis=0)
        tl.store(bias_part_ptr + (split * num_t + pid_t).to(tl.int64) * D + d, part, mask=d_ok)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers (no autograd; ``launch`` is ``torch.library.wrap_triton`` inside the registered ops).


def is_channels_last_like(x: torch.Tensor) -> bool:
    """True when each pixel's channels are adjacent and pixels along W are C apart (channels-last rows)."""
    c = x.shape[1]
    return c > 1 and x.stride(1) == 1 and x.stride(3) == c


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _gemm_config(target: tuning.Target, dtype: torch.dtype, m: int, n: int, k: int) -> dict:
    """Tile sizes for an [m, k] x [k, n] product on ``target``. In the interpreter big tiles mean few slow Python
    programs."""
    if target.interpreted:
        return {"BM": _pow2(m, 16, 64), "BN": _pow2(n, 16, 64), "BK": _pow2(k, 16, 128), "num_warps": 4,
                "num_stages": 1}
    # One config serves the forward and both backward kernels (in their own roles of m, n, k), so it is the largest
    # that compiles spill-free for all three on sm_80 and sm_90a (docs/performance.md): 128 x 128 x 64 tiles spilled
    # up to 116 bytes per thread in the forward (the implicit-im2col gather keeps a 64-bit address per A element)
    # and 748 in the input gradient. fp32 ("ieee" dots, FMA, not tensor cores) holds twice the bytes per element.
    fp32 = dtype == torch.float32
    bm_max, bn_max = (64, 64) if fp32 else (128, 64)
    bm = _pow2(m, 16, bm_max)
    bn = _pow2(n, 16, bn_max)
    warps = 8 if bm * bn >= bm_max * bn_max else 4
    return {"BM": bm, "BN": bn, "BK": 32, "num_warps": warps, "num_stages": 3}


def patch_embed_fwd(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    *,
    launch=None,
) -> torch.Tensor:
    """``y [B, L, D]`` from pixels ``[B, C, H, W]``, weight ``[D, C, P, P]``, bias ``[D]``, pos_embed ``[L, D]``,
    cls_token ``[D]`` (shapes already validated). Pixels, weight and pos_embed are read through their strides; the
    kernel reads bias and cls_token as unit-stride vectors, so a strided one (every other element of a buffer) is
    copied first instead of reading the elements between its own."""
    pos = pos_embed
    cls = cls_token if cls_token is None or cls_token.stride(0) == 1 else cls_token.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    bsz, c, h, w = pixels.shape
    d, _, p, _ = weight.shape
    hp, wp = h // p, w // p
    t = 1 if cls is not None else 0
    seq = t + hp * wp
    y = torch.empty((bsz, seq, d), device=pixels.device, dtype=pixels.dtype)
    m = bsz * seq
    if m == 0 or d == 0:
        return y
    kk = c * p * p
    target = tuning.target_of(pixels)
    cfg = tuning.pick("patch_embed_fwd", dict(dtype=pixels.dtype, m=m, n=d, k=kk),
                      _gemm_config(target, pixels.dtype, m, d, kk), like=pixels, target=target)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(d, cfg["BN"]),)
    dummy = weight  # never read: the HAS_* flags are off
    wrapped(_patch_embed_fwd_kernel, launch)[grid](
        pixels, weight,
        bias if bias is not None else dummy,
        pos if pos is not None else dummy,
        cls if cls is not None else dummy,
        y,
        m, d, seq, wp,
        *pixels.stride(),
        *weight.stride(),
        pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0,
        C=c, P=p, CL=is_channels_last_like(pixels),
        HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_CLS=int(cls is not None),
        PRECISION=input_precision(pixels.dtype),
        BLOCK_M=cfg["BM"], BLOCK_N=cfg["BN"], BLOCK_K=cfg["BK"], GROUP_M=8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def patch_embed_bwd_input(
    grad_out: torch.Tensor, weight: torch.Tensor, pixels: torch.Tensor, has_cls: bool, *, launch=None
) -> torch.Tensor:
    """Pixel gradient, in the layout of ``pixels`` (``empty_like``); ``pixels`` is used for its shape only."""
    bsz, c, h, w = pixels.shape
    d, _, p, _ = weight.shape
    hp, wp = h // p, w // p
    n = hp * wp
    dx = torch.empty_like(pixels)
    mp = bsz * n
    if dx.numel() == 0:
        return dx
    if d == 0:
        return dx.zero_()
    kk = c * p * p
    target = tuning.target_of(pixels)
    cfg = tuning.pick("patch_embed_bwd_input", dict(dtype=pixels.dtype, m=mp, n=kk, k=d),
                      _gemm_config(target, pixels.dtype, mp, kk, d), like=pixels, target=target)
    bm, bk, bd = cfg["BM"], cfg["BN"], cfg["BK"]
    grid = (triton.cdiv(mp, bm), triton.cdiv(kk, bk))
    wrapped(_patch_embed_bwd_input_kernel, launch)[grid](
        grad_out, weight, dx,
        mp, d, grad_out.shape[1], n, wp,
        *grad_out.stride(),
        *weight.stride(),
        *dx.stride(),
        C=c, P=p, CL=is_channels_last_like(dx), HAS_CLS=int(has_cls), PRECISION=input_precision(pixels.dtype),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dx


def _weight_grad_splits(target: tuning.Target, tiles: int, row_blocks: int, deterministic_rows: int) -> int:
    """How many chunks the reduction over patch rows is cut into on ``target``: enough programs to fill its SMs
    twice (one on an interpreted target)."""
    if target.interpreted:
        return 1
    want = triton.cdiv(2 * target.sm_count, max(1, tiles))
    # keep at least ~8 row blocks per chunk so the fp32 partial buffer stays small next to the work
    return max(1, min(want, row_blocks // 8 if row_blocks >= 8 else 1, deterministic_rows))


def _token_grad_splits(target: tuning.Target, tiles: int, batch: int) -> int:
    """How many batch chunks the token-gradient pass is cut into on ``target`` (each keeps >= 8 images)."""
    if target.interpreted:
        return 1
    return max(1, min(triton.cdiv(4 * target.sm_count, tiles), batch // 8))


def patch_embed_bwd_weight(
    grad_out: torch.Tensor, pixels: torch.Tensor, patch_size: int, has_cls: bool, *, launch=None
) -> torch.Tensor:
    """Weight gradient ``[D, C, P, P]`` in the dtype of ``grad_out``."""
    bsz, c, h, w = pixels.shape
    d = grad_out.shape[2]
    p = patch_size
    hp, wp = h // p, w // p
    n = hp * wp
    mp = bsz * n
    kk = c * p * p
    if mp == 0 or d == 0 or kk == 0:
        return torch.zeros((d, c, p, p), device=grad_out.device, dtype=grad_out.dtype)
    target = tuning.target_of(pixels)
    cfg = tuning.pick("patch_embed_bwd_weight", dict(dtype=pixels.dtype, m=d, n=kk, k=mp),
                      _gemm_config(target, pixels.dtype, d, kk, mp), like=pixels, target=target)
    bd, bk, bm = cfg["BM"], cfg["BN"], cfg["BK"]
    tiles = triton.cdiv(d, bd) * triton.cdiv(kk, bk)
    row_blocks = triton.cdiv(mp, bm)
    splits = _weight_grad_splits(target, tiles, row_blocks, 64)
    rows_per_split = triton.cdiv(row_blocks, splits) * bm
    splits = triton.cdiv(mp, rows_per_split)
    if splits == 1:
        dw = torch.empty((1, d, c, p, p), device=grad_out.device, dtype=grad_out.dtype)
    else:
        dw = torch.empty((splits, d, c, p, p), device=grad_out.device, dtype=torch.float32)
    wrapped(_patch_embed_bwd_weight_kernel, launch)[(triton.cdiv(d, bd), triton.cdiv(kk, bk), splits)](
        grad_out, pixels, dw,
        mp, d, grad_out.shape[1], n, wp, rows_per_split,
        *grad_out.stride(),
        *pixels.stride(),
        C=c, P=p, CL=is_channels_last_like(pixels), HAS_CLS=int(has_cls),
        PRECISION=input_precision(pixels.dtype), BLOCK_D=bd, BLOCK_K=bk, BLOCK_M=bm,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits == 1:
        return dw[0]
    return dw.sum(0).to(grad_out.dtype)


def patch_embed_bwd_tokens(
    grad_out: torch.Tensor, sum_rows: int, has_cls: bool, bias_grad: bool, *, launch=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``grad_out [B, L, D]``: fp32 ``sums [sum_rows, D]`` (sum over the batch of the first
    ``sum_rows`` tokens: the pos-embed / cls gradients) and fp32 ``bias [D]`` (sum over every patch row; shape
    ``[0]`` when ``bias_grad`` is False)."""
    bsz, seq, d = grad_out.shape
    dev = grad_out.device
    rows = seq if bias_grad else sum_rows  # tokens the pass must visit
    if d == 0 or rows == 0 or bsz == 0:
        return (torch.zeros((sum_rows, d), device=dev, dtype=torch.float32),
                torch.zeros((d if bias_grad else 0,), device=dev, dtype=torch.float32))
    target = tuning.target_of(grad_out)
    if target.interpreted:
        bt, bdim = _pow2(rows, 1, 64), _pow2(d, 16, 128)
    else:
        bt, bdim = 16, _pow2(d, 16, 128)
    t_blocks, d_blocks = triton.cdiv(rows, bt), triton.cdiv(d, bdim)
    # split the batch so that enough programs stream dY (each keeps >= 8 images); partial sums are added after
    splits = _token_grad_splits(target, t_blocks * d_blocks, bsz)
    b_per_split = triton.cdiv(bsz, splits)
    splits = triton.cdiv(bsz, b_per_split)
    sums = torch.empty((splits, sum_rows, d), device=dev, dtype=torch.float32)
    parts = torch.empty((splits, t_blocks if bias_grad else 0, d), device=dev, dtype=torch.float32)
    wrapped(_patch_embed_bwd_tokens_kernel, launch)[(t_blocks, d_blocks, splits)](
        grad_out, sums, parts if bias_grad else sums,
        bsz, rows, d, sum_rows, b_per_split,
        *grad_out.stride(),
        HAS_CLS=int(has_cls), STORE_SUMS=sum_rows > 0, BIAS=bias_grad,
        BLOCK_T=bt, BLOCK_D=bdim,
        num_warps=4,
    )
    bias = parts.sum((0, 1)) if bias_grad else torch.empty((0,), device=dev, dtype=torch.float32)
    return (sums[0] if splits == 1 else sums.sum(0)), bias


# --------------------------------------------------------------------------------------------------------------
# tuning: one search space per GEMM role (kernels/triton/tuning.py is the generic core)
# --------------------------------------------------------------------------------------------------------------
# The launchers call one config function for three GEMMs with different roles of (m, n, k):
#   fwd [B*L, C*P*P] x [C*P*P, D]; bwd_input [B*N, D] x [D, C*P*P]; bwd_weight [D, B*N] x [B*N, C*P*P].


def _patch_key(shape) -> dict:
    return {"dtype": tuning.dtype_token(shape), "m": tuning.bucket(shape["m"], tuning.DIM_BUCKETS),
            "n": tuning.bucket(shape["n"], tuning.DIM_BUCKETS), "k": tuning.bucket(shape["k"], tuning.DIM_BUCKETS)}


def _patch_adapt(cfg: dict, shape) -> dict:
    return dict(cfg, BM=tuning.shrink(cfg["BM"], shape["m"]), BN=tuning.shrink(cfg["BN"], shape["n"]))


def _est_gemm(c, key) -> tuple[int, int]:
    return tuning.gemm_estimate(c["BM"], c["BN"], c["BK"], c["num_stages"], c["num_warps"], tuning.element_size(key))


def _problem(role: str, shape) -> tuple[int, int, int, int, int]:
    """(B, C, HW, P, D) of a launch shape: the shape's own ``problem`` (a tune case), or one with the same GEMM sizes
    (an autotuned launch)."""
    if "problem" in shape:
        return shape["problem"]
    m, n, k = int(shape["m"]), int(shape["n"]), int(shape["k"])
    kk, d, rows = {"fwd": (k, n, m), "bwd_input": (n, k, m), "bwd_weight": (n, m, k)}[role]
    c = 3 if kk % 3 == 0 and math.isqrt(kk // 3) ** 2 == kk // 3 else 1
    p = max(1, math.isqrt(kk // c))
    side = 14  # 196 patches per image
    return max(1, math.ceil(rows / (side * side + (role == "fwd")))), c, side * p, p, d


def _make(role: str):
    def make(shape, device: torch.device, small: bool):
        """Input maker of one GEMM role: pixels, weights (and the forward's bias / pos-embed / cls) of the shape."""
        b, c, hw, p, d = _problem(role, shape)
        if small:
            b, hw = 1, 2 * p
        dt = shape["dtype"]
        px = torch.randn(b, c, hw, hw, device=device, dtype=dt)
        w = torch.randn(d, c, p, p, device=device, dtype=dt) * (c * p * p) ** -0.5
        n = (hw // p) ** 2 + 1
        if role == "fwd":
            bias, pos, cls = (torch.randn(d, device=device, dtype=dt), torch.randn(n, d, device=device, dtype=dt),
                              torch.randn(d, device=device, dtype=dt))
            return lambda: patch_embed_fwd(px, w, bias, pos, cls)
        g = torch.randn(b, n, d, device=device, dtype=dt)
        if role == "bwd_input":
            return lambda: patch_embed_bwd_input(g, w, px, True)
        return lambda: patch_embed_bwd_weight(g, px, p, True)

    return make


def _default(shape) -> dict:
    return _gemm_config(tuning.SM90, shape["dtype"], shape["m"], shape["n"], shape["k"])


for _role, _jit in (("fwd", _patch_embed_fwd_kernel), ("bwd_input", _patch_embed_bwd_input_kernel),
                    ("bwd_weight", _patch_embed_bwd_weight_kernel)):
    tuning.register(tuning.Space(
        f"patch_embed_{_role}", "patch_embed",
        {"BM": (64, 128), "BN": (64, 128, 256), "BK": (32, 64, 128), "num_warps": tuning.WARPS,
         "num_stages": (2, 3, 4)},
        _patch_key, ("dtype", "m", "n", "k"), ("m", "n", "k"), _est_gemm, _make(_role), __name__, _jit, _default,
        adapt=_patch_adapt))
