"""mmkernels.ops.moe_route: routing invariants against a float64 reference, gradients, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.moe import moe_route_reference, route_scores
from mmkernels.ops import MoERouting, moe_route
from mmkernels.ops.moe import ROUTE_BACKENDS
from mmkernels.testing import run_opcheck

CPU = torch.device("cpu")
BACKENDS = ROUTE_BACKENDS.available(CPU)  # cpp (when built) and reference

# (T, N, Z, K): one token, K = 1, K = N+Z, LongCat-Flash-Lite's 384 experts, odd sizes, no zero experts.
SHAPES = [(1, 3, 2, 1), (17, 8, 4, 12), (33, 30, 13, 5), (64, 256, 128, 12), (5, 7, 0, 3), (9, 1, 1, 2)]
OPTIONS = [
    dict(scoring="softmax", routed_scaling_factor=6.0, renormalize=False),
    dict(scoring="sigmoid", routed_scaling_factor=2.5, renormalize=True),
    dict(scoring="softmax", routed_scaling_factor=1.0, renormalize=True),
]


def make(t, e, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, e, generator=g) * 2).to(dtype)
    bias = torch.randn(e, generator=g) * 0.02
    return logits, bias


def check_against_reference(r: MoERouting, logits, bias, k, n, **opts):
    """Invariants of the contract, with a float64 oracle. A different pick is accepted only where two biased
    scores tie within float32 rounding."""
    t, e = logits.shape
    scores64 = route_scores(logits.double(), opts["scoring"])
    choice64 = scores64 + bias.double()
    ids = r.topk_ids.long()
    assert r.topk_ids.dtype == torch.int32 and r.topk_ids.shape == (t, k)
    assert r.topk_weights.dtype == torch.float32 and r.zero_weight.shape == (t,)
    assert r.counts.dtype == torch.int32 and r.counts.shape == (e,)
    # the picks are distinct and are a top-k set of the biased scores
    assert all(len(set(row)) == k for row in ids.tolist())
    kth = choice64.gather(1, ids).min(1).values
    not_picked = choice64.scatter(1, ids, float("-inf")).max(1).values
    assert (not_picked <= kth + 1e-6).all(), "a better expert was left out"
    # weights: unbiased scores of the picks (renormalised if asked) x scale, to 1e-6 relative
    w = scores64.gather(1, ids)
    if opts["renormalize"]:
        w = w / w.sum(1, keepdim=True)
    w = w * opts["routed_scaling_factor"]
    torch.testing.assert_close(r.topk_weights.double(), w, rtol=1e-6, atol=1e-7)
    if not opts["renormalize"] and opts["scoring"] == "softmax":
        assert (r.topk_weights.sum(1) <= opts["routed_scaling_factor"] * (1 + 1e-6)).all()
    torch.testing.assert_close(r.zero_weight, (r.topk_weights * (ids >= n)).sum(1), rtol=1e-6, atol=1e-7)
    assert torch.equal(r.counts, torch.bincount(ids.flatten(), minlength=e).to(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,n,z,k", SHAPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=["softmax", "sigmoid-renorm", "softmax-renorm"])
def test_routing_matches_reference(backend, t, n, z, k, opts):
    logits, bias = make(t, n + z)
    r = moe_route(logits, top_k=k, num_ffn_experts=n, bias=bias, backend=backend, **opts)
    check_against_reference(r, logits, bias, k, n, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_id(backend):
    logits = torch.zeros(4, 10)
    logits[:, 7] = 1.0
    r = moe_route(logits, top_k=4, num_ffn_experts=5, backend=backend)
    assert r.topk_ids[:, 0].eq(7).all()
    assert sorted(r.topk_ids[0, 1:].tolist()) == [0, 1, 2]
    bias = torch.zeros(10)
    bias[9] = bias[3] = 0.5  # equal biased scores: 3 before 9
    r = moe_route(torch.zeros(2, 10), top_k=2, num_ffn_experts=5, bias=bias, backend=backend)
    assert sorted(r.topk_ids[0].tolist()) == [3, 9]
    r = moe_route(torch.zeros(2, 10), top_k=1, num_ffn_experts=5, bias=bias, backend=backend)
    assert r.topk_ids.flatten().tolist() == [3, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_steers_the_choice_not_the_weights(backend):
    logits, _ = make(50, 12)
    bias = torch.zeros(12)
    bias[11] = 10.0  # always chosen, weight still its unbiased score
    r = moe_route(logits, top_k=2, num_ffn_experts=8, bias=bias, backend=backend)
    assert r.topk_ids.eq(11).any(1).all()
    p = torch.softmax(logits, -1)
    w11 = (r.topk_weights * r.topk_ids.eq(11)).sum(1)
    torch.testing.assert_close(w11, p[:, 11])
    torch.testing.assert_close(r.zero_weight, w11 + (r.topk_weights * r.topk_ids.ge(8) * r.topk_ids.ne(11)).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_limited_choice(backend):
    t, e, groups, kept, k = 40, 32, 8, 3, 6
    logits, bias = make(t, e, seed=4)
    r = moe_route(logits, top_k=k, num_ffn_experts=24, bias=bias, scoring="sigmoid", renormalize=True,
                  routed_scaling_factor=2.5, n_groups=groups, topk_groups=kept, backend=backend)
    ref = moe_route_reference(logits.double(), bias, k, 24, "sigmoid", 2.5, True, groups, kept)
    assert torch.equal(r.topk_ids.sort(1).values, ref[0].sort(1).values)
    assert ((r.topk_ids // (e // groups)).unique(dim=None).numel() <= kept * t)
    for row in r.topk_ids.tolist():
        assert len({i // (e // groups) for i in row}) <= kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=["softmax", "sigmoid-renorm", "softmax-renorm"])
def test_gradient_to_logits(backend, opts):
    t, n, z, k = 13, 9, 4, 5
    logits, bias = make(t, n + z, seed=2)
    x = logits.clone().requires_grad_()
    r = moe_route(x, top_k=k, num_ffn_experts=n, bias=bias, backend=backend, **opts)
    gw, gz = torch.randn(t, k), torch.randn(t)
    (d,) = torch.autograd.grad((r.topk_weights * gw).sum() + (r.zero_weight * gz).sum(), x)
    x64 = logits.double().requires_grad_()
    ref = moe_route_reference(x64, bias, k, n, **opts)
    assert torch.equal(ref[0], r.topk_ids)
    (d64,) = torch.autograd.grad((ref[1] * gw.double()).sum() + (ref[2] * gz.double()).sum(), x64)
    torch.testing.assert_close(d.double(), d64, rtol=1e-5, atol=1e-6)


def test_half_logits_route_in_fp32():
    logits, bias = make(20, 24, dtype=torch.float16)
    for backend in BACKENDS:
        r = moe_route(logits, top_k=4, num_ffn_experts=16, bias=bias, backend=backend)
        check_against_reference(r, logits.float(), bias, 4, 16, scoring="softmax", routed_scaling_factor=1.0,
                                renormalize=False)


def test_no_tokens():
    for backend in BACKENDS:
        r = moe_route(torch.zeros(0, 6), top_k=2, num_ffn_experts=4, backend=backend)
        assert r.topk_ids.shape == (0, 2) and r.zero_weight.shape == (0,) and r.counts.sum() == 0


@pytest.mark.skipif(not mmkernels.extension_status().loaded, reason="compiled extension not built")
def test_opcheck():
    logits, bias = make(11, 20)
    run_opcheck(torch.ops.mmkernels.moe_route.default,
                (logits.requires_grad_(), bias, 3, 15, "softmax", 6.0, False, 1, 1))
    run_opcheck(torch.ops.mmkernels.moe_route.default, (make(7, 16)[0], None, 4, 12, "sigmoid", 2.5, True, 4, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    logits, bias = make(9, 12)

    def f(x):
        r = moe_route(x, top_k=3, num_ffn_experts=8, bias=bias, routed_scaling_factor=6.0, backend=backend)
        return r.topk_weights.sum() + r.zero_weight.sum()

    torch._dynamo.reset()
    x = logits.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    out.backward()
    x2 = logits.clone().requires_grad_()
    f(x2).backward()
    torch.testing.assert_close(out, f(logits))
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(logits=torch.zeros(4, 8, dtype=torch.int64)), TypeError, "logits must be"),
        (dict(logits=torch.zeros(8)), ValueError, "logits must have 2 dimension"),
        (dict(top_k=9), ValueError, "top_k must be in"),
        (dict(top_k=0), ValueError, "top_k must be in"),
        (dict(num_ffn_experts=9), ValueError, "num_ffn_experts must be in"),
        (dict(bias=torch.zeros(7)), ValueError, "bias must have N\\+Z = 8"),
        (dict(bias=torch.zeros(8, dtype=torch.float64)), TypeError, "bias must be float32"),
        (dict(bias=torch.zeros(8, device="meta")), ValueError, "one device"),
        (dict(scoring="softplus"), ValueError, "scoring must be one of"),
        (dict(n_groups=3), ValueError, "n_groups \\(3\\) must divide"),
        (dict(n_groups=4, topk_groups=5), ValueError, "topk_groups must be in"),
        (dict(n_groups=4, topk_groups=1, top_k=3), ValueError, "exceeds the 2 experts"),
        (dict(renormalize=1), TypeError, "renormalize must be a bool"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(logits=torch.zeros(4, 8), top_k=2, num_ffn_experts=6) | kwargs
    logits = args.pop("logits")
    with pytest.raises(error, match=match):
        moe_route(logits, **args)


@pytest.mark.gpu
@pytest.mark.parametrize("t,n,z,k", SHAPES + [(4096, 512, 256, 12), (100, 700, 324, 16), (33, 1024, 0, 32)])
@pytest.mark.parametrize("opts", OPTIONS, ids=["softmax", "sigmoid-renorm", "softmax-renorm"])
def test_cuda_kernel_matches_reference(t, n, z, k, opts):
    logits, bias = make(t, n + z)
    r = moe_route(logits.cuda(), top_k=k, num_ffn_experts=n, bias=bias.cuda(), backend="cuda", **opts)
    check_against_reference(MoERouting(*(x.cpu() for x in r)), logits, bias, k, n, **opts)


@pytest.mark.gpu
def test_cuda_group_limited_matches_cpu():
    logits, bias = make(300, 256, seed=7)
    kw = dict(top_k=8, num_ffn_experts=256, scoring="sigmoid", renormalize=True, routed_scaling_factor=2.5,
              n_groups=8, topk_groups=4)
    r = moe_route(logits.cuda(), bias=bias.cuda(), backend="cuda", **kw)
    ref = moe_route(logits, bias=bias, backend="reference", **kw)
    assert torch.equal(r.topk_ids.cpu().sort(1).values, ref.topk_ids.sort(1).values)
    torch.testing.assert_close(r.topk_weights.cpu().sort(1).values, ref.topk_weights.sort(1).values)
