"""``moe_route``: top-k routing with zero-computation experts (docs/ops/moe.md, docs/design/longcat_moe.md).

Layers: ``csrc/cpu/moe_route.cpp`` (cpp), ``csrc/cuda/moe_route.cu`` (cuda), ``kernels/reference/moe.py``
(reference); registered as ``torch.ops.mmkernels.moe_route`` with a fake and autograd (gradient to the logits
through the chosen weights and ``zero_weight``).
"""

from __future__ import annotations

import torch

from .._backends import OpBackends
from ..kernels.reference.moe import RENORM_EPS, moe_route_reference, route_scores
from . import _validate as v
from ._library import define
from .moe_common import FLOAT_DTYPES, KERNEL_ONLY, MoERouting

__all__ = ["ROUTE_BACKENDS", "SCORINGS", "moe_route", "route_backward"]

SCORINGS = ("softmax", "sigmoid")

ROUTE = define(
    "moe_route(Tensor logits, Tensor? bias, int top_k, int num_ffn_experts, str scoring, "
    "float routed_scaling_factor, bool renormalize, int n_groups, int topk_groups) -> "
    "(Tensor topk_weights, Tensor zero_weight, Tensor topk_ids, Tensor counts)"
)
# Float outputs first: opcheck's autograd test sums the outputs into one scalar and trips over an int first.


@torch.library.register_fake(ROUTE)
def _route_fake(logits, bias, top_k, num_ffn_experts, scoring, routed_scaling_factor, renormalize, n_groups,
                topk_groups):
    t, e = logits.shape
    return (logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t,), dtype=torch.float32),
            logits.new_empty((t, top_k), dtype=torch.int32), logits.new_empty((e,), dtype=torch.int32))


def route_backward(logits, topk_ids, grad_weights, grad_zero_weight, num_ffn_experts, scoring, scale, renormalize):
    """d logits from d topk_weights and d zero_weight (the zero slots' weights feed zero_weight)."""
    scores = route_scores(logits, scoring)
    ids = topk_ids.long()
    g = torch.zeros(ids.shape, dtype=scores.dtype, device=logits.device)
    if grad_weights is not None:
        g = g + grad_weights.to(scores.dtype)
    if grad_zero_weight is not None:  # where, not a mask product: zero_weight reads the zero slots only
        g = g + torch.where(ids >= num_ffn_experts, grad_zero_weight.to(scores.dtype)[:, None], 0.0)
    picked = scores.gather(1, ids)
    if renormalize:  # w_k = s p_k / D, D = sum_j p_j over the picks + eps (the forward's denominator)
        denom = picked.sum(-1, keepdim=True) + RENORM_EPS
        d_picked = scale * (g - (g * picked).sum(-1, keepdim=True) / denom) / denom
    else:
        d_picked = scale * g
    d_scores = torch.zeros_like(scores).scatter_add_(1, ids, d_picked)
    if scoring == "softmax":
        d_logits = scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))
    else:
        d_logits = d_scores * scores * (1 - scores)
    return d_logits.to(logits.dtype)


def _route_setup(ctx, inputs, output):
    logits, _, _, num_ffn, scoring, scale, renormalize, _, _ = inputs
    ctx.save_for_backward(logits, output[2])
    ctx.args = (num_ffn, scoring, scale, renormalize)


def _route_autograd_backward(ctx, grad_weights, grad_zero_weight, grad_ids, grad_counts):
    logits, ids = ctx.saved_tensors
    d = route_backward(logits, ids, grad_weights, grad_zero_weight, *ctx.args)
    return d, None, None, None, None, None, None, None, None


torch.library.register_autograd(ROUTE, _route_autograd_backward, setup_context=_route_setup)

ROUTE_BACKENDS = OpBackends("moe_route", auto_order={"cuda": ("cuda", "reference"), "cpu": ("cpp", "reference")})


def _route_cuda_supports(logits, bias, top_k, num_ffn, scoring, scale, renormalize, n_groups, topk_groups):
    """The CUDA kernel keeps a token's scores in one warp's registers."""
    e = logits.shape[1]
    if e > 1024 or top_k > 32 or n_groups > 32:
        return (f"the CUDA kernel takes N+Z <= 1024, top_k <= 32 and n_groups <= 32, got N+Z = {e}, top_k = {top_k}, "
                f"n_groups = {n_groups}")
    return None


@ROUTE_BACKENDS.register("cuda", supports=lambda *a: KERNEL_ONLY(*a) or _route_cuda_supports(*a))
@ROUTE_BACKENDS.register("cpp", supports=KERNEL_ONLY, batch_invariant=True)
def _route_native(*args):
    weights, zero_weight, ids, counts = torch.ops.mmkernels.moe_route(*args)
    return ids, weights, zero_weight, counts


@ROUTE_BACKENDS.register("reference", batch_invariant=True)
def _route_reference(logits, bias, top_k, num_ffn, scoring, scale, renormalize, n_groups, topk_groups):
    ids, w, zw, counts = moe_route_reference(logits, bias, top_k, num_ffn, scoring, scale, renormalize, n_groups,
                                             topk_groups)
    return ids, w.float(), zw.float(), counts


def moe_route(
    logits: torch.Tensor,
    *,
    top_k: int,
    num_ffn_experts: int,
    bias: torch.Tensor | None = None,
    scoring: str = "softmax",
    routed_scaling_factor: float = 1.0,
    renormalize: bool = False,
    n_groups: int = 1,
    topk_groups: int = 1,
    backend: str | None = None,
) -> MoERouting:
    """Top-k routing over N FFN experts and Z zero-computation experts, on the device, no host sync.

    ``scores = softmax(logits)`` (or ``sigmoid``) over all N+Z experts in fp32; the top-k of ``scores + bias``
    are chosen (ties go to the lower expert id); ``topk_weights`` are the *unbiased* scores of the picks
    (divided by their sum when ``renormalize``) times ``routed_scaling_factor``; ``zero_weight`` sums the
    weights of picks with id >= N; ``counts`` is the histogram of picks. ``n_groups``/``topk_groups`` give
    DeepSeek-V3's group-limited choice. Gradients reach ``logits`` through the weights and ``zero_weight``.

    Non-finite input gives the same answer on every backend (cpp, cuda, reference):

    - scores are exactly fp32 ``torch.softmax`` / ``torch.sigmoid``: a NaN logit (or, under softmax, a +inf
      logit or a row of -inf) gives NaN scores, which are not hidden: a NaN logit is a broken model;
    - selection order: a NaN ``score + bias`` ranks below every number, -inf included; ties (NaN with NaN too)
      go to the lower expert id; so ids are always valid and equal across backends, and counts follow from them.
      The group-limited choice ranks groups by the sum of their two best values in the same order;
    - renormalisation divides by ``sum + 1e-20`` (as HF's DeepSeek-V3 router), so picks whose scores are all
      zero (sigmoid of -120) get zero weights and zero gradients, never 0/0; the backward uses the same
      denominator;
    - ``zero_weight`` sums the weights of the zero slots only: a NaN there gives NaN, a NaN weight on an FFN
      slot never leaks into it.

    Args:
        logits: [T, N+Z], fp32 / fp16 / bf16 (the router's output; LongCat keeps the router in fp32).
        top_k: K, 1 <= K <= N+Z (K <= 32 and N+Z <= 1024 on the CUDA kernel; larger runs on the reference).
        num_ffn_experts: N (0 <= N <= N+Z).
        bias: optional fp32 [N+Z] selection bias (``ExpertBiasController.bias``).

    Raises:
        TypeError: wrong dtype for logits/bias, or a non-bool ``renormalize``.
        ValueError: wrong shapes, devices or sizes (top_k, num_ffn_experts, n_groups, topk_groups), or an unknown
            ``scoring``.
        mmkernels.BackendError: an explicit ``backend`` that cannot run here, e.g. ``"cuda"`` beyond its limits
            (auto then picks the reference).
    """
    op = "moe_route"
    v.tensor("logits", logits, dtypes=FLOAT_DTYPES, dim=2, op=op)
    e = logits.shape[1]
    if e < 1:
        raise ValueError(f"{op}: logits must have at least one expert column, got shape {tuple(logits.shape)}")
    k = v.integer("top_k", top_k, op=op, low=1, high=e)
    n = v.integer("num_ffn_experts", num_ffn_experts, op=op, low=0, high=e)
    if bias is not None:
        v.tensor("bias", bias, dtypes=(torch.float32,), dim=1, op=op)
        if bias.shape[0] != e:
            raise ValueError(f"{op}: bias must have N+Z = {e} entries like the logits' last dim, got {bias.shape[0]}")
        v.same_device(op, logits=logits, bias=bias)
    v.choice("scoring", scoring, SCORINGS, op=op)
    scale = v.real("routed_scaling_factor", routed_scaling_factor, op=op)
    renormalize = v.flag("renormalize", renormalize, op=op)
    groups = v.integer("n_groups", n_groups, op=op, low=1, high=e)
    if e % groups:
        raise ValueError(f"{op}: n_groups ({groups}) must divide the number of experts ({e})")
    kept = v.integer("topk_groups", topk_groups, op=op, low=1, high=groups)
    if k > kept * (e // groups):
        raise ValueError(f"{op}: top_k ({k}) exceeds the {kept * (e // groups)} experts of the kept groups")
    args = (logits, bias, k, n, scoring, scale, renormalize, groups, kept)
    _, impl = ROUTE_BACKENDS.select(logits.device, backend, args)
    return MoERouting(*impl(*args))

