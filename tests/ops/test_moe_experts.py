"""mmkernels.ops.moe_experts: grouped SwiGLU experts vs a per-expert loop in float64, forward and every gradient,
the zero-expert and imbalance edge cases, deterministic combine, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.moe import moe_experts_reference
from mmkernels.ops import MoERouting, moe_experts
from mmkernels.ops.moe import EXPERTS_BACKENDS
from mmkernels.testing import TOLERANCES, run_opcheck

CPU = torch.device("cpu")
BACKENDS = EXPERTS_BACKENDS.available(CPU)  # triton (interpreter) and reference
HAS_TRITON = "triton" in BACKENDS


def routing(t, n, z, k, *, seed=0, pattern="random"):
    """Random routing of T tokens over N FFN + Z zero experts, or a deliberately awkward pattern."""
    g = torch.Generator().manual_seed(seed)
    e = n + z
    if pattern == "random":
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    elif pattern == "all_zero":  # every slot of every token on a zero expert
        ids = torch.stack([n + torch.randperm(z, generator=g)[:k] for _ in range(t)])
    elif pattern == "one_expert":  # every token's only FFN expert is expert 2; other experts get nothing
        ids = torch.stack([torch.cat([torch.tensor([2]), n + torch.randperm(z, generator=g)[: k - 1]])
                           for _ in range(t)])
    elif pattern == "some_zero":  # the first half of the tokens only on zero experts
        ids = torch.stack([n + torch.randperm(z, generator=g)[:k] if i < t // 2
                           else torch.randperm(e, generator=g)[:k] for i in range(t)])
    ids = ids.to(torch.int32)
    w = torch.rand(t, k, generator=g) * 1.5
    zw = (w * (ids >= n)).sum(1)
    return MoERouting(ids, w, zw, torch.bincount(ids.flatten().long(), minlength=e).to(torch.int32))


def weights(n, dm, di, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, 2 * di, dm, generator=g) / dm**0.5).to(dtype),
            (torch.randn(n, dm, di, generator=g) / di**0.5).to(dtype))


def run_and_grad(backend, x, r, wgu, wd, grad):
    leaves = [x.clone().requires_grad_(), r.topk_weights.clone().requires_grad_(),
              r.zero_weight.clone().requires_grad_(), wgu.clone().requires_grad_(), wd.clone().requires_grad_()]
    xx, tw, zw, g1, g2 = leaves
    if backend == "float64":  # the oracle: the per-expert loop, in float64
        y = moe_experts_reference(xx, r.topk_ids, tw, zw, g1, g2)
    else:
        y = moe_experts(xx, MoERouting(r.topk_ids, tw, zw, r.counts), g1, g2, backend=backend)
    grads = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    return y, [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves)]  # unused: 0


def truth(x, r, wgu, wd, grad):
    return run_and_grad("float64", x.double(), MoERouting(r.topk_ids, r.topk_weights.double(),
                        r.zero_weight.double(), r.counts), wgu.double(), wd.double(), grad.double())


# (T, N, Z, K, Dm, Di): hidden sizes not multiples of 64; K = 1; K = N+Z; one token; LongCat-like ratios.
SHAPES = [(37, 6, 3, 3, 40, 24), (1, 4, 2, 2, 24, 16), (29, 5, 0, 5, 72, 20), (16, 3, 4, 7, 33, 17),
          (20, 8, 4, 1, 48, 32)]
NAMES = ["out", "hidden", "topk_weights", "zero_weight", "w_gate_up", "w_down"]


def check(backend, x, r, wgu, wd, dtype):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    y, grads = run_and_grad(backend, x, r, wgu, wd, grad)
    y64, grads64 = truth(x, r, wgu, wd, grad)
    rtol, atol = TOLERANCES[dtype]
    if dtype == torch.float16:  # fp16 operands through two GEMMs: the flash-attn-style bar vs PyTorch's own fp16
        rtol, atol = 1e-2, 1e-2
    for name, a, b in zip(NAMES, (y, *grads), (y64, *grads64)):
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b, rtol=rtol * 10, atol=atol * 10 * max(scale, 1.0),
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("t,n,z,k,dm,di", SHAPES)
def test_triton_matches_loop_fp32(t, n, z, k, dm, di):
    x = torch.randn(t, dm)
    wgu, wd = weights(n, dm, di, torch.float32)
    check("triton", x, routing(t, n, z, k), wgu, wd, torch.float32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_matches_loop_fp16():
    t, n, z, k, dm, di = 24, 5, 3, 3, 48, 32
    x = torch.randn(t, dm).half()
    wgu, wd = weights(n, dm, di, torch.float16)
    check("triton", x, routing(t, n, z, k), wgu, wd, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["all_zero", "one_expert", "some_zero"])
def test_imbalanced_routing(backend, pattern):
    t, n, z, k, dm, di = 19, 5, 4, 3, 24, 16
    x = torch.randn(t, dm)
    wgu, wd = weights(n, dm, di, torch.float32)
    check(backend, x, routing(t, n, z, k, pattern=pattern), wgu, wd, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_slots_is_scaled_identity(backend):
    t, n, z, k, dm, di = 7, 3, 5, 2, 16, 16
    x = torch.randn(t, dm)
    wgu, wd = weights(n, dm, di, torch.float32)
    r = routing(t, n, z, k, pattern="all_zero")
    torch.testing.assert_close(moe_experts(x, r, wgu, wd, backend=backend), x * r.zero_weight[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    wgu, wd = weights(3, 16, 8, torch.float32)
    x = torch.zeros(0, 16, requires_grad=True)
    r = routing(0, 3, 2, 2)
    y = moe_experts(x, r, wgu, wd, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_deterministic_combine_is_bitwise_repeatable():
    t, n, z, k, dm, di = 33, 4, 2, 4, 40, 24
    x = torch.randn(t, dm)
    wgu, wd = weights(n, dm, di, torch.float32)
    r = routing(t, n, z, k)
    grad = torch.randn(t, dm)
    with mmkernels.deterministic():
        y1, g1 = run_and_grad("triton", x, r, wgu, wd, grad)
        y2, g2 = run_and_grad("triton", x, r, wgu, wd, grad)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    y3, g3 = run_and_grad("triton", x, r, wgu, wd, grad)  # the atomic path agrees to rounding
    torch.testing.assert_close(y1, y3)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_int64_ids_accepted():
    t, n, z, k, dm, di = 9, 3, 2, 2, 16, 16
    x = torch.randn(t, dm)
    wgu, wd = weights(n, dm, di, torch.float32)
    r = routing(t, n, z, k)
    r64 = MoERouting(r.topk_ids.long(), r.topk_weights, r.zero_weight, r.counts)
    torch.testing.assert_close(moe_experts(x, r64, wgu, wd, backend="triton"), moe_experts(x, r, wgu, wd))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_opcheck_triton():
    t, n, z, k, dm, di = 11, 3, 2, 2, 32, 16
    r = routing(t, n, z, k)
    wgu, wd = weights(n, dm, di, torch.float32)
    args = (torch.randn(t, dm, requires_grad=True), r.topk_ids, r.topk_weights.requires_grad_(),
            r.zero_weight.requires_grad_(), wgu.requires_grad_(), wd.requires_grad_(), False)
    run_opcheck(torch.ops.mmkernels.moe_experts_triton.default, args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_compiles_fullgraph():
    t, n, z, k, dm, di = 10, 3, 2, 2, 16, 16
    r = routing(t, n, z, k)
    wgu, wd = weights(n, dm, di, torch.float32)
    x = torch.randn(t, dm, requires_grad=True)

    def f(x):
        return moe_experts(x, r, wgu, wd, backend="triton").square().sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    out.backward()
    torch.testing.assert_close(out, f(x.detach()))
    x2 = x.detach().clone().requires_grad_()
    f(x2).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def _good():
    t, n, z, k, dm, di = 6, 3, 2, 2, 16, 8
    wgu, wd = weights(n, dm, di, torch.float32)
    return dict(hidden=torch.randn(t, dm), routing=routing(t, n, z, k), w_gate_up=wgu, w_down=wd)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden must be"),
        (lambda a: a.update(hidden=a["hidden"][None]), ValueError, "hidden must have 2 dimension"),
        (lambda a: a.update(w_gate_up=a["w_gate_up"].half()), TypeError, "w_gate_up must be float32"),
        (lambda a: a.update(w_gate_up=a["w_gate_up"][:, :, :-1]), ValueError, "w_gate_up must be"),
        (lambda a: a.update(w_gate_up=a["w_gate_up"][:, :-1]), ValueError, "w_gate_up must be"),
        (lambda a: a.update(w_down=a["w_down"][:2]), ValueError, "w_down must be"),
        (lambda a: a.update(routing=a["routing"]._replace(topk_ids=a["routing"].topk_ids.float())), TypeError,
         "topk_ids must be int32 or int64"),
        (lambda a: a.update(routing=a["routing"]._replace(topk_weights=a["routing"].topk_weights[:, :1])),
         ValueError, "topk_ids and topk_weights must both be"),
        (lambda a: a.update(routing=a["routing"]._replace(zero_weight=a["routing"].zero_weight[:-1])), ValueError,
         "zero_weight must be"),
        (lambda a: a.update(routing=a["routing"]._replace(topk_weights=a["routing"].topk_weights.to("meta"))),
         ValueError, "one device"),
        (lambda a: a.update(routing=[1, 2, 3]), TypeError, "routing must be a MoERouting"),
    ],
)
def test_bad_input(change, error, match):
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        moe_experts(args["hidden"], args["routing"], args["w_gate_up"], args["w_down"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["random", "one_expert", "some_zero"])
def test_gpu_matches_loop(dtype, pattern):
    t, n, z, k, dm, di = 300, 16, 8, 6, 200, 136
    x = torch.randn(t, dm).to(dtype)
    wgu, wd = weights(n, dm, di, dtype)
    r = routing(t, n, z, k, pattern=pattern)
    dev = torch.device("cuda")
    grad = torch.randn(t, dm).to(dtype)
    y, grads = run_and_grad("triton", x.to(dev), MoERouting(*(v.to(dev) for v in r)), wgu.to(dev), wd.to(dev),
                            grad.to(dev))
    y_ref, grads_ref = run_and_grad("reference", x, r, wgu, wd, grad)  # same-dtype PyTorch reference
    y64, grads64 = truth(x, r, wgu, wd, grad)
    for name, a, b, c in zip(NAMES, (y, *grads), (y_ref, *grads_ref), (y64, *grads64)):
        ours = (a.cpu().double() - c).abs().max().item()
        theirs = (b.double() - c).abs().max().item()
        assert ours <= 2 * theirs + 1e-5 * c.abs().max().item(), f"{name}: {ours:.3e} vs reference {theirs:.3e}"
