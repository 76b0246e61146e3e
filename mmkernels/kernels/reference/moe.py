"""Plain-PyTorch references for MoE routing with zero-computation experts and for the SwiGLU expert FFNs.

Semantics: ../shared/specs/longcat_moe.md. These are the tests' oracles (run them on float64 inputs), the
benchmarks' baselines and the CPU fallback. No host synchronisation in ``moe_route_reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Router scores in at least fp32: softmax over all N+Z experts, or independent sigmoids."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)


def _topk_lowest_id_on_ties(values: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices by value, ties broken towards the lower expert id (torch.topk makes no such promise).

    A stable descending sort keeps equal values in index order, so the first k are the lowest ids among ties.
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def group_limited_mask(choice: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited choice: keep the ``topk_groups`` groups with the largest sum of their two best
    biased scores (one best when a group has one expert); experts elsewhere become -inf for the choice."""
    t, e = choice.shape
    grouped = choice.view(t, n_groups, e // n_groups)
    best = torch.sort(grouped, dim=-1, descending=True).values[..., : min(2, e // n_groups)].sum(-1)
    keep = _topk_lowest_id_on_ties(best, topk_groups)
    group_ok = torch.zeros(t, n_groups, dtype=torch.bool, device=choice.device).scatter_(1, keep, True)
    return group_ok.repeat_interleave(e // n_groups, dim=1)


def moe_route_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    num_ffn_experts: int,
    scoring: str = "softmax",
    routed_scaling_factor: float = 1.0,
    renormalize: bool = False,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (topk_ids int32 [T,K], topk_weights [T,K], zero_weight [T], counts int32 [N+Z]).

    Weights are fp32 (fp64 for fp64 logits) and differentiable in ``logits`` through the unbiased scores.
    """
    scores = route_scores(logits, scoring)
    with torch.no_grad():
        choice = scores if bias is None else scores + bias.to(scores.dtype)
        if n_groups > 1:
            choice = choice.masked_fill(~group_limited_mask(choice, n_groups, topk_groups), float("-inf"))
        ids = _topk_lowest_id_on_ties(choice, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * routed_scaling_factor
    zero_weight = (weights * (ids >= num_ffn_experts)).sum(-1)
    counts = torch.bincount(ids.flatten(), minlength=logits.shape[-1]).to(torch.int32)
    return ids.to(torch.int32), weights, zero_weight, counts


def moe_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """``y_t = sum_{k: id<N} w_tk * down_e(silu(gate_e x_t) * up_e x_t) + zero_weight_t * x_t``, one expert at a
    time (sort by expert, loop). Math in fp32 for half inputs; output in ``hidden``'s dtype. Data-dependent
    shapes: a test/CPU reference, not a fast path."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(compute)
    n, two_di, _ = w_gate_up.shape
    di = two_di // 2
    out = x * zero_weight.to(compute)[:, None]
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).to(compute)
    token = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    for e in torch.unique(flat_ids[flat_ids < n]).tolist():
        slots = (flat_ids == e).nonzero().squeeze(1)
        rows = x[token[slots]]
        gu = rows @ w_gate_up[e].to(compute).t()
        h = F.silu(gu[:, :di]) * gu[:, di:]
        y = (h @ w_down[e].to(compute).t()) * flat_w[slots, None]
        out = out.index_add(0, token[slots], y)
    return out.to(hidden.dtype)
