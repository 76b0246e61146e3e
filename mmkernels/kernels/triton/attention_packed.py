"""Packed varlen attention: query tiles over the packed token axis, block-diagonal masks, head dims in two chunks.

The per-sequence kernels (``attention.py``) give every (sequence, head) its own row blocks, so a 197-token image
computes ``ceil(197 / BLOCK_M) * BLOCK_M`` rows against ``ceil(197 / BLOCK_N) * BLOCK_N`` keys (59% of the score
entries valid at 128 x 64). Here a program owns ``BLOCK_M`` consecutive rows of the packed ``[total_q, H, D]``
tensor, whatever sequences they belong to:

- row -> sequence ids come from ``cu_seqlens`` on the device (a vectorised binary search in the kernel,
  :func:`_seq_ids`; no host sync, no extra tensor);
- the program streams the keys from the first key of the first sequence it touches to the last key of the last
  one (``[lo, hi)``), and masks block-diagonally: row ``i`` of sequence ``b`` sees keys
  ``[cu_k[b], cu_k[b] + n_i)`` with ``n_i = len_k(b)`` or, causal (bottom-right aligned, as the dense kernels),
  ``clamp(i_local + len_k - len_q + 1, 0, len_k)``;
- the backward mirrors it: dK/dV programs own ``BLOCK_N`` packed key rows of one key/value head (GQA group loop
  inside, as the dense kernel), stream the query rows that see them and mask the same way; dQ programs own packed
  query tiles like the forward. The atomic-dQ mode adds dQ from the dK/dV kernel, as the dense path.

Same contract as the per-sequence path: lse ``[Hq, total_q]`` (natural log, ``+inf`` for rows that see no key),
rows past ``cu_seqlens[-1]`` get zero output / gradients and are never read (so NaN there reaches nothing), and the
dropout stream is the same Philox element index ``((b * Hq + h) * LQ + i) * LK + j`` with ``i``/``j`` positions
within sequence ``b`` and ``LQ``/``LK`` the max lengths, so a seed drops the same probabilities in both paths and the
two can be mixed (a packed forward with a per-sequence backward gives the same gradients).

Head dims: ``tl.arange`` and the ``tl.dot`` operands need power-of-two sizes, so the dense kernels pad D = 72/80/88
to 128. Here the head dim is cut into two power-of-two chunks (:func:`head_dim_chunks`: 72 -> 64 + 16, 88 -> 64 +
32); the score is ``q0 k0^T + q1 k1^T`` (two accumulating dots) and O, dQ, dK, dV are kept as two accumulators. A
head dim that gains nothing from a split (powers of two, 112 -> 64 + 64) runs as one chunk.

Invalid regions: padding rows/keys, rows that see no key and keys that no row sees are never loaded into a product
(or their results are stored as exact zeros), so NaN/inf there reaches nothing. That includes the keys of a
sequence without queries (``cu_seqlens_q`` repeats a value while ``cu_seqlens_k`` grows) lying inside a tile's key
range ``[lo, hi)``: the forward and dQ programs load K/V under a column mask "some row of the tile sees this key"
(:func:`_seen_cols`), the dK/dV programs load only the keys some query row sees, and they leave the others'
dk/dv at zero.

Caveat of sharing a tile: a non-finite value in one sequence A's *valid* rows reaches the other sequences B whose
rows share its query tile (forward, dQ) or key block (dK/dV) through ``0 * NaN`` inside one ``tl.dot``: A's V ->
B's out (``P V``), A's K -> B's dq (``dS K``), A's q -> B's dk (``dS^T Q``), A's dO -> B's dv (``P^T dO``). The
per-sequence kernels keep it inside A; ``docs/ops/attention.md`` says how to avoid it.

Which varlen kernels run (these or the per-sequence ones) is decided in one place, ``attention_varlen.py`` (its
``packed_pays`` rule and this module's :func:`packed_fits`); neither kernel module imports the other.
``attention_varlen.occupancy`` computes, for a list of sequence lengths, the fraction of computed score entries (rows x
keys multiplied) that are valid and the head-dim fraction, for either mode (``docs/ops/attention.md`` has the table;
``benchmarks/occupancy.py`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import (
    LN2_JIT,
    LOG2E,
    LOG2E_JIT,
    check_grid,
    dropout_args,
    dropout_keep,
    dropout_seed,
    head_dim_chunks,
    input_precision,
    wrapped,
)

__all__ = ["attention_packed_bwd", "attention_packed_fwd", "head_dim_chunks", "packed_fits"]


# --------------------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _seq_ids(CU, rows, NUM_SEQS):
    """Sequence of each packed row: the largest ``b`` in ``[0, NUM_SEQS)`` with ``CU[b] <= row`` (a vectorised
    binary search over ``cu_seqlens``: ``ceil(log2(NUM_SEQS))`` gathers; empty sequences are skipped because
    ``CU[b] == CU[b + 1]``). Meaningless for rows ``>= CU[NUM_SEQS]`` (padding): the callers mask those."""
    lo = tl.zeros_like(rows)
    hi = lo + NUM_SEQS
    while tl.max(hi - lo, 0) > 1:
        mid = (lo + hi) // 2
        right = tl.load(CU + mid) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _query_tile(CU_Q, CU_K, tile, NUM_SEQS, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """What a forward / dQ program needs about its packed rows ``[tile * BLOCK_M, (tile + 1) * BLOCK_M)``:
    ``(rows, row_ok, seq, pos, k_first, k_last, lo, hi)``. Row ``rows[i]`` (position ``pos[i]`` in sequence
    ``seq[i]``) sees keys ``[k_first[i], k_last[i])``; the program streams ``[lo, hi)``, the union over its rows
    (empty, ``lo >= hi``, when no row sees a key)."""
    total_q = tl.load(CU_Q + NUM_SEQS)
    total_k = tl.load(CU_K + NUM_SEQS)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total_q
    seq = _seq_ids(CU_Q, rows, NUM_SEQS)
    q_first = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_first
    k_first = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_first
    pos = rows - q_first
    n_keys = len_k
    if CAUSAL:  # bottom-right aligned: position i sees keys j <= i + len_k - len_q
        n_keys = tl.minimum(tl.maximum(pos + len_k - len_q + 1, 0), len_k)
    n_keys = tl.where(row_ok, n_keys, 0)
    k_last = k_first + n_keys
    sees = n_keys > 0
    lo = tl.min(tl.where(sees, k_first, total_k), 0)
    hi = tl.max(tl.where(sees, k_last, 0), 0)
    return rows, row_ok, seq, pos, k_first, k_last, lo, hi


@triton.jit
def _seen_cols(CU_Q, CU_K, cols, hi, NUM_SEQS):
    """bool ``[BLOCK_N]``: the keys of a query tile's key block that some row of the tile may see. The keys of a
    sequence without queries (``cu_seqlens_q`` repeats a value while ``cu_seqlens_k`` grows) can lie inside the
    tile's ``[lo, hi)``, between two of its sequences: they are not loaded (their NaN/inf would reach every row
    through ``0 * NaN`` in ``P V`` / ``dS K``). Sequences keep their order in q and k, so a key in ``[lo, hi)`` whose
    sequence has a query belongs to a sequence of the tile: the test is on the key's own sequence (a binary search
    of ``[BLOCK_N]``, no ``[BLOCK_M, BLOCK_N]`` mask held across the dot: the kernels are at the register limit)."""
    seq = _seq_ids(CU_K, cols, NUM_SEQS)
    has_queries = tl.load(CU_Q + seq + 1) > tl.load(CU_Q + seq)
    return (cols < hi) & has_queries


@triton.jit
def _load_rows(base, rows, row_mask, stride, offs_d, HEAD_DIM: tl.constexpr):
    """``[len(rows), len(offs_d)]`` elements of packed rows (int64 ``rows``) of one head; masked rows and the
    head-dim padding read 0."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :],
                   mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_rows_t(base, rows, row_mask, stride, offs_d, HEAD_DIM: tl.constexpr):
    """:func:`_load_rows` transposed: ``[len(offs_d), len(rows)]``."""
    return tl.load(base + rows[None, :] * stride + offs_d[:, None],
                   mask=row_mask[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, rows, row_mask, stride, offs_d, value, HEAD_DIM: tl.constexpr):
    tl.store(base + rows[:, None] * stride + offs_d[None, :], value.to(base.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------


# The second head-dim chunk exists only when BLOCK_D1 > 0: a constexpr condition, so Triton compiles the taken
# branch only (its variables stay defined for the later `if BLOCK_D1 > 0` blocks) and one source serves both.


@triton.jit
def _packed_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, SEED,
    stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh, stride_ol, stride_oh, stride_lh,
    NUM_SEQS, LQ, LK, HQ, GROUP, NUM_TILES, qk_scale, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % NUM_TILES
    h = (pid // NUM_TILES).to(tl.int64)
    if tile * BLOCK_M >= tl.load(CU_Q + NUM_SEQS):
        return  # padding rows past cu_seqlens_q[-1]: out 0 and lse +inf from the launcher
    hk = h // GROUP
    rows, row_ok, seq, pos, k_first, k_last, lo, hi = _query_tile(CU_Q, CU_K, tile, NUM_SEQS, BLOCK_M, CAUSAL)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q_base = Q + h * stride_qh
    k_base = K + hk * stride_kh
    v_base = V + hk * stride_vh
    q0 = _load_rows(q_base, rows64, row_ok, stride_ql, offs_d0, HEAD_DIM)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_rows(q_base, rows64, row_ok, stride_ql, offs_d1, HEAD_DIM)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    seed = dropout_seed(SEED, DROPOUT)
    drop_base = (seq.to(tl.int64) * HQ + h) * LQ
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = _seen_cols(CU_Q, CU_K, cols, hi, NUM_SEQS)  # loads: never the keys of query-less sequences
        cols64 = cols.to(tl.int64)
        kt0 = _load_rows_t(k_base, cols64, col_ok, stride_kl, offs_d0, HEAD_DIM)
        s = tl.dot(q0, kt0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            kt1 = _load_rows_t(k_base, cols64, col_ok, stride_kl, offs_d1, HEAD_DIM)
            s = tl.dot(q1, kt1, s, input_precision=PRECISION)
        # block-diagonal (and causal) mask: a NaN score of a row that sees none of these keys is dropped here
        visible = (cols[None, :] >= k_first[:, None]) & (cols[None, :] < k_last[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the probabilities before dropout
        if DROPOUT:
            keep = dropout_keep(seed, drop_base[:, None], pos[:, None], cols[None, :] - k_first[:, None], LK,
                                dropout_p)
            p = tl.where(keep, p, 0.0)
        v0 = _load_rows(v_base, cols64, col_ok, stride_vl, offs_d0, HEAD_DIM)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if BLOCK_D1 > 0:
            v1 = _load_rows(v_base, cols64, col_ok, stride_vl, offs_d1, HEAD_DIM)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    scale = 1.0 / l_safe
    if DROPOUT:
        scale = scale * drop_scale  # inverted dropout: kept probabilities scaled by 1 / (1 - p)
    o_base = OUT + h * stride_oh
    # rows that see no key: exact zeros (their acc is 0 * the values of the keys other rows of the tile see)
    _store_rows(o_base, rows64, row_ok, stride_ol, offs_d0, tl.where(empty[:, None], 0.0, acc0 * scale[:, None]),
                HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_rows(o_base, rows64, row_ok, stride_ol, offs_d1,
                    tl.where(empty[:, None], 0.0, acc1 * scale[:, None]), HEAD_DIM)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2_JIT)
    tl.store(LSE + h * stride_lh + rows64, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _packed_bwd_preprocess_kernel(
    OUT, DO, DELTA, CU_Q,
    stride_ol, stride_oh, stride_dol, stride_doh, stride_lh,
    NUM_SEQS, NUM_TILES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O) in fp32 over packed rows (memory-bound: one power-of-two chunk, masked)
    pid = tl.program_id(0)
    tile = pid % NUM_TILES
    h = (pid // NUM_TILES).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(CU_Q + NUM_SEQS)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(OUT + h * stride_oh, rows64, row_ok, stride_ol, offs_d, HEAD_DIM)
    do = _load_rows(DO + h * stride_doh, rows64, row_ok, stride_dol, offs_d, HEAD_DIM)
    tl.store(DELTA + h * stride_lh + rows64, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _packed_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K, SEED,
    stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh, stride_dol, stride_doh,
    stride_dkl, stride_dkh, stride_dvl, stride_dvh, stride_dql, stride_dqh, stride_lh,
    NUM_SEQS, LQ, LK, HKV, GROUP, NUM_TILES, qk_scale, sm_scale, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % NUM_TILES
    hk = (pid // NUM_TILES).to(tl.int64)
    total_k = tl.load(CU_K + NUM_SEQS)
    if tile * BLOCK_N >= total_k:
        return  # padding keys past cu_seqlens_k[-1]: dk/dv start from zeros
    total_q = tl.load(CU_Q + NUM_SEQS)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < total_k
    seq = _seq_ids(CU_K, cols, NUM_SEQS)
    k_first = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_first
    q_first = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_first
    pos = cols - k_first
    q_end = q_first + len_q
    row_first = q_first  # the first query row that sees each key
    if CAUSAL:
        row_first = q_first + tl.minimum(tl.maximum(pos - (len_k - len_q), 0), len_q)
    row_first = tl.where(col_ok, row_first, q_end)  # padding keys: seen by no row
    sees = row_first < q_end
    lo = tl.min(tl.where(sees, row_first, total_q), 0)
    hi = tl.max(tl.where(sees, q_end, 0), 0)

    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    # keys that no row sees (a sequence without queries, causal keys past every row's diagonal, padding) are not
    # loaded: the atomic dQ product dS K would carry their NaN to the block's other rows through 0 * NaN
    k0 = _load_rows(K + hk * stride_kh, cols64, sees, stride_kl, offs_d0, HEAD_DIM)
    v0 = _load_rows(V + hk * stride_vh, cols64, sees, stride_vl, offs_d0, HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_rows(K + hk * stride_kh, cols64, sees, stride_kl, offs_d1, HEAD_DIM)
        v1 = _load_rows(V + hk * stride_vh, cols64, sees, stride_vl, offs_d1, HEAD_DIM)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    seed = dropout_seed(SEED, DROPOUT)
    # dropout element ((b * Hq + h) * LQ + i_local) * LK + j_local, with i_local = row - q_first[b]
    drop_key = seq.to(tl.int64) * HKV * GROUP * LQ - q_first
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + h * stride_qh
        do_base = DO + h * stride_doh
        lse_base = LSE + h * stride_lh
        delta_base = DELTA + h * stride_lh
        drop_base = drop_key + h * LQ
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            visible = (rows[None, :] >= row_first[:, None]) & (rows[None, :] < q_end[:, None])  # [BLOCK_N, BLOCK_M]
            # Rows that see none of these keys (other sequences' rows in the range, causal rows before the
            # diagonal) are not loaded: their q/dO (even NaN) would reach dK/dV through 0 * NaN in the products.
            seen = tl.max(visible.to(tl.int32), 0) > 0
            rows64 = rows.to(tl.int64)
            q0 = _load_rows(q_base, rows64, seen, stride_ql, offs_d0, HEAD_DIM)
            do0 = _load_rows(do_base, rows64, seen, stride_dol, offs_d0, HEAD_DIM)
            lse2 = tl.load(lse_base + rows64, mask=seen, other=float("inf")) * LOG2E_JIT
            delta = tl.load(delta_base + rows64, mask=seen, other=0.0)
            s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
            dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
            if BLOCK_D1 > 0:
                q1 = _load_rows(q_base, rows64, seen, stride_ql, offs_d1, HEAD_DIM)
                do1 = _load_rows(do_base, rows64, seen, stride_dol, offs_d1, HEAD_DIM)
                s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
                dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
            p_t = tl.exp2(tl.where(visible, s_t * qk_scale, float("-inf")) - lse2[None, :])  # p = 0 off the mask
            if DROPOUT:
                keep_t = dropout_keep(seed, drop_base[:, None], rows[None, :], pos[:, None], LK, dropout_p)
                pd_t = tl.where(keep_t, p_t * drop_scale, 0.0)
                dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
            else:
                pd_t = p_t
            dv0 = tl.dot(pd_t.to(do0.dtype), do0, dv0, input_precision=PRECISION)
            ds_t = tl.where(visible, p_t * (dp_t - delta[None, :]), 0.0)
            dk0 = tl.dot(ds_t.to(q0.dtype), q0, dk0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dv1 = tl.dot(pd_t.to(do1.dtype), do1, dv1, input_precision=PRECISION)
                dk1 = tl.dot(ds_t.to(q1.dtype), q1, dk1, input_precision=PRECISION)
            if ATOMIC_DQ:
                ds = tl.trans(ds_t.to(k0.dtype))
                dq_base = DQ + h * stride_dqh
                tl.atomic_add(dq_base + rows64[:, None] * stride_dql + offs_d0[None, :],
                              tl.dot(ds, k0, input_precision=PRECISION) * sm_scale,
                              mask=seen[:, None] & (offs_d0[None, :] < HEAD_DIM), sem="relaxed")
                if BLOCK_D1 > 0:
                    tl.atomic_add(dq_base + rows64[:, None] * stride_dql + offs_d1[None, :],
                                  tl.dot(ds, k1, input_precision=PRECISION) * sm_scale,
                                  mask=seen[:, None] & (offs_d1[None, :] < HEAD_DIM), sem="relaxed")
    # keys that no row sees keep the launcher's zeros (their dS / P columns are 0, but the block's rows may hold
    # another sequence's NaN q / dO)
    _store_rows(DK + hk * stride_dkh, cols64, sees, stride_dkl, offs_d0, dk0 * sm_scale, HEAD_DIM)
    _store_rows(DV + hk * stride_dvh, cols64, sees, stride_dvl, offs_d0, dv0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_rows(DK + hk * stride_dkh, cols64, sees, stride_dkl, offs_d1, dk1 * sm_scale, HEAD_DIM)
        _store_rows(DV + hk * stride_dvh, cols64, sees, stride_dvl, offs_d1, dv1, HEAD_DIM)


@triton.jit
def _packed_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, SEED,
    stride_ql, stride_qh, stride_kl, stride_kh, stride_vl, stride_vh, stride_dol, stride_doh,
    stride_dql, stride_dqh, stride_lh,
    NUM_SEQS, LQ, LK, HQ, GROUP, NUM_TILES, qk_scale, sm_scale, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % NUM_TILES
    h = (pid // NUM_TILES).to(tl.int64)
    if tile * BLOCK_M >= tl.load(CU_Q + NUM_SEQS):
        return
    hk = h // GROUP
    rows, row_ok, seq, pos, k_first, k_last, lo, hi = _query_tile(CU_Q, CU_K, tile, NUM_SEQS, BLOCK_M, CAUSAL)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q_base = Q + h * stride_qh
    do_base = DO + h * stride_doh
    k_base = K + hk * stride_kh
    v_base = V + hk * stride_vh
    q0 = _load_rows(q_base, rows64, row_ok, stride_ql, offs_d0, HEAD_DIM)
    do0 = _load_rows(do_base, rows64, row_ok, stride_dol, offs_d0, HEAD_DIM)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_rows(q_base, rows64, row_ok, stride_ql, offs_d1, HEAD_DIM)
        do1 = _load_rows(do_base, rows64, row_ok, stride_dol, offs_d1, HEAD_DIM)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    lse2 = tl.load(LSE + h * stride_lh + rows64, mask=row_ok, other=float("inf")) * LOG2E_JIT
    delta = tl.load(DELTA + h * stride_lh + rows64, mask=row_ok, other=0.0)
    seed = dropout_seed(SEED, DROPOUT)
    drop_base = (seq.to(tl.int64) * HQ + h) * LQ
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = _seen_cols(CU_Q, CU_K, cols, hi, NUM_SEQS)
        cols64 = cols.to(tl.int64)
        kt0 = _load_rows_t(k_base, cols64, col_ok, stride_kl, offs_d0, HEAD_DIM)
        vt0 = _load_rows_t(v_base, cols64, col_ok, stride_vl, offs_d0, HEAD_DIM)
        s = tl.dot(q0, kt0, input_precision=PRECISION)
        dp = tl.dot(do0, vt0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            kt1 = _load_rows_t(k_base, cols64, col_ok, stride_kl, offs_d1, HEAD_DIM)
            vt1 = _load_rows_t(v_base, cols64, col_ok, stride_vl, offs_d1, HEAD_DIM)
            s = tl.dot(q1, kt1, s, input_precision=PRECISION)
            dp = tl.dot(do1, vt1, dp, input_precision=PRECISION)
        visible = (cols[None, :] >= k_first[:, None]) & (cols[None, :] < k_last[:, None])
        p = tl.exp2(tl.where(visible, s * qk_scale, float("-inf")) - lse2[:, None])  # p = 0 off the mask
        if DROPOUT:
            keep = dropout_keep(seed, drop_base[:, None], pos[:, None], cols[None, :] - k_first[:, None], LK,
                                dropout_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
        dq0 = tl.dot(ds.to(kt0.dtype), tl.trans(kt0), dq0, input_precision=PRECISION)
        if BLOCK_D1 > 0:
            dq1 = tl.dot(ds.to(kt1.dtype), tl.trans(kt1), dq1, input_precision=PRECISION)
    dq_base = DQ + h * stride_dqh
    sees = k_last > k_first  # rows that see no key keep the launcher's zeros (0 * the tile's keys otherwise)
    _store_rows(dq_base, rows64, sees, stride_dql, offs_d0, dq0 * sm_scale, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_rows(dq_base, rows64, sees, stride_dql, offs_d1, dq1 * sm_scale, HEAD_DIM)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _configs(width: int, dtype: torch.dtype, target: tuning.Target, dropout: bool = False
             ) -> tuple[_Config, _Config, _Config]:
    """(forward, dK/dV, dQ) configs for a padded head dim ``width`` (``BLOCK_D0 + BLOCK_D1``). Fixed block sizes (no
    fit to the max length): a packed tile spans sequences, so short sequences fill it. The interpreter takes 32 x 32
    tiles (few NumPy steps; small tests still cross sequence boundaries inside a tile).

    GPU values are untuned starting points, chosen without a GPU so that ptxas (Triton 3.8, sm_80 and sm_90a) reports no
    spills for every launched specialisation (``make check-triton``), with the wide half-precision backward routed to
    the per-sequence kernels (:func:`packed_fits`). 64-row query tiles: a tile straddling two sequences computes its
    rows against both, so shorter tiles waste less (``attention_varlen.occupancy``). dK/dV takes 16-row query steps:
    its program holds K, V, dK and dV for 64 keys."""
    if target.interpreted:
        cfg = _Config(32, 32, 4, 1)
        return cfg, cfg, cfg
    if dtype == torch.float32:  # ieee products, twice the bytes per element
        return _Config(32, 32, 4, 2), _Config(16, 16, 8, 1), _Config(16, 16, 4, 1)
    if width <= 64:
        kv = _Config(16, 64, 8, 1 if dropout else 2)  # Philox's registers: one stage fewer with dropout
        # 8 warps: with 4 (any stage count) the seen-key mask of the loads spills 12 bytes on sm_80
        return _Config(64, 64, 8, 3), kv, _Config(64, 32, 4, 2)
    if width <= 128:
        # 64 + 16 or 64 + 32: 32-key forward tiles (64 spill on sm_80). The backward configs are what the
        # interpreter-sized tests shape; on a GPU these widths' half-precision backward runs the per-sequence
        # kernels (packed_fits: no dK/dV config compiles spill-free).
        return _Config(64, 32, 4, 2), _Config(16, 64, 8, 1 if dropout else 2), _Config(64, 32, 8, 2)
    return _Config(64, 32, 8, 2), _Config(16, 32, 8, 1), _Config(32, 32, 8, 1)


def packed_fits(q: torch.Tensor, backward: bool, target: tuning.Target | None = None) -> bool:
    """Whether the packed kernels run for ``q`` once ``attention_varlen.packed_pays`` (or
    ``MMKERNELS_ATTENTION_PACKED=1``) says packed: always on an interpreted ``target`` (default
    ``tuning.target_of(q)``); on a GPU only where their configs compile without register spills
    (``make check-triton``, ptxas from Triton 3.8 on sm_80 and sm_90a), else the per-sequence kernels run (same
    results; either backward takes either forward's lse):

    - fp16/bf16 forward: padded head widths up to 128 (D <= 128; at 144 it spills 72 bytes on sm_80);
    - fp16/bf16 backward: widths up to 64 (D <= 64). At 80 and 96 (D = 65..96) the dK/dV program holds K, V, dK and
      dV for its key block in two head-dim chunks, and every config swept (BLOCK_M 16/32 x BLOCK_N 32/64, 2/4/8
      warps, 1/2 stages) spills 12-19,000 bytes per thread in some launched specialisation;
    - fp32: never (its ieee products hold twice the registers per element and spill from D = 40 on; fp32 is not a
      speed path on GPUs)."""
    if (target or tuning.target_of(q)).interpreted:
        return True
    if q.dtype == torch.float32:
        return False
    d0, d1 = head_dim_chunks(q.shape[-1])
    return d0 + d1 <= (64 if backward else 128)


def _grid(tiles, heads, what: str) -> tuple[int]:
    programs = tiles * heads
    return check_grid((programs,), f"attention (triton, packed {what}): {tiles} tiles x {heads} heads = {programs} "
                                   "programs")


def attention_packed_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen forward, the same contract as ``attention_fwd_triton`` with ``cu_seqlens``: q
    ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]`` (unit stride on D), int32 ``cu_seqlens_*`` ``[B + 1]``;
    returns (out like q, lse fp32 ``[Hq, total_q]``). Rows past ``cu_seqlens_q[-1]`` get 0 / ``+inf``. Inputs are
    validated by the caller."""
    batch = cu_seqlens_q.shape[0] - 1
    hq, hkv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # padding rows belong to no program
    lse = torch.full((hq, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)  # [Hq, total_q]
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    d0, d1 = head_dim_chunks(head_dim)
    cfg, _, _ = _configs(d0 + d1, q.dtype, tuning.target_of(q))
    seed_ptr, dropout_p, drop_scale, dropout = dropout_args(dropout_p, seed, lse)
    tiles = triton.cdiv(q.shape[0], cfg.block_m)
    wrapped(_packed_fwd_kernel, launch)[_grid(tiles, hq, "forward")](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed_ptr,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        batch, max_seqlen_q, max_seqlen_k, hq, hq // hkv, tiles, softmax_scale * LOG2E, dropout_p, drop_scale,
        HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        PRECISION=input_precision(q.dtype), DROPOUT=dropout,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def attention_packed_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
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
    """Packed varlen backward, the same contract as ``attention_bwd_triton`` with ``cu_seqlens``: returns (dq, dk,
    dv) in the inputs' dtypes, zero on padding rows; ``deterministic`` computes dQ in its own kernel, otherwise the
    dK/dV kernel adds it with fp32 atomics. ``lse`` ``[Hq, total_q]`` may come from either forward."""
    batch = cu_seqlens_q.shape[0] - 1
    hq, hkv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv
    d0, d1 = head_dim_chunks(head_dim)
    _, kv_cfg, q_cfg = _configs(d0 + d1, q.dtype, tuning.target_of(q), dropout_p > 0.0)
    precision = input_precision(q.dtype)
    group = hq // hkv
    seed_ptr, dropout_p, drop_scale, dropout = dropout_args(dropout_p, seed, lse)
    qk_scale = softmax_scale * LOG2E

    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # padding rows: never read
    pre_m = 32  # memory-bound; 128 rows x 128 columns of O and dO spill at 4 warps (ptxas, sm_90a)
    pre_tiles = triton.cdiv(q.shape[0], pre_m)
    pre_d = max(16, triton.next_power_of_2(head_dim))
    wrapped(_packed_bwd_preprocess_kernel, launch)[_grid(pre_tiles, hq, "backward preprocess")](
        out, dout, delta, cu_seqlens_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        batch, pre_tiles,
        HEAD_DIM=head_dim, BLOCK_D=pre_d, BLOCK_M=pre_m, num_warps=4 if pre_d <= 128 else 8,
    )

    atomic_dq = not deterministic
    dq_buf = torch.zeros(q.shape, dtype=torch.float32 if atomic_dq else q.dtype, device=q.device)
    kv_tiles = triton.cdiv(k.shape[0], kv_cfg.block_n)
    wrapped(_packed_bwd_dkdv_kernel, launch)[_grid(kv_tiles, hkv, "dK/dV")](
        q, k, v, dout, lse, delta, dk, dv, dq_buf, cu_seqlens_q, cu_seqlens_k, seed_ptr,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_buf.stride(0), dq_buf.stride(1), lse.stride(0),
        batch, max_seqlen_q, max_seqlen_k, hkv, group, kv_tiles, qk_scale, softmax_scale, dropout_p, drop_scale,
        HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n,
        CAUSAL=causal, ATOMIC_DQ=atomic_dq, PRECISION=precision, DROPOUT=dropout,
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
    )
    if atomic_dq:
        return dq_buf.to(q.dtype), dk, dv
    q_tiles = triton.cdiv(q.shape[0], q_cfg.block_m)
    wrapped(_packed_bwd_dq_kernel, launch)[_grid(q_tiles, hq, "dQ")](
        q, k, v, dout, lse, delta, dq_buf, cu_seqlens_q, cu_seqlens_k, seed_ptr,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq_buf.stride(0), dq_buf.stride(1), lse.stride(0),
        batch, max_seqlen_q, max_seqlen_k, hq, group, q_tiles, qk_scale, softmax_scale, dropout_p, drop_scale,
        HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n,
        CAUSAL=causal, PRECISION=precision, DROPOUT=dropout,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
    )
    return dq_buf, dk, dv
