"""``moe_permute`` and ``moe_unpermute``: the dispatch and combine of the split MoE pieces (Megatron's names), for
expert parallelism (rows cross ranks between them and ``moe_grouped_swiglu``).

Backends, named for what they run:

- ``"triton"``: the plan (a device-side stable sort and searchsorted) and Triton kernels that move the rows
  (``kernels/triton/moe_permute.py``: gather into expert order, combine back into tokens), registered as
  ``torch.ops.mmkernels.moe_permute`` / ``moe_unpermute`` with their backward ops (``moe_permute_bwd_triton`` /
  ``moe_unpermute_bwd_triton``);
- ``"reference"``: plain PyTorch (``kernels/reference/moe.py``), the same plan, differentiable by autograd. Also
  device-side with no host sync (outputs sized by the bound T*K), so the sync-free path runs on every device, CPU
  included.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from .._config import is_deterministic
from ..kernels.reference.moe import moe_permute_reference, moe_unpermute_reference
from . import _validate as v
from .moe_common import AUTO, FLOAT_DTYPES, KERNEL_ONLY, MoEPermutation

__all__ = ["MAX_LOCAL_EXPERTS", "PERMUTE_BACKENDS", "UNPERMUTE_BACKENDS", "moe_permute", "moe_unpermute"]

MAX_LOCAL_EXPERTS = 2**24  # moe_permute's num_local_experts: its int32 plan offsets [E+1] (64 MiB) on every call

PERMUTE_BACKENDS = OpBackends("moe_permute", auto_order=AUTO)
UNPERMUTE_BACKENDS = OpBackends("moe_unpermute", auto_order=AUTO)
PERMUTE_BACKENDS.register("reference", batch_invariant=True)(moe_permute_reference)
UNPERMUTE_BACKENDS.register("reference", batch_invariant=True)(moe_unpermute_reference)


if triton_available():
    from ..kernels.triton import moe as tk
    from ..kernels.triton.moe_permute import gather_rows, token_sums
    from ._triton_op import triton_op

    # -- moe_permute: the plan, then the rows gathered into expert order by a kernel --

    def _permute_fake(hidden, topk_ids, num_local_experts, expert_offset, deterministic):
        m = topk_ids.numel()
        return (hidden.new_empty((m, hidden.shape[1])), topk_ids.new_empty((m,), dtype=torch.int32),
                topk_ids.new_empty((num_local_experts + 1,), dtype=torch.int32))

    @triton_op("mmkernels::moe_permute", mutates_args=(), fake=_permute_fake)
    def _permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int, expert_offset: int,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order, offsets = tk.align(topk_ids, num_local_experts, expert_offset)
        rows = hidden.new_empty((order.numel(), hidden.shape[1]))
        # Rows of undispatched slots come out zero (never the token's values: NaN there must not travel on).
        gather_rows(hidden.contiguous(), order, offsets[-1:], rows, div=topk_ids.shape[1],
                    launch=torch.library.wrap_triton)
        return rows, order, offsets

    def _permute_backward_fake(grad_rows, order, offsets, t, k, deterministic):
        return grad_rows.new_empty((t, grad_rows.shape[1]))

    @triton_op("mmkernels::moe_permute_bwd_triton", mutates_args=(), fake=_permute_backward_fake)
    def _permute_triton_backward(grad_rows: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, t: int, k: int,
                                 deterministic: bool) -> torch.Tensor:
        d = token_sums(grad_rows.contiguous(), order, offsets[-1:], t, k, deterministic=deterministic,
                       launch=torch.library.wrap_triton)
        return d.to(grad_rows.dtype)

    def _permute_setup(ctx, inputs, output):
        hidden, topk_ids, _, _, deterministic = inputs
        ctx.save_for_backward(output[1], output[2])
        ctx.shape = (hidden.shape[0], topk_ids.shape[1], deterministic)

    def _permute_backward(ctx, grad_rows, grad_slots, grad_offsets):
        order, offsets = ctx.saved_tensors
        t, k, deterministic = ctx.shape
        d = torch.ops.mmkernels.moe_permute_bwd_triton(grad_rows, order, offsets, t, k, deterministic)
        return d, None, None, None, None

    _permute.register_autograd(_permute_backward, setup_context=_permute_setup)

    @PERMUTE_BACKENDS.register("triton", supports=KERNEL_ONLY, batch_invariant=True)
    def _permute_backend(hidden, topk_ids, num_local_experts, expert_offset):
        return torch.ops.mmkernels.moe_permute(hidden.contiguous(), topk_ids, num_local_experts, expert_offset,
                                               is_deterministic())

    # -- moe_unpermute: the weighted combine into the tokens by a kernel, plus the identity term --

    def _unpermute_fake(expert_out, slots, offsets, topk_weights, zero_weight, hidden, deterministic):
        return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]))

    @triton_op("mmkernels::moe_unpermute", mutates_args=(), fake=_unpermute_fake)
    def _unpermute(expert_out: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, topk_weights: torch.Tensor,
                   zero_weight: torch.Tensor | None, hidden: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
        t, k = topk_weights.shape
        init = hidden.float() * zero_weight[:, None] if hidden is not None else None
        out = token_sums(expert_out.contiguous(), slots, offsets[-1:], t, k, weights=topk_weights, init=init,
                         deterministic=deterministic, launch=torch.library.wrap_triton)
        return out.to(expert_out.dtype)

    def _unpermute_backward_fake(grad_out, expert_out, slots, offsets, topk_weights, zero_weight, hidden):
        return (torch.empty_like(expert_out), torch.empty_like(topk_weights),
                topk_weights.new_empty((0,) if zero_weight is None else zero_weight.shape),
                expert_out.new_empty((0,) if hidden is None else hidden.shape))

    @triton_op("mmkernels::moe_unpermute_bwd_triton", mutates_args=(), fake=_unpermute_backward_fake)
    def _unpermute_triton_backward(
        grad_out: torch.Tensor, expert_out: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor,
        topk_weights: torch.Tensor, zero_weight: torch.Tensor | None, hidden: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d expert_out, d topk_weights, d zero_weight, d hidden); the last two empty without the identity term."""
        t, k = topk_weights.shape
        m = expert_out.shape[0]
        g = grad_out.float().contiguous()
        # d expert_out: the token's gradient times the slot's weight, gathered into row order by the kernel; rows not
        # read (past offsets[-1], or without a slot: moe_unpermute maps out-of-range slots to -1) get zero.
        d_out = expert_out.new_empty(expert_out.shape)  # row-major, whatever expert_out's strides
        gather_rows(g, slots, offsets[-1:], d_out, div=k, scale=topk_weights.reshape(-1),
                    launch=torch.library.wrap_triton)
        slot = slots[:m].long()
        read = (torch.arange(m, device=g.device) < offsets[-1:].long()) & (slot >= 0)
        slot = slot.clamp_min(0)
        # d weights: <dY_t, row> per read row; where, not a product with 0: rows not read may hold NaN/inf.
        d_w_rows = torch.where(read, (g[slot // k] * expert_out.float()).sum(-1), 0.0)
        d_weights = torch.zeros(t * k + 1, dtype=torch.float32, device=g.device).index_add_(
            0, torch.where(read, slot, t * k), d_w_rows)  # rows not read land in a spare last entry
        d_weights = d_weights[: t * k].view(t, k).to(topk_weights.dtype)
        if hidden is None:
            return d_out, d_weights, topk_weights.new_empty((0,)), expert_out.new_empty((0,))
        d_zero = (g * hidden.float()).sum(-1).to(zero_weight.dtype)
        d_hidden = (g * zero_weight.float()[:, None]).to(hidden.dtype)
        return d_out, d_weights, d_zero, d_hidden

    def _unpermute_setup(ctx, inputs, output):
        expert_out, slots, offsets, topk_weights, zero_weight, hidden, _ = inputs
        ctx.save_for_backward(expert_out, slots, offsets, topk_weights, zero_weight, hidden)

    def _unpermute_backward(ctx, grad_out):
        expert_out, slots, offsets, topk_weights, zero_weight, hidden = ctx.saved_tensors
        d_out, d_weights, d_zero, d_hidden = torch.ops.mmkernels.moe_unpermute_bwd_triton(
            grad_out, expert_out, slots, offsets, topk_weights, zero_weight, hidden)
        if hidden is None:
            d_zero = d_hidden = None
        return d_out, None, None, d_weights, d_zero, d_hidden, None

    _unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)

    @UNPERMUTE_BACKENDS.register("triton", supports=KERNEL_ONLY, batch_invariant=True)
    def _unpermute_backend(expert_out, slots, offsets, topk_weights, zero_weight, hidden):
        return torch.ops.mmkernels.moe_unpermute(expert_out, slots, offsets, topk_weights, zero_weight, hidden,
                                                 is_deterministic())


def moe_permute(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_local_experts: int,
    expert_offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, MoEPermutation]:
    """Dispatch plan and permuted rows (Megatron's ``permute``): the token rows of every slot routed to one of the
    local experts ``[expert_offset, expert_offset + E)``, grouped by expert, on the device, no host sync.

    A slot (t, k) is dispatched when ``expert_offset <= topk_ids[t, k] < expert_offset + E``; zero experts, other
    ranks' experts, negative ids (-1) and ids past the range are not. Rows come out in expert order, each
    expert's slots in slot order (slot = t*K + k), so with ``expert_offset=0, num_local_experts=N`` the rows are
    grouped by destination rank as well (rank r owns a contiguous block of experts). The output is sized for the
    worst case, T*K rows: rows ``>= perm.offsets[-1]`` belong to undispatched slots and are zero.

    Args:
        hidden: [T, Dm] fp32 / fp16 / bf16.
        topk_ids: int32 or int64 [T, K] global expert ids (``MoERouting.topk_ids``, or received ids with K = 1).
        num_local_experts: E, 0 <= E <= 2**24 (``MAX_LOCAL_EXPERTS``: the plan ``offsets`` [E+1] is allocated on
            every call, so E is capped at 64 MiB of it, far past any real model's experts per rank; larger is a
            ``ValueError`` naming the argument, not an out-of-memory error).
        expert_offset: global id of local expert 0, 0 <= offset <= 2**62.

    Returns:
        ``(rows, perm)``: rows [T*K, Dm] in ``hidden``'s dtype; ``perm`` a ``MoEPermutation`` with ``slots`` int32
        [T*K] (the slot of each row; undispatched slots last, in slot order) and ``offsets`` int32 [E+1]
        (expert e owns rows ``[offsets[e], offsets[e+1])``; ``offsets[E]`` = rows dispatched). Differentiable in
        ``hidden`` (its gradient sums each token's dispatched rows).

    Raises:
        TypeError / ValueError: wrong types, dtypes, dimensions, shapes or devices.
    """
    op = "moe_permute"
    v.tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dim=2, op=op)
    v.tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), dim=2, op=op)
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: topk_ids must be [T={hidden.shape[0]}, K], got {tuple(topk_ids.shape)}")
    # Bounds of the plan (offsets [E+1], allocated per call: MAX_LOCAL_EXPERTS keeps it <= 64 MiB) and of int64 id
    # arithmetic (id - expert_offset).
    e = v.integer("num_local_experts", num_local_experts, op=op, low=0, high=MAX_LOCAL_EXPERTS)
    offset = v.integer("expert_offset", expert_offset, op=op, low=0, high=2**62)
    v.same_device(op, hidden=hidden, topk_ids=topk_ids)
    _, impl = PERMUTE_BACKENDS.select(hidden.device, backend, (hidden,))
    rows, slots, offsets = impl(hidden, topk_ids, e, offset)
    return rows, MoEPermutation(slots, offsets)




def moe_unpermute(
    expert_out: torch.Tensor,
    permutation: MoEPermutation | tuple,
    topk_weights: torch.Tensor,
    *,
    zero_weight: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Combine (Megatron's ``unpermute``): ``y_t = sum_k w_tk * expert_out[row of slot (t, k)] (+ zero_weight_t *
    hidden_t)`` over the dispatched slots of ``permutation`` (``moe_permute``'s, reused: no second sort).

    ``expert_out`` may have fewer rows than T*K (for instance only the dispatched rows, received back from other
    ranks): row r is read when ``r < offsets[-1]`` (``offsets[-1]`` clamped into [0, M]: a negative one reads no row)
    and ``permutation.slots[r]`` is a slot, in [0, T*K) (a row whose slot is negative or >= T*K names no token and is
    not read: the rule of out-of-range routing ids, on every backend, no host sync; int64 slots are never narrowed).
    Undispatched slots contribute nothing, their ``topk_weights`` entries are never read and get gradient 0.
    ``set_deterministic(True)``: each token sums its slots in slot order (bitwise reproducible) instead of a
    scatter-add.

    Args:
        expert_out: [M, C] fp32 / fp16 / bf16, M <= T*K, rows in ``permutation``'s order.
        permutation: a ``MoEPermutation`` (or a (slots, offsets) tuple) from ``moe_permute``.
        topk_weights: fp32 [T, K] routing weights.
        zero_weight: fp32 [T], with ``hidden`` [T, C] (``expert_out``'s dtype): adds the zero-expert term. Give
            both or neither.

    Returns:
        [T, C] in ``expert_out``'s dtype, accumulated in fp32. Differentiable in ``expert_out``, ``topk_weights``,
        ``zero_weight`` and ``hidden``.

    Raises:
        TypeError / ValueError: wrong types, dtypes, dimensions, shapes or devices.
    """
    op = "moe_unpermute"
    v.tensor("expert_out", expert_out, dtypes=FLOAT_DTYPES, dim=2, op=op)
    if not isinstance(permutation, tuple) or len(permutation) != 2:
        raise TypeError(f"{op}: permutation must be a MoEPermutation (or a (slots, offsets) tuple)")
    slots, offsets = permutation
    v.tensor("slots", slots, dtypes=(torch.int32, torch.int64), dim=1, op=op)
    v.tensor("offsets", offsets, dtypes=(torch.int32, torch.int64), dim=1, op=op)
    v.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, op=op)
    t, k = topk_weights.shape
    m, c = expert_out.shape
    if slots.shape[0] != t * k:
        raise ValueError(f"{op}: permutation.slots must have T*K = {t * k} entries (topk_weights is {[t, k]}), "
                         f"got {slots.shape[0]}")
    if offsets.shape[0] < 1:
        raise ValueError(f"{op}: permutation.offsets must have E+1 >= 1 entries")
    if m > t * k:
        raise ValueError(f"{op}: expert_out has {m} rows, more than the T*K = {t * k} slots")
    if (zero_weight is None) != (hidden is None):
        raise ValueError(f"{op}: give zero_weight and hidden together (the zero-expert term), or neither")
    tensors = dict(expert_out=expert_out, slots=slots, offsets=offsets, topk_weights=topk_weights)
    if hidden is not None:
        v.tensor("zero_weight", zero_weight, dtypes=(torch.float32,), dim=1, op=op)
        v.tensor("hidden", hidden, dtypes=(expert_out.dtype,), dim=2, op=op)
        if tuple(zero_weight.shape) != (t,) or tuple(hidden.shape) != (t, c):
            raise ValueError(f"{op}: zero_weight must be [T={t}] and hidden [T, C] = {[t, c]}, got "
                             f"{list(zero_weight.shape)} and {list(hidden.shape)}")
        tensors.update(zero_weight=zero_weight, hidden=hidden)
    v.same_device(op, **tensors)
    name, impl = UNPERMUTE_BACKENDS.select(expert_out.device, backend, (expert_out,))
    # One rule for every backend, on the device (no host sync): a slot outside [0, T*K) names no (token, k), so its
    # row is not read, like an undispatched one; it becomes -1 before any narrowing to int32 (an int64 slot 2**32 is
    # not slot 0).
    slots = torch.where((slots >= 0) & (slots < t * k), slots, -1)
    if name == "triton":
        slots, offsets = slots.to(torch.int32).contiguous(), offsets.contiguous()
        expert_out, topk_weights = expert_out.contiguous(), topk_weights.contiguous()
    return impl(expert_out, slots, offsets, topk_weights, zero_weight, hidden)
