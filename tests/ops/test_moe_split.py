"""The split MoE pieces for expert parallelism: ``moe_permute`` -> ``moe_grouped_swiglu`` -> ``moe_unpermute``.

Each piece against a float64 loop written here (forward and every gradient), triton (interpreter) against the
reference, odd shapes (T = 0, T = 1, K = 1, K = N+Z, Dm/Di 24/40, experts without rows, every row on one expert),
NaN in rows and weights that must never be read, the composition against ``moe_experts``, a one-process simulation
of the expert-parallel dispatch/combine, opcheck, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.ops import MoEPermutation, moe_experts, moe_grouped_swiglu, moe_permute, moe_unpermute
from mmkernels.ops.moe import PERMUTE_BACKENDS, SWIGLU_BACKENDS, UNPERMUTE_BACKENDS
from mmkernels.testing import TOLERANCES, run_opcheck

CPU = torch.device("cpu")


# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
def _sample_routing(r, tokens):
    return mmkernels.ops.moe_route(r(tokens, 7, seed=4), top_k=2, num_ffn_experts=5, backend="reference")


def _sample_swiglu(r):
    rows, perm = moe_permute(r(9, 12), _sample_routing(r, 9).topk_ids, num_local_experts=5, backend="reference")
    return dict(rows=rows, offsets=perm.offsets, w_gate_up=r(5, 2 * 6, 12, seed=1), w_down=r(5, 12, 6, seed=2))


def _sample_unpermute(r):
    routing = _sample_routing(r, 9)
    rows, perm = moe_permute(r(9, 12), routing.topk_ids, num_local_experts=5, backend="reference")
    return dict(expert_out=rows, permutation=perm, topk_weights=routing.topk_weights,
                zero_weight=routing.zero_weight, hidden=r(9, 12))


def _usage_split(r, op):
    routing = _sample_routing(r, 17)
    hidden = r(17, 12)
    if op == "moe_permute":
        return moe_permute, (hidden, routing.topk_ids), {"num_local_experts": 3, "expert_offset": 1}
    rows, perm = moe_permute(hidden, routing.topk_ids, num_local_experts=5, backend="reference")
    if op == "moe_grouped_swiglu":
        return moe_grouped_swiglu, (rows, perm.offsets, r(5, 2 * 20, 12, seed=1) * 0.2, r(5, 12, 20, seed=2) * 0.2), {}
    return (moe_unpermute, (r(*rows.shape, seed=5), perm, routing.topk_weights),
            {"zero_weight": routing.zero_weight, "hidden": hidden})


SAMPLES = {
    "moe_permute": lambda r: dict(hidden=r(9, 12), topk_ids=_sample_routing(r, 9).topk_ids, num_local_experts=3,
                                  expert_offset=1),
    "moe_grouped_swiglu": _sample_swiglu,
    "moe_unpermute": _sample_unpermute,
}
USAGE_SAMPLES = {op: (lambda r, op=op: _usage_split(r, op)) for op in SAMPLES}

BACKENDS = PERMUTE_BACKENDS.available(CPU)
assert BACKENDS == SWIGLU_BACKENDS.available(CPU) == UNPERMUTE_BACKENDS.available(CPU)
HAS_TRITON = "triton" in BACKENDS
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
NAN = float("nan")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_ids(t, k, n_total, *, seed=0, pattern="random"):
    """int32 [T, K] global ids in [0, n_total) (distinct per token when K <= n_total), or awkward patterns."""
    g = gen(seed)
    if t == 0:
        return torch.zeros(0, k, dtype=torch.int32)
    ids = torch.stack([torch.randperm(n_total, generator=g)[:k] for _ in range(t)])
    if pattern == "one_expert":  # every token's first slot on expert 1, the rest on ids that are never local
        ids[:, 0] = 1
        ids[:, 1:] = -1
    elif pattern == "invalid":  # -1 / out-of-range ids mixed in, one token with none valid
        specials = torch.tensor([-1, -7, n_total + 3, 2**31 - 1])
        pick = torch.rand(t, k, generator=g) < 0.3
        ids = torch.where(pick, specials[torch.randint(0, 4, (t, k), generator=g)], ids)
        ids[0] = -1
    return ids.to(torch.int32)


def tol(dtype):
    return (1e-2, 1e-2) if dtype == torch.float16 else TOLERANCES[dtype]


def assert_close(name, a, b, dtype):
    rtol, atol = tol(dtype)
    scale = max(b.abs().max().item() if b.numel() else 1.0, 1.0)
    assert a.isfinite().all(), f"{name}: NaN/inf (from a row or weight that must not be read)"
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol * 10, atol=atol * 10 * scale,
                               msg=lambda m: f"{name}: {m}")


# ---- moe_permute -------------------------------------------------------------------------------------------------

# (T, K, ids over n_total, E local, expert_offset, pattern)
PERMUTE_CASES = [
    (13, 3, 8, 8, 0, "random"),  # every FFN expert local (moe_experts' plan)
    (13, 3, 8, 3, 2, "random"),  # a rank's slice of the experts
    (17, 4, 9, 4, 5, "invalid"),
    (1, 1, 4, 2, 0, "random"),  # T = 1, K = 1
    (0, 2, 4, 2, 0, "random"),  # T = 0
    (9, 6, 6, 6, 0, "random"),  # K = N+Z (every expert picked by every token)
    (11, 2, 5, 3, 0, "one_expert"),  # every dispatched row on expert 1; experts 0 and 2 empty
    (7, 2, 6, 0, 0, "random"),  # no local experts: nothing dispatched
]


def permute_oracle(hidden, ids, e, offset):
    """(rows, slots, offsets) by a per-slot loop: expert by expert, slots ascending, then the rest ascending."""
    t, k = ids.shape
    flat = [int(i) - offset for i in ids.reshape(-1)]
    per_expert = [[s for s, i in enumerate(flat) if i == j] for j in range(e)]
    rest = [s for s, i in enumerate(flat) if not 0 <= i < e]
    slots = [s for group in per_expert for s in group] + rest
    offsets = [0]
    for group in per_expert:
        offsets.append(offsets[-1] + len(group))
    end = offsets[-1]
    rows = [hidden[s // k] if r < end else torch.zeros_like(hidden[0]) for r, s in enumerate(slots)]
    rows = torch.stack(rows) if rows else hidden.new_zeros((0, hidden.shape[1]))
    return rows, torch.tensor(slots, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,k,n_total,e,offset,pattern", PERMUTE_CASES)
def test_permute_matches_loop(backend, dtype, t, k, n_total, e, offset, pattern):
    dm = 24
    x = torch.randn(t, dm, generator=gen(1)).to(dtype)
    ids = make_ids(t, k, n_total, seed=2, pattern=pattern)
    xx = x.clone().requires_grad_()
    rows, perm = moe_permute(xx, ids, num_local_experts=e, expert_offset=offset, backend=backend)
    assert isinstance(perm, MoEPermutation) and perm.slots.dtype == perm.offsets.dtype == torch.int32
    want_rows, want_slots, want_offsets = permute_oracle(x.double(), ids, e, offset)
    assert torch.equal(perm.offsets, want_offsets)
    assert torch.equal(perm.slots, want_slots)
    assert torch.equal(rows.double(), want_rows)  # a copy: exact, and zero past offsets[-1]
    # Gradient: each token sums its dispatched rows; NaN in the gradient of undispatched rows must not leak.
    end = int(want_offsets[-1])
    grad = torch.randn(rows.shape, generator=gen(3)).to(dtype)
    grad[end:] = NAN
    (dx,) = torch.autograd.grad(rows, xx, grad)
    want_dx = torch.zeros(t, dm, dtype=torch.float64)
    for r in range(end):
        want_dx[int(want_slots[r]) // k] += grad[r].double()
    assert_close("d hidden", dx, want_dx, dtype)


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_permute_triton_equals_reference(deterministic):
    x = torch.randn(31, 40, generator=gen(4))
    ids = make_ids(31, 5, 12, seed=5, pattern="invalid")
    grad = torch.randn(31 * 5, 40, generator=gen(6))
    out = {}
    with mmkernels.deterministic(deterministic):
        for b in ("triton", "reference"):
            xx = x.clone().requires_grad_()
            rows, perm = moe_permute(xx, ids, num_local_experts=4, expert_offset=3, backend=b)
            out[b] = (rows, *perm, *torch.autograd.grad(rows, xx, grad))
    for a, b in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, b)


# ---- moe_grouped_swiglu ------------------------------------------------------------------------------------------


def swiglu_oracle(rows, offsets, wgu, wd):
    """float64, one row at a time: rows outside [offsets[0], offsets[-1]) are zero."""
    di = wgu.shape[1] // 2
    out = torch.zeros_like(rows)
    offs = offsets.tolist()
    for e in range(len(offs) - 1):
        for r in range(offs[e], offs[e + 1]):
            gu = wgu[e] @ rows[r]
            out[r] = wd[e] @ (F.silu(gu[:di]) * gu[di:])
    return out


def weights(e, dm, di, dtype, seed=7):
    g = gen(seed)
    return ((torch.randn(e, 2 * di, dm, generator=g) / dm**0.5).to(dtype),
            (torch.randn(e, dm, di, generator=g) / di**0.5).to(dtype))


# (counts per expert, padding rows after them, Dm, Di)
SWIGLU_CASES = [
    ([5, 0, 9, 3], 4, 24, 40),  # an expert without rows, padding rows
    ([0, 17, 0], 0, 40, 24),  # every row on one expert
    ([1], 0, 33, 17),  # one row, one expert
    ([0, 0], 3, 24, 16),  # nothing dispatched: only padding
    ([], 0, 24, 16),  # M = 0, E = 0
    ([70, 2], 5, 24, 40),  # more rows than one fp32/fp16 tile
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts,pad,dm,di", SWIGLU_CASES)
def test_grouped_swiglu_matches_loop(backend, dtype, counts, pad, dm, di):
    e, m = len(counts), sum(counts) + pad
    offsets = torch.tensor([0, *torch.tensor(counts, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    rows = torch.randn(m, dm, generator=gen(8)).to(dtype)
    rows[m - pad:] = NAN  # padding rows are never read
    wgu, wd = weights(e, dm, di, dtype)
    grad = torch.randn(m, dm, generator=gen(9)).to(dtype)
    grad[m - pad:] = NAN  # nor is the gradient of a padding row
    leaves = [a.clone().requires_grad_() for a in (rows, wgu, wd)]
    out = moe_grouped_swiglu(leaves[0], offsets, leaves[1], leaves[2], backend=backend)
    assert out.shape == (m, dm) and out.dtype == dtype
    assert (out[m - pad:] == 0).all()
    got = [out, *(g if g is not None else torch.zeros_like(a)  # E = 0: the weights are not used
                  for g, a in zip(torch.autograd.grad(out, leaves, grad, allow_unused=True), leaves))]
    leaves64 = [torch.nan_to_num(rows.double()).requires_grad_(), wgu.double().requires_grad_(),
                wd.double().requires_grad_()]
    out64 = swiglu_oracle(leaves64[0], offsets, *leaves64[1:])
    if out64.requires_grad:
        want = [out64, *torch.autograd.grad(out64, leaves64, torch.nan_to_num(grad.double()), allow_unused=True)]
        want = [w if w is not None else torch.zeros_like(a) for w, a in zip(want, [out64, *leaves64])]
    else:  # no row in any group: nothing depends on the inputs
        want = [out64, *(torch.zeros_like(a) for a in leaves64)]
    for name, a, b in zip(["out", "rows", "w_gate_up", "w_down"], got, want):
        assert_close(name, a, b, dtype)
    assert (got[1][m - pad:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_swiglu_clamps_bad_offsets(backend):
    # Decreasing and out-of-range offsets are used as clamp(0, M) + running max: never an out-of-bounds read.
    m, dm, di = 12, 24, 16
    rows = torch.randn(m, dm, generator=gen(10))
    wgu, wd = weights(3, dm, di, torch.float32)
    bad = torch.tensor([-4, 5, 3, 100], dtype=torch.int32)
    fixed = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    torch.testing.assert_close(moe_grouped_swiglu(rows, bad, wgu, wd, backend=backend),
                               moe_grouped_swiglu(rows, fixed, wgu, wd, backend=backend), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_swiglu_triton_equals_reference(dtype):
    offsets = torch.tensor([0, 4, 4, 30, 31], dtype=torch.int64)  # int64 offsets accepted
    rows = torch.randn(35, 40, generator=gen(11)).to(dtype)
    wgu, wd = weights(4, 40, 24, dtype)
    torch.testing.assert_close(moe_grouped_swiglu(rows, offsets, wgu, wd, backend="triton"),
                               moe_grouped_swiglu(rows, offsets, wgu, wd, backend="reference"),
                               rtol=tol(dtype)[0] * 10, atol=tol(dtype)[1] * 10)


# ---- moe_unpermute -----------------------------------------------------------------------------------------------


def unpermute_oracle(expert_out, slots, end, w, k, zw=None, hidden=None):
    t = w.shape[0]
    out = torch.zeros(t, expert_out.shape[1], dtype=torch.float64) + expert_out[:0].sum()  # in the graph
    for r in range(min(end, expert_out.shape[0])):
        s = int(slots[r])
        out[s // k] = out[s // k] + w[s // k, s % k] * expert_out[r]
    if hidden is not None:
        out = out + zw[:, None] * hidden
    return out


@pytest.mark.parametrize("backend,deterministic", [(b, d) for b in BACKENDS for d in (False, True)
                                                   if not (b == "reference" and d)])  # the reference has one mode
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,k,n_total,e,offset,pattern", PERMUTE_CASES)
@pytest.mark.parametrize("rows_given", ["all", "dispatched"])
def test_unpermute_matches_loop(backend, dtype, deterministic, t, k, n_total, e, offset, pattern, rows_given):
    dm = 40
    ids = make_ids(t, k, n_total, seed=12, pattern=pattern)
    _, perm = moe_permute(torch.zeros(t, dm), ids, num_local_experts=e, expert_offset=offset, backend="reference")
    end = int(perm.offsets[-1])
    m = t * k if rows_given == "all" else end  # e.g. only the rows that came back from the other ranks
    expert_out = torch.randn(m, dm, generator=gen(13)).to(dtype)
    expert_out[end:] = NAN  # rows of undispatched slots are never read
    w = torch.rand(t, k, generator=gen(14)) * 2
    local = ids.long() - offset
    undispatched = (local < 0) | (local >= e)
    w = torch.where(undispatched, NAN, w)  # nor are their weights
    zw = torch.rand(t, generator=gen(15))
    hidden = torch.randn(t, dm, generator=gen(16)).to(dtype)
    grad = torch.randn(t, dm, generator=gen(17)).to(dtype)
    for with_zero in (False, True):
        leaves = [a.clone().requires_grad_() for a in (expert_out, w, zw, hidden)]
        extra = dict(zero_weight=leaves[2], hidden=leaves[3]) if with_zero else {}
        with mmkernels.deterministic(deterministic):
            y = moe_unpermute(leaves[0], perm, leaves[1], backend=backend, **extra)
            got = [y, *torch.autograd.grad(y, leaves, grad, allow_unused=True)]
        assert y.shape == (t, dm) and y.dtype == dtype
        l64 = [torch.nan_to_num(a.double()).requires_grad_() for a in (expert_out, w, zw, hidden)]
        y64 = unpermute_oracle(l64[0], perm.slots, end, l64[1], k, *((l64[2], l64[3]) if with_zero else ()))
        want = [y64, *torch.autograd.grad(y64, l64, grad.double(), allow_unused=True)]
        for name, a, b, leaf in zip(["out", "expert_out", "topk_weights", "zero_weight", "hidden"], got, want,
                                    [y64, *l64]):
            a = a if a is not None else torch.zeros_like(leaf)
            b = b if b is not None else torch.zeros_like(leaf)
            assert_close(f"{name} (zero term {with_zero})", a, b, dtype)
        assert (got[2][undispatched] == 0).all()


# ---- the composition -----------------------------------------------------------------------------------------------


def split_experts(x, r, wgu, wd, backend):
    rows, perm = moe_permute(x, r[0], num_local_experts=wgu.shape[0], backend=backend)
    out = moe_grouped_swiglu(rows, perm.offsets, wgu, wd, backend=backend)
    return moe_unpermute(out, perm, r[1], zero_weight=r[2], hidden=x, backend=backend)


def routing(t, n, z, k, seed, pattern="random"):
    ids = make_ids(t, k, n + z, seed=seed, pattern=pattern)
    w = torch.rand(t, k, generator=gen(seed + 1))
    return ids, w, (w * (ids >= n)).sum(1)


def grads_of(fn, x, r, wgu, wd, grad):
    leaves = [a.clone().requires_grad_() for a in (x, r[1], r[2], wgu, wd)]
    y = fn(leaves[0], (r[0], leaves[1], leaves[2]), leaves[3], leaves[4])
    return [y, *torch.autograd.grad(y, leaves, grad)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,n,z,k,dm,di,pattern", [(23, 5, 3, 3, 24, 40, "random"), (1, 3, 2, 5, 40, 24, "random"),
                                                   (15, 4, 2, 2, 24, 16, "one_expert"),
                                                   (19, 6, 2, 4, 33, 17, "invalid")])
def test_composition_equals_moe_experts(backend, dtype, t, n, z, k, dm, di, pattern):
    x = torch.randn(t, dm, generator=gen(20)).to(dtype)
    wgu, wd = weights(n, dm, di, dtype)
    r = routing(t, n, z, k, 21, pattern)
    grad = torch.randn(t, dm, generator=gen(22)).to(dtype)
    split = grads_of(lambda *a: split_experts(*a, backend), x, r, wgu, wd, grad)
    fused = grads_of(lambda *a: moe_experts(*a, backend=backend), x, r, wgu, wd, grad)
    for name, a, b in zip(["out", "hidden", "topk_weights", "zero_weight", "w_gate_up", "w_down"], split, fused):
        assert_close(name, a, b.double(), dtype)


@needs_triton
def test_composition_forward_is_bit_identical_in_fp32_deterministic():
    # Same plan, same tiles, same fp32 products (the weight multiplies the fp32 row in both), same slot-order sum.
    t, n, z, k, dm, di = 29, 6, 3, 4, 40, 24
    x = torch.randn(t, dm, generator=gen(23))
    wgu, wd = weights(n, dm, di, torch.float32)
    r = routing(t, n, z, k, 24, "invalid")
    with mmkernels.deterministic():
        assert torch.equal(split_experts(x, r, wgu, wd, "triton"), moe_experts(x, r, wgu, wd, backend="triton"))


def test_expert_parallel_dispatch_and_combine_in_one_process():
    """What ExpertParallelMoE does with W ranks, all-to-all replaced by lists: each source rank permutes its slots
    over all N experts (rows come out grouped by destination), ships each rank its rows with their global ids;
    each expert rank permutes what it received (K = 1) over its N/W local experts, runs its grouped SwiGLU and
    unpermutes with weight 1; the rows travel back and the source unpermutes with its routing weights and the
    zero-expert term. The result and every gradient equal moe_experts on each source's tokens."""
    n, z, k, dm, di, w_ranks = 6, 2, 3, 24, 40, 3
    per = n // w_ranks
    wgu, wd = weights(n, dm, di, torch.float32)
    sources = []
    for s, t in enumerate([11, 0, 7]):  # one source rank without tokens
        x = torch.randn(t, dm, generator=gen(30 + s))
        sources.append((x, routing(t, n, z, k, 40 + s, "invalid" if s == 2 else "random")))
    wgu_p, wd_p = wgu.clone().requires_grad_(), wd.clone().requires_grad_()
    leaves = [[x.clone().requires_grad_(), r[1].clone().requires_grad_(), r[2].clone().requires_grad_()]
              for x, r in sources]
    # dispatch
    plans, inbox = [], [[] for _ in range(w_ranks)]
    for (x, _, _), (_, r) in zip(leaves, sources):
        rows, perm = moe_permute(x, r[0], num_local_experts=n)
        bounds = perm.offsets[::per].tolist()  # host read: the all-to-all split sizes
        ids = r[0].reshape(-1)[perm.slots.long()]
        for dst in range(w_ranks):
            inbox[dst].append((rows[bounds[dst]:bounds[dst + 1]], ids[bounds[dst]:bounds[dst + 1]]))
        plans.append(perm)
    # expert ranks
    outbox = []
    for dst in range(w_ranks):
        recv = torch.cat([rows for rows, _ in inbox[dst]])
        recv_ids = torch.cat([ids for _, ids in inbox[dst]])[:, None]
        rows, perm = moe_permute(recv, recv_ids, num_local_experts=per, expert_offset=dst * per)
        out = moe_grouped_swiglu(rows, perm.offsets, wgu_p[dst * per:(dst + 1) * per], wd_p[dst * per:(dst + 1) * per])
        back = moe_unpermute(out, perm, torch.ones(recv.shape[0], 1))
        outbox.append(list(back.split([rows.shape[0] for rows, _ in inbox[dst]])))
    # combine
    total = 0
    ys = []
    for s, ((x, tw, zw), perm) in enumerate(zip(leaves, plans)):
        returned = torch.cat([outbox[dst][s] for dst in range(w_ranks)])
        y = moe_unpermute(returned, perm, tw, zero_weight=zw, hidden=x)
        ys.append(y)
        total = total + (y * torch.randn(y.shape, generator=gen(50 + s))).sum()
    total.backward()
    # the same on one rank with moe_experts
    wgu_r, wd_r = wgu.clone().requires_grad_(), wd.clone().requires_grad_()
    total_r = 0
    for s, (x, r) in enumerate(sources):
        ref_leaves = [x.clone().requires_grad_(), r[1].clone().requires_grad_(), r[2].clone().requires_grad_()]
        y = moe_experts(ref_leaves[0], (r[0], ref_leaves[1], ref_leaves[2]), wgu_r, wd_r)
        assert_close(f"source {s} out", ys[s], y.detach().double(), torch.float32)
        total_r = total_r + (y * torch.randn(y.shape, generator=gen(50 + s))).sum()
        grads_r = torch.autograd.grad(total_r, ref_leaves, retain_graph=True, allow_unused=True)
        for name, a, b in zip(["hidden", "topk_weights", "zero_weight"], leaves[s], grads_r):
            b = b if b is not None else torch.zeros_like(a)  # T = 0: moe_experts does not read the weights
            assert_close(f"source {s} d {name}", a.grad, b.double(), torch.float32)
    gw = torch.autograd.grad(total_r, [wgu_r, wd_r])
    assert_close("d w_gate_up", wgu_p.grad, gw[0].double(), torch.float32)
    assert_close("d w_down", wd_p.grad, gw[1].double(), torch.float32)


@pytest.fixture
def poisoned_empty():
    """torch.empty and friends return NaN-filled memory: an output or gradient row left unwritten shows up."""
    torch.use_deterministic_algorithms(True)
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_split_pieces_leave_no_uninitialised_memory(backend, deterministic, poisoned_empty):
    assert torch.empty(3).isnan().all()
    t, n, z, k, dm, di = 17, 5, 3, 3, 24, 40
    x = torch.randn(t, dm, generator=gen(90))
    wgu, wd = weights(n, dm, di, torch.float32)
    r = routing(t, n, z, k, 91, "invalid")
    grad = torch.randn(t, dm, generator=gen(92))
    with mmkernels.deterministic(deterministic):
        leaves = [a.clone().requires_grad_() for a in (x, r[1], r[2], wgu, wd)]
        rows, perm = moe_permute(leaves[0], r[0], num_local_experts=n, backend=backend)
        out = moe_grouped_swiglu(rows, perm.offsets, leaves[3], leaves[4], backend=backend)
        y = moe_unpermute(out, perm, leaves[1], zero_weight=leaves[2], hidden=leaves[0], backend=backend)
        got = [rows, out, y, *torch.autograd.grad(y, leaves, grad)]
    for name, a in zip(["rows", "expert_out", "out", "hidden", "topk_weights", "zero_weight", "w_gate_up",
                        "w_down"], got):
        assert a.isfinite().all(), f"{name}: uninitialised memory"
    fused = grads_of(lambda *a: moe_experts(*a, backend="reference"), x, r, wgu, wd, grad)
    for name, a, b in zip(["out", "hidden", "topk_weights", "zero_weight", "w_gate_up", "w_down"], got[2:], fused):
        assert_close(name, a, b.double(), torch.float32)


# ---- opcheck, torch.compile --------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_permute_and_unpermute(deterministic):
    t, k, dm = 9, 3, 24
    ids = make_ids(t, k, 7, seed=60, pattern="invalid")
    x = torch.randn(t, dm, requires_grad=True)
    run_opcheck(torch.ops.mmkernels.moe_permute.default, (x, ids, 3, 2, deterministic))
    rows, slots, offsets = torch.ops.mmkernels.moe_permute(x.detach(), ids, 3, 2, deterministic)
    w = torch.rand(t, k, requires_grad=True)
    expert_out = torch.randn(t * k, dm, requires_grad=True)
    zw, hidden = torch.rand(t, requires_grad=True), torch.randn(t, dm, requires_grad=True)
    run_opcheck(torch.ops.mmkernels.moe_unpermute.default, (expert_out, slots, offsets, w, zw, hidden, deterministic))
    run_opcheck(torch.ops.mmkernels.moe_unpermute.default, (expert_out[:5], slots, offsets, w, None, None,
                                                            deterministic))


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_permute_and_unpermute_backward_ops(deterministic):
    """The backward ops the Triton permute/unpermute register (their combine and gather kernels): opcheck, and their
    values against autograd through the reference backend."""
    t, k, dm = 9, 3, 24
    ids = make_ids(t, k, 7, seed=61, pattern="invalid")
    x = torch.randn(t, dm)
    rows, slots, offsets = torch.ops.mmkernels.moe_permute(x, ids, 3, 2, deterministic)
    grad_rows = torch.randn(t * k, dm)
    run_opcheck(torch.ops.mmkernels.moe_permute_bwd_triton.default, (grad_rows, slots, offsets, t, k, deterministic))
    xr = x.clone().requires_grad_()
    (moe_permute(xr, ids, num_local_experts=3, expert_offset=2, backend="reference")[0] * grad_rows).sum().backward()
    torch.testing.assert_close(torch.ops.mmkernels.moe_permute_bwd_triton(grad_rows, slots, offsets, t, k,
                                                                          deterministic), xr.grad)
    w, zw, hidden, g = torch.rand(t, k), torch.rand(t), torch.randn(t, dm), torch.randn(t, dm)
    for extra in ((zw, hidden), (None, None)):
        run_opcheck(torch.ops.mmkernels.moe_unpermute_bwd_triton.default, (g, rows, slots, offsets, w, *extra))
    got = torch.ops.mmkernels.moe_unpermute_bwd_triton(g, rows, slots, offsets, w, zw, hidden)
    leaves = [a.clone().requires_grad_() for a in (rows, w, zw, hidden)]
    y = moe_unpermute(leaves[0], MoEPermutation(slots, offsets), leaves[1], zero_weight=leaves[2], hidden=leaves[3],
                      backend="reference")
    for a, b in zip(got, torch.autograd.grad(y, leaves, g)):
        torch.testing.assert_close(a, b)


@needs_triton
def test_opcheck_grouped_swiglu():
    from mmkernels.kernels.triton import moe as tk

    m, dm, di = 20, 24, 16
    offsets = torch.tensor([0, 6, 6, 17], dtype=torch.int32)
    g = tk.tiles(offsets, m, tk.block_m(torch.float32))
    wgu, wd = weights(3, dm, di, torch.float32)
    args = (torch.randn(m, dm, requires_grad=True), g.offsets, g.tile_expert, g.tile_row, wgu.requires_grad_(),
            wd.requires_grad_())
    run_opcheck(torch.ops.mmkernels.moe_grouped_swiglu_fwd_triton.default, args)


@needs_triton
@pytest.mark.parametrize("dynamic", [False, True])
def test_split_pieces_compile_fullgraph(dynamic):
    n, z, k, dm, di = 3, 2, 2, 24, 16
    wgu, wd = weights(n, dm, di, torch.float32)

    def f(x, r):
        return split_experts(x, r, wgu, wd, "triton").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for t in (10, 13):  # a second token count: recompiles (static) or reuses the graph (dynamic)
        r = routing(t, n, z, k, 70 + t, "invalid")
        x = torch.randn(t, dm, generator=gen(t), requires_grad=True)
        out = compiled(x, r)
        out.backward()
        x2 = x.detach().clone().requires_grad_()
        ref = f(x2, r)
        ref.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(x.grad, x2.grad)


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_permute_bad_input():
    x, ids = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        moe_permute(x, ids.float(), num_local_experts=2)
    with pytest.raises(ValueError, match=r"topk_ids must be \[T=4, K\]"):
        moe_permute(x, ids[:3], num_local_experts=2)
    with pytest.raises(ValueError, match="num_local_experts must be"):
        moe_permute(x, ids, num_local_experts=-1)
    with pytest.raises(TypeError, match="expert_offset must be an int"):
        moe_permute(x, ids, num_local_experts=2, expert_offset=1.0)
    with pytest.raises(ValueError, match="expert_offset must be (in|>=)"):
        moe_permute(x, ids, num_local_experts=2, expert_offset=-2)
    with pytest.raises(TypeError, match="hidden must be"):
        moe_permute(x.long(), ids, num_local_experts=2)


def test_grouped_swiglu_bad_input():
    rows, offsets = torch.randn(6, 8), torch.tensor([0, 3, 6], dtype=torch.int32)
    wgu, wd = weights(2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="offsets must have E\\+1 = 3 entries"):
        moe_grouped_swiglu(rows, offsets[:2], wgu, wd)
    with pytest.raises(TypeError, match="offsets must be int32 or int64"):
        moe_grouped_swiglu(rows, offsets.float(), wgu, wd)
    with pytest.raises(TypeError, match="w_gate_up must be float32"):
        moe_grouped_swiglu(rows, offsets, wgu.half(), wd)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_grouped_swiglu(rows, offsets, wgu, wd[:, :, :-1])
    with pytest.raises(ValueError, match="w_gate_up must be"):
        moe_grouped_swiglu(rows[:, :-1], offsets, wgu, wd)


def test_unpermute_bad_input():
    t, k, dm = 4, 2, 8
    _, perm = moe_permute(torch.randn(t, dm), torch.zeros(t, k, dtype=torch.int32), num_local_experts=1)
    out, w = torch.randn(t * k, dm), torch.rand(t, k)
    with pytest.raises(TypeError, match="permutation must be a MoEPermutation"):
        moe_unpermute(out, perm.slots, w)
    with pytest.raises(ValueError, match="slots must have T\\*K = 6"):
        moe_unpermute(out, perm, w[:3])
    with pytest.raises(ValueError, match="more than the T\\*K"):
        moe_unpermute(torch.randn(t * k + 1, dm), perm, w)
    with pytest.raises(ValueError, match="give zero_weight and hidden together"):
        moe_unpermute(out, perm, w, zero_weight=torch.rand(t))
    with pytest.raises(TypeError, match="hidden must be float32"):
        moe_unpermute(out, perm, w, zero_weight=torch.rand(t), hidden=torch.randn(t, dm).half())
    with pytest.raises(ValueError, match="zero_weight must be \\[T=4\\]"):
        moe_unpermute(out, perm, w, zero_weight=torch.rand(t + 1), hidden=torch.randn(t, dm))
    with pytest.raises(TypeError, match="topk_weights must be float32"):
        moe_unpermute(out, perm, w.double())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_composition_matches_moe_experts(dtype):
    t, n, z, k, dm, di = 300, 16, 8, 6, 200, 136
    dev = torch.device("cuda")
    x = torch.randn(t, dm, generator=gen(80)).to(dtype)
    wgu, wd = weights(n, dm, di, dtype)
    r = routing(t, n, z, k, 81, "invalid")
    grad = torch.randn(t, dm, generator=gen(82)).to(dtype)
    on = [a.to(dev) for a in (x, wgu, wd, grad)]
    r_dev = tuple(a.to(dev) for a in r)
    split = grads_of(lambda *a: split_experts(*a, "triton"), on[0], r_dev, on[1], on[2], on[3])
    fused = grads_of(lambda *a: moe_experts(*a, backend="triton"), on[0], r_dev, on[1], on[2], on[3])
    for name, a, b in zip(["out", "hidden", "topk_weights", "zero_weight", "w_gate_up", "w_down"], split, fused):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * scale, msg=lambda m, name=name: name)


# ---- moe_unpermute: slots and offsets a caller hands in follow one rule on every backend (finding 10) --------------

def _combine_oracle(expert_out, slots, end, weights, zero_weight, hidden):
    """Row by row in float64: rows r < clamp(end, 0, M) whose slot is in [0, T*K) add w[slot] * row to token
    slot // K; other rows are not read."""
    t, k = weights.shape
    out = hidden.double() * zero_weight.double()[:, None]
    for r in range(min(max(end, 0), expert_out.shape[0])):
        s = int(slots[r])
        if 0 <= s < t * k:
            out[s // k] += weights.reshape(-1)[s].double() * expert_out[r].double()
    return out


BAD_SLOTS = {
    # name: (slot edits {row: value}, offsets[-1] or None to keep)
    "int64 slot 2**32 (not slot 0)": ({0: 2**32, 3: 2**32 + 5}, None),
    "negative slots": ({1: -1, 4: -7}, None),
    "slots >= T*K": ({2: 14, 5: 2**31 - 1}, None),
    "negative offsets[-1]": ({}, -3),
    "offsets[-1] past M": ({}, 10**6),
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_SLOTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_unpermute_out_of_range_slots_and_offsets_follow_one_rule(backend, case, deterministic):
    """Rows whose slot is outside [0, T*K) are not read (NaN in them and in their weights stays out), int64 slots are
    never narrowed, and offsets[-1] is clamped into [0, M]: the same values on every backend, no raw IndexError, and
    the backward runs with zero gradient for rows not read."""
    g = gen(5)
    t, k, c = 7, 2, 5
    edits, end = BAD_SLOTS[case]
    slots = torch.randperm(t * k, generator=g).to(torch.int64)
    for r, s in edits.items():
        slots[r] = s
    m = t * k
    offsets = torch.tensor([0, 4, m if end is None else end], dtype=torch.int64)
    expert_out = torch.randn(m, c, generator=g)
    weights = torch.rand(t, k, generator=g)
    zero_weight, hidden = torch.rand(t, generator=g), torch.randn(t, c, generator=g)
    for r in edits:  # rows not read may hold anything
        expert_out[r] = float("nan")
    want = _combine_oracle(expert_out, slots, int(offsets[-1]), weights, zero_weight, hidden)
    x = expert_out.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    with mmkernels.deterministic(deterministic):
        got = moe_unpermute(x, MoEPermutation(slots, offsets), w, zero_weight=zero_weight, hidden=hidden,
                            backend=backend)
        got.sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for r in edits:
        assert torch.equal(x.grad[r], torch.zeros(c)), r
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    if end is not None and end < 0:
        assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
