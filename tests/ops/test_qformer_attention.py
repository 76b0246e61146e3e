"""mmkernels.ops.qformer_cross_attention: forward and every gradient against a float64 reference (flash-attn's 2x
rule), Lk = 1 / 257 / 677, mixed kv_lens, B = 1, the split-K path and its combine, opcheck, torch.compile, bad
input, masked keys holding NaN/inf never leaking (eager and compiled), unchecked kv_lens clamped, float64, dropout.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32/fp16, small grid); larger grids are GPU tests."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import BackendError
from mmkernels.kernels.reference.qformer_attention import qformer_attention_reference
from mmkernels.ops import qformer_cross_attention
from mmkernels.ops.qformer_attention import QFORMER_BACKENDS
from mmkernels.testing import assert_within_ref_error, run_opcheck

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
SAMPLES = {
    "qformer_cross_attention": lambda r: dict(q=r(2, 3, 2, 8), k=r(2, 6, 2, 8, seed=1), v=r(2, 6, 2, 8, seed=2),
                                              kv_lens=torch.tensor([6, 2], dtype=torch.int32), softmax_scale=0.4,
                                              validate_kv_lens=True, dropout_p=0.0),
}
USAGE_SAMPLES = {
    "qformer_cross_attention": lambda r: (qformer_cross_attention,
                                          (r(2, 5, 3, 8), r(2, 11, 3, 8, seed=1), r(2, 11, 3, 8, seed=2)),
                                          {"kv_lens": torch.tensor([11, 4], dtype=torch.int32)}),
}
TRITON_CPU = "triton" in QFORMER_BACKENDS.available(CPU)

# (B, Lq, H, D, Lk, kv_lens): BLIP-2 shape at 224 px and 364 px (B = 1), one key, mixed lengths with a length-1
# sample, 128 queries x head dim 128, non-power-of-two head dims.
SHAPES = [
    (2, 32, 2, 64, 257, None),
    (1, 32, 1, 64, 677, None),
    (2, 7, 3, 40, 1, None),
    (3, 5, 2, 24, 97, [1, 50, 97]),
    (1, 128, 1, 128, 33, None),
    (2, 1, 1, 3, 17, [17, 4]),
]
GPU_SHAPES = [
    (256, 32, 12, 64, 257, None),
    (32, 32, 12, 64, 577, None),
    (1, 32, 12, 64, 677, None),
    (4, 32, 12, 64, 677, [677, 257, 1, 500]),
    (8, 96, 4, 128, 300, None),
    (3, 17, 5, 72, 129, [129, 64, 2]),
    (2, 128, 2, 111, 1025, [1000, 1025]),
]


def _ids(shapes):
    return [f"B{b}-Lq{q}-H{h}-D{d}-Lk{k}" + ("-lens" if lens else "") for b, q, h, d, k, lens in shapes]


def make(B, Lq, H, D, Lk, lens, dtype, device, *, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g)
    if strided:  # K and V as slices of one projection, like QFormer's hoisted K/V GEMM
        kv = torch.randn(B, Lk, 2, H, D, generator=g)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k, v = torch.randn(B, Lk, H, D, generator=g), torch.randn(B, Lk, H, D, generator=g)
    dout = torch.randn(B, Lq, H, D, generator=g)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), dout.to(**to), kv_lens


def fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def check_against_reference(fn, q, k, v, dout, kv_lens, scale=None):
    """Ours vs a float64 truth, allowed 2x the error of the same-dtype PyTorch reference (forward and grads)."""
    ours = fwd_bwd(fn, q, k, v, dout)
    ref = fwd_bwd(lambda a, b, c: qformer_attention_reference(a, b, c, kv_lens, scale, upcast=False), q, k, v, dout)
    truth = fwd_bwd(lambda a, b, c: qformer_attention_reference(a, b, c, kv_lens, scale),
                    q.double(), k.double(), v.double(), dout.double())
    # Samples attending to one key are degenerate: the softmax is constant, so dq = dk = 0 exactly, and the
    # same-dtype reference gets exactly zero by cancellation; ours (recomputed p = exp2(s - lse) ~ 1, dp - delta)
    # gets fp32 rounding relative to the problem's scale. Those samples get that absolute bound; the others (and
    # out, dv everywhere) the 2x rule.
    n_keys = torch.full((q.shape[0],), k.shape[1]) if kv_lens is None else kv_lens.cpu()
    one_key = n_keys == 1
    scale = max(t.abs().max().item() for t in truth if t.numel())
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert a.shape == t.shape and a.dtype == q.dtype, name
        if name in ("dq", "dk") and one_key.any():
            torch.testing.assert_close(a[one_key].double(), t[one_key], rtol=0, atol=1e-6 * scale)
            a, r, t = a[~one_key], r[~one_key], t[~one_key]
        # + the floor of mmkernels.testing.ref_error_floor (4 fp32 ulps of the tensor's magnitude): the kernel
        # recomputes p from the saved LSE (FlashAttention-2), a few ulps off the reference's softmax; it matters only
        # when the reference error is itself ~1 ulp (fp32, tiny reductions).
        assert_within_ref_error(a, r, t, name=name)
    if kv_lens is not None:  # padded keys: exactly zero gradients
        for b, n in enumerate(kv_lens.tolist()):
            assert torch.all(ours[2][b, n:] == 0) and torch.all(ours[3][b, n:] == 0)
    return ours


def _triton_dtypes(device):
    # the interpreter mishandles bf16 on CPU
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,Lq,H,D,Lk,lens", SHAPES, ids=_ids(SHAPES))
def test_triton_matches_reference(device, B, Lq, H, D, Lk, lens, dtype):
    q, k, v, dout, kv_lens = make(B, Lq, H, D, Lk, lens, dtype, device, strided=Lk == 257)
    fn = lambda a, b, c: qformer_cross_attention(a, b, c, kv_lens=kv_lens, backend="triton")  # noqa: E731
    check_against_reference(fn, q, k, v, dout, kv_lens)


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
@pytest.mark.parametrize("splits,lens", [(3, None), (4, [1, 130]), (7, [200, 65])], ids=["3", "4-lens", "7-lens"])
def test_split_k_matches_reference(device, splits, lens):
    """Flash-decoding: keys split over programs, then combined; empty chunks (kv_len < chunk start) weigh nothing."""
    q, k, v, dout, kv_lens = make(len(lens or [0, 0]), 9, 2, 48, 200, lens, torch.float32, device)
    op = torch.ops.mmkernels.qformer_attention_fwd_triton

    def fn(a, b, c):
        return op(a, b, c, kv_lens, 0.125, splits, 0.0, None)[0]

    check_against_reference(fn, q, k, v, dout, kv_lens, scale=0.125)
    out_1, lse_1 = op(q, k, v, kv_lens, 0.125, 1, 0.0, None)
    out_s, lse_s = op(q, k, v, kv_lens, 0.125, splits, 0.0, None)
    torch.testing.assert_close(lse_s, lse_1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s, out_1, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
def test_lse_is_logsumexp(device):
    q, k, v, _, kv_lens = make(2, 6, 2, 16, 40, [40, 11], torch.float32, device)
    _, lse = torch.ops.mmkernels.qformer_attention_fwd_triton(q, k, v, kv_lens, 0.3, 0, 0.0, None)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3
    scores[1, :, :, 11:] = float("-inf")
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
def test_backward_is_deterministic(device):
    q, k, v, dout, kv_lens = make(2, 8, 2, 32, 150, [150, 70], torch.float32, device)
    op = torch.ops.mmkernels.qformer_attention_fwd_triton
    out, lse = op(q, k, v, kv_lens, 0.2, 3, 0.0, None)
    bwd = torch.ops.mmkernels.qformer_attention_bwd_triton
    first = bwd(dout, q, k, v, out, lse, kv_lens, 0.2, 3, 0.0, None)
    second = bwd(dout, q, k, v, out, lse, kv_lens, 0.2, 3, 0.0, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_reference_backend(dtype):
    """The CPU fallback (also the bf16 path on CPU: no interpreter involved)."""
    q, k, v, dout, kv_lens = make(2, 32, 2, 64, 257, [257, 100], dtype, CPU)
    out = check_against_reference(
        lambda a, b, c: qformer_cross_attention(a, b, c, kv_lens=kv_lens, backend="reference"), q, k, v, dout,
        kv_lens)
    truth = qformer_attention_reference(q.double(), k.double(), v.double(), kv_lens)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out[0].double(), truth, rtol=rtol, atol=rtol)


def test_auto_backend_cpu_is_reference(no_backend_env):
    assert QFORMER_BACKENDS.select(CPU)[0] == "reference"


def test_softmax_scale_and_empty_batch(device):
    q, k, v, _, _ = make(2, 4, 1, 8, 9, None, torch.float32, device)
    got = qformer_cross_attention(q, k, v, softmax_scale=0.7)
    want = qformer_attention_reference(q.double(), k.double(), v.double(), None, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    empty = [t[:0].requires_grad_() for t in (q, k, v)]
    out = qformer_cross_attention(*empty, kv_lens=torch.zeros(0, dtype=torch.int32, device=device))
    assert out.shape == (0, 4, 1, 8)
    out.sum().backward()
    assert empty[0].grad.shape == (0, 4, 1, 8)


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
@pytest.mark.parametrize("lens,splits", [(None, 0), ([5, 33], 2)], ids=["dense", "lens-split"])
def test_opcheck(device, lens, splits):
    q, k, v, dout, kv_lens = make(2, 5, 2, 24, 33, lens, torch.float32, device, strided=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    run_opcheck(torch.ops.mmkernels.qformer_attention_fwd_triton.default, (q, k, v, kv_lens, 0.2, splits, 0.0, None))
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    run_opcheck(torch.ops.mmkernels.qformer_attention_fwd_triton.default, (q, k, v, kv_lens, 0.2, splits, 0.25, seed))
    out, lse = torch.ops.mmkernels.qformer_attention_fwd_triton(q, k, v, kv_lens, 0.2, splits, 0.0, None)
    run_opcheck(torch.ops.mmkernels.qformer_attention_bwd_triton.default,
                (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, kv_lens, 0.2, splits, 0.0, None))


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
def test_torch_compile_fullgraph(device):
    q, k, v, dout, kv_lens = make(2, 6, 2, 16, 20, [20, 7], torch.float32, device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"

    def f(a, b, c, lens):
        return qformer_cross_attention(a, b, c, kv_lens=lens, backend="triton") * 2

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    got = fwd_bwd(lambda a, b, c: compiled(a, b, c, kv_lens), q, k, v, dout)
    want = fwd_bwd(lambda a, b, c: f(a, b, c, kv_lens), q, k, v, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _bad_inputs():
    q = torch.randn(2, 4, 3, 8)
    k = torch.randn(2, 10, 3, 8)
    lens = torch.tensor([10, 3], dtype=torch.int32)
    yield "q not a tensor", dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"
    yield "int dtype", dict(q=q.int(), k=k.int(), v=k.int()), TypeError, "q must be"
    yield "dtype mismatch", dict(k=k.double(), v=k.double()), TypeError, "share one dtype"
    yield "fp16 vs fp32", dict(k=k.half(), v=k.half()), TypeError, "share one dtype"
    yield "3-d q", dict(q=q[0]), ValueError, "q must have 4 dimension"
    yield "k/v shapes differ", dict(v=k[:, :5]), ValueError, "same shape"
    yield "head count", dict(k=k[:, :, :2], v=k[:, :, :2]), ValueError, "to match q"
    yield "batch", dict(k=k[:1], v=k[:1]), ValueError, "to match q"
    yield "too many queries", dict(q=torch.randn(2, 129, 3, 8)), ValueError, "Lq <= 128"
    yield "no keys", dict(k=k[:, :0], v=k[:, :0]), ValueError, "Lk >= 1"
    yield "head dim", dict(q=torch.randn(2, 4, 1, 129), k=torch.randn(2, 3, 1, 129), v=torch.randn(2, 3, 1, 129)), \
        ValueError, "head dim"
    yield "kv_lens int64", dict(kv_lens=lens.long()), TypeError, "kv_lens must be int32"
    yield "kv_lens shape", dict(kv_lens=lens[:1]), ValueError, "kv_lens must have shape"
    yield "kv_lens too big", dict(kv_lens=torch.tensor([11, 3], dtype=torch.int32)), ValueError, "[1, Lk]"
    yield "kv_lens zero", dict(kv_lens=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "[1, Lk]"
    yield "kv_lens not tensor", dict(kv_lens=[10, 3]), TypeError, "kv_lens must be a torch.Tensor"
    yield "scale tensor", dict(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale"
    yield "fp64 on triton", dict(q=q.double(), k=k.double(), v=k.double(), backend="triton"), BackendError, "float64"
    yield "validate not bool", dict(validate_kv_lens=1), TypeError, "validate_kv_lens must be a bool"
    yield "dropout 1", dict(dropout_p=1.0), ValueError, "dropout_p must be in"
    yield "dropout nan", dict(dropout_p=float("nan")), ValueError, "dropout_p"
    yield "unknown backend", dict(backend="cuda"), BackendError, "not implemented"


@pytest.mark.parametrize("name,override,exc,match", list(_bad_inputs()), ids=[b[0] for b in _bad_inputs()])
def test_bad_input(name, override, exc, match):
    args = dict(q=torch.randn(2, 4, 3, 8), k=torch.randn(2, 10, 3, 8), v=torch.randn(2, 10, 3, 8))
    args.update(override)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        qformer_cross_attention(q, k, v, **args)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(BackendError):
        qformer_cross_attention(q, q, q, backend="triton")


@pytest.mark.gpu
def test_device_mismatch():
    q = torch.randn(1, 2, 1, 8, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        qformer_cross_attention(q, q.cpu(), q.cpu())
    with pytest.raises(ValueError, match="kv_lens must be on"):
        qformer_cross_attention(q, q, q, kv_lens=torch.ones(1, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("B,Lq,H,D,Lk,lens", GPU_SHAPES, ids=_ids(GPU_SHAPES))
def test_gpu_grid(B, Lq, H, D, Lk, lens, dtype):
    """The auto split heuristic on a real SM count (B*H small -> split-K), wrap_triton ops, every dtype."""
    q, k, v, dout, kv_lens = make(B, Lq, H, D, Lk, lens, dtype, torch.device("cuda"), strided=True)
    check_against_reference(lambda a, b, c: qformer_cross_attention(a, b, c, kv_lens=kv_lens, backend="triton"),
                            q, k, v, dout, kv_lens)


@pytest.mark.gpu
def test_gpu_opcheck_triton_op():
    q, k, v, dout, kv_lens = make(2, 32, 4, 64, 257, [257, 100], torch.bfloat16, torch.device("cuda"))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    run_opcheck(torch.ops.mmkernels.qformer_attention_fwd_triton.default, (q, k, v, kv_lens, 0.125, 0, 0.0, None))


# ---------------------------------------------------------------------------------------------------------------
# keys past kv_lens never influence results (NaN, inf, fp16-overflowing garbage), eager and compiled
# ---------------------------------------------------------------------------------------------------------------

POISONS = [float("nan"), float("inf"), float("-inf"), 1e4]
_BACKENDS_HERE = ["reference"] + (["triton"] if TRITON_CPU or HAS_CUDA else [])


def _poisoned_run(fn, x, img, ws, dout, bad_k, heads, poison):
    """q = x Wq, k = img Wk (+ poison past kv_lens), v = img Wv (+ poison): out, dq, dk, dv, dWq, dWk, dWv."""
    H, D = heads
    ws = [w.detach().clone().requires_grad_() for w in ws]
    shape = (*bad_k.shape, H, D)
    fill = torch.full(shape, poison, dtype=x.dtype, device=x.device)
    pq = torch.zeros(*x.shape[:2], H, D, dtype=x.dtype, device=x.device, requires_grad=True)
    pk, pv = (torch.where(bad_k[..., None, None], fill, 0.0).requires_grad_() for _ in range(2))
    out = fn(x, img, *ws, pq, pk, pv)
    (out.float() * dout.float()).sum().backward()
    return [out.detach(), pq.grad, pk.grad, pv.grad] + [w.grad for w in ws]


@pytest.mark.parametrize("mode", ["eager", "compile", "compile-dynamic"])
@pytest.mark.parametrize("backend", _BACKENDS_HERE)
def test_masked_keys_never_leak(backend, mode, device):
    """NaN, +-inf and 1e4 in the keys and values past kv_lens: out and every gradient (also of the projection
    weights) finite, dk/dv exactly zero past kv_lens, everything equal to the run with zeros there."""
    dtype = torch.float16 if mode != "eager" else torch.float32
    B, Lq, H, D, Lk = 3, 5, 2, 24, 29
    lens = [29, 1, 13]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, Lq, 16, generator=g).to(device=device, dtype=dtype)
    img = torch.randn(B, Lk, 12, generator=g).to(device=device, dtype=dtype)
    ws = [(0.5 * torch.randn(c, H * D, generator=g)).to(device=device, dtype=dtype) for c in (16, 12, 12)]
    dout = torch.randn(B, Lq, H, D, generator=g).to(device=device, dtype=dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    bad_k = torch.arange(Lk, device=device)[None, :] >= kv_lens[:, None]

    def f(x, img, wq, wk, wv, pq, pk, pv):
        q = (x @ wq).unflatten(-1, (H, D)) + pq
        k = (img @ wk).unflatten(-1, (H, D)) + pk
        v = (img @ wv).unflatten(-1, (H, D)) + pv
        return qformer_cross_attention(q, k, v, kv_lens=kv_lens, backend=backend)

    if mode != "eager":
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, dynamic=mode == "compile-dynamic",
                          backend="inductor" if device.type == "cuda" else "aot_eager")
    clean = _poisoned_run(f, x, img, ws, dout, bad_k, (H, D), 0.0)
    for poison in POISONS:
        got = _poisoned_run(f, x, img, ws, dout, bad_k, (H, D), poison)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dWq", "dWk", "dWv"), got, clean):
            assert torch.isfinite(a).all(), f"{poison}: {name} not finite"
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{poison}: {name} differs from the clean run")
        assert torch.all(got[2][bad_k] == 0) and torch.all(got[3][bad_k] == 0)


@pytest.mark.parametrize("backend", _BACKENDS_HERE)
def test_issue_example_and_fp16_overflow(backend, device):
    """The issue's cases: v = [[2], [nan or inf]] with kv_lens = [1] gives 2; fp16 scores past 65504 stay finite
    and agree across backends (the reference computes in fp32)."""
    q = torch.ones(1, 1, 1, 1, device=device)
    lens = torch.tensor([1], dtype=torch.int32, device=device)
    for bad in (float("nan"), float("inf")):
        v = torch.tensor([2.0, bad], device=device).reshape(1, 2, 1, 1)
        assert qformer_cross_attention(q, q.expand(1, 2, 1, 1), v, kv_lens=lens, backend=backend).item() == 2.0
    g = torch.Generator().manual_seed(2)
    q = (100 * torch.randn(2, 4, 2, 16, generator=g)).half().to(device)  # raw scores past 65504
    k = (100 * torch.randn(2, 9, 2, 16, generator=g)).half().to(device)
    v = torch.randn(2, 9, 2, 16, generator=g).half().to(device)
    got = qformer_cross_attention(q, k, v, softmax_scale=1e-3, backend=backend)
    want = qformer_attention_reference(q.double(), k.double(), v.double(), None, 1e-3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", _BACKENDS_HERE)
def test_unchecked_kv_lens_are_clamped(backend, device):
    """validate_kv_lens=False (and torch.compile, where the check is skipped): values clamped to [0, Lk] on every
    backend; a sample left with no key gets zeros and zero gradients."""
    q, k, v, dout, _ = make(4, 3, 2, 8, 6, None, torch.float32, device)
    wild = torch.tensor([0, 40, -3, 4], dtype=torch.int32, device=device)
    clamped = wild.clamp(0, 6)
    with pytest.raises(ValueError, match="kv_lens values"):
        qformer_cross_attention(q, k, v, kv_lens=wild, backend=backend)

    def f(a, b, c, lens):
        return qformer_cross_attention(a, b, c, kv_lens=lens, backend=backend, validate_kv_lens=False)

    compiled = torch.compile(lambda a, b, c, lens: qformer_cross_attention(a, b, c, kv_lens=lens, backend=backend),
                             fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    for fn in (f, compiled):
        out, dq, dk, dv = fwd_bwd(lambda a, b, c, fn=fn: fn(a, b, c, wild), q, k, v, dout)
        assert torch.all(out[[0, 2]] == 0) and torch.all(dq[[0, 2]] == 0)
        assert torch.all(dk[[0, 2]] == 0) and torch.all(dv[[0, 2]] == 0)
        live = [1, 3]
        want = qformer_attention_reference(q.double(), k.double(), v.double(), clamped)
        torch.testing.assert_close(out[live].double(), want[live], rtol=1e-5, atol=1e-5)


def test_float64_numpy_scale_and_grid(device, no_backend_env):
    np = pytest.importorskip("numpy")
    q, k, v, _, kv_lens = make(2, 3, 2, 8, 7, [7, 2], torch.float64, device)
    q.requires_grad_()
    out = qformer_cross_attention(q, k, v, kv_lens=kv_lens, softmax_scale=np.float32(0.5))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, qformer_attention_reference(q, k, v, kv_lens, 0.5), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a: qformer_cross_attention(a, k, v, kv_lens=kv_lens), (q,))
    if "triton" in QFORMER_BACKENDS.impls:
        from mmkernels.kernels.triton.qformer_attention import _grid

        assert _grid(70_000, 12) == (840_000, 1)  # batch x heads on axis 0: past 65535
        with pytest.raises(ValueError, match="CUDA grid"):
            _grid(2**20, 2**12)


# ---------------------------------------------------------------------------------------------------------------
# attention dropout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _BACKENDS_HERE)
def test_dropout_semantics_and_reproducibility(backend, device):
    """q = 0 and one-hot values make the output spell out keep / (Lk (1 - p)): kept with probability 1 - p,
    scaled by 1 / (1 - p), keys past kv_lens never kept. Same torch.manual_seed, same output and gradients;
    p = 0 is the no-dropout call and draws nothing from the generator."""
    p, lk = 0.3, 40
    lens = torch.tensor([40, 25], dtype=torch.int32, device=device)
    q = torch.zeros(2, 32, 2, lk, device=device)
    v = torch.eye(lk, device=device)[None, :, None, :].expand(2, lk, 2, lk).contiguous()
    out = qformer_cross_attention(q, torch.randn(2, lk, 2, lk, device=device), v, kv_lens=lens, dropout_p=p,
                                  backend=backend)
    keep = out * (1 - p) * lens.view(2, 1, 1, 1)
    torch.testing.assert_close(keep, keep.round(), rtol=0, atol=1e-5)
    assert torch.all(keep[1, :, :, 25:] == 0)
    n = 32 * 2 * (40 + 25)  # live (query, head, key) triples
    kept = keep.sum().item() / n
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5

    a, b, c, dout, lens = make(2, 7, 2, 24, 50, [50, 13], torch.float32, device)
    fn = lambda x, y, z: qformer_cross_attention(x, y, z, kv_lens=lens, dropout_p=0.2, backend=backend)  # noqa: E731
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(fwd_bwd(fn, a, b, c, dout))
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x, y)
    assert not torch.equal(runs[0][0], runs[2][0])
    state = torch.get_rng_state()
    plain = fwd_bwd(lambda x, y, z: qformer_cross_attention(x, y, z, kv_lens=lens, backend=backend), a, b, c, dout)
    zero = fwd_bwd(lambda x, y, z: qformer_cross_attention(x, y, z, kv_lens=lens, dropout_p=0.0, backend=backend),
                   a, b, c, dout)
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(plain, zero):
        assert torch.equal(x, y)


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_matches_reference_with_the_same_mask(device, dtype, splits):
    """The kernels' keep mask (test hook, shared with the attention kernels) fed to the reference: forward and every
    gradient agree, with and without the split-K path."""
    from mmkernels.kernels.triton.attention import dropout_keep_mask

    p = 0.25
    q, k, v, dout, kv_lens = make(2, 9, 2, 40, 150, [150, 61], dtype, device)
    seed = torch.tensor([777], dtype=torch.int64, device=device)
    mask = dropout_keep_mask(seed, 2, 2, 9, 150, p)
    op = torch.ops.mmkernels.qformer_attention_fwd_triton
    ours = fwd_bwd(lambda a, b, c: op(a, b, c, kv_lens, 0.15, splits, p, seed)[0], q, k, v, dout)
    ref = lambda a, b, c, up: qformer_attention_reference(a, b, c, kv_lens, 0.15, upcast=up, dropout_p=p,  # noqa: E731
                                                          dropout_mask=mask)
    same = fwd_bwd(lambda a, b, c: ref(a, b, c, False), q, k, v, dout)
    truth = fwd_bwd(lambda a, b, c: ref(a, b, c, True), q.double(), k.double(), v.double(), dout.double())
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, same, truth):
        assert_within_ref_error(a, r, t, name=name)


@pytest.mark.skipif(not TRITON_CPU and not HAS_CUDA, reason="needs triton")
def test_double_backward_is_a_clear_error(device):
    q, k, v, _, _ = make(1, 4, 2, 8, 9, None, torch.float32, device)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(qformer_cross_attention(q, k, v, backend="triton").square().sum(), q, create_graph=True)


# -- masks -> kv_lens: a mask with holes is rejected eagerly and inside torch.compile --------------------------------

MASKS = {
    "holes": ([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], "holes"),
    "leading-zero": ([[0, 1, 1, 1, 1], [1, 1, 0, 0, 0]], "holes"),
    "empty-row": ([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], "0 attended"),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_kv_lens_from_mask_rejects_non_prefix_masks(case):
    from mmkernels.ops.qformer_attention import kv_lens_from_mask

    rows, detail = MASKS[case]
    for dtype in (torch.bool, torch.int64, torch.float32):
        with pytest.raises(ValueError, match=f"QFormer: image_attention_mask must be a prefix mask.*{detail}"):
            kv_lens_from_mask(torch.tensor(rows).to(dtype), op="QFormer", name="image_attention_mask")
    # inside torch.compile there is no host read: a device-side assertion (RuntimeError on CPU), never lengths
    for dynamic in (False, True):
        torch._dynamo.reset()
        f = torch.compile(lambda m: kv_lens_from_mask(m, name="mask") * 1, fullgraph=True, dynamic=dynamic,
                          backend="aot_eager")
        assert f(torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])).tolist() == [2, 5]
        with pytest.raises(RuntimeError, match="mask must be a prefix mask"):
            f(torch.tensor(rows))


def test_kv_lens_from_mask_values():
    from mmkernels.ops.qformer_attention import kv_lens_from_mask

    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    lens = kv_lens_from_mask(mask)
    assert lens.dtype == torch.int32 and lens.tolist() == [2, 3, 1]
    assert kv_lens_from_mask(torch.ones(2, 3), none_if_full=True) is None
    assert kv_lens_from_mask(torch.ones(0, 3)).shape == (0,)
    with pytest.raises(ValueError, match="mask must have 2 dimension"):
        kv_lens_from_mask(torch.ones(3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        kv_lens_from_mask([[1, 0]])


def test_compiled_qformer_rejects_a_mask_with_holes():
    """The QFormer model under torch.compile(fullgraph=True): a prefix mask runs and matches eager, a mask with holes
    raises (the model used to turn it into per-row counts silently when compiled)."""
    from mmkernels.models import QFormer, QFormerConfig

    model = QFormer(QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  encoder_hidden_size=24, cross_attention_frequency=2), backend="reference").eval()
    q, img = torch.randn(2, 4, 32), torch.randn(2, 5, 24)
    good = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    holes = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, img, good), model(q, img, good), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="prefix mask"):
            model(q, img, holes)
        with pytest.raises(RuntimeError, match="prefix mask"):
            compiled(q, img, holes)


@pytest.mark.parametrize("backend", _BACKENDS_HERE)
def test_kv_lens_unchecked_without_debug_checks(backend, device):
    """With debug checks off (production) the default call takes no host read of kv_lens: out-of-range values are
    clamped to [0, Lk] as with validate_kv_lens=False (same result, exactly); with them on (the suite's default) they
    raise."""
    q, k, v, _, _ = make(4, 3, 2, 8, 6, None, torch.float32, device)
    wild = torch.tensor([0, 40, -3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="kv_lens values"):
        qformer_cross_attention(q, k, v, kv_lens=wild, backend=backend)
    with mmkernels.debug_checks(False):
        got = qformer_cross_attention(q, k, v, kv_lens=wild, backend=backend)
    want = qformer_cross_attention(q, k, v, kv_lens=wild.clamp(0, 6), backend=backend, validate_kv_lens=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
