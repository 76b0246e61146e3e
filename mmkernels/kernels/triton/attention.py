"""FlashAttention-2-style Triton kernels: forward (saves O and the log-sum-exp) and backward (recomputes P).

Layout ``[B, L, H, D]`` with any strides except a unit stride on D (or varlen ``[total, H, D]`` with int32
``cu_seqlens``). One program owns a block of rows of one (sequence, head):

- forward: ``BLOCK_M`` query rows; streams key/value blocks through the online softmax in fp32 with exp2 (the
  softmax scale and log2(e) are folded into the scores); writes O in the input dtype and the lse (natural log) in
  fp32.
- backward preprocess: ``delta = rowsum(dO * O)`` in fp32, one value per query row and head.
- backward dK/dV: ``BLOCK_N`` key rows of one key/value head; loops over the query heads of its GQA group and over
  the query blocks that can see these keys, so dK/dV are reduced over the group inside the program (no atomics).
  With ``ATOMIC_DQ`` it also adds its dQ contributions to an fp32 buffer with atomics (FlashAttention-2's way:
  fewer matmuls, but the order of the additions, hence the last bits of dQ, varies between runs).
- backward dQ (the deterministic mode): ``BLOCK_M`` query rows; streams key/value blocks like the forward.

Head dims that are not powers of two are padded to ``BLOCK_D`` inside the kernels with masked loads and stores; caller
memory is never padded. A value head dim ``D_v`` different from the query/key one ``D`` (MLA: 192 / 128) has its own
width ``BLOCK_DV`` (O, dO, dV, delta), and the Q/K side then runs in two power-of-two chunks ``BLOCK_D + BLOCK_D1``
(``head_dim_chunks``: 192 -> 128 + 64) instead of one padded power of two (:func:`_head_dims`). Causal masks are
bottom-right aligned (query ``i`` sees keys ``j <= i + Lk - Lq``); a query row that sees no key gets output 0, lse
``+inf`` and zero gradients, and its q (even NaN) is zeroed before the dK product. Key blocks that every row of a query
block sees entirely run without masks; only the boundary blocks pay for them.

Invalid values never leak: rows past a sequence and head-dim padding are masked loads (zeros), so NaN/inf there
reach nothing; varlen rows past ``cu_seqlens[-1]`` belong to no program, so out/dq/dk/dv start from zeros there (lse
from ``+inf``). Keys read as zeros still score 0, and ``exp(0 - lse)`` overflows for a row whose lse is low (logits
~ -1e4): so in every kernel and branch (causal or not, whole or partial blocks) the score of a key past ``seqlen_k``
or hidden by the causal mask is set to ``-inf`` before the exp, p = 0 there and dS = p (dP - delta) = 0.

Grid: one axis, ``(row block, head, sequence)`` folded into ``program_id(0)`` (:func:`_tile`), so more than 65535
sequences x heads launch (CUDA axes 1 and 2 stop at 65535; axis 0 takes 2**31 - 1).

Dropout (``DROPOUT`` constexpr; off compiles the exact no-dropout kernels): Philox ``tl.rand(seed, offset)`` on
each probability's index ``((b * Hq + h) * LQ + i) * LK + j``; the forward drops after the row sum (the lse is
that of the undropped probabilities), the backward regenerates the mask for dV and dP (``delta = rowsum(dO * O)``
still holds). ``dropout_keep_mask`` (a test hook) writes the mask for a seed.

Only the basic ``tl`` API is used (masked loads/stores, ``tl.dot``, ``tl.trans``, ``tl.atomic_add``), so the
kernels build on Triton 3.6 and later and run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._config import is_batch_invariant
from . import tuning
from ._common import (
    LN2_JIT,
    LOG2E,
    LOG2E_JIT,
    MAX_PROGRAMS,
    check_grid,
    dropout_args,
    dropout_keep,
    dropout_seed,
    head_dim_chunks,
    input_precision,
    wrapped,
)

__all__ = ["MAX_PROGRAMS", "attention_bwd_per_sequence", "attention_fwd_per_sequence", "dropout_keep_mask",
           "lse_shape"]


# --------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(NUM_BLOCKS, HEADS):
    """Decode the one-axis grid: program ``pid = (b * HEADS + h) * NUM_BLOCKS + block`` (blocks fastest, so the
    programs of one (sequence, head) run together and share its K/V in L2). Axis 0 allows 2**31 - 1 programs,
    where axes 1 and 2 stop at 65535 (many short varlen sequences times heads)."""
    pid = tl.program_id(0)
    blk = pid % NUM_BLOCKS
    bh = pid // NUM_BLOCKS
    return blk, (bh % HEADS).to(tl.int64), bh // HEADS


@triton.jit
def _seq_range(CU, b, L, VARLEN: tl.constexpr):
    """(first row (int64), length) of sequence ``b``: read from ``cu_seqlens`` when VARLEN; dense, ``(0, L)`` (the
    batch stride addresses the sequence). The forward and both backward kernels set up q and k through this."""
    start = 0
    length = L
    if VARLEN:
        first = tl.load(CU + b)
        start = first.to(tl.int64)
        length = tl.load(CU + b + 1) - first
    return start, length


@triton.jit
def _row_block(CU_Q, CU_K, LQ, LK, HQ, GROUP, NUM_BLOCKS, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """The query rows a forward or dQ program owns: ``(b, h, hk, start_m, q_start, seqlen_q, k_start, seqlen_k)``:
    rows ``[start_m, start_m + BLOCK_M)`` of sequence ``b``, query head ``h`` and its key/value head ``hk`` (GQA);
    the sequence's q and k rows start at ``q_start`` / ``k_start``. The caller returns at once when
    ``start_m >= seqlen_q`` (a block past the end of a short varlen sequence), and only then widens ``b`` to int64:
    next to its uses, so the address products stay 32x32->64-bit multiplies (``mul.wide``)."""
    pid_m, h, b = _tile(NUM_BLOCKS, HQ)
    q_start, seqlen_q = _seq_range(CU_Q, b, LQ, VARLEN)
    k_start, seqlen_k = _seq_range(CU_K, b, LK, VARLEN)
    return b, h, h // GROUP, pid_m * BLOCK_M, q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The keys the query rows ``[start_m, start_m + BLOCK_M)`` attend to (forward and dQ): ``(diag, full_end, hi)``.

    Causal masks are bottom-right aligned: row ``i`` sees keys ``j <= i + diag``, ``diag = seqlen_k - seqlen_q``, so
    the block's last row sees keys before ``hi = start_m + BLOCK_M + diag`` (clamped to ``[0, seqlen_k]``). Keys
    ``[0, full_end)`` (whole ``BLOCK_N`` blocks that the block's first row already sees) need no mask;
    ``[full_end, hi)`` need the sequence-end and causal masks (:func:`_visible`)."""
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    return diag, full_end, hi


@triton.jit
def _query_range(start_n, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The same range seen from the keys ``[start_n, start_n + BLOCK_N)`` (dK/dV): ``(diag, lo, mid)``. Causal:
    query blocks ``[lo, mid)`` straddle the diagonal (masked), ``[mid, seqlen_q)`` see the whole key block and rows
    before ``lo`` see none of it; not causal: ``lo = mid = 0`` (every query block, unmasked)."""
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, seqlen_q)
    else:
        lo = 0
        mid = 0
    return diag, lo, mid


@triton.jit
def _visible(rows, cols, seqlen_k, diag, CAUSAL: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]``: query row ``rows[i]`` may see key ``cols[j]`` (inside the sequence and, causal,
    ``j <= i + diag``)."""
    visible = cols[None, :] < seqlen_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + diag)
    return visible


@triton.jit
def _load_kv(base, cols, stride_l, offs_d, seqlen_k, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
             EVEN_D: tl.constexpr, TRANS: tl.constexpr):
    """Key or value rows ``cols`` of one (sequence, head) as ``[BLOCK_N, BLOCK_D]``, or ``[BLOCK_D, BLOCK_N]`` with
    TRANS. MASKED (a boundary block): rows past ``seqlen_k`` and the head-dim padding read 0. Otherwise the block
    lies inside the sequence: only the head-dim padding is masked, and with EVEN_D (no padding) nothing is, which
    keeps the hot loop of whole key blocks free of masks."""
    if TRANS:
        ptrs = base + cols[None, :] * stride_l + offs_d[:, None]
        row_ok = cols[None, :] < seqlen_k
        d_ok = offs_d[:, None] < HEAD_DIM
    else:
        ptrs = base + cols[:, None] * stride_l + offs_d[None, :]
        row_ok = cols[:, None] < seqlen_k
        d_ok = offs_d[None, :] < HEAD_DIM
    if MASKED:
        tile = tl.load(ptrs, mask=row_ok & d_ok, other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_ok, other=0.0)
    return tile


@triton.jit
def _dropout_mask_kernel(SEED, OUT, LQ, LK, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # test hook: the keep mask [B * Hq, LQ, LK] (int8) the kernels use for this seed
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    seed = tl.load(SEED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for n0 in range(0, LK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh * LQ, rows[:, None], cols[None, :], LK, dropout_p)
        tl.store(OUT + (bh * LQ + rows[:, None]) * LK + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < LQ) & (cols[None, :] < LK))


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------


# The inner loops take MASKED as a constexpr and are called twice per program (unmasked whole blocks, then the
# masked boundary blocks): one source, two specialisations, so the hot loop carries no mask arithmetic.
#
# Head dims: the Q/K side runs in up to two power-of-two chunks, ``BLOCK_D`` (columns ``[0, BLOCK_D)``) plus
# ``BLOCK_D1`` (columns ``[BLOCK_D, BLOCK_D + BLOCK_D1)``; 0 = none, a constexpr condition, so Triton compiles the
# taken branch only): the score is ``q0 k0^T + q1 k1^T``. The V side (O, dO, dV) has its own width ``BLOCK_DV``
# (``HEAD_DV`` valid columns). Equal head dims run one chunk with ``BLOCK_DV == BLOCK_D`` (the kernels of before
# the split); ``D_qk != D_v`` (MLA: 192 / 128 = 128 + 64 / 128) splits Q/K instead of padding it to a power of two.


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, q1, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, offs_d1, offs_dv, lo, hi, seqlen_k,
    diag, qk_scale, seed, drop_base, LK, dropout_p,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_kv(k_base, cols, stride_kl, offs_d, seqlen_k, HEAD_DIM, MASKED, EVEN_D, True)
        v = _load_kv(v_base, cols, stride_vl, offs_dv, seqlen_k, HEAD_DV, MASKED, EVEN_D, False)
        s = tl.dot(q, kt, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            kt1 = _load_kv(k_base, cols, stride_kl, offs_d1, seqlen_k, HEAD_DIM, MASKED, EVEN_D, True)
            s = tl.dot(q1, kt1, s, input_precision=PRECISION)
        s = s * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            s = tl.where(_visible(offs_m, cols, seqlen_k, diag, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the probabilities before dropout
        if DROPOUT:
            p = tl.where(dropout_keep(seed, drop_base, offs_m[:, None], cols[None, :], LK, dropout_p), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, SEED,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_lb, stride_lh,
    LQ, LK, HQ, GROUP, NUM_BLOCKS, qk_scale, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_D1: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, start_m, q_start, seqlen_q, k_start, seqlen_k = _row_block(CU_Q, CU_K, LQ, LK, HQ, GROUP, NUM_BLOCKS,
                                                                          BLOCK_M, VARLEN)
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q

    q_base = Q + b64 * stride_qb + q_start * stride_ql + h * stride_qh
    k_base = K + b64 * stride_kb + k_start * stride_kl + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vl + hk * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        q1 = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d1[None, :],
                     mask=mask_m[:, None] & (offs_d1[None, :] < HEAD_DIM), other=0.0)
    else:
        offs_d1 = offs_d
        q1 = q

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    diag, full_end, hi = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    seed = dropout_seed(SEED, DROPOUT)
    drop_base = (b64 * HQ + h) * LQ
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q1, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, offs_d1,
                               offs_dv, 0, full_end, seqlen_k, diag, qk_scale, seed, drop_base, LK, dropout_p,
                               False, CAUSAL, HEAD_DIM, HEAD_DV, BLOCK_D1, BLOCK_N, EVEN_D, PRECISION, DROPOUT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q1, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, offs_d1,
                               offs_dv, full_end, hi, seqlen_k, diag, qk_scale, seed, drop_base, LK, dropout_p,
                               True, CAUSAL, HEAD_DIM, HEAD_DV, BLOCK_D1, BLOCK_N, EVEN_D, PRECISION, DROPOUT)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * drop_scale  # inverted dropout: kept probabilities scaled by 1 / (1 - p)
    o_base = OUT + b64 * stride_ob + q_start * stride_ol + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dv[None, :] < HEAD_DV))
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2_JIT)
    tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=mask_m)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT, DO, DELTA, CU_Q,
    stride_ob, stride_ol, stride_oh,
    stride_db, stride_dl, stride_dh,
    stride_lb, stride_lh,
    LQ, HQ, NUM_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    # delta = rowsum(dO * O): both are V-side rows (the launcher passes HEAD_DIM = D_v, BLOCK_D = BLOCK_DV)
    pid_m, h, b = _tile(NUM_BLOCKS, HQ)
    q_start, seqlen_q = _seq_range(CU_Q, b, LQ, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + b64 * stride_ob + (q_start + offs_m[:, None]) * stride_ol + h * stride_oh + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_db + (q_start + offs_m[:, None]) * stride_dl + h * stride_dh + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_kv_inner(
    dk, dk1, dv, k, k1, v, q_base, do_base, lse_base, delta_base, dq_base, stride_ql, stride_dol, stride_dql,
    offs_n, key_ok, offs_d, offs_d1, offs_dv, lo, hi, seqlen_q, diag, qk_scale, sm_scale, seed, drop_base, LK,
    dropout_p, drop_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dK/dV (and, ATOMIC_DQ, dQ) contributions of the query rows ``[lo, hi)`` to the program's key block. MASKED: the
    causal boundary (rows that see part of the block). Keys past ``seqlen_k`` (``~key_ok``, a partial last block)
    are loaded as zeros, so their score is 0 and ``exp2(0 - lse)`` overflows for a row whose lse is low (scores
    ~ -1e4): their scores are set to -inf before the exp in every branch, so p = 0 there and dS = p (dP - delta)
    = 0 (dP is finite: V and dO rows outside the sequence are zeros); nothing outside the block's valid keys
    reaches dV, dK or the atomic dQ (FlashAttention-2's ``test_flash_attn_bwd_overflow``). ``dk1``/``k1`` are the
    second Q/K head-dim chunk (used only when ``BLOCK_D1 > 0``)."""
    mask_d = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        mask_m = rows < seqlen_q
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_dv[None, :],
                     mask=mask_m[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        # Rows past the sequence read lse = +inf, so their probabilities are exactly 0: no row mask needed below.
        lse2 = tl.load(lse_base + rows, mask=mask_m, other=float("inf")) * LOG2E_JIT
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)
        if MASKED:
            # A causal row that sees no key (Lq > Lk) has p = 0 everywhere; zero its q too, or a NaN/inf there
            # would reach dK through 0 * NaN in dS^T Q.
            q = tl.where((rows + diag >= 0)[:, None], q, 0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if BLOCK_D1 > 0:
            q1 = tl.load(q_base + rows[:, None] * stride_ql + offs_d1[None, :],
                         mask=mask_m[:, None] & (offs_d1[None, :] < HEAD_DIM), other=0.0)
            if MASKED:
                q1 = tl.where((rows + diag >= 0)[:, None], q1, 0.0)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
        s_t = s_t * qk_scale
        visible = key_ok[:, None]
        if MASKED:
            visible = visible & (offs_n[:, None] <= rows[None, :] + diag)
        p_t = tl.exp2(tl.where(visible, s_t, float("-inf")) - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep_t = dropout_keep(seed, drop_base, rows[None, :], offs_n[:, None], LK, dropout_p)
            dv = tl.dot(tl.where(keep_t, p_t * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dk1 = tl.dot(ds_t.to(q1.dtype), q1, dk1, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * stride_dql + offs_d[None, :], dq,
                          mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")
            if BLOCK_D1 > 0:
                dq1 = tl.dot(tl.trans(ds_t.to(k1.dtype)), k1, input_precision=PRECISION) * sm_scale
                tl.atomic_add(dq_base + rows[:, None] * stride_dql + offs_d1[None, :], dq1,
                              mask=mask_m[:, None] & (offs_d1[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dk1, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K, SEED,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh,
    stride_dvb, stride_dvl, stride_dvh,
    stride_dqb, stride_dql, stride_dqh,
    stride_lb, stride_lh,
    LQ, LK, HKV, GROUP, NUM_BLOCKS, qk_scale, sm_scale, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_D1: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n, hk, b = _tile(NUM_BLOCKS, HKV)
    q_start, seqlen_q = _seq_range(CU_Q, b, LQ, VARLEN)
    k_start, seqlen_k = _seq_range(CU_K, b, LK, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_n[:, None] < seqlen_k
    mask_k = row_ok & (offs_d[None, :] < HEAD_DIM)
    mask_v = row_ok & (offs_dv[None, :] < HEAD_DV)
    k_rows = K + b64 * stride_kb + (k_start + offs_n[:, None]) * stride_kl + hk * stride_kh
    k = tl.load(k_rows + offs_d[None, :], mask=mask_k, other=0.0)
    v = tl.load(V + b64 * stride_vb + (k_start + offs_n[:, None]) * stride_vl + hk * stride_vh + offs_dv[None, :],
                mask=mask_v, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        mask_k1 = row_ok & (offs_d1[None, :] < HEAD_DIM)
        k1 = tl.load(k_rows + offs_d1[None, :], mask=mask_k1, other=0.0)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    else:  # placeholders, never read
        offs_d1 = offs_d
        k1 = k
        dk1 = tl.zeros([16, 16], dtype=tl.float32)
    # Key rows past the sequence are zeros, their scores -inf (p = 0): their dK/dV rows are not stored and they add
    # nothing to dQ.
    key_ok = offs_n < seqlen_k
    diag, lo, mid = _query_range(start_n, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    seed = dropout_seed(SEED, DROPOUT)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * stride_qb + q_start * stride_ql + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start * stride_dol + h * stride_doh
        dq_base = DQ + b64 * stride_dqb + q_start * stride_dql + h * stride_dqh
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        drop_base = (b64 * HKV * GROUP + h) * LQ
        if CAUSAL:
            dk, dk1, dv = _bwd_kv_inner(dk, dk1, dv, k, k1, v, q_base, do_base, lse_base, delta_base, dq_base,
                                        stride_ql, stride_dol, stride_dql, offs_n, key_ok, offs_d, offs_d1, offs_dv,
                                        lo, mid, seqlen_q, diag, qk_scale, sm_scale, seed, drop_base, LK, dropout_p,
                                        drop_scale, True, HEAD_DIM, HEAD_DV, BLOCK_D1, BLOCK_M, ATOMIC_DQ, PRECISION,
                                        DROPOUT)
        dk, dk1, dv = _bwd_kv_inner(dk, dk1, dv, k, k1, v, q_base, do_base, lse_base, delta_base, dq_base,
                                    stride_ql, stride_dol, stride_dql, offs_n, key_ok, offs_d, offs_d1, offs_dv,
                                    mid, seqlen_q, seqlen_q, diag, qk_scale, sm_scale, seed, drop_base, LK, dropout_p,
                                    drop_scale, False, HEAD_DIM, HEAD_DV, BLOCK_D1, BLOCK_M, ATOMIC_DQ, PRECISION,
                                    DROPOUT)
    dk = dk * sm_scale
    dk_rows = DK + b64 * stride_dkb + (k_start + offs_n[:, None]) * stride_dkl + hk * stride_dkh
    tl.store(dk_rows + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_k)
    if BLOCK_D1 > 0:
        tl.store(dk_rows + offs_d1[None, :], (dk1 * sm_scale).to(DK.dtype.element_ty), mask=mask_k1)
    tl.store(DV + b64 * stride_dvb + (k_start + offs_n[:, None]) * stride_dvl + hk * stride_dvh + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_v)


@triton.jit
def _bwd_q_inner(
    dq, dq1, q, q1, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, offs_d1, offs_dv, lo, hi,
    seqlen_k, diag, qk_scale, seed, drop_base, LK, dropout_p, drop_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_kv(k_base, cols, stride_kl, offs_d, seqlen_k, HEAD_DIM, MASKED, EVEN_D, True)
        vt = _load_kv(v_base, cols, stride_vl, offs_dv, seqlen_k, HEAD_DV, MASKED, EVEN_D, True)
        s = tl.dot(q, kt, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            kt1 = _load_kv(k_base, cols, stride_kl, offs_d1, seqlen_k, HEAD_DIM, MASKED, EVEN_D, True)
            s = tl.dot(q1, kt1, s, input_precision=PRECISION)
        s = s * qk_scale
        if MASKED:  # keys past seqlen_k (read as zeros) and causal-hidden keys: -inf before the exp, so p = 0
            s = tl.where(_visible(offs_m, cols, seqlen_k, diag, CAUSAL), s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, drop_base, offs_m[:, None], cols[None, :], LK, dropout_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dq1 = tl.dot(ds.to(kt1.dtype), tl.trans(kt1), dq1, input_precision=PRECISION)
    return dq, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, SEED,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    stride_lb, stride_lh,
    LQ, LK, HQ, GROUP, NUM_BLOCKS, qk_scale, sm_scale, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_D1: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, start_m, q_start, seqlen_q, k_start, seqlen_k = _row_block(CU_Q, CU_K, LQ, LK, HQ, GROUP, NUM_BLOCKS,
                                                                          BLOCK_M, VARLEN)
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q
    mask_q = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_rows = Q + b64 * stride_qb + (q_start + offs_m[:, None]) * stride_ql + h * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=mask_q, other=0.0)
    do = tl.load(DO + b64 * stride_dob + (q_start + offs_m[:, None]) * stride_dol + h * stride_doh
                 + offs_dv[None, :], mask=mask_m[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        mask_q1 = mask_m[:, None] & (offs_d1[None, :] < HEAD_DIM)
        q1 = tl.load(q_rows + offs_d1[None, :], mask=mask_q1, other=0.0)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:  # placeholders, never read
        offs_d1 = offs_d
        q1 = q
        dq1 = tl.zeros([16, 16], dtype=tl.float32)
    lse2 = tl.load(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=mask_m,
                   other=float("inf")) * LOG2E_JIT
    delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=mask_m, other=0.0)
    k_base = K + b64 * stride_kb + k_start * stride_kl + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vl + hk * stride_vh
    diag, full_end, hi = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    seed = dropout_seed(SEED, DROPOUT)
    drop_base = (b64 * HQ + h) * LQ
    dq, dq1 = _bwd_q_inner(dq, dq1, q, q1, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d,
                           offs_d1, offs_dv, 0, full_end, seqlen_k, diag, qk_scale, seed, drop_base, LK, dropout_p,
                           drop_scale, False, CAUSAL, HEAD_DIM, HEAD_DV, BLOCK_D1, BLOCK_N, EVEN_D, PRECISION,
                           DROPOUT)
    dq, dq1 = _bwd_q_inner(dq, dq1, q, q1, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d,
                           offs_d1, offs_dv, full_end, hi, seqlen_k, diag, qk_scale, seed, drop_base, LK, dropout_p,
                           drop_scale, True, CAUSAL, HEAD_DIM, HEAD_DV, BLOCK_D1, BLOCK_N, EVEN_D, PRECISION,
                           DROPOUT)
    dq_rows = DQ + b64 * stride_dqb + (q_start + offs_m[:, None]) * stride_dql + h * stride_dqh
    tl.store(dq_rows + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_q)
    if BLOCK_D1 > 0:
        tl.store(dq_rows + offs_d1[None, :], (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=mask_q1)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


class _HeadDims(NamedTuple):
    """How the kernels tile the head dims (the constexprs ``BLOCK_D``, ``BLOCK_D1``, ``BLOCK_DV``, ``EVEN_D``) and the
    width their configs are chosen for; built by :func:`_head_dims`."""

    block_d: int
    block_d1: int
    block_dv: int
    even: bool
    width: int


def _head_dims(head_dim: int, head_dv: int) -> _HeadDims:
    """``D_qk == D_v``: one power-of-two chunk for both sides (``BLOCK_D1 = 0``, ``BLOCK_DV = BLOCK_D``), the configs
    of that width. ``D_qk != D_v``: Q/K in :func:`head_dim_chunks` (192 -> 128 + 64, 40 -> 32 + 16, 72 -> 64 + 16),
    V in its own power of two (128, 24 -> 32), and the configs of the larger padded width (192 / 128 takes D = 256's
    configs: the split tiles hold fewer registers than 256 / 256, so the swept spill-free choice stays safe).
    ``EVEN_D``: no padding on either side (no head-dim masks)."""
    if head_dim == head_dv:
        block_d = _block_d(head_dim)
        return _HeadDims(block_d, 0, block_d, head_dim == block_d, block_d)
    d0, d1 = head_dim_chunks(head_dim)
    block_dv = _block_d(head_dv)
    even = d0 + d1 == head_dim and block_dv == head_dv
    return _HeadDims(d0, d1, block_dv, even, _block_d(max(head_dim, head_dv)))


def _fit(block: int, length) -> int:
    """Shrink a block for short sequences (Lq = 1, 32 learned queries): no point computing 128 padded rows.

    Comparisons only, so a symbolic length (``torch.compile`` with dynamic shapes) becomes guards, not an error. Not
    in the batch-invariant mode: the key block sets a row's reduction order, and the max length is the batch's."""
    if is_batch_invariant():
        return block
    while block > 16 and length <= block // 2:
        block //= 2
    return block


def _fwd_config(block_d: int, dtype: torch.dtype, max_q: int, max_k: int, target: tuning.Target) -> _Config:
    """The forward's hand default for ``target`` (an interpreted target gets interpreter-sized tiles)."""
    if target.interpreted:  # fewer, larger numpy steps: the interpreter pays per op, not per element
        return _Config(_fit(64, max_q), _fit(64, max_k), 4, 1)
    # The largest tiles found spill-free on sm_80 and sm_90a in every specialisation the launchers make (causal,
    # varlen, dropout, odd head dims); the compile sweep and the per-config table are in docs/performance.md. The
    # dropout specialisation (Philox per score) sets the limit: 128 x 64 tiles spilled 80-160 bytes per thread.
    if dtype == torch.float32:  # "ieee" dots run as FMA loops: far more live registers per element
        cfg = _Config(32, 32, 4, 2) if block_d <= 64 else _Config(32, 16, 8, 2)
    elif block_d <= 64:
        cfg = _Config(128, 32, 8, 3)
    elif block_d <= 128:
        cfg = _Config(64, 32, 8, 3)
    else:  # 32 x 64 spilled 12-44 bytes in varlen specialisations
        cfg = _Config(32, 32, 8, 2)
    return _Config(_fit(cfg.block_m, max_q), _fit(cfg.block_n, max_k), cfg.num_warps, cfg.num_stages)


def _bwd_configs(block_d: int, dtype: torch.dtype, max_q: int, max_k: int, target: tuning.Target,
                 split: bool = False) -> tuple[_Config, _Config]:
    """(dK/dV kernel config, dQ kernel config): the backward's hand defaults for ``target``. ``split``: the head dims
    differ (``D_v != D_qk``, :func:`_head_dims`), so the Q/K side runs in two chunks and the programs hold a second
    dK/dQ accumulator; ``block_d`` is then the larger padded width."""
    if target.interpreted:
        cfg = _Config(_fit(64, max_q), _fit(64, max_k), 4, 1)
        return cfg, cfg
    # Spill-free on sm_80 and sm_90a in every launched specialisation (docs/performance.md has the sweep). The
    # tutorial's shapes (dK/dV 32 x 128, dQ 128 x 32) spilled in every dK/dV config, up to 1,740 bytes per thread:
    # the dK/dV program holds K, V, dK, dV for its BLOCK_N keys plus 64-bit dQ atomic addresses, so BLOCK_N shrinks
    # with the head dim. Exceptions, allowed by name in tests/triton_gpu_compile.py with the configs swept: fp32
    # dK/dV at D <= 128 (<= 64 bytes, causal only; 84 on sm_90a in causal varlen since the key mask of issue 19)
    # and at D <= 64 (<= 48 bytes, varlen only), and causal varlen specialisations of dQ at D <= 128 (8 bytes,
    # sm_90a), of fp16/bf16 dK/dV at D > 128 (<= 120 bytes, sm_80) and of fp32 dQ at D > 128 (56 bytes, sm_80).
    if dtype == torch.float32:
        if block_d <= 64:  # dQ two stages: 32 x 32 w4s1 spilled 8 bytes on sm_80 (dropout) once keys were masked
            kv, q = _Config(16, 32, 4, 1), _Config(32, 32, 4, 2)
        elif block_d <= 128:
            kv, q = _Config(32, 16, 8, 1), _Config(32, 16, 8, 1)
        else:
            kv, q = _Config(16, 16, 8, 1), _Config(32, 16, 8, 1)
    elif block_d <= 64:
        kv, q = _Config(16, 64, 4, 2), _Config(128, 32, 8, 2)
    elif block_d <= 128:
        kv, q = _Config(16, 32, 8, 1), _Config(16, 32, 4, 2)
    else:  # dQ 16 x 32: 32 x 16 spilled up to 224 bytes in varlen (VARLEN's extra registers)
        kv, q = _Config(16, 16, 8, 1), _Config(16, 32, 8, 1)
    if split:
        # Swept over the launched split specialisations (192/128, 72/64, 40/24; causal, varlen, dropout, both dQ
        # modes) x sm_80/sm_90a; the equal-dim choices spilled 8-56 bytes there. fp16/bf16 at widths > 64 (192/128
        # included) keep the equal-dim configs, spill-free. Exception, allowed by name in tests/triton_gpu_compile.py:
        # fp32 dK/dV at 192/128 (16 x 16 w8s1, the best of 5 swept: 3 of 16 spill, <= 56 bytes).
        if dtype == torch.float32:
            if block_d <= 64:
                kv = _Config(16, 32, 8, 1)  # 16 x 32 w4s1 spilled up to 28 bytes
            elif block_d <= 128:
                kv, q = _Config(16, 16, 4, 1), _Config(32, 16, 4, 1)  # 32 x 16 w8s1: 44 / 32 bytes on sm_80
            else:
                q = _Config(16, 16, 8, 1)  # 32 x 16 w8s1 spilled 4-36 bytes
        elif block_d <= 64:
            kv = _Config(16, 64, 8, 2)  # 16 x 64 w4s2 spilled 8-32 bytes on sm_80 (causal varlen)
    kv = _Config(_fit(kv.block_m, max_q), _fit(kv.block_n, max_k), kv.num_warps, kv.num_stages)
    q = _Config(_fit(q.block_m, max_q), _fit(q.block_n, max_k), q.num_warps, q.num_stages)
    return kv, q


def _grid(blocks, heads, batch) -> tuple[int]:
    """One grid axis for (block, head, sequence) (decoded by :func:`_tile`): axis 0 takes 2**31 - 1 programs, where
    axes 1 and 2 would stop at 65535 sequences or heads (flash-attn users hit that with many short sequences)."""
    programs = blocks * heads * batch
    return check_grid((programs,), f"attention (triton): {batch} sequences x {heads} heads x {blocks} row blocks = "
                                   f"{programs} programs")


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides; the head-dim stride must be 1."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, "attention kernels need a unit stride on the head dim"
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """The log-sum-exp's shape: ``[B, Hq, Lq]`` dense, ``[Hq, total_q]`` varlen (flash-attn's layouts)."""
    if varlen:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def out_shape_of(q: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """The output's shape: q's with the value head dim (``D_v`` may differ from ``D_qk``)."""
    return (*q.shape[:-1], v.shape[-1])


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        hq, hkv = q.shape[1], k.shape[1]
        lq, lk = max_seqlen_q, max_seqlen_k
    else:
        batch, lq, hq = q.shape[0], q.shape[1], q.shape[2]
        lk, hkv = k.shape[1], k.shape[2]
    return varlen, batch, hq, hkv, lq, lk


def attention_fwd_per_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the per-sequence kernels (dense, or varlen with each sequence's own row blocks): returns (out of
    :func:`out_shape_of` (q's shape with v's head dim) in q's dtype, lse fp32 of :func:`lse_shape`). Inputs are
    validated by the caller; which varlen kernels run (these or the packed ones) is decided in
    ``attention_varlen.py``.

    Varlen rows past ``cu_seqlens_q[-1]`` (padding; ``total_q`` may exceed it) get output 0 and lse ``+inf``.
    ``dropout_p > 0`` drops probabilities with the Philox stream of ``seed`` (int64 ``[1]`` on q's device); the lse
    is that of the probabilities before dropout. ``launch`` wraps each kernel (``torch.library.wrap_triton`` inside
    the registered op).
    """
    varlen, batch, hq, hkv, lq, lk = _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    head_dim, head_dv = q.shape[-1], v.shape[-1]
    out_shape = out_shape_of(q, v)
    if varlen:  # no program owns the padding rows past cu_seqlens_q[-1]: they must start at 0 / +inf
        out = torch.zeros(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.full(lse_shape(q, varlen), float("inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or lq == 0:
        return out, lse
    dims = _head_dims(head_dim, head_dv)
    block_d = dims.width
    target = tuning.target_of(q)
    cfg = tuning.pick("attention_fwd", dict(dtype=q.dtype, block_d=block_d, causal=causal, lq=lq, lk=lk),
                      _fwd_config(block_d, q.dtype, lq, lk, target), like=q, target=target)
    cu_q = cu_seqlens_q if varlen else lse  # unused pointer when dense
    cu_k = cu_seqlens_k if varlen else lse
    seed_ptr, dropout_p, drop_scale, dropout = dropout_args(dropout_p, seed, lse)
    blocks = triton.cdiv(lq, cfg.block_m)
    wrapped(_attn_fwd_kernel, launch)[_grid(blocks, hq, batch)](
        q, k, v, out, lse, cu_q, cu_k, seed_ptr,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        lq, lk, hq, hq // hkv, blocks, softmax_scale * LOG2E, dropout_p, drop_scale,
        HEAD_DIM=head_dim, BLOCK_D=dims.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, VARLEN=varlen, EVEN_D=dims.even, PRECISION=input_precision(q.dtype),
        DROPOUT=dropout, BLOCK_D1=dims.block_d1, HEAD_DV=head_dv, BLOCK_DV=dims.block_dv,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def attention_bwd_per_sequence(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    deterministic: bool,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the per-sequence kernels: returns (dq, dk, dv) in the inputs' dtypes. ``deterministic`` computes
    dQ in its own kernel (no atomics, bitwise reproducible); otherwise the dK/dV kernel adds dQ with fp32 atomics.
    Varlen padding rows (past ``cu_seqlens_*[-1]``) get zero gradients. ``dropout_p``/``seed`` must be the
    forward's."""
    varlen, batch, hq, hkv, lq, lk = _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    head_dim, head_dv = q.shape[-1], v.shape[-1]
    # varlen: key rows past cu_seqlens_k[-1] belong to no program
    alloc = torch.zeros if varlen else torch.empty
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0 or lq == 0 or lk == 0:
        dk.zero_()
        dv.zero_()
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv
    target = tuning.target_of(q)
    interpret = target.interpreted
    dims = _head_dims(head_dim, head_dv)
    block_d = dims.width
    kv_cfg, q_cfg = _bwd_configs(block_d, q.dtype, lq, lk, target, split=head_dv != head_dim)
    shape = dict(dtype=q.dtype, block_d=block_d, causal=causal, lq=lq, lk=lk, atomic=not deterministic)
    kv_cfg = tuning.pick("attention_bwd_dkdv", shape, kv_cfg, like=q, target=target)
    q_cfg = tuning.pick("attention_bwd_dq", shape, q_cfg, like=q, target=target)
    precision = input_precision(q.dtype)
    group = hq // hkv
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    lse_strides = _lse_strides(lse, varlen)
    seed_ptr, dropout_p, drop_scale, dropout = dropout_args(dropout_p, seed, lse)

    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    # 8 warps over 8192 elements per (O, dO) tile: 128 x D rows held whole in registers spilled (up to 1,184 bytes
    # per thread at D=256, docs/performance.md); this size is spill-free on sm_80 and sm_90a for D <= 256.
    pre_m = 64 if interpret else min(128, max(16, 8192 // dims.block_dv))
    pre_blocks = triton.cdiv(lq, pre_m)
    wrapped(_attn_bwd_preprocess_kernel, launch)[_grid(pre_blocks, hq, batch)](
        out, dout, delta, cu_q,
        *_strides(out, varlen), *_strides(dout, varlen), *lse_strides,
        lq, hq, pre_blocks,
        HEAD_DIM=head_dv, BLOCK_D=dims.block_dv, BLOCK_M=pre_m, VARLEN=varlen,
        num_warps=4 if dims.block_dv <= 32 else 8,
    )

    atomic_dq = not deterministic
    if atomic_dq:
        dq_buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_buf = alloc(q.shape, dtype=q.dtype, device=q.device)
    kv_blocks = triton.cdiv(lk, kv_cfg.block_n)
    wrapped(_attn_bwd_dkdv_kernel, launch)[_grid(kv_blocks, hkv, batch)](
        q, k, v, dout, lse, delta, dk, dv, dq_buf, cu_q, cu_k, seed_ptr,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), *_strides(dq_buf, varlen), *lse_strides,
        lq, lk, hkv, group, kv_blocks, softmax_scale * LOG2E, softmax_scale, dropout_p, drop_scale,
        HEAD_DIM=head_dim, BLOCK_D=dims.block_d, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n,
        CAUSAL=causal, VARLEN=varlen, ATOMIC_DQ=atomic_dq, PRECISION=precision, DROPOUT=dropout,
        BLOCK_D1=dims.block_d1, HEAD_DV=head_dv, BLOCK_DV=dims.block_dv,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
    if atomic_dq:
        return dq_buf.to(q.dtype), dk, dv
    q_blocks = triton.cdiv(lq, q_cfg.block_m)
    wrapped(_attn_bwd_dq_kernel, launch)[_grid(q_blocks, hq, batch)](
        q, k, v, dout, lse, delta, dq_buf, cu_q, cu_k, seed_ptr,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dq_buf, varlen), *lse_strides,
        lq, lk, hq, group, q_blocks, softmax_scale * LOG2E, softmax_scale, dropout_p, drop_scale,
        HEAD_DIM=head_dim, BLOCK_D=dims.block_d, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n,
        CAUSAL=causal, VARLEN=varlen, EVEN_D=dims.even, PRECISION=precision, DROPOUT=dropout,
        BLOCK_D1=dims.block_d1, HEAD_DV=head_dv, BLOCK_DV=dims.block_dv,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
    )
    return dq_buf, dk, dv


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, lq: int, lk: int, dropout_p: float
                      ) -> torch.Tensor:
    """Test hook: the bool keep mask ``[batch, heads, lq, lk]`` the kernels apply for ``seed`` (element ``(b, h, i,
    j)`` is query ``i``, key ``j`` of sequence ``b``; for varlen, positions within the sequence and ``lq``/``lk``
    the max lengths). The attention and Q-Former kernels share this stream."""
    out = torch.empty((batch * heads, lq, lk), dtype=torch.int8, device=seed.device)
    if out.numel():
        _dropout_mask_kernel[(triton.cdiv(lq, 32), batch * heads)](seed, out, lq, lk, float(dropout_p),
                                                                   BLOCK_M=32, BLOCK_N=32)
    return out.view(batch, heads, lq, lk).bool()


# --------------------------------------------------------------------------------------------------------------
# tuning: the search spaces of the three kernels (kernels/triton/tuning.py is the generic core; docs/tuning.md)
# --------------------------------------------------------------------------------------------------------------

_GPU = tuning.SM90  # the hand defaults tuning starts from are the GPU ones (any non-interpreted target gives them)
_ATTN_FIELDS = ("dtype", "d", "causal", "seq")


def _attn_key(shape) -> dict:
    return {"dtype": tuning.dtype_token(shape), "d": int(shape["block_d"]), "causal": int(bool(shape["causal"])),
            "seq": tuning.bucket(max(shape["lq"], shape["lk"]), tuning.SEQ_BUCKETS)}


def _attn_bwd_key(shape) -> dict:
    return {**_attn_key(shape), "atomic": int(bool(shape.get("atomic", False)))}


def _attn_adapt(cfg: dict, shape) -> dict:
    return dict(cfg, block_m=tuning.shrink(cfg["block_m"], shape["lq"]),
                block_n=tuning.shrink(cfg["block_n"], shape["lk"]))


def _est_fwd(c, key) -> tuple[int, int]:
    m, n, d, es = c["block_m"], c["block_n"], key["d"], tuning.element_size(key)
    shared = m * d * es + max(1, c["num_stages"]) * 2 * n * d * es  # q, and K/V tiles per pipeline stage
    words = m * d + m * n + (m * n + m * d) * es / 4  # acc and scores in fp32; p and q in the input dtype
    return shared, tuning.regs_estimate(words, c["num_warps"])


def _est_dkdv(c, key) -> tuple[int, int]:
    m, n, d, es = c["block_m"], c["block_n"], key["d"], tuning.element_size(key)
    shared = max(1, c["num_stages"]) * 2 * m * d * es + 2 * n * d * es  # q/dO per stage, k/v
    words = 2 * n * d + 2 * n * d * es / 4 + 3 * n * m  # dK, dV (fp32), k, v, and s/p, dp, ds
    return shared, tuning.regs_estimate(words, c["num_warps"])


def _est_dq(c, key) -> tuple[int, int]:
    m, n, d, es = c["block_m"], c["block_n"], key["d"], tuning.element_size(key)
    shared = max(1, c["num_stages"]) * 2 * n * d * es + 2 * m * d * es
    words = m * d + 3 * m * n  # dQ (fp32) and s/p, dp, ds; q and dO feed the dots from shared memory
    return shared, tuning.regs_estimate(words, c["num_warps"])


def _tune_inputs(shape, device: torch.device, small: bool):
    d = shape.get("head_dim", shape["block_d"])
    lq, lk = int(shape["lq"]), int(shape["lk"])
    heads = 2 if small else 16
    batch = 1 if small else max(1, 16384 // max(lq, 1))  # ~16k query rows x 16 heads: several waves on any card
    q = torch.randn(batch, lq, heads, d, device=device, dtype=shape["dtype"])
    k = torch.randn(batch, lk, heads, d, device=device, dtype=shape["dtype"])
    v = torch.randn_like(k)
    return q, k, v, lq, lk, bool(shape["causal"]), d**-0.5


def _make_fwd(shape, device: torch.device, small: bool):
    """Input maker of ``attention_fwd``: a dense launch on fresh inputs of the shape."""
    q, k, v, lq, lk, causal, scale = _tune_inputs(shape, device, small)
    return lambda: attention_fwd_per_sequence(q, k, v, None, None, lq, lk, causal, scale)


def _make_bwd(deterministic):
    def make(shape, device: torch.device, small: bool):
        q, k, v, lq, lk, causal, scale = _tune_inputs(shape, device, small)
        out, lse = attention_fwd_per_sequence(q, k, v, None, None, lq, lk, causal, scale)
        dout = torch.randn_like(out)
        det = deterministic(shape)
        return lambda: attention_bwd_per_sequence(dout, q, k, v, out, lse, None, None, lq, lk, causal, scale, det)

    return make


def _default(which: int):
    def default(shape):
        args = (shape["block_d"], shape["dtype"], shape["lq"], shape["lk"], _GPU)
        return _fwd_config(*args) if which < 0 else _bwd_configs(*args)[which]

    return default


_LIMITS = {"block_m": "seq", "block_n": "seq"}
tuning.register(tuning.Space(
    "attention_fwd", "attention",
    {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": tuning.WARPS, "num_stages": (1, 2, 3, 4)},
    _attn_key, _ATTN_FIELDS, ("seq",), _est_fwd, _make_fwd, __name__, _attn_fwd_kernel, _default(-1),
    flags=("causal",), limits=_LIMITS, adapt=_attn_adapt))
tuning.register(tuning.Space(
    "attention_bwd_dkdv", "attention",
    {"block_m": (16, 32, 64), "block_n": (32, 64, 128), "num_warps": tuning.WARPS, "num_stages": (1, 2, 3)},
    _attn_bwd_key, (*_ATTN_FIELDS, "atomic"), ("seq",), _est_dkdv, _make_bwd(lambda s: not s.get("atomic", True)),
    __name__, _attn_bwd_dkdv_kernel, _default(0), flags=("causal", "atomic"), limits=_LIMITS, adapt=_attn_adapt))
tuning.register(tuning.Space(
    "attention_bwd_dq", "attention",
    {"block_m": (32, 64, 128), "block_n": (16, 32, 64), "num_warps": tuning.WARPS, "num_stages": (1, 2, 3)},
    _attn_key, _ATTN_FIELDS, ("seq",), _est_dq, _make_bwd(lambda s: True), __name__, _attn_bwd_dq_kernel,
    _default(1), flags=("causal",), limits=_LIMITS, adapt=_attn_adapt))
