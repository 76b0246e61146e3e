"""Triton kernels for Q-Former cross-attention: few learned queries (Lq <= 128) over many image tokens.

Layout (flash-attn style, unit stride on the head dim, any other strides): q ``[B, Lq, H, D]``,
k/v ``[B, Lk, H, D]``, out ``[B, Lq, H, D]``, log-sum-exp ``[B, H, Lq]`` (fp32, natural log).

- forward: one program per (batch, head) holds *every* query (``BLOCK_M >= Lq``) and streams its keys once
  through an online softmax in fp32 (exp2 with the scale folded in). Each key/value tile is loaded once for all
  queries, so K/V traffic is the minimum. ``kv_lens[b]`` ends the key loop early (padded image tokens are never
  read). Head dims that are not powers of two are padded to ``BLOCK_D`` with masked loads.
- split-K (flash-decoding): when B*H programs cannot fill the GPU, grid axis 1 splits the keys into chunks; each
  program writes a normalised fp32 partial output and its LSE, and :func:`_qf_combine_kernel` merges them
  (``out = sum_s exp(lse_s - lse) o_s``, ``lse = logsumexp_s lse_s``; empty chunks have ``lse_s = -inf`` and
  weigh nothing).
- backward: one program per (batch, head, key chunk) holds every query, so dK/dV of its keys are complete in
  registers (no atomics); dQ is complete too when there is one chunk, else each chunk writes an fp32 partial and
  the host sums them (deterministic). ``delta = rowsum(dO * Out)`` is recomputed in the program (Lq x D: cheap).

- ``kv_lens`` is clamped to ``[0, Lk]`` in the kernels (values unchecked under ``torch.compile``); masked keys are
  never loaded, so NaN/inf there reach nothing; a sample with no key gets zeros (lse ``-inf``).
- dropout: the Philox stream of the attention kernels (``_common.dropout_keep``, index
  ``((b * H + h) * Lq + i) * Lk + j``), after the row sum; the split-K partials are scaled by ``1 / (1 - p)``
  before the (linear) combine.
- grid: batch x heads on axis 0 (up to 2**31 - 1 programs), key chunks on axis 1 (:func:`_grid`).

Only the basic ``tl`` API is used (Triton >= 3.6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._config import is_batch_invariant
from . import tuning
from ._common import (
    LN2_JIT,
    LOG2E,
    LOG2E_JIT,
    check_grid,
    dropout_args,
    dropout_keep,
    dropout_seed,
    input_precision,
    wrapped,
)

__all__ = ["MAX_HEAD_DIM", "MAX_QUERIES", "qformer_attention_bwd_triton", "qformer_attention_fwd_triton"]

MAX_QUERIES = 128
MAX_HEAD_DIM = 128


@triton.jit
def _qf_program(KV_LENS, SEED, H, Lq, Lk, chunk, HAS_KV_LENS: tl.constexpr, DROPOUT: tl.constexpr):
    """What the forward and backward programs share: ``(b, h, split, start, end, seed, drop_base)``. Program
    ``(b * H + h, split)`` owns the keys ``[start, end)`` of (batch ``b``, head ``h``): key chunk ``split`` cut at
    ``kv_lens[b]``, which is clamped to ``[0, Lk]`` (values are unchecked under torch.compile; 0 keys give zeros).
    ``seed``/``drop_base`` feed :func:`dropout_keep` (``drop_base = (b * H + h) * Lq``)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_len = Lk
    if HAS_KV_LENS:
        kv_len = tl.maximum(tl.minimum(tl.load(KV_LENS + b).to(tl.int32), Lk), 0)
    seed = dropout_seed(SEED, DROPOUT)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, kv_len)
    return b, h, pid_s, start, end, seed, pid_bh.to(tl.int64) * Lq


@triton.jit
def _qf_fwd_kernel(
    Q, K, V, Out, LSE, KV_LENS, SEED,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_os, stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    H, Lq, Lk, chunk, qk_scale, dropout_p, drop_scale,
    HAS_KV_LENS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    b, h, pid_s, start, end, seed, drop_base = _qf_program(KV_LENS, SEED, H, Lq, Lk, chunk, HAS_KV_LENS, DROPOUT)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < HEAD_D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        mask_n = offs < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one live key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the probabilities before dropout
        if DROPOUT:
            p = tl.where(dropout_keep(seed, drop_base, offs_m[:, None], offs[None, :], Lk, dropout_p), p, 0.0)
        v = tl.load(v_base + offs[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    live = l_i > 0.0  # false only for an empty key range (an empty split, or kv_len == 0)
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * drop_scale  # inverted dropout (linear: the split-K combine stays exact)
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2_JIT, float("-inf"))
    o_ptrs = Out + pid_s * stride_os + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + offs_m, lse, mask=mask_m)


@triton.jit
def _qf_combine_kernel(
    OP, LSEP, Out, LSE,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_qs, stride_qb, stride_qh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    H, Lq, num_splits,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask = mask_m[:, None] & (offs_d[None, :] < HEAD_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(LSEP + s * stride_qs + b * stride_qb + h * stride_qh + offs_m, mask=mask_m,
                        other=float("-inf"))
        o_s = tl.load(OP + s * stride_ps + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm
                      + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # 0 while nothing was seen
        w = tl.exp(lse_s - m_safe)  # 0 for an empty split
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new

    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(live, m_i + tl.log(l_safe), float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask)
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=mask_m)


@triton.jit
def _qf_bwd_kernel(
    Q, K, V, Out, DO, LSE, KV_LENS, DQ, DK, DV, SEED,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh,
    stride_dqs, stride_dqb, stride_dqm, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    H, Lq, Lk, chunk, sm_scale, qk_scale, dropout_p, drop_scale,
    HAS_KV_LENS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    b, h, pid_s, start, end, seed, drop_base = _qf_program(KV_LENS, SEED, H, Lq, Lk, chunk, HAS_KV_LENS, DROPOUT)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < HEAD_D
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_md, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask_md, other=0.0)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask_md, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=mask_m, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_JIT)  # dead rows: p = 0

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        mask_n = offs < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # keys past kv_len (read as zeros) and query rows past Lq: -inf before the exp, so p = 0 and dS = 0 there
        s = tl.where(mask_m[:, None] & mask_n[None, :], s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            keep = dropout_keep(seed, drop_base, offs_m[:, None], offs[None, :], Lk, dropout_p)
            dv = tl.dot(tl.trans(tl.where(keep, p * drop_scale, 0.0).to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * sm_scale
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs[:, None] * stride_dkn + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * stride_dvb + h * stride_dvh + offs[:, None] * stride_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    dq = dq * sm_scale
    tl.store(DQ + pid_s * stride_dqs + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask_md)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------


def _grid(B: int, H: int, splits: int = 1) -> tuple[int, int]:
    """(batch x heads on axis 0, which takes 2**31 - 1 programs; key chunks on axis 1, at most 65535)."""
    return check_grid((B * H, splits), f"qformer_cross_attention (triton): B * H = {B * H} programs with {splits} "
                                       "key chunks")


def _blocks(lq: int, d: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(lq)), max(16, triton.next_power_of_2(d))


# (BLOCK_N, num_warps, num_stages) for a small (<= 32 x 64), medium (<= 64 x 128) and large query tile; the
# backward holds more per key (dK, dV, dQ), so it takes fewer keys per step.
_FWD_CONFIGS = ((64, 4, 3), (64, 4, 2), (32, 8, 2))
_BWD_CONFIGS = ((64, 4, 2), (32, 4, 2), (16, 8, 1))


def _config(block_m: int, block_d: int, dtype: torch.dtype, target: tuning.Target, backward: bool
            ) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) by dtype and the size of the query tile ``block_m x block_d``, for
    ``target`` (an interpreted one gets the interpreter's)."""
    if target.interpreted:
        return 64, 4, 1
    # Spill-free on sm_80 and sm_90a for the BLIP-2 shapes (32 queries, D 64 / 88 / 128, with and without dropout;
    # docs/performance.md). The old picks spilled: fp32 up to 16,680 bytes per thread ("ieee" dots are FMA loops),
    # fp16 backward 12-76. Query tiles larger than 32 x 128 keep the untested _FWD_CONFIGS / _BWD_CONFIGS "large".
    tile = block_m * block_d
    if dtype == torch.float32:
        if backward:
            return (16, 8, 1) if tile <= 32 * 64 else (16, 8, 2)
        return 32, 8, 2
    if tile > 64 * 128:
        return _BWD_CONFIGS[2] if backward else _FWD_CONFIGS[2]
    if backward:
        return (32, 8, 2) if tile <= 32 * 64 else (16, 4, 2)
    return 64, 8, 2


def num_key_splits(q: torch.Tensor, lk: int, block_n: int, requested: int = 0, target: tuning.Target | None = None
                   ) -> int:
    """Key chunks per (batch, head). ``requested > 0`` forces it (tests); 0 picks: one chunk on an interpreted
    ``target`` (default ``tuning.target_of(q)``) or when the B*H programs fill its SMs, else enough chunks for about
    two waves, never less than one key tile per chunk."""
    tiles = triton.cdiv(max(lk, 1), block_n)
    if requested > 0:
        return max(1, min(requested, tiles))
    target = target or tuning.target_of(q)
    if target.interpreted or is_batch_invariant():  # the split count follows B * H: the batch would decide
        return 1
    programs = q.shape[0] * q.shape[2]
    sms = target.sm_count
    if programs >= sms:
        return 1
    return max(1, min(tiles, triton.cdiv(2 * sms, programs)))


def _chunking(lk: int, splits: int, block_n: int) -> tuple[int, int]:
    """(chunk length, number of chunks): chunks are whole key tiles."""
    chunk = triton.cdiv(triton.cdiv(max(lk, 1), splits), block_n) * block_n
    return chunk, triton.cdiv(max(lk, 1), chunk)


def qformer_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    softmax_scale: float,
    num_splits: int = 0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. Returns ``(out [B, Lq, H, D] contiguous in q's dtype, lse [B, H, Lq] fp32)``.

    ``kv_lens`` values are clamped to ``[0, Lk]``; a sample with no key gets zeros (lse ``-inf``). ``dropout_p > 0``
    drops probabilities with the Philox stream of ``seed`` (int64 ``[1]`` on q's device; the same stream as the
    attention kernels, see ``attention.dropout_keep_mask``). ``launch`` wraps each kernel
    (``torch.library.wrap_triton`` inside the registered op)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    block_m, block_d = _blocks(Lq, D)
    target = tuning.target_of(q)
    block_n, warps, stages = tuning.pick("qformer_fwd", dict(dtype=q.dtype, block_m=block_m, block_d=block_d, lk=Lk),
                                         _config(block_m, block_d, q.dtype, target, backward=False), like=q,
                                         target=target)
    chunk, splits = _chunking(Lk, num_key_splits(q, Lk, block_n, num_splits, target), block_n)
    has_lens = kv_lens is not None
    lens = kv_lens if has_lens else lse  # any pointer; never read
    qk_scale = float(softmax_scale) * LOG2E
    seed_ptr, dropout_p, drop_scale, dropout = dropout_args(dropout_p, seed, lse)
    common = dict(HAS_KV_LENS=has_lens, HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  PRECISION=input_precision(q.dtype), DROPOUT=dropout, num_warps=warps, num_stages=stages)
    fwd = wrapped(_qf_fwd_kernel, launch)
    if splits == 1:
        fwd[_grid(B, H)](
            q, k, v, out, lse, lens, seed_ptr,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            0, out.stride(0), out.stride(1), out.stride(2),
            0, lse.stride(0), lse.stride(1),
            H, Lq, Lk, chunk, qk_scale, dropout_p, drop_scale,
            **common,
        )
        return out, lse
    o_part = torch.empty((splits, B, Lq, H, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((splits, B, H, Lq), dtype=torch.float32, device=q.device)
    fwd[_grid(B, H, splits)](
        q, k, v, o_part, lse_part, lens, seed_ptr,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        H, Lq, Lk, chunk, qk_scale, dropout_p, drop_scale,
        **common,
    )
    wrapped(_qf_combine_kernel, launch)[_grid(B, H)[:1]](
        o_part, lse_part, out, lse,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        H, Lq, splits,
        # 8 warps: spill-free for every launched specialisation on sm_80 and sm_90a (4 warps spilled 16-20 bytes).
        HEAD_D=D, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8,
    )
    return out, lse


def qformer_attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    softmax_scale: float,
    num_splits: int = 0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. Returns contiguous ``(dq, dk, dv)`` shaped like ``q, k, v``; keys at or past ``kv_lens[b]`` get
    zero gradients. ``dropout_p``/``seed`` must be the forward's."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    has_lens = kv_lens is not None
    # Keys past kv_len are never visited: their gradients must start at zero.
    alloc = torch.zeros if has_lens else torch.empty
    dk = alloc((B, Lk, H, D), dtype=k.dtype, device=k.device)
    dv = alloc((B, Lk, H, D), dtype=v.dtype, device=v.device)
    if B == 0:
        return torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device), dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    block_m, block_d = _blocks(Lq, D)
    target = tuning.target_of(q)
    block_n, warps, stages = tuning.pick("qformer_bwd", dict(dtype=q.dtype, block_m=block_m, block_d=block_d, lk=Lk),
                                         _config(block_m, block_d, q.dtype, target, backward=True), like=q,
                                         target=target)
    chunk, splits = _chunking(Lk, num_key_splits(q, Lk, block_n, num_splits, target), block_n)
    if splits == 1:
        dq = torch.empty((1, B, Lq, H, D), dtype=q.dtype, device=q.device)
    else:
        dq = torch.empty((splits, B, Lq, H, D), dtype=torch.float32, device=q.device)
    lens = kv_lens if has_lens else lse
    seed_ptr, dropout_p, drop_scale, dropout = dropout_args(dropout_p, seed, lse)
    wrapped(_qf_bwd_kernel, launch)[_grid(B, H, splits)](
        q, k, v, out, dout, lse, lens, dq, dk, dv, seed_ptr,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H, Lq, Lk, chunk, float(softmax_scale), float(softmax_scale) * LOG2E, dropout_p, drop_scale,
        HAS_KV_LENS=has_lens, HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=input_precision(q.dtype), DROPOUT=dropout, num_warps=warps, num_stages=stages,
    )
    dq = dq[0] if splits == 1 else dq.sum(0).to(q.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------------
# tuning: the search spaces of the forward and backward kernels (kernels/triton/tuning.py is the generic core)
# --------------------------------------------------------------------------------------------------------------


def _qf_key(shape) -> dict:
    return {"dtype": tuning.dtype_token(shape), "m": int(shape["block_m"]), "d": int(shape["block_d"]),
            "seq": tuning.bucket(shape["lk"], tuning.SEQ_BUCKETS)}


def _est_fwd(c, key) -> tuple[int, int]:
    """As the attention forward with the whole query tile (``m``) in one program."""
    m, n, d, es = key["m"], c["block_n"], key["d"], tuning.element_size(key)
    shared = m * d * es + max(1, c["num_stages"]) * 2 * n * d * es  # q, and K/V tiles per pipeline stage
    words = m * d + m * n + (m * n + m * d) * es / 4  # acc and scores in fp32; p and q in the input dtype
    return shared, tuning.regs_estimate(words, c["num_warps"])


def _est_bwd(c, key) -> tuple[int, int]:
    m, n, d, es = key["m"], c["block_n"], key["d"], tuning.element_size(key)
    shared = max(1, c["num_stages"]) * 2 * n * d * es + 2 * m * d * es
    words = m * d + 2 * m * d * es / 4 + 2 * n * d + 3 * m * n  # dQ, q, dO, this step's dK/dV, s/p, dp, ds
    return shared, tuning.regs_estimate(words, c["num_warps"])


def _make(backward: bool):
    def make(shape, device: torch.device, small: bool):
        """Input maker: BLIP-2-like batches (12 heads, 64 images fill a card without key splits) of the shape."""
        lq, d, lk = shape.get("lq", shape["block_m"]), shape.get("head_dim", shape["block_d"]), int(shape["lk"])
        b, h = (1, 2) if small else (64, 12)
        q = torch.randn(b, lq, h, d, device=device, dtype=shape["dtype"])
        k = torch.randn(b, lk, h, d, device=device, dtype=shape["dtype"])
        v = torch.randn_like(k)
        if not backward:
            return lambda: qformer_attention_fwd_triton(q, k, v, None, d**-0.5)
        out, lse = qformer_attention_fwd_triton(q, k, v, None, d**-0.5)
        dout = torch.randn_like(out)
        return lambda: qformer_attention_bwd_triton(dout, q, k, v, out, lse, None, d**-0.5)

    return make


def _default(backward: bool):
    return lambda shape: _config(shape["block_m"], shape["block_d"], shape["dtype"], tuning.SM90, backward)


_QF_FIELDS = ("dtype", "m", "d", "seq")
tuning.register(tuning.Space(
    "qformer_fwd", "qformer_cross_attention",
    {"block_n": (16, 32, 64, 128), "num_warps": tuning.WARPS, "num_stages": (1, 2, 3)},
    _qf_key, _QF_FIELDS, ("seq",), _est_fwd, _make(False), __name__, _qf_fwd_kernel, _default(False),
    fields=("block_n", "num_warps", "num_stages"), limits={"block_n": "seq"}))
tuning.register(tuning.Space(
    "qformer_bwd", "qformer_cross_attention",
    {"block_n": (16, 32, 64), "num_warps": tuning.WARPS, "num_stages": (1, 2)},
    _qf_key, _QF_FIELDS, ("seq",), _est_bwd, _make(True), __name__, _qf_bwd_kernel, _default(True),
    fields=("block_n", "num_warps", "num_stages"), limits={"block_n": "seq"}))
