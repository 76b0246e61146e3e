"""Plain-PyTorch attention: the tests' baseline, the benchmarks' reference and the CPU backend.

Same semantics as the Triton kernels (see ``mmkernels.ops.attention``): layout ``[B, L, H, D]`` (or varlen
``[total, H, D]`` with ``cu_seqlens``), GQA by head grouping (query head ``h`` reads key/value head
``h // (Hq // Hkv)``), causal masks aligned to the bottom-right corner when ``Lq != Lk``, and query rows that see
no key (causal with ``Lq > Lk``, a varlen sequence without keys) give zeros and zero gradients.

Values outside the valid region never reach a result, even NaN or inf: masked scores are replaced (not added to),
and the q rows that see no key and the k/v rows that no query sees (varlen padding past ``cu_seqlens[-1]``) are
replaced by zeros with ``torch.where`` before any product, so no ``0 * NaN`` appears forward or backward. Varlen
rows past ``cu_seqlens_q[-1]`` get output 0 (lse ``+inf``) and zero gradients.

Varlen input is gathered into a padded ``[B, max_seqlen, H, D]`` batch by index arithmetic on ``cu_seqlens`` (no
host read when ``max_seqlen_*`` are given), so the reference also runs under ``torch.compile(fullgraph=True)``.
It materialises the ``[B, H, Lq, Lk]`` score matrix: fine for tests and as a baseline, not for long sequences.
Differentiable (also twice) through PyTorch autograd.

Batch-invariant mode (:func:`mmkernels.set_batch_invariant`): each sequence (each batch entry when dense, each
``cu_seqlens`` segment when varlen) runs on its own, at its own lengths (:func:`attention_reference_per_sequence`;
varlen reads ``cu_seqlens`` on the host once per call): its products and sums have the same shapes whatever else is
in the call; a causal one as an online softmax over blocks of 64 keys, so a row's bits do not depend on the tokens
after it either (a prefill, the full forward and a KV-cache decode step agree).
"""

from __future__ import annotations

import torch

from ..._config import is_batch_invariant

__all__ = ["attention_reference", "attention_reference_per_sequence", "attention_reference_with_lse"]


def _math_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float,
            upcast: bool, dropout_p: float, dropout_mask: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], ``visible`` bool [B or 1, Lq, Lk] (None: all) -> (out [B, Lq, Hq, D]
    in q's dtype, lse [B, Hq, Lq] in the math dtype)."""
    out_dtype = q.dtype
    if upcast:
        math_dtype = _math_dtype(q.dtype, True)
        q, k, v = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    if visible is not None:
        # where, not multiply: a NaN/inf in a q row that sees no key, or in a key that no query sees, must not
        # reach dK/dQ through 0 * NaN in the products' backward
        q = torch.where(visible.any(-1)[..., None, None], q, 0.0)
        seen = visible.any(-2)[..., None, None]
        k = torch.where(seen, k, 0.0)
        v = torch.where(seen, v, 0.0)
    group = q.shape[2] // max(k.shape[2], 1)
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # Softmax that gives zeros (and zero gradients) for rows with no visible key, instead of NaN.
    lk = scores.shape[-1]
    row_max = scores.amax(dim=-1, keepdim=True) if lk > 0 else scores.sum(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        keep = dropout_mask if dropout_mask is not None else torch.rand_like(p) >= dropout_p
        p = torch.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    lse = torch.where(denom.squeeze(-1) == 0, torch.full_like(lse, float("inf")), lse)
    return out.to(out_dtype).contiguous(), lse  # einsum leaves [B, H, L, D] memory


KEY_BLOCK = 64  # keys per step of the batch-invariant path's online softmax


def _blocked_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, upcast: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal sequence (bottom-right aligned), q [1, Lq, Hq, D], k/v [1, Lk, Hkv, D/Dv] -> (out [1, Lq, Hq, Dv]
    in q's dtype, lse [1, Hq, Lq]), as FlashAttention computes it: an online softmax over key blocks of
    :data:`KEY_BLOCK` keys from key 0 (the last block zero-padded and masked). A query row's result then depends
    only on the keys it sees, not on how many keys or query rows the call has: a block past the row's causal
    diagonal is an exact no-op (its probabilities are 0, its rescale factor ``exp(0) = 1``), and every product and
    sum has one shape per head dim. So the same token gets the same bits in a prefill of P tokens, a full-length
    forward and a one-token KV-cache decode step (the sampler and the trainer agree). The batch-invariant mode's
    path (its products run in fixed row blocks)."""
    out_dtype = q.dtype
    math_dtype = _math_dtype(q.dtype, upcast)
    q, k, v = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    lq, lk, heads = q.shape[1], k.shape[1], q.shape[2]
    group = heads // max(k.shape[2], 1)
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # each row's last visible key (bottom-right)
    # a row that sees no key (Lq > Lk): zeros, and no NaN of its q reaches a product's backward
    q = torch.where((rows >= 0)[None, :, :, None], q, 0.0)
    qh = q.transpose(1, 2)  # [1, H, Lq, D]
    m = torch.full((1, heads, lq), float("-inf"), dtype=math_dtype, device=q.device)
    denom = torch.zeros((1, heads, lq), dtype=math_dtype, device=q.device)
    acc = torch.zeros((1, heads, lq, v.shape[-1]), dtype=math_dtype, device=q.device)
    pad = (-lk) % KEY_BLOCK  # the last block zero-padded once: every block is one shape
    k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
    v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
    for start in range(0, lk, KEY_BLOCK):
        kb, vb = k[:, start:start + KEY_BLOCK], v[:, start:start + KEY_BLOCK]
        cols = torch.arange(start, start + KEY_BLOCK, device=q.device)[None, :]
        visible = (cols < lk) & (cols <= rows)
        s = torch.matmul(qh, kb.permute(0, 2, 3, 1)) * scale  # [1, H, Lq, KEY_BLOCK]
        s = s.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)  # a row without a visible key yet: p = 0, no NaN
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.where(torch.isfinite(m), torch.exp(m - m_safe), 0.0)
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.matmul(p, vb.transpose(1, 2))
        m = m_new
    empty = denom == 0
    out = acc / torch.where(empty, 1.0, denom)[..., None]
    lse = torch.where(empty, float("inf"), m + torch.log(torch.where(empty, 1.0, denom)))
    return out.transpose(1, 2).to(out_dtype).contiguous(), lse


def _one_sequence(q, k, v, causal: bool, scale: float, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence of the batch-invariant path. Causal: :func:`_blocked_causal` (a row's bits must not depend on
    the keys after it: prefill, full forward and decode agree). Otherwise every key is the row's own: one product
    over the sequence's keys (its shape is the sequence's, whatever else is in the call), about 3x cheaper on a
    CPU."""
    if causal:
        return _blocked_causal(q, k, v, scale, upcast)
    return _masked(q, k, v, None, scale, upcast, 0.0, None)


def _causal(lq, lk, device, diag=None) -> torch.Tensor:
    """[Lq, Lk] (or [B, Lq, Lk] with a per-sequence ``diag`` [B]): key j visible to query i iff j <= i + diag."""
    rows = torch.arange(lq, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    if diag is None:
        return cols <= rows + (lk - lq)  # bottom-right aligned, as flash-attn >= 2.1
    return cols[None] <= rows[None] + diag[:, None, None]


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, upcast, dropout_p, dropout_mask):
    total_q = q.shape[0]
    cu_q, cu_k = cu_q.to(torch.int64), cu_k.to(torch.int64)
    if cu_q.shape[0] < 2:  # no sequences: one empty sequence keeps every shape below non-empty
        cu_q, cu_k = cu_q.new_zeros(2), cu_k.new_zeros(2)
    batch = cu_q.shape[0] - 1
    max_q, max_k = max(max_q, 1), max(max_k, 1)
    lens_q, lens_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]

    def gather(t, cu, lens, length):
        # [total, H, D] -> [B, length, H, D]; positions past a sequence read an appended zero row
        pos = torch.arange(length, device=t.device)
        valid = pos[None, :] < lens[:, None]
        index = torch.where(valid, cu[:-1, None] + pos[None, :], t.shape[0])
        padded = torch.cat([t, t.new_zeros((1, *t.shape[1:]))])
        return padded[index], valid

    qp, valid_q = gather(q, cu_q, lens_q, max_q)
    kp, valid_k = gather(k, cu_k, lens_k, max_k)
    vp, _ = gather(v, cu_k, lens_k, max_k)
    visible = valid_q[:, :, None] & valid_k[:, None, :]
    if causal:
        visible = visible & _causal(max_q, max_k, q.device, lens_k - lens_q)
    if dropout_mask is not None:
        dropout_mask = dropout_mask[:, :, :max_q, :max_k]
    out_p, lse_p = _masked(qp, kp, vp, visible, scale, upcast, dropout_p, dropout_mask)

    # back to rows: row r belongs to sequence seq[r] (== batch for padding rows past cu_seqlens_q[-1])
    rows = torch.arange(total_q, device=q.device)
    seq = torch.searchsorted(cu_q[1:].contiguous(), rows, right=True)
    live = seq < batch
    seq = seq.clamp(max=batch - 1)
    pos = (rows - cu_q[seq]).clamp(0, max_q - 1)
    out = torch.where(live[:, None, None], out_p[seq, pos], 0.0)
    lse = torch.where(live[None, :], lse_p.permute(1, 0, 2)[:, seq, pos], float("inf"))
    return out, lse


def attention_reference_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    upcast: bool = True,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp (natural log, ``+inf`` for rows that see no key).

    ``upcast=True`` (the default, and the backend's behaviour) computes in float32 (float64 stays float64) and
    returns the output in the input dtype; ``upcast=False`` computes in the input dtype, which is the "same-dtype
    PyTorch reference" of the flash-attn accuracy rule. The lse has the layout of the Triton op: ``[B, Hq, Lq]``
    dense, ``[Hq, total_q]`` varlen. Varlen ``max_seqlen_*`` default to the longest sequence (a host read of
    ``cu_seqlens``); pass them under ``torch.compile``.

    ``dropout_p``: inverted dropout on the probabilities (kept with probability ``1 - p``, scaled by
    ``1 / (1 - p)``); the lse is that of the probabilities before dropout. ``dropout_mask`` (bool
    ``[B, Hq, Lq, Lk]``, ``Lq``/``Lk`` the max lengths for varlen) replaces the random draw: the tests pass the
    Triton kernels' own mask.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if is_batch_invariant() and dropout_p == 0.0:
        return attention_reference_per_sequence(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, upcast=upcast)
    if cu_seqlens_q is None:
        visible = _causal(q.shape[1], k.shape[1], q.device)[None] if causal else None
        return _masked(q, k, v, visible, scale, upcast, dropout_p, dropout_mask)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, upcast,
                   dropout_p, dropout_mask)


def attention_reference_per_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) as :func:`attention_reference_with_lse` (no dropout), one sequence at a time: batch entry ``b``
    (dense) or segment ``b`` of ``cu_seqlens`` (varlen, read on the host) is computed from its own rows at its own
    lengths, so its result does not depend on the other sequences, their number, their lengths or its position (the
    batch-invariant mode's path; with ``mmkernels.set_batch_invariant`` the products also run in fixed row blocks);
    causal ones by :func:`_blocked_causal`, so a row's result does not depend on the keys after it either.
    Empty sequences and padding rows past ``cu_seqlens_q[-1]``: zeros, lse ``+inf``."""
    if cu_seqlens_q is None:
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, lse = _one_sequence(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal, scale, upcast)
            outs.append(o)
            lses.append(lse)
        if not outs:
            visible = _causal(q.shape[1], k.shape[1], q.device)[None] if causal else None
            return _masked(q, k, v, visible, scale, upcast, 0.0, None)
        return torch.cat(outs), torch.cat(lses)
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    math_dtype = _math_dtype(q.dtype, upcast)
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=math_dtype, device=q.device)
    pieces, lse_pieces, rows = [], [], []
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # a sequence without keys: zeros, lse +inf (the buffers' values)
            continue
        o, l_ = _one_sequence(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, scale, upcast)
        pieces.append(o[0])
        lse_pieces.append(l_[0])
        rows.append((q0, q1))
    if not pieces:
        return out, lse
    # scatter the sequences' rows back (index_copy: its backward gathers each row's gradient, no sums)
    index = torch.cat([torch.arange(a, b_, device=q.device) for a, b_ in rows])
    out = out.index_copy(0, index, torch.cat(pieces))
    lse = lse.index_copy(1, index, torch.cat(lse_pieces, 1).to(lse.dtype))
    return out, lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    upcast: bool = True,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output only; see :func:`attention_reference_with_lse`."""
    return attention_reference_with_lse(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, upcast=upcast, dropout_p=dropout_p,
                                        dropout_mask=dropout_mask)[0]
