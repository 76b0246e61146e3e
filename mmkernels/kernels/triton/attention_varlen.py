"""Varlen attention: the one place that decides between the per-sequence kernels (``attention.py``) and the packed
ones (``attention_packed.py``); neither kernel module imports the other.

:func:`attention_fwd_triton` and :func:`attention_bwd_triton` are the bodies of the registered ops
``mmkernels::attention_fwd_triton`` / ``attention_bwd_triton`` (``mmkernels/ops/attention.py``): dense calls go to the
per-sequence kernels; varlen calls (``cu_seqlens_q`` given) go to the packed kernels when :func:`packed_pays` (the
``MMKERNELS_ATTENTION_PACKED`` override, else a rule on host ints) and ``attention_packed.packed_fits`` (the widths
whose packed configs compile spill-free) both say so, else to the per-sequence kernels. A value head dim that differs
from the query/key head dim (``v.shape[-1] != q.shape[-1]``, MLA's 192 / 128) always runs the per-sequence kernels
(they split Q/K and V widths on their own; the packed kernels take one head dim), also under
``MMKERNELS_ATTENTION_PACKED=1``. Both modes return the same
results and either backward takes either forward's lse, so the decision changes only speed.

:func:`occupancy` is the analysis behind the rule: the valid share of the multiply-adds of either mode for a list of
sequence lengths (``docs/ops/attention.md`` has the table; ``benchmarks/occupancy.py`` prints it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._config import is_batch_invariant
from ..._env import attention_packed_override
from . import attention as _dense
from . import attention_packed as _packed
from . import tuning
from .attention import lse_shape

__all__ = ["Occupancy", "attention_bwd_triton", "attention_fwd_triton", "lse_shape", "occupancy", "packed_pays",
           "use_packed"]


def use_packed(q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, backward: bool,
               target: tuning.Target | None = None) -> bool:
    """Whether a varlen launch on ``q`` runs the packed kernels: :func:`packed_pays` and
    ``attention_packed.packed_fits`` on the same ``target`` (default ``tuning.target_of(q)``)."""
    if is_batch_invariant():  # a packed tile's key blocks start where its first sequence does: neighbours decide
        return False
    target = target or tuning.target_of(q)
    return (packed_pays(q, max_seqlen_q, max_seqlen_k, target)
            and _packed.packed_fits(q, backward=backward, target=target))


def _packed_takes(q: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None) -> bool:
    """Whether the packed kernels can take the call at all: varlen, and one head dim for Q/K and V."""
    return cu_seqlens_q is not None and v.shape[-1] == q.shape[-1]


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
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns (out ``[..., Hq, D_v]``, lse fp32 of ``lse_shape``); the contract of
    ``attention.attention_fwd_per_sequence``, packed tiles across sequences when :func:`use_packed` says so."""
    if _packed_takes(q, v, cu_seqlens_q) and use_packed(q, max_seqlen_q, max_seqlen_k, backward=False):
        return _packed.attention_packed_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                            softmax_scale, dropout_p, seed, launch=launch)
    return _dense.attention_fwd_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                             softmax_scale, dropout_p, seed, launch=launch)


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
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns (dq, dk, dv); the contract of ``attention.attention_bwd_per_sequence``, packed when
    :func:`use_packed` says so (packed or not, either backward takes either forward's lse)."""
    if _packed_takes(q, v, cu_seqlens_q) and use_packed(q, max_seqlen_q, max_seqlen_k, backward=True):
        return _packed.attention_packed_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, causal, softmax_scale, deterministic, dropout_p, seed,
                                            launch=launch)
    return _dense.attention_bwd_per_sequence(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, causal, softmax_scale, deterministic, dropout_p, seed,
                                             launch=launch)


def packed_pays(q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, target: tuning.Target | None = None) -> bool:
    """Whether the varlen launchers take the packed kernels for ``q`` (``[total_q, Hq, D]``) on ``target`` (default
    ``tuning.target_of(q)``).

    ``MMKERNELS_ATTENTION_PACKED=1``/``0`` forces the answer; otherwise an interpreted target says no, and on a GPU a
    rule on
    host ints only (no sync) compares the multiply-adds of the two modes for sequences that all have the max lengths:
    per sequence, the per-sequence kernels compute ``ceil(Lq / BM) BM x ceil(Lk / BN) BN x BLOCK_D`` (their configs);
    a packed tile of ``BM'`` rows computes the keys of the ``1 + (BM' - 1) / Lq`` sequences it touches on average,
    rounded up to whole key blocks, times ``BLOCK_D0 + BLOCK_D1`` (within 1% of :func:`occupancy`'s exact count).
    Packed when it does at most 90% of the per-sequence work (its masks cost a little more per tile). Both modes
    return the same results, so the choice (even a forward and a backward that choose differently) changes only
    speed. Raises ``ValueError`` for a bad ``MMKERNELS_ATTENTION_PACKED``."""
    forced = attention_packed_override()
    if forced is not None:
        return forced
    target = target or tuning.target_of(q)
    if target.interpreted or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        return False  # the interpreter (CPU tests) runs the per-sequence kernels unless a test forces packed
    head_dim = q.shape[-1]
    d0, d1 = _packed.head_dim_chunks(head_dim)
    fwd, _, _ = _packed._configs(d0 + d1, q.dtype, target)
    block_d = _dense._block_d(head_dim)
    dense = _dense._fwd_config(block_d, q.dtype, max_seqlen_q, max_seqlen_k, target)
    unpacked = _round_up(max_seqlen_q, dense.block_m) * _round_up(max_seqlen_k, dense.block_n) * block_d
    # A packed tile at a uniform offset touches `whole + 1` sequences, or `whole + 2` for `rem` of the Lq offsets
    # (BM' - 1 = whole * Lq + rem), and computes their keys rounded up to whole key blocks: per sequence,
    # (Lq - rem) R((whole + 1) Lk) + rem R((whole + 2) Lk) with R(x) = ceil(x / BN') BN'.
    whole, rem = divmod(fwd.block_m - 1, max_seqlen_q)
    packed = ((max_seqlen_q - rem) * _round_up((whole + 1) * max_seqlen_k, fwd.block_n)
              + rem * _round_up((whole + 2) * max_seqlen_k, fwd.block_n)) * (d0 + d1)
    return 10 * packed <= 9 * unpacked


def _round_up(n, block: int):
    return -(-n // block) * block


# --------------------------------------------------------------------------------------------------------------
# occupancy: how much of the computed work is valid (analytic, host only)
# --------------------------------------------------------------------------------------------------------------


class Occupancy(NamedTuple):
    """Work of the attention forward on one head for a list of sequences, as the kernels tile it.

    ``valid``: score entries (query row, key) that the mask keeps; ``computed``: entries the kernels multiply
    (whole ``block_m x block_n`` tiles); ``score_fraction = valid / computed``; ``head_dim_fraction = head_dim /
    block_d`` (the padded head dim every product runs at); ``fraction``: their product, the valid share of the
    multiply-adds of ``Q K^T`` and ``P V``."""

    mode: str
    valid: int
    computed: int
    score_fraction: float
    head_dim: int
    block_d: int
    head_dim_fraction: float
    fraction: float
    block_m: int
    block_n: int


def _keys_seen(pos: int, len_q: int, len_k: int, causal: bool) -> int:
    if not causal:
        return len_k
    return min(max(pos + len_k - len_q + 1, 0), len_k)


def occupancy(seqlens, head_dim: int, mode: str, *, seqlens_k=None, causal: bool = False,
              dtype: torch.dtype = torch.float16, block_m: int | None = None, block_n: int | None = None) -> Occupancy:
    """The :class:`Occupancy` of a batch: ``seqlens`` query lengths (and key lengths unless ``seqlens_k``), one head
    of dim ``head_dim``; ``mode`` ``"unpacked"`` (the per-sequence kernels: blocks from ``attention._fwd_config`` on a
    GPU, fitted to the max length; head dim padded to the next power of two) or ``"packed"`` (``attention_packed``:
    fixed GPU blocks, head dim in ``head_dim_chunks``). ``block_m``/``block_n`` override the blocks. The key range of
    a packed tile is computed exactly as the kernel does (union of its rows' keys, rounded up to whole key blocks).
    Raises ``ValueError`` for an unknown mode or mismatched length lists."""
    lens_q = [int(n) for n in seqlens]
    lens_k = lens_q if seqlens_k is None else [int(n) for n in seqlens_k]
    if len(lens_q) != len(lens_k):
        raise ValueError(f"occupancy: {len(lens_q)} query lengths but {len(lens_k)} key lengths")
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    valid = sum(_keys_seen(i, lq, lk, causal) for lq, lk in zip(lens_q, lens_k) for i in range(lq))
    if mode == "unpacked":
        block_d = _dense._block_d(head_dim)
        cfg = _dense._fwd_config(block_d, dtype, max(max_q, 1), max(max_k, 1), tuning.SM90)
        bm, bn = block_m or cfg.block_m, block_n or cfg.block_n
        computed = 0
        for lq, lk in zip(lens_q, lens_k):
            for start in range(0, lq, bm):  # the kernel's key loop ends at the block's last row's last key
                hi = max(min(lk, start + bm + lk - lq), 0) if causal else lk
                computed += bm * -(-hi // bn) * bn
    elif mode == "packed":
        d0, d1 = _packed.head_dim_chunks(head_dim)
        block_d = d0 + d1
        cfg, _, _ = _packed._configs(block_d, dtype, tuning.SM90)
        bm, bn = block_m or cfg.block_m, block_n or cfg.block_n
        row_keys = []  # (first key, end key) of every packed row
        k_first = 0
        for lq, lk in zip(lens_q, lens_k):
            row_keys += [(k_first, k_first + _keys_seen(i, lq, lk, causal)) for i in range(lq)]
            k_first += lk
        computed = 0
        for start in range(0, len(row_keys), bm):
            seen = [(a, b) for a, b in row_keys[start:start + bm] if b > a]
            if seen:
                span = max(b for _, b in seen) - min(a for a, _ in seen)
                computed += bm * -(-span // bn) * bn
    else:
        raise ValueError(f"occupancy: mode must be 'unpacked' or 'packed', got {mode!r}")
    score = valid / computed if computed else 1.0
    dfrac = head_dim / block_d
    return Occupancy(mode, valid, computed, score, head_dim, block_d, dfrac, score * dfrac, bm, bn)
