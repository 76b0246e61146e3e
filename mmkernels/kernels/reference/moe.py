"""Plain-PyTorch references for MoE routing with zero-computation experts and for the SwiGLU expert FFNs.

Semantics: docs/design/longcat_moe.md. These are the tests' oracles (run them on float64 inputs), the
benchmarks' baselines and the CPU fallback. No host synchronisation in ``moe_route_reference``,
``moe_permute_reference`` and ``moe_unpermute_reference`` (outputs sized by bounds, masks instead of slices); the
per-expert loops (``moe_experts_reference`` and its backward, ``moe_grouped_swiglu_reference``) read the plan's
offsets on the host once per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Router scores in at least fp32: softmax over all N+Z experts, or independent sigmoids.

    Exactly ``torch.softmax`` / ``torch.sigmoid`` (the C++ kernel calls the same ATen kernels): a NaN logit, a
    +inf logit under softmax, or a row of -inf under softmax gives NaN scores, which are never hidden.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)


def _topk_lowest_id_on_ties(values: torch.Tensor, k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k indices in the selection order of every backend: larger values first, NaN below every number
    (-inf included), ``excluded`` entries (bool, same shape) below NaN; equal keys, NaN with NaN included, go to
    the lower index. torch.topk makes no tie promise and ranks NaN first, hence two stable sorts.
    """
    nan = values.isnan()
    # NaN -> 0 only so that NaNs compare equal among themselves here; the class sort below puts them last.
    order = torch.sort(values.masked_fill(nan, 0.0), dim=-1, descending=True, stable=True).indices
    rank_class = nan.to(torch.uint8)  # 0: a number, 1: NaN, 2: excluded
    if excluded is not None:
        rank_class = rank_class.masked_fill(excluded, 2)
    by_class = torch.sort(rank_class.gather(-1, order), dim=-1, stable=True).indices
    return order.gather(-1, by_class[..., :k])


def group_limited_mask(choice: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited choice: keep the ``topk_groups`` groups with the largest sum of their two best
    biased scores (one best when a group has one expert), both "best" and "largest" in the selection order of
    ``_topk_lowest_id_on_ties`` (NaN last, lower id on ties). Returns the bool mask of experts kept [T, N+Z]."""
    t, e = choice.shape
    size = e // n_groups
    grouped = choice.view(t, n_groups, size)
    top = grouped.gather(-1, _topk_lowest_id_on_ties(grouped, min(2, size)))
    best = top[..., 0] + top[..., 1] if size >= 2 else top[..., 0]
    keep = _topk_lowest_id_on_ties(best, topk_groups)
    group_ok = torch.zeros(t, n_groups, dtype=torch.bool, device=choice.device).scatter_(1, keep, True)
    return group_ok.repeat_interleave(size, dim=1)


# HF DeepSeek-V3's renormalisation epsilon: weights / (sum + 1e-20), so all-zero picks give zeros, never 0/0.
RENORM_EPS = 1e-20


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
    Non-finite input follows the rules of ``mmkernels.ops.moe_route`` (NaN ranks last, ``sum + 1e-20``).
    """
    scores = route_scores(logits, scoring)
    with torch.no_grad():
        choice = scores if bias is None else scores + bias.to(scores.dtype)
        excluded = ~group_limited_mask(choice, n_groups, topk_groups) if n_groups > 1 else None
        ids = _topk_lowest_id_on_ties(choice, top_k, excluded)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPS)
    weights = weights * routed_scaling_factor
    # where, not a product with the mask: a NaN weight on an FFN slot must not leak into zero_weight.
    zero_weight = torch.where(ids >= num_ffn_experts, weights, 0.0).sum(-1)
    # scatter_add, not bincount: no host sync, and it runs on the meta device (shape-only forwards, to_empty set-ups).
    counts = torch.zeros(logits.shape[-1], dtype=torch.int32, device=logits.device).scatter_add_(
        0, ids.flatten(), torch.ones(ids.numel(), dtype=torch.int32, device=logits.device))
    return ids.to(torch.int32), weights, zero_weight, counts


def keep_weights_in_graph(out: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """``out`` + 0 with every weight in autograd's graph: a weight that no row reached gets a zero gradient, never
    None (DDP without ``find_unused_parameters`` needs every parameter's gradient every step). An empty slice's sum,
    not ``0 * w``, so NaN / inf in a weight never reaches ``out``."""
    if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
        return out
    return out + sum(w.reshape(-1)[:0].sum().to(out.dtype) for w in weights)


def align(topk_ids: torch.Tensor, num_experts: int, expert_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side alignment, no host sync: sort the T*K slots (slot = t*K + k) by local expert ``id - expert_offset``.

    Slots whose local id is outside ``[0, num_experts)`` (zero experts, other ranks' experts, negative or
    out-of-range ids) share one key past every expert: they sort last, in slot order. Returns ``order`` (int32
    [T*K]: the slot of each sorted row) and ``offsets`` (int32 [E+1]: expert e owns sorted rows
    [offsets[e], offsets[e+1]); offsets[E] = rows dispatched). Plain PyTorch: the reference and the Triton path
    share it (``kernels/triton/moe.py`` builds its tile map on it)."""
    n = num_experts
    flat = topk_ids.reshape(-1).long() - expert_offset
    key = torch.where((flat >= 0) & (flat < n), flat, n)
    sorted_key, order = torch.sort(key, stable=True)
    # offsets[e] = number of keys < e: a searchsorted (static output shape) rather than a bincount, whose output
    # size depends on the largest key and which rejects negative keys.
    offsets = torch.searchsorted(sorted_key, torch.arange(n + 1, device=key.device), right=False)
    return order.to(torch.int32), offsets.to(torch.int32)


def _expert_slots(topk_ids: torch.Tensor, n: int) -> list[tuple[int, torch.Tensor]]:
    """(expert, its slots ascending) for every FFN expert with slots: one sort and one host read of the offsets
    (the loop needs the sizes), not one ``nonzero`` per expert."""
    order, offsets = align(topk_ids, n)
    ends = offsets.tolist()
    order = order.long()
    return [(e, order[ends[e]: ends[e + 1]]) for e in range(n) if ends[e + 1] > ends[e]]


def moe_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """``y_t = sum_{k: 0<=id<N} w_tk * down_e(silu(gate_e x_t) * up_e x_t) + zero_weight_t * x_t``, one expert at a
    time (sort by expert, loop). Slots with a negative id or one >= N are not dispatched and their weight is never
    read. Math in fp32 for half inputs; output in ``hidden``'s dtype. Data-dependent shapes: a test/CPU
    reference, not a fast path."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(compute)
    n, two_di, _ = w_gate_up.shape
    di = two_di // 2
    out = x * zero_weight.to(compute)[:, None]
    flat_w = topk_weights.reshape(-1).to(compute)
    token = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    present = _expert_slots(topk_ids, n)
    for e, slots in present:
        rows = x[token[slots]]
        gu = rows @ w_gate_up[e].to(compute).t()
        h = F.silu(gu[:, :di]) * gu[:, di:]
        y = (h @ w_down[e].to(compute).t()) * flat_w[slots, None]
        out = out.index_add(0, token[slots], y)
    if not present:  # no slot reached an expert: zero weight gradients, not None
        out = keep_weights_in_graph(out, w_gate_up, w_down)
    return out.to(hidden.dtype)


def moe_experts_reference_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`moe_experts_reference` (d hidden, d topk_weights, d zero_weight, d w_gate_up, d w_down),
    written out (no autograd: it runs inside a registered op, where autograd may be off), same loop and precision.

    Per expert e and slot s on it (token t, weight w): ``gu = x W_gu^T``, ``h = silu(g) * u``, ``y = h W_d^T``;
    ``dw_s = <dY_t, y>``, ``dh = w dY_t W_d``, ``dW_d += (w dY_t)^T h``, ``dg = dh * u * silu'(g)``, ``du = dh *
    silu(g)``, ``dW_gu += [dg | du]^T x``, ``dx_t += [dg | du] W_gu``; the identity term adds ``zero_weight * dY`` to
    ``dx`` and ``<dY_t, x_t>`` to ``d zero_weight``."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(compute)
    g_out = grad_out.to(compute)
    n, two_di, _ = w_gate_up.shape
    di = two_di // 2
    d_x = g_out * zero_weight.to(compute)[:, None]
    d_zero = (g_out * x).sum(-1)
    flat_w = topk_weights.reshape(-1).to(compute)
    d_w = torch.zeros_like(flat_w)
    d_gu_w = torch.zeros(w_gate_up.shape, dtype=compute, device=hidden.device)
    d_down_w = torch.zeros(w_down.shape, dtype=compute, device=hidden.device)
    token = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    for e, slots in _expert_slots(topk_ids, n):
        rows, dy = x[token[slots]], g_out[token[slots]]
        w_gu, w_d = w_gate_up[e].to(compute), w_down[e].to(compute)
        gu = rows @ w_gu.t()
        gate, up = gu[:, :di], gu[:, di:]
        act = F.silu(gate)
        h = act * up
        d_w[slots] = (dy * (h @ w_d.t())).sum(-1)
        wdy = dy * flat_w[slots, None]
        d_down_w[e] = wdy.t() @ h
        dh = wdy @ w_d
        sig = torch.sigmoid(gate)
        d_gu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * act], dim=1)
        d_gu_w[e] = d_gu.t() @ rows
        d_x = d_x.index_add(0, token[slots], d_gu @ w_gu)
    return (d_x.to(hidden.dtype), d_w.view(topk_weights.shape).to(topk_weights.dtype), d_zero.to(zero_weight.dtype),
            d_gu_w.to(w_gate_up.dtype), d_down_w.to(w_down.dtype))


def moe_permute_reference(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int, expert_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [T*K, Dm], slots int32 [T*K], offsets int32 [E+1]): the token rows of the slots whose id is in
    ``[expert_offset, expert_offset + E)``, grouped by expert, each expert's slots in slot order (slot = t*K + k),
    then zero rows for the other slots (listed in slot order after ``offsets[E]``). A stable sort of the slots by
    local expert (the undispatched ones keyed E, so last): O(T*K log + E), not one pass per expert; no host sync
    (output sized T*K, the bound)."""
    t, k = topk_ids.shape
    if hidden.is_meta or topk_ids.is_meta:  # shapes only (no data to sort): the op's output shapes, a shape-only graph
        rows = hidden.index_select(0, torch.zeros(t * k, dtype=torch.long, device=hidden.device))
        return (rows, torch.empty(t * k, dtype=torch.int32, device=hidden.device),
                torch.empty(num_local_experts + 1, dtype=torch.int32, device=hidden.device))
    slots, offsets = align(topk_ids, num_local_experts, expert_offset)
    # Every row gathered, the undispatched ones (r >= offsets[E], a device tensor: no host sync) zeroed by a where
    # (never the token's values: NaN there must not travel on).
    rows = hidden[slots.long() // k]
    dispatched = torch.arange(t * k, device=hidden.device) < offsets[-1:]
    rows = torch.where(dispatched[:, None], rows, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return rows, slots, offsets


def moe_grouped_swiglu_reference(
    rows: torch.Tensor, offsets: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """``out[r] = down_e(silu(gate_e rows[r]) * up_e rows[r])`` for the rows ``[offsets[e], offsets[e+1])`` of
    expert e; other rows are zero. ``offsets`` is first clamped into [0, M] and made non-decreasing (the rule
    every backend applies). Math in fp32 for half inputs, one expert at a time."""
    compute = torch.float64 if rows.dtype == torch.float64 else torch.float32
    m, dm = rows.shape
    di = w_gate_up.shape[1] // 2
    if rows.is_meta or offsets.is_meta:  # shapes only: every row through expert 0 (a graph to every input)
        if w_gate_up.shape[0] == 0:
            return rows * 0
        gu = rows.to(compute) @ w_gate_up[0].to(compute).t()
        return ((F.silu(gu[:, :di]) * gu[:, di:]) @ w_down[0].to(compute).t()).to(rows.dtype)
    offs = offsets.long().clamp(0, m).cummax(0).values.tolist()
    pieces = [rows[:0].to(compute), rows.new_zeros((offs[0], dm), dtype=compute)]  # [:0]: in the graph if E = 0
    for e in range(len(offs) - 1):
        x = rows[offs[e]: offs[e + 1]].to(compute)
        gu = x @ w_gate_up[e].to(compute).t()
        pieces.append((F.silu(gu[:, :di]) * gu[:, di:]) @ w_down[e].to(compute).t())
    pieces.append(rows.new_zeros((m - offs[-1], dm), dtype=compute))
    return torch.cat(pieces).to(rows.dtype)


def moe_unpermute_reference(
    expert_out: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    topk_weights: torch.Tensor,
    zero_weight: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_t = sum over the dispatched rows r of token t (0 <= r < min(offsets[-1], M), slots[r] = t*K + k in
    [0, T*K)) of w_tk * expert_out[r]`` (+ ``zero_weight_t * hidden_t``). Rows past the dispatched ones, rows whose
    slot is out of range and the weights of undispatched slots are never read. No host sync. Math in fp32 for half
    inputs; output in ``expert_out``'s dtype."""
    compute = torch.float64 if expert_out.dtype == torch.float64 else torch.float32
    t, k = topk_weights.shape
    if expert_out.is_meta or offsets.is_meta:  # shapes only: every row added to token 0
        m = expert_out.shape[0]
        y = expert_out.to(compute) * topk_weights.reshape(-1)[:m].to(compute)[:, None]
        out = y.new_zeros((t, expert_out.shape[1])).index_add(0, torch.zeros(m, dtype=torch.long, device=y.device), y)
        if hidden is not None:
            out = out + hidden.to(compute) * zero_weight.to(compute)[:, None]
        return out.to(expert_out.dtype)
    m = expert_out.shape[0]
    slot = slots[:m].long()
    # Row r is read when r < offsets[-1] (a device tensor: no host sync; a negative one reads no row) and its slot
    # names a (token, k) in [0, T*K). Rows not read go to a spare token row t, dropped at the end.
    read = (torch.arange(m, device=slot.device) < offsets[-1:].long()) & (slot >= 0) & (slot < t * k)
    slot = torch.where(read, slot, 0)
    # where on both factors (not on their product): NaN in a row not read stays out of the output and of the
    # weights' gradient (0 * NaN would reach it through the product's backward)
    rows = torch.where(read[:, None], expert_out.to(compute), 0.0)
    y = rows * torch.where(read, topk_weights.reshape(-1)[slot].to(compute), 0.0)[:, None]
    out = y.new_zeros((t + 1, expert_out.shape[1])).index_add(0, torch.where(read, slot // k, t), y)[:t]
    if hidden is not None:
        out = out + hidden.to(compute) * zero_weight.to(compute)[:, None]
    return out.to(expert_out.dtype)
