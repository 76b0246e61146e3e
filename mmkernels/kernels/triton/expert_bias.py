"""Triton kernel for the expert-bias update: one program reduces the counts and updates every FFN bias.

The problem is tiny (a few thousand floats), so the goal is one launch with no host synchronisation, not
bandwidth. Arithmetic follows csrc/expert_bias.h in the same float32 order: correctly rounded division
(``div_rn``), the clamp as comparisons (NaN kept, as C++ and ``torch.clamp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import wrapped


@triton.jit
def _expert_bias_update_kernel(
    bias_ptr,
    counts_ptr,
    state_ptr,
    n_total,
    num_ffn,
    target_share,
    kp,
    ki,
    kd,
    max_abs,
    SIGN: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    acc_total = tl.zeros([BLOCK], dtype=tl.int64)
    acc_ffn = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, n_total, BLOCK):
        idx = start + offs
        c = tl.load(counts_ptr + idx, mask=idx < n_total, other=0).to(tl.int64)
        acc_total += c
        acc_ffn += tl.where(idx < num_ffn, c, 0)
    total = tl.sum(acc_total, axis=0)
    sum_ffn = tl.sum(acc_ffn, axis=0)
    observed = total > 0

    for start in range(0, num_ffn, BLOCK):
        idx = start + offs
        mask = idx < num_ffn
        c = tl.load(counts_ptr + idx, mask=mask, other=0).to(tl.int64)
        b = tl.load(bias_ptr + idx, mask=mask, other=0.0)
        if SIGN:
            diff = sum_ffn - num_ffn * c
            new_b = tl.where(diff > 0, b + ki, tl.where(diff < 0, b - ki, b))
        else:
            e1 = tl.load(state_ptr + idx, mask=mask, other=0.0)
            e2 = tl.load(state_ptr + num_ffn + idx, mask=mask, other=0.0)
            # div_rn: the correctly rounded quotient of C++ and PyTorch (a plain `/` is approximate on GPUs).
            e = target_share - tl.math.div_rn(c.to(tl.float32), tl.maximum(total, 1).to(tl.float32))
            delta = ki * e + kp * (e - e1) + kd * (e - 2.0 * e1 + e2)
            new_b = b + delta
            tl.store(state_ptr + idx, tl.where(observed, e, e1), mask=mask)
            tl.store(state_ptr + num_ffn + idx, tl.where(observed, e1, e2), mask=mask)
        if CLAMP:  # C++'s comparisons: NaN stays NaN (tl.maximum drops it on GPUs). The lower bound as a tensor times
            # -1.0: Triton's `-x` is `0 - x` and turns a scalar -0.0 into +0.0, where C++ and torch.clamp give -0.0.
            hi = tl.zeros_like(new_b) + max_abs
            lo = hi * -1.0
            new_b = tl.where(new_b < lo, lo, tl.where(new_b > hi, hi, new_b))
        tl.store(bias_ptr + idx, tl.where(observed, new_b, b), mask=mask)


def expert_bias_update_triton(
    bias: torch.Tensor,
    counts: torch.Tensor,
    state: torch.Tensor,
    num_ffn_experts: int,
    top_k: int,
    target_ffn_per_token: float,
    kp: float,
    ki: float,
    kd: float,
    rule: str,
    max_abs: float | None,
    *,
    launch=None,
) -> None:
    """Update ``bias`` (fp32 ``[N+Z]``) and ``state`` (fp32 ``[2, N]``) in place from ``counts`` (int ``[N+Z]``);
    ``rule`` is ``"pid"`` or ``"sign"`` (the public ``mode``; the op schema may not name an argument ``mode``).
    Inputs are validated by the caller. ``launch`` wraps the kernel (``torch.library.wrap_triton`` inside the op)."""
    kernel = wrapped(_expert_bias_update_kernel, launch)
    n_total = bias.numel()
    block = min(1024, max(32, triton.next_power_of_2(n_total)))
    kernel[(1,)](
        bias,
        counts,
        state,
        n_total,
        num_ffn_experts,
        target_ffn_per_token / (top_k * num_ffn_experts),  # rounded to float32 at launch, as in C++
        float(kp),
        float(ki),
        float(kd),
        float(max_abs) if max_abs is not None else 0.0,
        SIGN=rule == "sign",
        CLAMP=max_abs is not None,
        BLOCK=block,
        num_warps=4,
        # No FMA contraction: C++ (ISO, no -ffp-contract), CUDA (_rn intrinsics) and the reference round every
        # product and sum on its own, so every backend gives the same bits.
        enable_fp_fusion=False,
    )
