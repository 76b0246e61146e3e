"""PyTorch reference of the expert-bias update (docs/design/longcat_moe.md), in the kernels' float32 order.

Written without host synchronisation (no ``.item()``, data-dependent branches become ``torch.where``), so it is
also a valid backend on CUDA and inside CUDA-graph capture.
"""

from __future__ import annotations

import torch


def expert_bias_update_reference(
    bias: torch.Tensor,
    counts: torch.Tensor,
    state: torch.Tensor,
    num_ffn_experts: int,
    top_k: int,
    target_ffn_per_token: float,
    kp: float,
    ki: float,
    kd: float,
    mode: str,
    max_abs: float | None,
) -> None:
    n = num_ffn_experts
    c = counts.to(torch.int64)
    total = c.sum()
    c_ffn = c[:n]
    b = bias[:n]
    observed = total > 0  # a batch with no selections changes nothing
    if mode == "sign":
        diff = c_ffn.sum() - n * c_ffn  # sign(mean_j T_j - T_i), exact in integers
        step = torch.where(diff > 0, ki, -ki).to(torch.float32)
        new_bias = torch.where(diff != 0, b + step, b)
    else:
        target_share = target_ffn_per_token / (top_k * n)  # a Python scalar: rounded to float32, no H2D copy
        e = target_share - c_ffn.to(torch.float32) / total.clamp_min(1).to(torch.float32)  # total=0: discarded
        e1, e2 = state[0], state[1]
        delta = ki * e + kp * (e - e1) + kd * (e - 2.0 * e1 + e2)
        new_bias = b + delta
        state.copy_(torch.where(observed, torch.stack([e, e1]), state))
    if max_abs is not None:
        new_bias = new_bias.clamp(-max_abs, max_abs)
    b.copy_(torch.where(observed, new_bias, b))
