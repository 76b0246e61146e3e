"""``batch_invariant``: what the batch-invariant mode (``mmkernels.set_batch_invariant``) costs, op by op.

Each shape times one op twice on the same inputs and backend: ``fast`` (the mode off: the baseline) and
``batch-invariant`` (the whole call, forward and backward, inside the mode), so the speed-up column is the mode's
cost (below 1: slower). The issue's target is at most 15% on a GPU; on a CPU the reference paths run one sequence at
a time and the products in 64-row blocks (``mmkernels.batch_invariance``), which costs more (docs/batch_invariance.md).

Presets: ``quick`` (tiny: the entering and leaving of the mode, about 0.6 ms per call on a CPU, dominates), ``cpu``
(what a CPU run gets by default) and ``default`` (GPU-sized). Shapes: a packed varlen attention batch (8 sequences
of 48-160 tokens), BLIP-2's Q-Former cross-attention (32 queries over padded image tokens), a ViT patch embedding,
routing and grouped SwiGLU experts over tokens, the vision rotary embedding, Flamingo's media cross-attention, and
an ``nn.Linear`` (the products of the rest of a model). FLOPs: the ops' own counts (attention: the attended pairs);
bytes: inputs read and outputs written once.
"""

from __future__ import annotations

import torch

from ... import _config, ops
from ..suite import BenchConfig, Inputs, Shape, Suite, register_suite

FAST, INVARIANT = "fast", "batch-invariant"


class _InMode(torch.autograd.Function):
    """``fn(*inputs)`` with its forward and its backward inside the mode (``enabled``), as a training step in the
    mode runs both; both rows of a shape go through it, so the wrapper's own cost is in both."""

    @staticmethod
    def forward(ctx, fn, enabled, *inputs):
        leaves = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
        with torch.enable_grad(), _config.batch_invariant(enabled):
            out = fn(*leaves)
        ctx.enabled, ctx.leaves, ctx.out = enabled, leaves, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        wrt = [x for x in ctx.leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        with _config.batch_invariant(ctx.enabled):
            grads = iter(torch.autograd.grad(ctx.out, wrt, grad))
        return (None, None, *[next(grads) if isinstance(x, torch.Tensor) and x.requires_grad else None
                              for x in ctx.leaves])


def _pair(fn, grad: bool) -> dict:
    """The two providers of a shape: ``fn(*args)`` with the mode off and on."""
    if grad:
        return {FAST: lambda *a: _InMode.apply(fn, False, *a), INVARIANT: lambda *a: _InMode.apply(fn, True, *a)}

    def run(enabled):
        def call(*a):
            with _config.batch_invariant(enabled):
                return fn(*a)
        return call

    return {FAST: run(False), INVARIANT: run(True)}


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _shapes(config: BenchConfig, ours: list) -> list[Shape]:
    device, dtype = config.device, config.dtype

    def size(quick, cpu, default):
        return {"quick": quick, "cpu": cpu}.get(config.preset, default)

    backend = next((b for b in ours if b is not None), None)
    elem = torch.finfo(dtype).bits // 8
    shapes = []

    def add(name, make, fn, flops, moved, grad=True, **params):
        def make_inputs(grad_mode, make=make):
            args, wrt, out_shape = make(grad_mode)
            grad_out = torch.randn(out_shape, device=device, dtype=dtype) if grad_mode else None
            return Inputs(args, wrt=wrt, grad_out=grad_out)

        shapes.append(Shape(name=name, make_inputs=make_inputs, providers=_pair(fn, grad), baseline=FAST,
                            flops=flops, bytes=moved, params=params, modes=None if grad else ("fwd",)))

    def randn(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    # attention: a packed varlen batch
    lens = size([17, 5, 30], [48, 160, 96, 64], [48, 160, 96, 64, 128, 80, 112, 144])
    h, d = size((2, 16), (4, 64), (8, 64))
    cu = _cu(lens, device)

    def make_attention(grad):
        q, k, v = (randn(sum(lens), h, d, grad=grad) for _ in range(3))
        return (q, k, v), (q, k, v) if grad else (), (sum(lens), h, d)

    add(f"attention varlen {len(lens)} seqs H={h} D={d}", make_attention,
        lambda q, k, v: ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                                      max_seqlen_k=max(lens), backend=backend),
        4.0 * h * d * sum(n * n for n in lens), 4.0 * elem * sum(lens) * h * d, op="attention")
    # causal (a decoder's): the reference's invariant path is then the 64-key online softmax (prefill = decode)
    add(f"attention varlen causal {len(lens)} seqs H={h} D={d}", make_attention,
        lambda q, k, v: ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                                      max_seqlen_k=max(lens), causal=True, backend=backend),
        2.0 * h * d * sum(n * n for n in lens), 4.0 * elem * sum(lens) * h * d, op="attention")

    # Q-Former cross-attention: 32 queries over padded image tokens
    bq, lq, lk, hq, dq = size((3, 8, 20, 2, 16), (4, 32, 257, 12, 64), (8, 32, 257, 12, 64))
    kv_lens = torch.tensor([lk - 3 * i for i in range(bq)], dtype=torch.int32, device=device)

    def make_qformer(grad):
        q, k, v = (randn(bq, n, hq, dq, grad=grad) for n in (lq, lk, lk))
        return (q, k, v), (q, k, v) if grad else (), (bq, lq, hq, dq)

    add(f"qformer_cross_attention B={bq} Lq={lq} Lk={lk}", make_qformer,
        lambda q, k, v: ops.qformer_cross_attention(q, k, v, kv_lens=kv_lens, backend=backend),
        4.0 * bq * lq * lk * hq * dq, elem * bq * (2 * lq + 2 * lk) * hq * dq, op="qformer_cross_attention")

    # patch embedding
    bp, px, p, dim = size((2, 16, 4, 32), (4, 112, 16, 384), (8, 224, 16, 768))
    n_patch = (px // p) ** 2
    weight, bias = randn(dim, 3, p, p), randn(dim)

    def make_patch(grad):
        pixels = randn(bp, 3, px, px, grad=grad)
        return (pixels,), (pixels,) if grad else (), (bp, n_patch, dim)

    add(f"patch_embed B={bp} {px}px P={p} D={dim}", make_patch,
        lambda pixels: ops.patch_embed(pixels, weight, bias, backend=backend),
        2.0 * bp * n_patch * 3 * p * p * dim, elem * (bp * 3 * px * px + bp * n_patch * dim), op="patch_embed")

    # routing and experts
    tokens, hid, inter, n_exp = size((40, 16, 24, 6), (512, 256, 512, 8), (2048, 512, 1024, 16))
    logits = torch.randn(tokens, n_exp + 2, device=device)
    route_backend = backend if backend in (None, "reference") else None

    def make_route(grad):
        return (torch.randn(tokens, n_exp + 2, device=device),), (), None

    add(f"moe_route T={tokens} E={n_exp}+2 top-2", make_route,
        lambda lg: ops.moe_route(lg, top_k=2, num_ffn_experts=n_exp, backend=route_backend).topk_weights,
        10.0 * tokens * (n_exp + 2), 4.0 * tokens * (n_exp + 2), grad=False, op="moe_route")
    routing = ops.moe_route(logits, top_k=2, num_ffn_experts=n_exp)
    w_gu, w_d = randn(n_exp, 2 * inter, hid) * 0.05, randn(n_exp, hid, inter) * 0.05

    def make_experts(grad):
        x = randn(tokens, hid, grad=grad)
        return (x,), (x,) if grad else (), (tokens, hid)

    add(f"moe_experts T={tokens} H={hid} I={inter} N={n_exp}", make_experts,
        lambda x: ops.moe_experts(x, routing, w_gu, w_d, backend=backend),
        2.0 * tokens * 2 * 3 * hid * inter, elem * (2 * tokens * hid + n_exp * 3 * hid * inter), op="moe_experts")

    # rotary
    tr, hr, dr = size((64, 4, 16), (4096, 16, 80), (16384, 16, 80))
    cos, sin = torch.randn(tr, dr, device=device), torch.randn(tr, dr, device=device)

    def make_rotary(grad):
        q, k = randn(tr, hr, dr, grad=grad), randn(tr, hr, dr, grad=grad)
        return (q, k), (q, k) if grad else (), (2 * tr, hr, dr)

    add(f"rotary_embedding T={tr} H={hr} D={dr}", make_rotary,
        lambda q, k: torch.cat(ops.rotary_embedding(q, k, cos, sin, backend=backend)),
        6.0 * tr * hr * dr, elem * 4 * tr * hr * dr, op="rotary_embedding")

    # media cross-attention
    bm, lt, m, nl, hm, dm = size((2, 12, 2, 4, 2, 16), (2, 256, 3, 32, 4, 64), (4, 512, 5, 64, 8, 64))
    ml = torch.zeros(bm, lt, dtype=torch.bool, device=device)
    ml[:, [1, lt // 2]] = True

    def make_media(grad):
        q = randn(bm, lt, hm, dm, grad=grad)
        k, v = randn(bm, m, nl, hm, dm, grad=grad), randn(bm, m, nl, hm, dm, grad=grad)
        return (q, k, v), (q, k, v) if grad else (), (bm, lt, hm, dm)

    add(f"media_cross_attention B={bm} Lt={lt} M={m} Nl={nl}", make_media,
        lambda q, k, v: ops.media_cross_attention(q, k, v, ml, backend=backend),
        4.0 * bm * lt * nl * hm * dm, elem * bm * (2 * lt + 2 * m * nl) * hm * dm, op="media_cross_attention")

    # the products of the rest of a model: nn.Linear (routed aten.mm / addmm)
    rows, k_in, n_out = size((70, 32, 48), (1024, 768, 3072), (4096, 768, 3072))
    lin = torch.nn.Linear(k_in, n_out, device=device, dtype=dtype)

    def make_linear(grad):
        x = randn(rows, k_in, grad=grad)
        return (x,), (x,) if grad else (), (rows, n_out)

    add(f"nn.Linear {rows}x{k_in} -> {n_out}", make_linear, lin, 2.0 * rows * k_in * n_out,
        elem * (rows * k_in + k_in * n_out + rows * n_out), op="aten.addmm")
    return shapes


register_suite(Suite(
    name="batch_invariant",
    description="the batch-invariant mode's cost per op: the same call with the mode off (fast) and on",
    shapes=_shapes,
    ops=("attention", "qformer_cross_attention", "patch_embed", "moe_experts", "rotary_embedding",
         "media_cross_attention"),
    presets=("quick", "cpu", "default"),
    modes=("fwd", "fwd+bwd"),
))
