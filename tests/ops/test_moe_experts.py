"""mmkernels.ops.moe_experts: grouped SwiGLU experts vs a per-expert loop in float64, forward and every gradient,
the zero-expert and imbalance edge cases, invalid expert ids (never dispatched, their weights never read),
no uninitialised memory in outputs or gradients, bit-identity with the pre-split Triton path, deterministic
combine, opcheck, torch.compile, bad input. The split pieces are in test_moe_split.py."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.moe import moe_experts_reference
from mmkernels.ops import MoERouting, moe_experts
from mmkernels.ops.moe import EXPERTS_BACKENDS
from mmkernels.testing import TOLERANCES, run_opcheck

CPU = torch.device("cpu")


# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
def _sample_routing(r, tokens):
    return mmkernels.ops.moe_route(r(tokens, 7, seed=4), top_k=2, num_ffn_experts=5, backend="reference")


SAMPLES = {
    "moe_experts": lambda r: dict(hidden=r(9, 12), routing=_sample_routing(r, 9), w_gate_up=r(5, 2 * 6, 12, seed=1),
                                  w_down=r(5, 12, 6, seed=2)),
}
USAGE_SAMPLES = {
    "moe_experts": lambda r: (moe_experts, (r(17, 12), _sample_routing(r, 17), r(5, 2 * 20, 12, seed=1) * 0.2,
                                            r(5, 12, 20, seed=2) * 0.2), {}),
}

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
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_triton(deterministic):
    from mmkernels.kernels.triton import moe as tk

    t, n, z, k, dm, di = 11, 3, 2, 2, 32, 16
    r = routing(t, n, z, k)
    r.topk_ids[0, 0] = -1
    wgu, wd = weights(n, dm, di, torch.float32)
    order, offsets = tk.align(r.topk_ids, n)
    g = tk.tiles(offsets, t * k, tk.block_m(torch.float32))
    args = (torch.randn(t, dm, requires_grad=True), r.topk_weights.requires_grad_(), r.zero_weight.requires_grad_(),
            wgu.requires_grad_(), wd.requires_grad_(), order, g.offsets, g.tile_expert, g.tile_row, deterministic)
    run_opcheck(torch.ops.mmkernels.moe_experts_fwd_triton.default, args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_fullgraph(dynamic):
    t, n, z, k, dm, di = 10, 3, 2, 2, 16, 16
    r = routing(t, n, z, k)
    r.topk_ids[1, 1] = -1  # the plan (sort, offsets, tile map) is traced: invalid ids too
    wgu, wd = weights(n, dm, di, torch.float32)
    x = torch.randn(t, dm, requires_grad=True)

    def f(x):
        return moe_experts(x, r, wgu, wd, backend="triton").square().sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")(x)
    out.backward()
    torch.testing.assert_close(out, f(x.detach()))
    x2 = x.detach().clone().requires_grad_()
    f(x2).backward()
    torch.testing.assert_close(x.grad, x2.grad)


# ---- invalid expert ids in a caller-built routing tuple --------------------------------------------------------------
# Rule (every backend): a slot whose id is negative or >= N goes to no expert GEMM and contributes nothing; its
# topk_weights entry is never read and gets gradient 0; the output is zero_weight * x plus the valid FFN slots.

INT32_MAX = 2**31 - 1


def slot_loop(x, ids, w, zw, wgu, wd):
    """The float64 oracle for the rule, one token and one slot at a time: slots with id outside [0, N) skipped."""
    n, di = wgu.shape[0], wgu.shape[1] // 2
    rows = []
    for t in range(x.shape[0]):
        y = x[t] * zw[t]
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < n:
                gu = wgu[e] @ x[t]
                y = y + w[t, j] * (wd[e] @ (torch.nn.functional.silu(gu[:di]) * gu[di:]))
        rows.append(y)
    return torch.stack(rows) if rows else x * zw[:, None]


def invalid_routing(t, n, z, k, *, seed=0, all_invalid=False, int64=False):
    """ids with -1, -7, N (a zero expert), N+Z+3, int32 max (and 2**40 for int64) mixed with valid ids; row 0
    entirely invalid, row 1 entirely zero experts or invalid; NaN and inf in the weights of every undispatched slot
    (never read: they must not reach the output or any gradient)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n + z, (t, k), generator=g, dtype=torch.int64)
    specials = torch.tensor([-1, -7, n, n + z + 3, INT32_MAX] + ([2**40, -(2**40)] if int64 else []))
    pick = torch.rand(t, k, generator=g) < 0.4
    ids = torch.where(pick, specials[torch.randint(0, len(specials), (t, k), generator=g)], ids)
    if t > 0:
        ids[0] = -1
    if t > 1:
        ids[1] = specials[torch.arange(k) % 4 + 1]
    if all_invalid:
        ids = specials[torch.randint(0, len(specials), (t, k), generator=g)]
    ids = ids if int64 else ids.to(torch.int32)
    w = torch.rand(t, k, generator=g) * 1.5
    undispatched = (ids < 0) | (ids >= n)
    poison = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.arange(t * k) % 3].view(t, k)
    w = torch.where(undispatched, poison, w)
    zw = torch.rand(t, generator=g)
    return ids, w, zw


def run_rule(backend, x, ids, w, zw, wgu, wd, grad):
    leaves = [a.clone().requires_grad_() for a in (x, w, zw, wgu, wd)]
    if backend == "loop":
        y = slot_loop(*leaves[:1], ids, *leaves[1:])
    else:
        y = moe_experts(leaves[0], (ids, *leaves[1:3]), *leaves[3:], backend=backend)
    grads = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    return [y, *(g if g is not None else torch.zeros_like(a) for g, a in zip(grads, leaves))]


def assert_rule(backend, dtype, t, n, z, k, dm, di, **kw):
    x = torch.randn(t, dm, generator=torch.Generator().manual_seed(kw.get("seed", 0))).to(dtype)
    wgu, wd = weights(n, dm, di, dtype)
    ids, w, zw = invalid_routing(t, n, z, k, **kw)
    grad = torch.randn(t, dm, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = run_rule(backend, x, ids, w, zw, wgu, wd, grad)
    want = run_rule("loop", x.double(), ids, w.double(), zw.double(), wgu.double(), wd.double(), grad.double())
    rtol, atol = (1e-2, 1e-2) if dtype == torch.float16 else TOLERANCES[dtype]
    for name, a, b in zip(NAMES, got, want):
        assert a.isfinite().all(), f"{backend} {name}: NaN/inf leaked from an undispatched slot's weight"
        scale = max(b.abs().max().item() if b.numel() else 1.0, 1.0)
        torch.testing.assert_close(a.double(), b, rtol=rtol * 10, atol=atol * 10 * scale,
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")
    undispatched = (ids < 0) | (ids >= n)
    assert (got[2][undispatched] == 0).all(), "an undispatched slot's weight got a gradient"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,n,z,k,dm,di", [(19, 5, 3, 4, 24, 40), (1, 3, 2, 2, 16, 8), (2, 4, 2, 6, 33, 17)])
def test_invalid_ids_are_not_dispatched_fp32(backend, t, n, z, k, dm, di):
    assert_rule(backend, torch.float32, t, n, z, k, dm, di)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_ids_are_not_dispatched_fp16(backend):
    assert_rule(backend, torch.float16, 23, 5, 3, 3, 40, 24, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_int64_ids_are_not_wrapped(backend):
    # int64 ids past the int32 range (2**40) must stay invalid, not wrap to a valid id when narrowed.
    assert_rule(backend, torch.float32, 17, 4, 2, 3, 24, 16, int64=True, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_all_invalid_batch_is_scaled_identity(backend, deterministic):
    t, n, z, k, dm, di = 9, 4, 2, 3, 24, 16
    with mmkernels.deterministic(deterministic):
        y, dx, dw, dzw, dgu, dd = assert_rule(backend, torch.float32, t, n, z, k, dm, di, all_invalid=True, seed=6)
    assert (dw == 0).all() and (dgu == 0).all() and (dd == 0).all()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_agrees_with_reference_on_invalid_ids(dtype, deterministic):
    t, n, z, k, dm, di = 21, 6, 2, 5, 40, 24
    with mmkernels.deterministic(deterministic):
        ours = assert_rule("triton", dtype, t, n, z, k, dm, di, seed=7)
    ref = assert_rule("reference", dtype, t, n, z, k, dm, di, seed=7)
    for name, a, b in zip(NAMES, ours, ref):
        tol = 1e-2 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def poisoned_empty():
    """torch.empty (and new_empty, empty_like) return NaN-filled memory, so a padding row or slot that an output or
    gradient leaves unwritten shows up as NaN."""
    torch.use_deterministic_algorithms(True)
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_no_uninitialised_memory_in_outputs_or_gradients(backend, deterministic, poisoned_empty):
    assert torch.empty(4).isnan().all()  # the fixture is in effect
    with mmkernels.deterministic(deterministic):
        assert_rule(backend, torch.float32, 15, 4, 3, 3, 24, 40, seed=8)  # experts 0..3, several empty ones


# ---- the Triton path is bit-identical to the implementation before the split ----------------------------------------


def _previous_triton_path(x, ids, w, zw, wgu, wd, grad, deterministic):
    """The monolithic Triton path as it was before the split pieces (bincount alignment, plan recomputed in the
    backward), kept as a private oracle: moe_experts must reproduce it bit for bit."""
    import torch.nn.functional as F

    from mmkernels.kernels.triton import moe as tk

    t, dm = x.shape
    n, two_di, _ = wgu.shape
    di, k = two_di // 2, ids.shape[1]
    flat = ids.reshape(-1).long()
    key = torch.where(flat < n, flat, n)
    order = torch.sort(key, stable=True).indices
    ends = torch.bincount(key, minlength=n + 1)[:n].cumsum(0)
    g = tk.tiles(torch.cat([ends.new_zeros(1), ends]), t * k, tk.block_m(x.dtype))
    token = (order // k).to(torch.int32)
    scale = w.reshape(-1)[order].contiguous()
    ffn = (ids < n)[..., None]

    def combine(rows, base):
        slot_rows = torch.empty_like(rows).index_copy_(0, order, rows).view(t, k, -1)
        return base.float() * zw[:, None] + torch.where(ffn, slot_rows, 0.0).sum(1)

    def tr(a):
        return a.stride(0), a.stride(2), a.stride(1)

    def asis(a):
        return a.stride(0), a.stride(1), a.stride(2)

    h = x.new_empty((t * k, di))
    tk.grouped_gemm(x, wgu, tr(wgu), h, g, n=di, k=dm, a_index=token, up_offset=di)
    if deterministic:
        yr = x.new_empty((t * k, dm), dtype=torch.float32)
        tk.grouped_gemm(h, wd, tr(wd), yr, g, n=dm, k=di, scale=scale)
        y = combine(yr, x).to(x.dtype)
    else:
        y = x.float() * zw[:, None]
        tk.grouped_gemm(h, wd, tr(wd), y, g, n=dm, k=di, c_index=token, scale=scale)
        y = y.to(x.dtype)
    gu = x.new_empty((t * k, 2 * di), dtype=torch.float32)
    tk.grouped_gemm(x, wgu, tr(wgu), gu, g, n=2 * di, k=dm, a_index=token)
    gate, up = gu[:, :di], gu[:, di:]
    act = F.silu(gate)
    hh = act * up
    dhp = x.new_empty((t * k, di), dtype=torch.float32)
    tk.grouped_gemm(grad, wd, asis(wd), dhp, g, n=di, k=dm, a_index=token)
    d_w_sorted = torch.where(torch.arange(t * k) < ends[-1:], (dhp * hh).sum(-1), 0.0)
    d_w = torch.zeros(t * k).index_copy_(0, order, d_w_sorted)
    d_w = torch.where(ids.reshape(-1) < n, d_w, 0.0).view(t, k)
    dh = dhp * scale[:, None]
    sig = torch.sigmoid(gate)
    d_gu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * act], dim=1).to(x.dtype)
    d_zw = (grad.float() * x.float()).sum(-1)
    if deterministic:
        rows = x.new_empty((t * k, dm), dtype=torch.float32)
        tk.grouped_gemm(d_gu, wgu, asis(wgu), rows, g, n=dm, k=2 * di)
        dx = combine(rows, grad).to(x.dtype)
    else:
        dx = grad.float() * zw[:, None]
        tk.grouped_gemm(d_gu, wgu, asis(wgu), dx, g, n=dm, k=2 * di, c_index=token)
        dx = dx.to(x.dtype)
    d_wd = tk.grouped_wgrad(grad, hh.to(x.dtype), torch.empty_like(wd), g, a_index=token, scale=scale)
    d_wgu = tk.grouped_wgrad(d_gu, x, torch.empty_like(wgu), g, b_index=token)
    return [y, dx, d_w, d_zw, d_wgu, d_wd]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("t,n,z,k,dm,di,pattern", [(37, 6, 3, 3, 40, 24, "random"), (1, 4, 2, 2, 24, 16, "random"),
                                                   (19, 5, 4, 3, 24, 16, "one_expert"),
                                                   (29, 5, 0, 5, 72, 20, "random")])
def test_triton_bit_identical_to_previous_path(dtype, deterministic, t, n, z, k, dm, di, pattern):
    x = torch.randn(t, dm).to(dtype)
    wgu, wd = weights(n, dm, di, dtype)
    r = routing(t, n, z, k, pattern=pattern)
    grad = torch.randn(t, dm).to(dtype)
    with mmkernels.deterministic(deterministic):
        leaves = [a.clone().requires_grad_() for a in (x, r.topk_weights, r.zero_weight, wgu, wd)]
        y = moe_experts(leaves[0], (r.topk_ids, *leaves[1:3]), *leaves[3:], backend="triton")
        ours = [y, *torch.autograd.grad(y, leaves, grad)]
    before = _previous_triton_path(x, r.topk_ids, r.topk_weights, r.zero_weight, wgu, wd, grad, deterministic)
    for name, a, b in zip(NAMES, ours, before):
        assert torch.equal(a, b), f"{name}: differs from the previous implementation by {(a - b).abs().max()}"


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
