"""Auxiliary balance losses that MoE training pairs with (or uses instead of) the expert-bias balancer.

Each takes the float32 router logits (``ZeroComputeMoE(x, return_router_logits=True)``) and the chosen expert ids
(``MoERouting.topk_ids``), honours a ``padding_mask`` (True = padding: left out of every mean and count), computes in
float32 (float64 for float64 logits) with autocast off, and returns a 0-d tensor of that dtype, differentiable in the
logits (through the router probabilities; the selection counts carry no gradient, as in every reference
implementation). Multiply by your coefficient (alpha) yourself. Ids outside ``[0, E)`` (e.g. the ``-1`` of dropped
padding slots) are not counted.

- :func:`load_balancing_loss`: Switch Transformers (arXiv 2101.03961) as Hugging Face's Mixtral
  ``load_balancing_loss_func`` computes it: ``E * sum_i f_i P_i`` with ``f_i`` = selections of expert i per token
  and ``P_i`` the mean softmax probability of expert i; it equals K at perfect balance with uniform probabilities
  (HF counts every one of the K slots).
- :func:`sequence_balance_loss`: DeepSeek-V3's complementary sequence-wise loss (arXiv 2412.19437, eq. 17-20):
  per sequence, ``sum_i f_i P_i`` with ``f_i = E / (K T) * selections_i`` and ``P_i`` the mean of the scores
  normalised to sum to 1 per token; averaged over sequences.
- :func:`device_balance_loss`: LongCat-Flash's device-level loss (arXiv 2509.01322; docs/design/longcat_moe.md):
  FFN experts in D contiguous groups (one per expert-parallel rank) plus one group of all zero experts;
  ``sum_j f_j P_j`` with ``P_j`` the mean router probability mass of group j and ``f_j`` its selection share
  normalised to 1 at balance: ``D / (K_e T)`` x selections for an FFN group, ``1 / ((K - K_e) T)`` x selections for
  the zero group.
"""

from __future__ import annotations

import torch

from ..ops import _validate as v
from ._fp32 import autocast_off

__all__ = ["device_balance_loss", "load_balancing_loss", "sequence_balance_loss"]

SCORINGS = ("softmax", "sigmoid")


def _inputs(op: str, logits: torch.Tensor, topk_ids: torch.Tensor, padding_mask: torch.Tensor | None,
            dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked (logits fp32, ids int64, valid-token weights fp32 of the token shape)."""
    v.tensor("router_logits", logits, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), dim=dim,
             op=op)
    v.tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), dim=dim, op=op)
    if topk_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"{op}: topk_ids must be [..., K] over the tokens of router_logits {tuple(logits.shape)}, "
                         f"got {tuple(topk_ids.shape)}")
    tokens = logits.shape[:-1]
    if padding_mask is None:
        valid = torch.ones(tokens, dtype=torch.float32, device=logits.device)
    else:
        v.tensor("padding_mask", padding_mask, dtypes=(torch.bool,), op=op)
        if tuple(padding_mask.shape) != tuple(tokens):
            raise ValueError(f"{op}: padding_mask must have the token shape {tuple(tokens)}, got "
                             f"{tuple(padding_mask.shape)}")
        valid = (~padding_mask).to(torch.float32)
        # padding rows may hold NaN/inf: replace them before any arithmetic (0 * NaN is NaN)
        logits = torch.where(padding_mask[..., None], 0.0, logits)
    v.same_device(op, router_logits=logits, topk_ids=topk_ids, valid=valid)
    math = logits if logits.dtype == torch.float64 else logits.float()  # float64 stays float64 (the tests' truth)
    return math, topk_ids.long(), valid.to(math.dtype)


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def _selections(ids: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-expert selection counts over the last-but-one (token) axis, float32 ``[..., E]``; padding tokens and ids
    outside ``[0, E)`` are not counted."""
    ok = (ids >= 0) & (ids < num_experts)
    weight = (valid[..., None] * ok).flatten(-2)
    index = ids.clamp(0, num_experts - 1).flatten(-2)
    out = torch.zeros((*ids.shape[:-2], num_experts), dtype=valid.dtype, device=ids.device)
    return out.scatter_add_(-1, index, weight)


def load_balancing_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, *,
                        padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load-balancing loss over all E experts, as HF Mixtral's ``load_balancing_loss_func``.

    Args:
        router_logits: ``[T, E]`` (any float dtype; math in float32, float64 for float64).
        topk_ids: ``[T, K]`` chosen experts.
        padding_mask: optional bool ``[T]``, True = padding.

    Returns ``E * sum_i (selections_i / T) * mean_t softmax(logits)_ti`` over valid tokens (0 when none is valid).
    Raises ``TypeError``/``ValueError`` on wrong dtypes or shapes.
    """
    op = "load_balancing_loss"
    with autocast_off(router_logits.device.type):
        logits, ids, valid = _inputs(op, router_logits, topk_ids, padding_mask, 2)
        e = logits.shape[-1]
        tokens = valid.sum().clamp_min(1.0)
        f = _selections(ids[None], valid[None], e)[0] / tokens
        p = (_scores(logits, "softmax") * valid[:, None]).sum(0) / tokens
        return e * (f * p).sum()


def sequence_balance_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, *,
                          padding_mask: torch.Tensor | None = None, scoring: str = "sigmoid") -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences of a batch.

    Args:
        router_logits: ``[B, L, E]``.
        topk_ids: ``[B, L, K]``.
        padding_mask: optional bool ``[B, L]``, True = padding (T of a sequence counts its valid tokens only).
        scoring: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"``: the affinities normalised per token to sum to 1.

    Returns ``mean_b sum_i f_bi P_bi``, ``f_bi = E / (K T_b) * selections_bi``, ``P_bi = mean_t s'_bti``; 1.0 at
    balance with uniform affinities. Sequences with no valid token are left out of the mean.
    """
    op = "sequence_balance_loss"
    v.choice("scoring", scoring, SCORINGS, op=op)
    with autocast_off(router_logits.device.type):
        logits, ids, valid = _inputs(op, router_logits, topk_ids, padding_mask, 3)
        e, k = logits.shape[-1], ids.shape[-1]
        s = _scores(logits, scoring)
        s = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        t = valid.sum(-1)  # [B]
        denom = t.clamp_min(1.0)
        f = _selections(ids, valid, e) * (e / k) / denom[:, None]
        p = (s * valid[..., None]).sum(1) / denom[:, None]
        per_seq = (f * p).sum(-1)
        has_tokens = (t > 0).to(per_seq.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def device_balance_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, *, num_ffn_experts: int,
                        num_groups: int, top_k: int, target_ffn_per_token: float,
                        padding_mask: torch.Tensor | None = None, scoring: str = "softmax") -> torch.Tensor:
    """LongCat-Flash's device-level balance loss: FFN experts in ``num_groups`` (D) groups, zero experts in one more.

    Args:
        router_logits: ``[T, N+Z]``; ids ``>= N`` are zero-computation experts.
        topk_ids: ``[T, K]``.
        num_ffn_experts: N, a multiple of ``num_groups``.
        num_groups: D, FFN expert groups (expert-parallel ranks); group j holds experts ``[j N/D, (j+1) N/D)``.
        top_k: K.
        target_ffn_per_token: K_e, ``0 < K_e <= K``; ``K_e < K`` when there are zero experts.
        padding_mask: optional bool ``[T]``, True = padding.
        scoring: ``"softmax"`` (LongCat) or ``"sigmoid"``.

    Returns ``sum_j f_j P_j``, which is 1.0 at balance (every ``f_j = 1``, and the masses ``P_j`` sum to 1 under
    softmax). Raises ``ValueError`` on inconsistent sizes.
    """
    op = "device_balance_loss"
    v.choice("scoring", scoring, SCORINGS, op=op)
    with autocast_off(router_logits.device.type):
        logits, ids, valid = _inputs(op, router_logits, topk_ids, padding_mask, 2)
        e = logits.shape[-1]
        n = v.integer("num_ffn_experts", num_ffn_experts, op=op, low=1, high=e)
        d = v.integer("num_groups", num_groups, op=op, low=1, high=n)
        if n % d:
            raise ValueError(f"{op}: num_ffn_experts ({n}) must be a multiple of num_groups ({d})")
        k = v.integer("top_k", top_k, op=op, low=1, high=e)
        if ids.shape[-1] != k:
            raise ValueError(f"{op}: topk_ids has {ids.shape[-1]} slots per token, top_k is {k}")
        z = e - n
        k_e = v.real("target_ffn_per_token", target_ffn_per_token, op=op, low=0.0, high=float(k))
        if k_e <= 0 or (z > 0 and k_e >= k):
            raise ValueError(f"{op}: target_ffn_per_token must be in (0, {k})" + (" (there are zero experts)" if z
                             else f", got {k_e}"))
        tokens = valid.sum().clamp_min(1.0)
        # Experts -> groups: FFN group j = id // (N/D); every zero expert -> group D.
        group_of = torch.arange(e, device=logits.device)
        group_of = torch.where(group_of < n, group_of // (n // d), d)
        groups = d + (1 if z else 0)
        sel = _selections(ids[None], valid[None], e)[0]
        sel_g = torch.zeros(groups, dtype=logits.dtype, device=logits.device).index_add_(0, group_of, sel)
        mass = (_scores(logits, scoring) * valid[:, None]).sum(0) / tokens
        p_g = torch.zeros(groups, dtype=logits.dtype, device=logits.device).index_add_(0, group_of, mass)
        norm = torch.cat([torch.full((d,), d / k_e, dtype=logits.dtype, device=logits.device),
                          torch.full((groups - d,), 1.0 / max(k - k_e, 1e-30), dtype=logits.dtype,
                                     device=logits.device)])
        f = sel_g * norm / tokens
        return (f * p_g).sum()
