"""Triton kernel for the vision rotary embedding (rotate-half RoPE) of q and k in one launch.

``out = x * cos + rotate_half(x) * sin`` per head, computed in float32 and rounded once to x's dtype, as HF's
``apply_rotary_pos_emb_vision`` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers). With ``x = [x1, x2]`` (halves of the
head dim) and ``cos = [c1, c2]``, ``sin = [s1, s2]``::

    o1 = x1 * c1 - x2 * s1          (forward)          o1 = x1 * c1 + x2 * s2      (TRANSPOSE: the backward)
    o2 = x2 * c2 + x1 * s2                             o2 = x2 * c2 - x1 * s1

The transposed map is the forward with the sines swapped and negated, so one kernel serves both directions (the
gradient of q and k is the transposed map of their output gradients). cos/sin come as ``[T, D]`` (HF's layout, each
half with its own angles) or ``[T, D/2]`` (flash-attn's, ``HALF_TABLE``: both halves share them).

Grid: token blocks x head blocks. A program holds ``BLOCK_T`` tokens, loads their cos/sin rows once, and rotates the
same ``BLOCK_H`` head slots of q *and* of k with them; with ``BLOCK_H >= max(Hq, Hk)`` (the default up to 32 heads)
each token's cos/sin row is read once for all heads of q and k. Any strides in and out (q and k are usually views
of one qkv projection); no FMA contraction (``enable_fp_fusion=False``), so the float32 results are HF's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import check_grid, wrapped

MAX_HEAD_DIM = 256  # the largest head dim the kernel takes (half of it, padded to a power of two, is one tile axis)


@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, h0, H,
    sxt, sxh, sxd, sot, soh, sod,
    t_idx, t_mask, d_idx, d_mask, c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rotate heads ``[h0, h0 + BLOCK_H)`` (masked past ``H``) of tokens ``t_idx`` of one tensor."""
    h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
    mask = t_mask & (h < H) & d_mask
    x_row = x_ptr + t_idx * sxt + h.to(tl.int64) * sxh
    o_row = o_ptr + t_idx * sot + h.to(tl.int64) * soh
    x1 = tl.load(x_row + d_idx * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (d_idx + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(o_row + d_idx * sod, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + (d_idx + HALF) * sod, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    T, HQ, HK,
    sqt, sqh, sqd, skt, skh, skd,
    sct, scd, sst, ssd,
    sqot, sqoh, sqod, skot, skoh, skod,
    HALF: tl.constexpr,
    HALF_TABLE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = (t < T)[:, None, None]
    t_idx = t.to(tl.int64)[:, None, None]
    d = tl.arange(0, BLOCK_D)
    d_mask = (d < HALF)[None, None, :]
    d_idx = d[None, None, :]
    # this token block's cos/sin rows, once for every head of q and k: [BLOCK_T, 1, BLOCK_D] (fp32)
    tmask = t_mask & d_mask
    c1 = tl.load(cos_ptr + t_idx * sct + d_idx * scd, mask=tmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t_idx * sst + d_idx * ssd, mask=tmask, other=0.0).to(tl.float32)
    if HALF_TABLE:
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(cos_ptr + t_idx * sct + (d_idx + HALF) * scd, mask=tmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t_idx * sst + (d_idx + HALF) * ssd, mask=tmask, other=0.0).to(tl.float32)
    if TRANSPOSE:  # the sines swapped and negated: o1 = x1*c1 + x2*s2, o2 = x2*c2 - x1*s1 (exact: -(-a) == a).
        # Times -1.0, not `-s`: Triton's `-s` is `0 - s`, which turns +0.0 into +0.0 instead of -0.0.
        neg_s2 = s2 * -1.0
        s2 = s1 * -1.0
        s1 = neg_s2
    if h0 < HQ:
        _rotate_heads(q_ptr, qo_ptr, h0, HQ, sqt, sqh, sqd, sqot, sqoh, sqod,
                      t_idx, t_mask, d_idx, d_mask, c1, c2, s1, s2, HALF, BLOCK_H)
    if h0 < HK:
        _rotate_heads(k_ptr, ko_ptr, h0, HK, skt, skh, skd, skot, skoh, skod,
                      t_idx, t_mask, d_idx, d_mask, c1, c2, s1, s2, HALF, BLOCK_H)


def _pow2(n, lo: int, hi: int) -> int:
    """The smallest power of two ``>= n`` within ``[lo, hi]`` (both powers of two). Comparisons only: a symbolic size
    (torch.compile with dynamic shapes) becomes guards on the rungs, never a specialisation on its value."""
    block = hi
    while block > lo and n <= block // 2:
        block //= 2
    return block


def _config(target: tuning.Target, t: int, heads: int, half: int) -> dict:
    """``BLOCK_T`` tokens x ``BLOCK_H`` head slots per program. GPUs: every head of q and k in one program up to 32
    heads (each cos/sin row read once), about 2048 elements of each half per tile, fewer tokens when that leaves the
    card with less than two programs per SM. The interpreter: big tiles, few NumPy steps."""
    block_d = _pow2(half, 1, MAX_HEAD_DIM // 2)
    if target.interpreted:
        block_h = _pow2(heads, 1, 16)
        return {"BLOCK_T": _pow2(t, 1, max(1, 4096 // (block_h * block_d))), "BLOCK_H": block_h, "num_warps": 4}
    block_h = _pow2(heads, 1, 32)
    block_t = _pow2(t, 1, max(1, 2048 // (block_h * block_d)))
    while block_t > 1 and triton.cdiv(t, block_t) < 2 * target.sm_count:
        block_t //= 2
    return {"BLOCK_T": block_t, "BLOCK_H": block_h, "num_warps": 4 if block_t * block_h * block_d <= 2048 else 8}


def rotary_embedding_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool, *, launch=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``(q_out [T, Hq, D], k_out [T, Hk, D])`` in q's / k's dtype: the rotary embedding of q and k with
    ``cos``/``sin`` ``[T, D]`` or ``[T, D/2]`` (any strides, float32 or the inputs' dtype); ``transpose`` applies the
    transposed map (the backward of q and k). Inputs are validated by the caller. ``launch`` wraps the kernel
    (``torch.library.wrap_triton`` inside the op)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    half = d // 2
    if d > MAX_HEAD_DIM:  # the public function sends larger head dims to the reference
        raise ValueError(f"rotary_embedding (triton): head dim {d} > {MAX_HEAD_DIM}")
    q_out = torch.empty((t, hq, d), device=q.device, dtype=q.dtype)
    k_out = torch.empty((t, hk, d), device=k.device, dtype=k.dtype)
    heads = max(hq, hk)
    if t == 0 or heads == 0 or d == 0:
        return q_out, k_out
    target = tuning.target_of(q)
    cfg = tuning.pick("rotary_embedding", dict(dtype=q.dtype, d=d, heads=heads, t=t),
                      _config(target, t, heads, half), like=q, target=target)
    bt, bh = cfg["BLOCK_T"], cfg["BLOCK_H"]
    grid = check_grid((triton.cdiv(t, bt), triton.cdiv(heads, bh)),
                      f"rotary_embedding (triton): {t} tokens x {heads} heads in blocks of {bt} x {bh}")
    wrapped(_rotary_kernel, launch)[grid](
        q, k, cos, sin, q_out, k_out,
        t, hq, hk,
        *q.stride(), *k.stride(),
        *cos.stride(), *sin.stride(),
        *q_out.stride(), *k_out.stride(),
        HALF=half, HALF_TABLE=cos.shape[1] != d, TRANSPOSE=bool(transpose),
        BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=_pow2(half, 1, MAX_HEAD_DIM // 2),
        num_warps=cfg["num_warps"],
        enable_fp_fusion=False,  # HF rounds each product and the sum on its own: same float32 bits
    )
    return q_out, k_out


# --------------------------------------------------------------------------------------------------------------
# tuning (kernels/triton/tuning.py is the generic core)
# --------------------------------------------------------------------------------------------------------------


def _key(shape) -> dict:
    return {"dtype": tuning.dtype_token(shape), "d": int(shape["d"]),  # head dims are static
            "heads": _pow2(shape["heads"], 1, 64), "t": tuning.bucket(shape["t"], tuning.SEQ_BUCKETS)}


def _estimate(c, key) -> tuple[int, int]:
    """No shared memory; registers: per program the four x/out halves of one tensor (q, then k) in fp32 plus the
    four cos/sin rows."""
    tile = c["BLOCK_T"] * c["BLOCK_H"] * key["d"] // 2
    rows = c["BLOCK_T"] * key["d"] // 2
    return 0, tuning.regs_estimate(4 * tile + 4 * rows, c["num_warps"])


def _adapt(cfg: dict, shape) -> dict:
    """A looked-up config for a smaller problem of its bucket: blocks no larger than the tokens and heads."""
    return dict(cfg, BLOCK_T=_pow2(shape["t"], 1, cfg["BLOCK_T"]), BLOCK_H=_pow2(shape["heads"], 1, cfg["BLOCK_H"]))


def _make(shape, device: torch.device, small: bool):
    """Input maker: q and k as views of one packed qkv projection (the vision towers' layout), HF's cos/sin."""
    t, h, d = int(shape["t"]), int(shape["heads"]), int(shape["d"])
    if small:
        t, h = min(t, 16), min(h, 4)
    dt = shape["dtype"]
    q, k, _ = torch.randn(t, 3, h, d, device=device, dtype=dt).unbind(1)
    ang = torch.randn(t, d // 2, device=device)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    return lambda: rotary_embedding_fwd(q, k, cos, sin, False)


def _default(shape) -> dict:
    return _config(tuning.SM90, int(shape["t"]), int(shape["heads"]), int(shape["d"]) // 2)


tuning.register(tuning.Space(
    "rotary_embedding", "rotary_embedding",
    {"BLOCK_T": (1, 2, 4, 8, 16, 32), "BLOCK_H": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    _key, ("dtype", "d", "heads", "t"), ("t",), _estimate, _make, __name__, _rotary_kernel, _default,
    limits={"BLOCK_T": "t", "BLOCK_H": "heads"}, adapt=_adapt))
