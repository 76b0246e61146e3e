"""mmkernels.ops.moe_route: routing invariants against a float64 reference, gradients, opcheck, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.moe import moe_route_reference, route_scores
from mmkernels.ops import MoERouting, moe_route
from mmkernels.ops.moe import ROUTE_BACKENDS
from mmkernels.testing import run_opcheck

CPU = torch.device("cpu")
# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
SAMPLES = {
    "moe_route": lambda r: dict(logits=r(9, 8), top_k=2, num_ffn_experts=6, bias=r(8, seed=1) * 0.1,
                                scoring="softmax", routed_scaling_factor=1.5, renormalize=False, n_groups=2,
                                topk_groups=2),
}
USAGE_SAMPLES = {
    "moe_route": lambda r: (moe_route, (r(33, 12) * 3,), {"top_k": 3, "num_ffn_experts": 8,
                                                          "bias": r(12, seed=1) * 0.1, "routed_scaling_factor": 2.5}),
}
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



# (T, E, K, n_groups, topk_groups, logit kind): every path of the C++ selection. K > 64 (full sort), E > 2048 (many
# blocks), ties en masse (rounded logits: hundreds of equal keys), E not a multiple of 16, one expert per group,
# enough tokens for several score blocks and threads.
EXACT_CASES = [(5, 100, 70, 1, 1, "randn"), (3, 2600, 8, 1, 1, "randn"), (9, 384, 12, 1, 1, "ties"),
               (6, 43, 7, 1, 1, "ties"), (11, 768, 12, 8, 4, "ties"), (4, 12, 5, 12, 6, "randn"),
               (7, 1, 1, 1, 1, "randn"), (8, 384, 12, 1, 1, "zeros"), (300, 384, 12, 1, 1, "ties"),
               (257, 768, 12, 8, 4, "randn")]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("t,e,k,groups,kept,kind", EXACT_CASES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_cpp_ids_equal_the_reference_exactly(t, e, k, groups, kept, kind, scoring):
    """The C++ kernel takes its scores from ATen's own kernels: the same bits, hence the same ids, even on ties."""
    g = torch.Generator().manual_seed(t * e)
    logits = {"randn": torch.randn(t, e, generator=g), "ties": torch.randint(0, 3, (t, e), generator=g).float(),
              "zeros": torch.zeros(t, e)}[kind]
    bias = torch.randint(0, 2, (e,), generator=g).float() * 0.5
    kw = dict(top_k=k, num_ffn_experts=e // 2, bias=bias, scoring=scoring, routed_scaling_factor=1.5,
              renormalize=True, n_groups=groups, topk_groups=kept)
    r, ref = moe_route(logits, backend="cpp", **kw), moe_route(logits, backend="reference", **kw)
    assert torch.equal(r.topk_ids, ref.topk_ids) and torch.equal(r.counts, ref.counts)
    assert torch.equal(r.topk_ids, oracle_ids(logits, bias, k, scoring, groups, kept))
    torch.testing.assert_close(r.topk_weights, ref.topk_weights)
    torch.testing.assert_close(r.zero_weight, ref.zero_weight)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
def test_cpp_same_bits_on_any_thread_count():
    """Tokens split over threads, per-thread count histograms: the result must not depend on the split."""
    logits, bias = make(1000, 768, seed=9)
    kw = dict(top_k=12, num_ffn_experts=512, bias=bias, routed_scaling_factor=6.0, backend="cpp")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moe_route(logits, **kw)
        torch.set_num_threads(max(2, threads))
        many = moe_route(logits, **kw)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    assert one.counts.sum() == 1000 * 12

# ---- non-finite and extreme input: the same answer on every backend -------------------------------------------------

NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf"), "+1e30": 1e30, "-1e30": -1e30,
             "-120": -120.0}
# (T=7, N=12, Z=4, K=4); groups of 4 experts, 2 kept, when group-limited. Rows: clean; one FFN expert; one zero
# expert; one expert per group; the whole row; all but two experts; the first and the last expert.
NF_N, NF_Z, NF_K = 12, 4, 4
NF_ROWS = [[], [3], [14], [1, 5, 9, 13], list(range(16)), [e for e in range(16) if e not in (6, 11)], [0, 15]]
NF_BIAS = {"bias-some": [2, 7, 12], "bias-all": list(range(16))}


def nonfinite_case(kind, where, with_bias):
    """Logits [7, 16] and bias [16] (or None) with the kind's value at the positions of NF_ROWS / NF_BIAS."""
    logits, bias = make(len(NF_ROWS), NF_N + NF_Z, seed=11)
    value = NONFINITE[kind]
    if where == "logits":
        for row, cols in enumerate(NF_ROWS):
            logits[row, cols] = value
    else:
        bias[NF_BIAS[where]] = value
    return logits, (bias if with_bias else None)


def _rank_key(i, v):
    """The contract's selection order as a sort key: numbers by value descending, then NaN; lower id on ties."""
    return (1, 0.0, i) if math.isnan(v) else (0, -v, i)


def oracle_ids(logits, bias, k, scoring, n_groups, topk_groups):
    """The selection order written out in plain Python, row by row (independent of every backend)."""
    choice = route_scores(logits, scoring)
    if bias is not None:
        choice = choice + bias
    size = choice.shape[1] // n_groups
    out = []
    for row in choice.tolist():
        excluded = set()
        if n_groups > 1:
            group_value = []
            for g in range(n_groups):
                top = sorted(_rank_key(e, row[e]) for e in range(g * size, (g + 1) * size))[:2]
                vals = torch.tensor([row[key[2]] for key in top], dtype=torch.float32)  # the fp32 sum
                group_value.append(float(vals.sum()) if len(vals) == 1 else float(vals[0] + vals[1]))
            kept = sorted(_rank_key(g, v) for g, v in enumerate(group_value))[:topk_groups]
            kept_groups = {key[2] for key in kept}
            excluded = {e for e in range(len(row)) if e // size not in kept_groups}
        order = sorted(range(len(row)), key=lambda e: (e in excluded, *_rank_key(e, row[e])))
        out.append(order[:k])
    return torch.tensor(out, dtype=torch.int32)


def _route_with_grad(logits, bias, backend, **kw):
    """(routing, d logits) of sum(w * gw) + sum(zero_weight * gz), with fixed random gw, gz."""
    x = logits.clone().requires_grad_()
    r = moe_route(x, bias=bias, backend=backend, **kw)
    g = torch.Generator().manual_seed(5)
    gw, gz = torch.randn(r.topk_weights.shape, generator=g), torch.randn(r.zero_weight.shape, generator=g)
    (d,) = torch.autograd.grad((r.topk_weights * gw).sum() + (r.zero_weight * gz).sum(), x)
    return r, d


def assert_same_routing(r, ref, d=None, d_ref=None):
    assert torch.equal(r.topk_ids.cpu(), ref.topk_ids), "different experts"
    assert torch.equal(r.counts.cpu(), ref.counts)
    torch.testing.assert_close(r.topk_weights.cpu(), ref.topk_weights, equal_nan=True)
    torch.testing.assert_close(r.zero_weight.cpu(), ref.zero_weight, equal_nan=True)
    if d is not None:
        torch.testing.assert_close(d.cpu(), d_ref, equal_nan=True, rtol=1e-5, atol=1e-6)


NF_CASES = [(kind, where, with_bias) for kind in NONFINITE for where, with_bias in
            [("logits", False), ("logits", True), ("bias-some", True), ("bias-all", True)]]
NF_OPTIONS = [(scoring, renorm, groups) for scoring in ("softmax", "sigmoid") for renorm in (False, True)
              for groups in (1, 4)]
NF_CASE_IDS = [f"{kind}-{where}-{'bias' if with_bias else 'nobias'}" for kind, where, with_bias in NF_CASES]
NF_OPTION_IDS = [f"{s}-{'renorm' if r else 'raw'}-g{g}" for s, r, g in NF_OPTIONS]


@pytest.mark.parametrize("kind,where,with_bias", NF_CASES, ids=NF_CASE_IDS)
@pytest.mark.parametrize("scoring,renormalize,n_groups", NF_OPTIONS, ids=NF_OPTION_IDS)
def test_nonfinite_input_same_on_every_backend(kind, where, with_bias, scoring, renormalize, n_groups):
    logits, bias = nonfinite_case(kind, where, with_bias)
    kw = dict(top_k=NF_K, num_ffn_experts=NF_N, scoring=scoring, routed_scaling_factor=2.5, renormalize=renormalize,
              n_groups=n_groups, topk_groups=2 if n_groups > 1 else 1)
    ref, d_ref = _route_with_grad(logits, bias, "reference", **kw)
    # ids: valid, distinct, and the contract's order (checked against plain Python, not only across backends)
    assert torch.equal(ref.topk_ids, oracle_ids(logits, bias, NF_K, scoring, kw["n_groups"], kw["topk_groups"]))
    assert all(len(set(row)) == NF_K for row in ref.topk_ids.tolist())
    # NaN weights only where a NaN score was picked or renormalised over; zero_weight reads the zero slots only
    scores = route_scores(logits, scoring)
    picked_nan = scores.gather(1, ref.topk_ids.long()).isnan()
    expect_nan = picked_nan.any(1, keepdim=True).expand_as(picked_nan) if renormalize else picked_nan
    assert torch.equal(ref.topk_weights.isnan(), expect_nan)
    zero_slot = ref.topk_ids >= NF_N
    assert torch.equal(ref.zero_weight.isnan(), (expect_nan & zero_slot).any(1))
    # NaN scores come only from a NaN logit, or under softmax a +inf logit or a row of -inf (row 4)
    if where != "logits" or not (kind == "nan" or (scoring == "softmax" and kind in ("+inf", "-inf"))):
        assert torch.isfinite(ref.topk_weights).all() and torch.isfinite(d_ref).all()
    for backend in BACKENDS:
        if backend != "reference":
            r, d = _route_with_grad(logits, bias, backend, **kw)
            assert_same_routing(r, ref, d, d_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_of_very_negative_logits_renormalises_to_zero(backend):
    """HF DeepSeek-V3 divides by sum + 1e-20: all-zero picks give zero weights and zero, finite gradients."""
    x = torch.full((3, 16), -120.0, requires_grad=True)
    r = moe_route(x, top_k=4, num_ffn_experts=12, bias=torch.zeros(16), scoring="sigmoid", renormalize=True,
                  routed_scaling_factor=2.5, backend=backend)
    assert r.topk_ids.tolist() == [[0, 1, 2, 3]] * 3  # all tie: the lowest ids
    assert torch.equal(r.topk_weights, torch.zeros(3, 4)) and torch.equal(r.zero_weight, torch.zeros(3))
    (r.topk_weights.sum() + r.zero_weight.sum()).backward()
    assert torch.equal(x.grad, torch.zeros(3, 16))
    # tiny but non-zero scores (sigmoid(-80) ~ 1.8e-35) still get finite weights and gradients
    x = torch.full((2, 16), -80.0, requires_grad=True)
    r = moe_route(x, top_k=4, num_ffn_experts=12, scoring="sigmoid", renormalize=True, backend=backend)
    r.topk_weights.sum().backward()
    assert torch.isfinite(r.topk_weights).all() and torch.isfinite(x.grad).all()
    p = torch.sigmoid(torch.tensor(-80.0))
    torch.testing.assert_close(r.topk_weights, (p / (4 * p + 1e-20)).expand(2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ranks_below_minus_inf_and_shows_in_the_weights(backend):
    logits = torch.zeros(2, 6)
    logits[0, 0] = float("nan")  # softmax: the whole row NaN, ids by id order, weights NaN (not hidden)
    bias = torch.tensor([0.0, float("nan"), float("-inf"), float("nan"), 1.0, 0.0])
    r = moe_route(logits, top_k=5, num_ffn_experts=4, bias=bias, backend=backend)
    assert r.topk_ids[0].tolist() == [0, 1, 2, 3, 4] and r.topk_weights[0].isnan().all()
    # row 1: 4 (1.0 + p) > 0 = 5 (tie, lower id first) > 2 (-inf) > 1 = 3 (NaN, lower id first)
    assert r.topk_ids[1].tolist() == [4, 0, 5, 2, 1]
    assert torch.isfinite(r.topk_weights[1]).all()
    torch.testing.assert_close(r.zero_weight[1], r.topk_weights[1, 0] + r.topk_weights[1, 2])
    assert r.counts.tolist() == [2, 2, 2, 1, 2, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,where,with_bias", NF_CASES, ids=NF_CASE_IDS)
@pytest.mark.parametrize("scoring,renormalize,n_groups", NF_OPTIONS, ids=NF_OPTION_IDS)
def test_cuda_nonfinite_input_matches_reference(kind, where, with_bias, scoring, renormalize, n_groups):
    logits, bias = nonfinite_case(kind, where, with_bias)
    kw = dict(top_k=NF_K, num_ffn_experts=NF_N, scoring=scoring, routed_scaling_factor=2.5, renormalize=renormalize,
              n_groups=n_groups, topk_groups=2 if n_groups > 1 else 1)
    ref, d_ref = _route_with_grad(logits, bias, "reference", **kw)
    r, d = _route_with_grad(logits.cuda(), None if bias is None else bias.cuda(), "cuda", **kw)
    assert_same_routing(r, ref, d, d_ref)
