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

Head dims that are not powers of two are padded to ``BLOCK_D`` inside the kernels with masked loads and stores;
caller memory is never padded. Causal masks are bottom-right aligned (query ``i`` sees keys
``j <= i + Lk - Lq``); a query row that sees no key gets output 0, lse ``+inf`` and zero gradients. Key blocks that
every row of a query block sees entirely run without masks; only the boundary blocks pay for them.

Only the basic ``tl`` API is used (masked loads/stores, ``tl.dot``, ``tl.trans``, ``tl.atomic_add``), so the
kernels build on Triton 3.6 and later and run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["attention_bwd_triton", "attention_fwd_triton", "lse_shape"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, lo, hi, seqlen_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    mask_d = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None],
                         mask=(cols[None, :] < seqlen_k) & mask_d[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :],
                        mask=(cols[:, None] < seqlen_k) & mask_d[None, :], other=0.0)
        elif EVEN_D:  # a whole block inside the sequence and no head-dim padding: no masks at all
            kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :])
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None], mask=mask_d[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_lb, stride_lh,
    LQ, LK, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    hk = h // GROUP
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        q_start = 0
        seqlen_q = LQ
        k_start = 0
        seqlen_k = LK
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < seqlen_q

    q_base = Q + b64 * stride_qb + q_start * stride_ql + h * stride_qh
    k_base = K + b64 * stride_kb + k_start * stride_kl + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vl + hk * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # keys [0, full_end) are visible to every row of the block; [full_end, hi) need the mask.
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, 0, full_end,
                               seqlen_k, diag, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, EVEN_D, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, full_end, hi,
                               seqlen_k, diag, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, EVEN_D, PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = OUT + b64 * stride_ob + q_start * stride_ol + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
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
    LQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
    else:
        q_start = 0
        seqlen_q = LQ
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
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_ql, stride_dol, stride_dql,
    offs_n, offs_d, lo, hi, seqlen_q, diag, qk_scale, sm_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
):
    mask_d = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        mask_m = rows < seqlen_q
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        # Rows past the sequence read lse = +inf, so their probabilities are exactly 0: no row mask needed below.
        lse2 = tl.load(lse_base + rows, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * stride_dql + offs_d[None, :], dq,
                          mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh,
    stride_dvb, stride_dvl, stride_dvh,
    stride_dqb, stride_dql, stride_dqh,
    stride_lb, stride_lh,
    LQ, LK, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        q_start = 0
        seqlen_q = LQ
        k_start = 0
        seqlen_k = LK
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_kv = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + (k_start + offs_n[:, None]) * stride_kl + hk * stride_kh + offs_d[None, :],
                mask=mask_kv, other=0.0)
    v = tl.load(V + b64 * stride_vb + (k_start + offs_n[:, None]) * stride_vl + hk * stride_vh + offs_d[None, :],
                mask=mask_kv, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Key rows past the sequence are zeros: their dK/dV rows are not stored and they add nothing to dQ.
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        # query blocks [lo, mid) straddle the diagonal (masked); [mid, seqlen_q) see the whole key block.
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, seqlen_q)
    else:
        lo = 0
        mid = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * stride_qb + q_start * stride_ql + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start * stride_dol + h * stride_doh
        dq_base = DQ + b64 * stride_dqb + q_start * stride_dql + h * stride_dqh
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        if CAUSAL:
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_ql,
                                   stride_dol, stride_dql, offs_n, offs_d, lo, mid, seqlen_q, diag, qk_scale,
                                   sm_scale, True, HEAD_DIM, BLOCK_M, ATOMIC_DQ, PRECISION)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_ql,
                               stride_dol, stride_dql, offs_n, offs_d, mid, seqlen_q, seqlen_q, diag, qk_scale,
                               sm_scale, False, HEAD_DIM, BLOCK_M, ATOMIC_DQ, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + (k_start + offs_n[:, None]) * stride_dkl + hk * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_kv)
    tl.store(DV + b64 * stride_dvb + (k_start + offs_n[:, None]) * stride_dvl + hk * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_kv)


@triton.jit
def _bwd_q_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, lo, hi, seqlen_k, diag, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    mask_d = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            mask_t = (cols[None, :] < seqlen_k) & mask_d[:, None]
            kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None], mask=mask_t, other=0.0)
            vt = tl.load(v_base + cols[None, :] * stride_vl + offs_d[:, None], mask=mask_t, other=0.0)
        elif EVEN_D:
            kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None])
            vt = tl.load(v_base + cols[None, :] * stride_vl + offs_d[:, None])
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None], mask=mask_d[:, None], other=0.0)
            vt = tl.load(v_base + cols[None, :] * stride_vl + offs_d[:, None], mask=mask_d[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    stride_lb, stride_lh,
    LQ, LK, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    hk = h // GROUP
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        q_start = 0
        seqlen_q = LQ
        k_start = 0
        seqlen_k = LK
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_q = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + (q_start + offs_m[:, None]) * stride_ql + h * stride_qh + offs_d[None, :],
                mask=mask_q, other=0.0)
    do = tl.load(DO + b64 * stride_dob + (q_start + offs_m[:, None]) * stride_dol + h * stride_doh
                 + offs_d[None, :], mask=mask_q, other=0.0)
    lse2 = tl.load(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=mask_m,
                   other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=mask_m, other=0.0)
    k_base = K + b64 * stride_kb + k_start * stride_kl + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vl + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    dq = _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, 0, full_end,
                      seqlen_k, diag, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, EVEN_D, PRECISION)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, offs_m, offs_d, full_end, hi,
                      seqlen_k, diag, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, EVEN_D, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + (q_start + offs_m[:, None]) * stride_dql + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_q)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "") == "1"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fit(block: int, length) -> int:
    """Shrink a block for short sequences (Lq = 1, 32 learned queries): no point computing 128 padded rows.

    Comparisons only, so a symbolic length (``torch.compile`` with dynamic shapes) becomes guards, not an error."""
    while block > 16 and length <= block // 2:
        block //= 2
    return block


def _fwd_config(block_d: int, dtype: torch.dtype, max_q: int, max_k: int, interpret: bool) -> _Config:
    if interpret:  # fewer, larger numpy steps: the interpreter pays per op, not per element
        return _Config(_fit(64, max_q), _fit(64, max_k), 4, 1)
    if block_d <= 64:
        cfg = _Config(128, 64, 4, 3)
    elif block_d <= 128:
        cfg = _Config(128, 64, 8, 3)
    else:
        cfg = _Config(64, 32, 8, 2)
    if dtype == torch.float32:  # twice the shared memory per element
        cfg = _Config(min(cfg.block_m, 64), min(cfg.block_n, 32 if block_d <= 128 else 16), 4, 2)
    return _Config(_fit(cfg.block_m, max_q), _fit(cfg.block_n, max_k), cfg.num_warps, cfg.num_stages)


def _bwd_configs(block_d: int, dtype: torch.dtype, max_q: int, max_k: int, interpret: bool
                 ) -> tuple[_Config, _Config]:
    """(dK/dV kernel config, dQ kernel config)."""
    if interpret:
        cfg = _Config(_fit(64, max_q), _fit(64, max_k), 4, 1)
        return cfg, cfg
    # Untuned starting points (the shapes of Triton's fused-attention tutorial); retune on the target GPU.
    if block_d <= 64:
        kv, q = _Config(32, 128, 4, 3), _Config(128, 32, 4, 3)
    elif block_d <= 128:
        kv, q = _Config(32, 128, 8, 2), _Config(128, 32, 8, 2)
    else:
        kv, q = _Config(32, 64, 8, 1), _Config(64, 32, 8, 1)
    if dtype == torch.float32:
        kv = _Config(min(kv.block_m, 32), min(kv.block_n, 64 if block_d <= 128 else 32), kv.num_warps, 1)
        q = _Config(min(q.block_m, 64 if block_d <= 128 else 32), min(q.block_n, 32), q.num_warps, 1)
    kv = _Config(_fit(kv.block_m, max_q), _fit(kv.block_n, max_k), kv.num_warps, kv.num_stages)
    q = _Config(_fit(q.block_m, max_q), _fit(q.block_n, max_k), q.num_warps, q.num_stages)
    return kv, q


def _check_grid(batch: int, heads: int) -> None:
    # grids are (row blocks, heads, batch): CUDA caps grid axes 1 and 2 at 65535
    if batch > 65535 or heads > 65535:
        raise ValueError(f"attention (triton): at most 65535 sequences and heads per call, got {batch} and {heads}")


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


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (not TF32): the fp32 path is the accuracy path.
    return "ieee" if dtype == torch.float32 else "tf32"


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


def attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns (out like q, lse fp32 of :func:`lse_shape`). Inputs are validated by the caller.

    ``launch`` wraps each kernel (``torch.library.wrap_triton`` inside the registered op).
    """
    wrap = launch if launch is not None else (lambda kern: kern)
    varlen, batch, hq, hkv, lq, lk = _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    head_dim = q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or lq == 0:
        return out, lse
    block_d = _block_d(head_dim)
    cfg = _fwd_config(block_d, q.dtype, lq, lk, _interpreting(q))
    cu_q = cu_seqlens_q if varlen else lse  # unused pointer when dense
    cu_k = cu_seqlens_k if varlen else lse
    _check_grid(batch, hq)
    grid = (triton.cdiv(lq, cfg.block_m), hq, batch)
    wrap(_attn_fwd_kernel)[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        lq, lk, hq // hkv, softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, VARLEN=varlen, EVEN_D=head_dim == block_d, PRECISION=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def attention_bwd_triton(
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
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns (dq, dk, dv) in the inputs' dtypes. ``deterministic`` computes dQ in its own kernel
    (no atomics, bitwise reproducible); otherwise the dK/dV kernel adds dQ with fp32 atomics."""
    wrap = launch if launch is not None else (lambda kern: kern)
    varlen, batch, hq, hkv, lq, lk = _problem(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    head_dim = q.shape[-1]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0 or lq == 0 or lk == 0:
        dk.zero_()
        dv.zero_()
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv
    interpret = _interpreting(q)
    block_d = _block_d(head_dim)
    kv_cfg, q_cfg = _bwd_configs(block_d, q.dtype, lq, lk, interpret)
    precision = _precision(q.dtype)
    group = hq // hkv
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    lse_strides = _lse_strides(lse, varlen)

    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    pre_m = 64 if interpret else 128
    wrap(_attn_bwd_preprocess_kernel)[(triton.cdiv(lq, pre_m), hq, batch)](
        out, dout, delta, cu_q,
        *_strides(out, varlen), *_strides(dout, varlen), *lse_strides,
        lq,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m, VARLEN=varlen,
        num_warps=4 if block_d <= 128 else 8,
    )

    atomic_dq = not deterministic
    if atomic_dq:
        dq_buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_buf = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    wrap(_attn_bwd_dkdv_kernel)[(triton.cdiv(lk, kv_cfg.block_n), hkv, batch)](
        q, k, v, dout, lse, delta, dk, dv, dq_buf, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), *_strides(dq_buf, varlen), *lse_strides,
        lq, lk, group, softmax_scale * LOG2E, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n,
        CAUSAL=causal, VARLEN=varlen, ATOMIC_DQ=atomic_dq, PRECISION=precision,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
    if atomic_dq:
        return dq_buf.to(q.dtype), dk, dv
    wrap(_attn_bwd_dq_kernel)[(triton.cdiv(lq, q_cfg.block_m), hq, batch)](
        q, k, v, dout, lse, delta, dq_buf, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dq_buf, varlen), *lse_strides,
        lq, lk, group, softmax_scale * LOG2E, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n,
        CAUSAL=causal, VARLEN=varlen, EVEN_D=head_dim == block_d, PRECISION=precision,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
    )
    return dq_buf, dk, dv
