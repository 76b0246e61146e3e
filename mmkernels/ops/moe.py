"""MoE routing with zero-computation experts (``moe_route``) and grouped SwiGLU experts (``moe_experts``).

Semantics: ../shared/specs/longcat_moe.md; contracts: DESIGN.md.

Layers:
- routing: ``csrc/cpu/moe_route.cpp`` (cpp), ``csrc/cuda/moe_route.cu`` (cuda), ``kernels/reference/moe.py``;
  registered as ``torch.ops.mmkernels.moe_route`` with a fake and autograd (gradient to the logits through
  the chosen weights and ``zero_weight``);
- experts: ``kernels/triton/moe.py`` (alignment + grouped gather-GEMMs + grouped weight gradients),
  registered as ``torch.ops.mmkernels.moe_experts_triton`` (+ ``_backward``) with autograd, and the
  per-expert-loop reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._backends import OpBackends, triton_available
from .._config import is_deterministic
from ..kernels.reference.moe import moe_experts_reference, moe_route_reference, route_scores
from . import _validate as v
from ._library import define

__all__ = ["MoERouting", "moe_experts", "moe_route"]

SCORINGS = ("softmax", "sigmoid")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MoERouting(NamedTuple):
    """What ``moe_route`` returns; ``moe_experts`` takes it as is."""

    topk_ids: torch.Tensor  # int32 [T, K], global expert ids (zero experts are ids >= N)
    topk_weights: torch.Tensor  # fp32 [T, K]: unbiased scores of the picks (renormalised if asked) x scale
    zero_weight: torch.Tensor  # fp32 [T]: sum of the weights on zero-expert slots
    counts: torch.Tensor  # int32 [N+Z]: selections per expert (feed ExpertBiasController.update)


# ---- routing -----------------------------------------------------------------------------------------------------

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
    if grad_zero_weight is not None:
        g = g + grad_zero_weight.to(scores.dtype)[:, None] * (ids >= num_ffn_experts)
    picked = scores.gather(1, ids)
    if renormalize:  # w_k = s p_k / S, S = sum_j p_j over the picks
        total = picked.sum(-1, keepdim=True)
        d_picked = scale * (g / total - (g * picked).sum(-1, keepdim=True) / total**2)
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


@ROUTE_BACKENDS.register("cuda")
@ROUTE_BACKENDS.register("cpp")
def _route_native(*args):
    weights, zero_weight, ids, counts = torch.ops.mmkernels.moe_route(*args)
    return ids, weights, zero_weight, counts


@ROUTE_BACKENDS.register("reference")
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

    Args:
        logits: [T, N+Z], fp32 / fp16 / bf16 (the router's output; LongCat keeps the router in fp32).
        top_k: K, 1 <= K <= N+Z (K <= 32 and N+Z <= 1024 on the CUDA kernel; larger runs on the reference).
        num_ffn_experts: N (0 <= N <= N+Z).
        bias: optional fp32 [N+Z] selection bias (``ExpertBiasController.bias``).
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
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    groups = v.integer("n_groups", n_groups, op=op, low=1, high=e)
    if e % groups:
        raise ValueError(f"{op}: n_groups ({groups}) must divide the number of experts ({e})")
    kept = v.integer("topk_groups", topk_groups, op=op, low=1, high=groups)
    if k > kept * (e // groups):
        raise ValueError(f"{op}: top_k ({k}) exceeds the {kept * (e // groups)} experts of the kept groups")
    args = (logits, bias, k, n, scoring, scale, renormalize, groups, kept)
    _, impl = ROUTE_BACKENDS.select(logits.device, _route_backend(backend, logits.device, e, k, groups))
    return MoERouting(*impl(*args))


def _route_backend(backend: str | None, device: torch.device, e: int, k: int, groups: int) -> str | None:
    """The CUDA kernel keeps a token's scores in one warp's registers: N+Z <= 1024, K <= 32, groups <= 32."""
    if device.type == "cuda" and (e > 1024 or k > 32 or groups > 32):
        if backend == "cuda":
            raise ValueError("moe_route: backend='cuda' supports N+Z <= 1024, top_k <= 32 and n_groups <= 32")
        if backend is None:
            return "reference"
    return backend


# ---- experts -----------------------------------------------------------------------------------------------------

EXPERTS_BACKENDS = OpBackends("moe_experts", auto_order={"cuda": ("triton", "reference"), "cpu": ("reference",)})
EXPERTS_BACKENDS.register("reference")(moe_experts_reference)

if triton_available():
    from ..kernels.triton import moe as tk
    from ._triton_op import triton_op

    class _Plan(NamedTuple):
        t: int
        dm: int
        n: int
        di: int
        k: int
        al: tk.Alignment
        scale: torch.Tensor  # routing weight of each sorted row

    def _plan(hidden, topk_ids, topk_weights, w_gate_up) -> _Plan:
        """Sizes, the device-side alignment, and the weights in expert order: shared by forward and backward."""
        t, dm = hidden.shape
        n, two_di, _ = w_gate_up.shape
        al = tk.align(topk_ids, n, tk._blocks(hidden.dtype)[0])
        scale = topk_weights.reshape(-1)[al.order.long()].contiguous()
        return _Plan(t, dm, n, two_di // 2, topk_ids.shape[1], al, scale)

    def _transposed(w):
        """Strides (expert, k, n) that read expert e's [rows, cols] weight as B_e = W_e^T (y = x @ W_e^T)."""
        return w.stride(0), w.stride(2), w.stride(1)

    def _as_is(w):
        """Strides (expert, k, n) that read W_e itself (y = x @ W_e)."""
        return w.stride(0), w.stride(1), w.stride(2)

    def _experts_fake(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down, deterministic):
        return torch.empty_like(hidden)

    @triton_op("mmkernels::moe_experts_triton", mutates_args=(), fake=_experts_fake)
    def _experts_triton(
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        zero_weight: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        deterministic: bool,
    ) -> torch.Tensor:
        wrap = torch.library.wrap_triton
        p = _plan(hidden, topk_ids, topk_weights, w_gate_up)
        al = p.al
        # SwiGLU intermediate of every FFN slot, in expert order (rows of zero slots are never written or read).
        h = hidden.new_empty((p.t * p.k, p.di))
        tk.grouped_gemm(hidden, w_gate_up, _transposed(w_gate_up), h, al, n=p.di, k=p.dm, a_index=al.token,
                        up_offset=p.di, launch=wrap)
        if deterministic:
            y = hidden.new_empty((p.t * p.k, p.dm), dtype=torch.float32)
            tk.grouped_gemm(h, w_down, _transposed(w_down), y, al, n=p.dm, k=p.di, scale=p.scale, launch=wrap)
            return _combine_in_slot_order(y, al, topk_ids, p.n, hidden, zero_weight)
        out = hidden.float() * zero_weight[:, None]
        tk.grouped_gemm(h, w_down, _transposed(w_down), out, al, n=p.dm, k=p.di, c_index=al.token, scale=p.scale,
                        launch=wrap)
        return out.to(hidden.dtype)

    def _experts_backward_fake(grad_out, hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down,
                               deterministic):
        return (torch.empty_like(hidden), torch.empty_like(topk_weights), torch.empty_like(zero_weight),
                torch.empty_like(w_gate_up), torch.empty_like(w_down))

    @triton_op("mmkernels::moe_experts_triton_backward", mutates_args=(), fake=_experts_backward_fake)
    def _experts_triton_backward(
        grad_out: torch.Tensor,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        zero_weight: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        wrap = torch.library.wrap_triton
        p = _plan(hidden, topk_ids, topk_weights, w_gate_up)
        t, dm, n, di, k, al, scale = p.t, p.dm, p.n, p.di, p.k, p.al, p.scale
        order = al.order.long()
        grad_out = grad_out.contiguous()
        # Recompute gate/up (cheaper in memory than saving them from the forward).
        gu = hidden.new_empty((t * k, 2 * di), dtype=torch.float32)
        tk.grouped_gemm(hidden, w_gate_up, _transposed(w_gate_up), gu, al, n=2 * di, k=dm, a_index=al.token,
                        launch=wrap)
        gate, up = gu[:, :di], gu[:, di:]
        act = F.silu(gate)
        h = act * up
        # dY_t @ W_down_e, per slot: gives d(weight) = <., h> and d(h) = weight * (.)
        dhp = hidden.new_empty((t * k, di), dtype=torch.float32)
        tk.grouped_gemm(grad_out, w_down, _as_is(w_down), dhp, al, n=di, k=dm, a_index=al.token, launch=wrap)
        ffn_rows = torch.arange(t * k, device=hidden.device) < al.ends[-1:].long() if n > 0 else None
        d_w_sorted = (dhp * h).sum(-1)
        d_w_sorted = torch.where(ffn_rows, d_w_sorted, 0.0) if ffn_rows is not None else d_w_sorted
        d_weights = torch.zeros(t * k, dtype=torch.float32, device=hidden.device).index_copy_(0, order, d_w_sorted)
        d_weights = torch.where(topk_ids.reshape(-1) < n, d_weights, 0.0).view(t, k).to(topk_weights.dtype)
        dh = dhp * scale[:, None]
        sig = torch.sigmoid(gate)
        d_gate = dh * up * sig * (1 + gate * (1 - sig))
        d_gu = torch.cat([d_gate, dh * act], dim=1).to(hidden.dtype)
        # d hidden: identity term, plus d_gu @ W_gate_up_e scattered back to the tokens.
        d_zero = (grad_out.float() * hidden.float()).sum(-1).to(zero_weight.dtype)
        if deterministic:
            dx_rows = hidden.new_empty((t * k, dm), dtype=torch.float32)
            tk.grouped_gemm(d_gu, w_gate_up, _as_is(w_gate_up), dx_rows, al, n=dm, k=2 * di, launch=wrap)
            d_hidden = _combine_in_slot_order(dx_rows, al, topk_ids, n, grad_out, zero_weight)
        else:
            d_hidden = grad_out.float() * zero_weight[:, None]
            tk.grouped_gemm(d_gu, w_gate_up, _as_is(w_gate_up), d_hidden, al, n=dm, k=2 * di, c_index=al.token,
                            launch=wrap)
            d_hidden = d_hidden.to(hidden.dtype)
        d_w_down = torch.empty_like(w_down)
        tk.grouped_wgrad(grad_out, h.to(hidden.dtype), d_w_down, al, a_index=al.token, scale=scale, launch=wrap)
        d_w_gate_up = torch.empty_like(w_gate_up)
        tk.grouped_wgrad(d_gu, hidden, d_w_gate_up, al, b_index=al.token, launch=wrap)
        return d_hidden, d_weights, d_zero, d_w_gate_up, d_w_down

    def _experts_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.deterministic = inputs[6]

    def _experts_autograd_backward(ctx, grad_out):
        hidden, ids, weights, zero_weight, w_gate_up, w_down = ctx.saved_tensors
        grads = torch.ops.mmkernels.moe_experts_triton_backward(grad_out, hidden, ids, weights, zero_weight,
                                                                w_gate_up, w_down, ctx.deterministic)
        d_hidden, d_weights, d_zero, d_gu, d_down = grads
        return d_hidden, None, d_weights, d_zero, d_gu, d_down, None

    _experts_triton.register_autograd(_experts_autograd_backward, setup_context=_experts_setup)

    @EXPERTS_BACKENDS.register("triton")
    def _experts_triton_backend(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down):
        return torch.ops.mmkernels.moe_experts_triton(hidden, topk_ids, topk_weights, zero_weight, w_gate_up, w_down,
                                                      is_deterministic())


def _combine_in_slot_order(rows, al, topk_ids, n, hidden, zero_weight):
    """Deterministic combine: each token sums its K slot rows in slot order (no atomics), plus the identity term.
    ``rows`` is in expert order; rows of zero slots were never written and are masked out."""
    t, k = topk_ids.shape
    slot_rows = torch.empty_like(rows).index_copy_(0, al.order.long(), rows).view(t, k, -1)
    ffn = (topk_ids < n)[..., None]
    out = hidden.float() * zero_weight[:, None] + torch.where(ffn, slot_rows, 0.0).sum(1)
    return out.to(hidden.dtype)


def moe_experts(
    hidden: torch.Tensor,
    routing: MoERouting | tuple,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU experts with zero-computation experts.

    ``y_t = sum_{k: id<N} w_tk * down_e(silu(gate_e x_t) * up_e x_t) + zero_weight_t * x_t``; dropless, no
    capacity factor; zero-expert slots are never dispatched. Differentiable in ``hidden``, both weights,
    ``routing.topk_weights`` and ``routing.zero_weight``. ``mmkernels.set_deterministic(True)`` replaces the
    atomic scatter-add with an ordered combine (bitwise reproducible, more memory).

    Args:
        hidden: [T, Dm] fp32 / fp16 / bf16.
        routing: a ``MoERouting`` (or (topk_ids, topk_weights, zero_weight[, counts])).
        w_gate_up: [N, 2*Di, Dm], rows [:Di] gate and [Di:] up (the HF LongCat layout), same dtype as hidden.
        w_down: [N, Dm, Di].
    """
    op = "moe_experts"
    v.tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dim=2, op=op)
    if not isinstance(routing, tuple) or len(routing) not in (3, 4):
        raise TypeError(f"{op}: routing must be a MoERouting (or a (topk_ids, topk_weights, zero_weight) tuple)")
    topk_ids, topk_weights, zero_weight = routing[:3]
    v.tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), dim=2, op=op)
    v.tensor("topk_weights", topk_weights, dtypes=(torch.float32,), dim=2, op=op)
    v.tensor("zero_weight", zero_weight, dtypes=(torch.float32,), dim=1, op=op)
    v.tensor("w_gate_up", w_gate_up, dtypes=(hidden.dtype,), dim=3, op=op)
    v.tensor("w_down", w_down, dtypes=(hidden.dtype,), dim=3, op=op)
    v.same_device(op, hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, zero_weight=zero_weight,
                  w_gate_up=w_gate_up, w_down=w_down)
    t, dm = hidden.shape
    n, two_di, dm_w = w_gate_up.shape
    if two_di % 2 or dm_w != dm:
        raise ValueError(f"{op}: w_gate_up must be [N, 2*Di, Dm={dm}], got {tuple(w_gate_up.shape)}")
    di = two_di // 2
    if tuple(w_down.shape) != (n, dm, di):
        raise ValueError(f"{op}: w_down must be [N, Dm, Di] = {(n, dm, di)}, got {tuple(w_down.shape)}")
    if topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{op}: topk_ids and topk_weights must both be [T={t}, K], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if tuple(zero_weight.shape) != (t,):
        raise ValueError(f"{op}: zero_weight must be [T={t}], got {tuple(zero_weight.shape)}")
    if t == 0 or n == 0:  # nothing to dispatch: only the identity term (keeps autograd to hidden/zero_weight)
        return (hidden.float() * zero_weight[:, None]).to(hidden.dtype)
    name, impl = EXPERTS_BACKENDS.select(hidden.device, backend)
    if name == "triton":
        hidden, w_gate_up, w_down = hidden.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
        topk_ids = topk_ids.to(torch.int32).contiguous()
    return impl(hidden, topk_ids, topk_weights.contiguous(), zero_weight.contiguous(), w_gate_up, w_down)
