"""What the MoE ops share: their result types, dtypes, backend order and argument checks (no op is defined here)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validate as v

__all__ = ["AUTO", "FLOAT_DTYPES", "KERNEL_DTYPES", "KERNEL_ONLY", "MoEPermutation", "MoERouting", "check_experts",
           "check_routing"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs on the reference backend (tests' truth, CPU users)
KERNEL_ONLY = v.first_arg_dtype_in(KERNEL_DTYPES)
# Auto order of the expert ops: Triton on GPUs; on CPU the reference (Triton only under the interpreter, in tests).
AUTO = {"cuda": ("triton", "reference"), "cpu": ("reference",)}


class MoERouting(NamedTuple):
    """What ``moe_route`` returns; ``moe_experts`` takes it as is."""

    topk_ids: torch.Tensor  # int32 [T, K], global expert ids (zero experts are ids >= N)
    topk_weights: torch.Tensor  # fp32 [T, K]: unbiased scores of the picks (renormalised if asked) x scale
    zero_weight: torch.Tensor  # fp32 [T]: sum of the weights on zero-expert slots
    counts: torch.Tensor  # int32 [N+Z]: selections per expert (feed ExpertBiasController.update)


class MoEPermutation(NamedTuple):
    """The plan ``moe_permute`` returns next to the permuted rows; ``moe_unpermute`` takes it back (no re-sort)."""

    slots: torch.Tensor  # int32 [T*K]: slot t*K + k of each permuted row; undispatched slots last, in slot order
    offsets: torch.Tensor  # int32 [E+1]: local expert e owns rows [offsets[e], offsets[e+1]); offsets[0] = 0


def check_routing(op, t, topk_ids, topk_weights, zero_weight) -> None:
    v.tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), dim=2, op=op)
    v.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, op=op)
    v.tensor("zero_weight", zero_weight, dtypes=(torch.float32,), dim=1, op=op)
    if topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{op}: topk_ids and topk_weights must both be [T={t}, K], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if tuple(zero_weight.shape) != (t,):
        raise ValueError(f"{op}: zero_weight must be [T={t}], got {tuple(zero_weight.shape)}")


def check_experts(op, dm, dtype, w_gate_up, w_down) -> tuple[int, int]:
    """(E, Di) of the weights ``w_gate_up`` [E, 2*Di, Dm] and ``w_down`` [E, Dm, Di]."""
    v.tensor("w_gate_up", w_gate_up, dtypes=(dtype,), dim=3, op=op)
    v.tensor("w_down", w_down, dtypes=(dtype,), dim=3, op=op)
    n, two_di, dm_w = w_gate_up.shape
    if two_di % 2 or dm_w != dm:
        raise ValueError(f"{op}: w_gate_up must be [N, 2*Di, Dm={dm}], got {tuple(w_gate_up.shape)}")
    di = two_di // 2
    if tuple(w_down.shape) != (n, dm, di):
        raise ValueError(f"{op}: w_down must be [N, Dm, Di] = {(n, dm, di)}, got {tuple(w_down.shape)}")
    return n, di
