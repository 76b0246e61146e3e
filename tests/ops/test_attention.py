"""mmkernels.ops.attention: Triton forward and backward against a float64 reference (flash-attn's 2x rule), on
awkward shapes; registration (opcheck, torch.compile); determinism; bad input; invalid values (NaN/inf in padding
and blind rows) never leaking, eager and compiled; float64 and the grid folding; attention dropout.

On CPU the Triton kernels run under the interpreter (fp32/fp16), so the CPU grid is small; the big grid carries the
``gpu`` marker.
"""

from __future__ import annotations

import os

import pytest
import torch

import mmkernels
from mmkernels import BackendError
from mmkernels.kernels.reference.attention import attention_reference
from mmkernels.ops import attention
from mmkernels.ops.attention import ATTENTION_BACKENDS
from mmkernels.testing import assert_within_ref_error, run_opcheck

HAS_CUDA = torch.cuda.is_available()
# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
SAMPLES = {
    "attention": lambda r: dict(q=r(2, 5, 4, 8), k=r(2, 7, 2, 8, seed=1), v=r(2, 7, 2, 8, seed=2), causal=True,
                                softmax_scale=0.3, dropout_p=0.0),
    # the varlen form: its cu_seqlens and max_seqlen arguments are swept too
    "attention[varlen]": lambda r: dict(q=r(9, 4, 8), k=r(11, 2, 8, seed=1), v=r(11, 2, 8, seed=2),
                                        cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                                        cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32), max_seqlen_q=5,
                                        max_seqlen_k=6, causal=True, softmax_scale=0.3, dropout_p=0.0),
}
USAGE_SAMPLES = {
    "attention": lambda r: (attention, (r(2, 9, 4, 12), r(2, 7, 2, 12, seed=1), r(2, 7, 2, 12, seed=2)),
                            {"causal": True}),
}


def _make(shape_q, shape_k, dtype, device, *, generator=None):
    q = torch.randn(shape_q, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    k = torch.randn(shape_k, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    v = torch.randn(shape_k, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return q, k, v


def _fwd_bwd(fn, q, k, v, dout, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check_against_reference(q, k, v, *, causal=False, backend="triton", logits=1.0, **kwargs):
    """ours vs float64 truth, bounded by 2x the error of the same-dtype PyTorch reference, for out, dq, dk, dv.

    The floor (:func:`mmkernels.testing.ref_error_floor`) is a few fp32 ulps (the kernels accumulate in fp32) of the
    largest true value plus twice the output dtype's rounding of the truth: where the reference is exact by
    construction (Lk = 1 makes dq and dk exactly 0 in autograd's order of operations) the rule would otherwise demand
    bit-exactness. It is far below the fp16 reference's own error. ``logits``: the largest |logit| of a problem with
    large scores (the floor grows with it: p is recomputed from scores of that size)."""
    dout = torch.randn(q.shape, dtype=torch.float32).to(q.device)
    ref_kwargs = {key: kwargs[key] for key in ("cu_seqlens_q", "cu_seqlens_k") if key in kwargs}
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=causal,
                     **ref_kwargs)
    same_dtype = _fwd_bwd(attention_reference, q, k, v, dout, causal=causal, upcast=False, **ref_kwargs)
    ours = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend=backend, **kwargs)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, same_dtype, truth, strict=True):
        assert a.dtype == q.dtype and a.shape == t.shape, name
        assert_within_ref_error(a, r, t, logits=logits, name=name)
    return ours


# (B, Lq, Lk, Hq, Hkv, D): every head dim of the issue, lengths that are not multiples of any block, Lq = Lk = 1,
# cross-attention both ways (Lq > Lk with causal leaves rows that see no key), GQA 1:1, 2:1, 4:1 (all-to-one).
CPU_SHAPES = [
    (1, 1, 1, 2, 1, 64),
    (2, 32, 257, 4, 1, 40),
    (1, 197, 197, 3, 3, 64),
    (2, 113, 203, 4, 2, 72),
    (1, 203, 113, 2, 2, 80),
    (1, 77, 77, 2, 1, 88),
    (1, 64, 96, 2, 2, 128),
    (1, 33, 47, 2, 1, 256),
]


def _shape_id(s):
    return "B{}-Lq{}-Lk{}-H{}:{}-D{}".format(*s)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_attention_fp32(shape, causal, device):
    b, lq, lk, hq, hkv, d = shape
    q, k, v = _make((b, lq, hq, d), (b, lk, hkv, d), torch.float32, device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_attention_fp16(shape, causal, device):
    b, lq, lk, hq, hkv, d = shape
    q, k, v = _make((b, lq, hq, d), (b, lk, hkv, d), torch.float16, device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_varlen(causal, dtype, deterministic, device):
    # lengths: an empty pair, a single query, Lq < Lk, Lq > Lk, keys but no queries, queries but no keys
    lens_q = [5, 0, 1, 64, 70, 0, 9]
    lens_k = [9, 0, 30, 100, 33, 12, 0]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = _make((sum(lens_q), 4, 72), (sum(lens_k), 2, 72), dtype, device)
    with mmkernels.deterministic(deterministic):
        out = check_against_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)[0]
    # a sequence that sees no key gives zeros
    assert torch.all(out[cu_q[6]:cu_q[7]] == 0)


def test_attention_varlen_matches_dense(device):
    """Padding-free varlen on equal lengths is the dense op, bit for bit in the forward."""
    q, k, v = _make((3, 37, 2, 40), (3, 29, 2, 40), torch.float32, device)
    dense = attention(q, k, v, causal=True, backend="triton")
    cu_q = torch.arange(0, 4 * 37, 37, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, 4 * 29, 29, dtype=torch.int32, device=device)
    var = attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True, cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k, max_seqlen_q=37, max_seqlen_k=29, backend="triton")
    torch.testing.assert_close(var.unflatten(0, (3, 37)), dense, rtol=0, atol=0)


def test_attention_empty_shapes(device):
    # no keys: zeros and zero gradients
    q, k, v = _make((1, 5, 2, 16), (1, 0, 2, 16), torch.float32, device)
    out, dq, dk, dv = check_against_reference(q, k, v)
    assert torch.all(out == 0) and torch.all(dq == 0) and dk.shape == k.shape
    # empty batch
    q, k, v = _make((0, 7, 2, 16), (0, 7, 2, 16), torch.float32, device)
    out, dq, dk, dv = check_against_reference(q, k, v, causal=True)
    assert out.shape == q.shape and dk.shape == k.shape


def test_attention_strided_inputs(device):
    """q/k/v as views of one fused projection (row strides != H*D) and a transposed head dim (copied)."""
    b, n, h, d = 2, 45, 2, 24
    qkv = torch.randn(b, n, 3 * h * d, device=device)
    q, k, v = (t.unflatten(-1, (h, d)) for t in qkv.split(h * d, dim=-1))
    assert not q.is_contiguous() and q.stride(-1) == 1
    torch.testing.assert_close(attention(q, k, v, backend="triton"), attention_reference(q, k, v),
                               rtol=1e-5, atol=1e-5)
    qt = torch.randn(b, n, d, h, device=device).transpose(-1, -2)
    assert qt.stride(-1) != 1
    torch.testing.assert_close(attention(qt, k, v, causal=True, backend="triton"),
                               attention_reference(qt, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_attention_softmax_scale(device):
    q, k, v = _make((1, 20, 2, 32), (1, 20, 2, 32), torch.float32, device)
    torch.testing.assert_close(attention(q, k, v, softmax_scale=0.3, backend="triton"),
                               attention_reference(q, k, v, softmax_scale=0.3), rtol=1e-5, atol=1e-5)


def test_deterministic_backward_is_bitwise_reproducible(device):
    q, k, v = _make((2, 70, 4, 64), (2, 90, 2, 64), torch.float32, device)
    with mmkernels.deterministic():
        first = check_against_reference(q, k, v, causal=True)
        g = torch.Generator().manual_seed(0)
        dout = torch.randn(q.shape, generator=g).to(device)
        runs = [_fwd_bwd(attention, q, k, v, dout, causal=True, backend="triton") for _ in range(2)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    # the default (atomic dQ) path agrees with the deterministic one
    default = _fwd_bwd(attention, q, k, v, dout, causal=True, backend="triton")
    for a, b in zip(default, runs[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert first[1].shape == q.shape


def test_opcheck(device):
    q, k, v = _make((2, 37, 4, 40), (2, 45, 2, 40), torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fwd = torch.ops.mmkernels.attention_fwd_triton.default
    run_opcheck(fwd, (q, k, v, None, None, 37, 45, True, 0.2, 0.0, None))
    cu = torch.tensor([0, 5, 5, 30], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(33, h, 72, device=device, requires_grad=True) for h in (4, 2, 2))  # 3 padding rows
    run_opcheck(fwd, (qv, kv, vv, cu, cu, 25, 25, False, 0.2, 0.0, None))
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    run_opcheck(fwd, (q, k, v, None, None, 37, 45, True, 0.2, 0.3, seed))  # dropout: the seed fixes the mask
    with torch.no_grad():
        out, lse = fwd(q, k, v, None, None, 37, 45, True, 0.2, 0.0, None)
    dout = torch.randn_like(out)
    run_opcheck(torch.ops.mmkernels.attention_bwd_triton.default,
                (dout, q.detach(), k.detach(), v.detach(), out, lse, None, None, 37, 45, True, 0.2, True, 0.0, None))


def test_torch_compile_fullgraph(device):
    q, k, v = _make((2, 33, 4, 40), (2, 21, 2, 40), torch.float32, device)
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"
    cu = torch.tensor([0, 5, 5, 33], dtype=torch.int32, device=device)

    def f(q, k, v):
        dense = attention(q, k, v, causal=True, backend="triton")
        var = attention(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 7, 7, 21], dtype=torch.int32,
                        device=q.device), max_seqlen_q=28, max_seqlen_k=14, backend="triton")
        return dense.sum() + var.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    eager = _grads(f, q, k, v)
    got = _grads(compiled, q, k, v)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _grads(f, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    loss = f(q, k, v)
    loss.backward()
    return loss.detach(), q.grad, k.grad, v.grad


def test_auto_backend(device, no_backend_env):
    name, _ = ATTENTION_BACKENDS.select(torch.device("cpu"))
    assert name == "reference"
    if HAS_CUDA:
        assert ATTENTION_BACKENDS.select(torch.device("cuda"))[0] == "triton"
    q, k, v = _make((1, 9, 2, 16), (1, 9, 2, 16), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v))


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


_CU = torch.tensor([0, 2, 4], dtype=torch.int32)
BAD_INPUTS = [
    ("int q", lambda: ((_t(1, 4, 2, 8, dtype=torch.int32), _t(1, 4, 2, 8), _t(1, 4, 2, 8)), {}), TypeError,
     "q must be"),
    ("fp64 on triton", lambda: ((_t(1, 4, 2, 8, dtype=torch.float64),) * 3, {"backend": "triton"}), BackendError,
     "float64 runs on backend='reference'"),
    ("dtype mismatch", lambda: ((_t(1, 4, 2, 8, dtype=torch.float16), _t(1, 4, 2, 8), _t(1, 4, 2, 8)), {}),
     TypeError, "same dtype"),
    ("not a tensor", lambda: (([1.0], _t(1, 4, 2, 8), _t(1, 4, 2, 8)), {}), TypeError, "torch.Tensor"),
    ("batch mismatch", lambda: ((_t(2, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8)), {}), ValueError, "batch size"),
    ("k/v shape", lambda: ((_t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 5, 2, 8)), {}), ValueError, "same shape"),
    ("head dim mismatch", lambda: ((_t(1, 4, 2, 8), _t(1, 4, 2, 16), _t(1, 4, 2, 16)), {}), ValueError,
     "same head dim"),
    ("GQA ratio", lambda: ((_t(1, 4, 3, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8)), {}), ValueError, "multiple"),
    ("D > 256", lambda: ((_t(1, 2, 1, 264),) * 3, {}), ValueError, "head dim must be in"),
    ("3-dim dense", lambda: ((_t(4, 2, 8),) * 3, {}), ValueError, "4 dims"),
    ("one cu_seqlens", lambda: ((_t(4, 2, 8),) * 3, {"cu_seqlens_q": _CU}), ValueError, "both"),
    ("cu_seqlens int64", lambda: ((_t(4, 2, 8),) * 3, {"cu_seqlens_q": _CU.long(), "cu_seqlens_k": _CU.long()}),
     TypeError, "cu_seqlens_q must be int32"),
    ("cu_seqlens 2-d", lambda: ((_t(4, 2, 8),) * 3, {"cu_seqlens_q": _CU[None], "cu_seqlens_k": _CU[None]}),
     ValueError, "1 dimension"),
    ("cu_seqlens not monotone", lambda: ((_t(4, 2, 8),) * 3, {
        "cu_seqlens_q": torch.tensor([0, 3, 2, 4], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 1, 2, 4], dtype=torch.int32)}), ValueError, "non-decreasing"),
    ("cu_seqlens start", lambda: ((_t(4, 2, 8),) * 3, {
        "cu_seqlens_q": torch.tensor([1, 4], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 4], dtype=torch.int32)}), ValueError, "start at 0"),
    ("cu_seqlens end", lambda: ((_t(3, 2, 8),) * 3, {"cu_seqlens_q": _CU, "cu_seqlens_k": _CU}), ValueError,
     "exceeds the number of rows"),
    ("cu_seqlens batch", lambda: ((_t(4, 2, 8),) * 3, {
        "cu_seqlens_q": _CU, "cu_seqlens_k": torch.tensor([0, 4], dtype=torch.int32)}), ValueError, "B \\+ 1"),
    ("max_seqlen too small", lambda: ((_t(4, 2, 8),) * 3, {"cu_seqlens_q": _CU, "cu_seqlens_k": _CU,
                                                           "max_seqlen_q": 1}), ValueError, "shorter"),
    ("max_seqlen dense", lambda: ((_t(1, 4, 2, 8),) * 3, {"max_seqlen_q": 4}), ValueError, "only used with"),
    ("devices", lambda: ((_t(1, 4, 2, 8), _t(1, 4, 2, 8, device="meta"), _t(1, 4, 2, 8)), {}), ValueError,
     "one device"),
    ("causal not bool", lambda: ((_t(1, 4, 2, 8),) * 3, {"causal": 1}), TypeError, "causal must be a bool"),
    ("scale tensor", lambda: ((_t(1, 4, 2, 8),) * 3, {"softmax_scale": torch.tensor(0.1)}), TypeError,
     "softmax_scale"),
    ("scale nan", lambda: ((_t(1, 4, 2, 8),) * 3, {"softmax_scale": float("nan")}), ValueError, "finite"),
    ("dropout 1", lambda: ((_t(1, 4, 2, 8),) * 3, {"dropout_p": 1.0}), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout negative", lambda: ((_t(1, 4, 2, 8),) * 3, {"dropout_p": -0.1}), ValueError, "dropout_p"),
    ("dropout tensor", lambda: ((_t(1, 4, 2, 8),) * 3, {"dropout_p": torch.tensor(0.1)}), TypeError, "dropout_p"),
    ("unknown backend", lambda: ((_t(1, 4, 2, 8),) * 3, {"backend": "cuda"}), BackendError, "not implemented"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case):
    _, build, exc, match = case
    args, kwargs = build()
    with pytest.raises(exc, match=match):
        attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# GPU: the full grid
# ---------------------------------------------------------------------------------------------------------------

GPU_HEAD_DIMS = [40, 59, 64, 72, 80, 88, 111, 128, 256]
GPU_LENGTHS = [(1, 1), (1, 257), (32, 257), (97, 97), (197, 197), (113, 203), (203, 113), (577, 577), (1025, 1025),
               (257, 1025)]
GPU_HEADS = [(4, 4), (8, 2), (6, 1)]  # 1:1, 4:1, all-to-one
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _gpu_grid():
    """A third of the head dim x length pairs, with dtype, causal and GQA ratio rotating: every value of every
    axis is covered several times while the number of distinct kernel compilations stays within the GPU suite's
    budget. MMKERNELS_FULL_GPU_GRID=1 runs the full product instead (many minutes of compilation)."""
    full = os.environ.get("MMKERNELS_FULL_GPU_GRID") == "1"
    for i, d in enumerate(GPU_HEAD_DIMS):
        for j, lengths in enumerate(GPU_LENGTHS):
            if not full and (i + j) % 3:
                continue  # about a third of the pairs: every head dim and every length pair, 3-4 times each
            combos = ([(dt, c, h) for dt in GPU_DTYPES for c in (False, True) for h in GPU_HEADS] if full else
                      [(GPU_DTYPES[(j // 3) % 3], (i + j // 3) % 2 == 1, GPU_HEADS[(i + j // 3 + 1) % 3])])
            for dtype, causal, heads in combos:
                yield pytest.param(d, lengths, dtype, causal, heads,
                                   id=f"D{d}-{lengths[0]}x{lengths[1]}-{str(dtype)[6:]}-"
                                      f"{'causal' if causal else 'full'}-H{heads[0]}:{heads[1]}")


@pytest.mark.gpu
@pytest.mark.parametrize("d,lengths,dtype,causal,heads", list(_gpu_grid()))
def test_attention_gpu_grid(d, lengths, dtype, causal, heads, device):
    (lq, lk), (hq, hkv) = lengths, heads
    q, k, v = _make((2, lq, hq, d), (2, lk, hkv, d), dtype, device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_attention_gpu_varlen(deterministic, causal, dtype, device):
    g = torch.Generator().manual_seed(1)
    lens_q = torch.randint(0, 600, (9,), generator=g).tolist() + [0, 1]
    lens_k = torch.randint(0, 600, (9,), generator=g).tolist() + [5, 0]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = _make((sum(lens_q), 8, 88), (sum(lens_k), 2, 88), dtype, device)
    with mmkernels.deterministic(deterministic):
        check_against_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_attention_gpu_deterministic_long(d, device):
    q, k, v = _make((2, 2048, 8, d), (2, 2048, 2, d), torch.bfloat16, device)
    dout = torch.randn_like(q)
    with mmkernels.deterministic():
        runs = [_fwd_bwd(attention, q, k, v, dout, causal=True, backend="triton") for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# values outside the valid region never influence results (NaN, inf, fp16-overflowing garbage), eager and compiled
# ---------------------------------------------------------------------------------------------------------------

POISONS = [float("nan"), float("inf"), float("-inf"), 1e4]
_POISON_IDS = ["nan", "inf", "-inf", "1e4"]


def _cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _invalid_rows(lens_q, lens_k, total_q, causal):
    """Query rows whose values reach nothing: padding past cu_seqlens_q[-1], and rows that see no key (a sequence
    without keys; causal with more queries than keys: its first len_q - len_k rows)."""
    bad = torch.ones(total_q, dtype=torch.bool)
    start = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        blind = lq if lk == 0 else (max(lq - lk, 0) if causal else 0)
        bad[start + blind:start + lq] = False
        start += lq
    return bad


# name -> (Hq, Hkv, D, dense shapes or varlen lengths, causal); padding rows past cu_seqlens[-1] on both sides
SWEEP_CASES = {
    "causal-Lq>Lk": dict(hq=4, hkv=2, d=24, dense=(2, 37, 20), causal=True),
    "varlen-pad": dict(hq=2, hkv=1, d=40, lens_q=[5, 0, 9, 4, 0], lens_k=[7, 3, 0, 6, 0], pad=(5, 3), causal=False),
    "varlen-causal-pad": dict(hq=2, hkv=2, d=16, lens_q=[9, 3, 0, 5, 2], lens_k=[4, 7, 2, 5, 0], pad=(4, 2),
                              causal=True),
    "varlen-no-seqs": dict(hq=2, hkv=2, d=16, lens_q=[], lens_k=[], pad=(3, 2), causal=False),
}


def _sweep_problem(case, dtype, device):
    """(x_q, x_k, x_v, weights, invalid q rows, invalid k/v rows, attention kwargs); the op's inputs are
    ``x @ W`` plus the poison, so the weight gradients see every row of dq/dk/dv (padding rows included)."""
    c = SWEEP_CASES[case]
    hq, hkv, d, causal = c["hq"], c["hkv"], c["d"], c["causal"]
    g = torch.Generator().manual_seed(3)
    if "dense" in c:
        b, lq, lk = c["dense"]
        rows_q, rows_k = (b, lq), (b, lk)
        bad_q = torch.zeros(b, lq, dtype=torch.bool)
        bad_q[:, :max(lq - lk, 0)] = causal
        bad_k = torch.zeros(b, lk, dtype=torch.bool)
        kwargs = {}
    else:
        pad_q, pad_k = c["pad"]
        total_q, total_k = sum(c["lens_q"]) + pad_q, sum(c["lens_k"]) + pad_k
        rows_q, rows_k = (total_q,), (total_k,)
        bad_q = _invalid_rows(c["lens_q"], c["lens_k"], total_q, causal)
        bad_k = torch.arange(total_k) >= sum(c["lens_k"])
        kwargs = dict(cu_seqlens_q=_cu(c["lens_q"], device), cu_seqlens_k=_cu(c["lens_k"], device),
                      max_seqlen_q=max(c["lens_q"], default=0), max_seqlen_k=max(c["lens_k"], default=0))
    xs = [torch.randn(*rows, 8, generator=g).to(device=device, dtype=dtype) for rows in (rows_q, rows_k, rows_k)]
    ws = [(0.5 * torch.randn(8, h * d, generator=g)).to(device=device, dtype=dtype) for h in (hq, hkv, hkv)]
    dout = torch.randn(*rows_q, hq, d, generator=g).to(device=device, dtype=dtype)
    return xs, ws, dout, bad_q.to(device), bad_k.to(device), dict(kwargs, causal=causal), (hq, hkv, d)


def _sweep_run(fn, xs, ws, dout, bad_q, bad_k, heads, poison):
    """out and the gradients of q, k, v (through the poison tensors) and of the three projection weights."""
    hq, hkv, d = heads
    ws = [w.detach().clone().requires_grad_() for w in ws]
    poisons = []
    for rows_bad, h in ((bad_q, hq), (bad_k, hkv), (bad_k, hkv)):
        shape = (*rows_bad.shape, h, d)
        fill = torch.full(shape, poison, dtype=dout.dtype, device=dout.device)
        poisons.append(torch.where(rows_bad[..., None, None], fill, 0.0).requires_grad_())
    out = fn(*xs, *ws, *poisons)
    (out.float() * dout.float()).sum().backward()
    return [out.detach()] + [p.grad for p in poisons] + [w.grad for w in ws]


def _projected(backend, kwargs, heads):
    hq, hkv, d = heads

    def f(xq, xk, xv, wq, wk, wv, pq, pk, pv):
        q = (xq @ wq).unflatten(-1, (hq, d)) + pq
        k = (xk @ wk).unflatten(-1, (hkv, d)) + pk
        v = (xv @ wv).unflatten(-1, (hkv, d)) + pv
        return attention(q, k, v, backend=backend, **kwargs)

    return f


# dynamic=True compiles are slow on CPU: the two richest cases (blind causal rows; varlen padding on both sides,
# an empty sequence, a sequence without keys, blind causal rows)
_SWEEP = [(c, m) for c in SWEEP_CASES for m in ("eager", "compile")] + [
    ("causal-Lq>Lk", "compile-dynamic"), ("varlen-causal-pad", "compile-dynamic")]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case,mode", _SWEEP, ids=[f"{c}-{m}" for c, m in _SWEEP])
def test_invalid_region_never_leaks(case, backend, mode, device):
    """NaN, +-inf and fp16-overflowing 1e4 in q rows that see no key, in varlen padding rows (past cu_seqlens[-1],
    on both sides) and around empty sequences: out and every gradient (also of the projection weights) are finite,
    padding/blind rows of out and dq and padding rows of dk/dv are exactly zero, and everything equals the run on
    clean inputs. Compiled with fullgraph=True, dynamic False and True (aot_eager on CPU, the varlen value checks
    skipped there)."""
    dtype = torch.float16 if mode != "eager" else torch.float32
    xs, ws, dout, bad_q, bad_k, kwargs, heads = _sweep_problem(case, dtype, device)
    fn = _projected(backend, kwargs, heads)
    if mode != "eager":
        torch._dynamo.reset()  # one code object across cases: start each from an empty cache (recompile limit)
        fn = torch.compile(fn, fullgraph=True, dynamic=mode == "compile-dynamic",
                           backend="inductor" if device.type == "cuda" else "aot_eager")
    with mmkernels.deterministic():
        clean = _sweep_run(fn, xs, ws, dout, bad_q, bad_k, heads, 0.0)
        for poison, pid in zip(POISONS, _POISON_IDS, strict=True):
            got = _sweep_run(fn, xs, ws, dout, bad_q, bad_k, heads, poison)
            names = ("out", "dq", "dk", "dv", "dWq", "dWk", "dWv")
            for name, a, b in zip(names, got, clean, strict=True):
                assert torch.isfinite(a).all(), f"{pid}: {name} not finite"
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{pid}: {name} differs from the clean run")
            out, dq, dk, dv = got[:4]
            assert torch.all(out[bad_q] == 0) and torch.all(dq[bad_q] == 0), pid
            assert torch.all(dk[bad_k] == 0) and torch.all(dv[bad_k] == 0), pid
    if "dense" not in SWEEP_CASES[case] and backend == "triton":  # the padding rows are not left uninitialised
        assert torch.all(clean[0][bad_q] == 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_causal_hidden_keys_do_not_change_earlier_rows(backend, device):
    """Causal with Lq < Lk: keys past query i's diagonal never change row i (finite garbage, here 1e4, which also
    overflows fp16 products). NaN/inf in a key that a later query sees is data: it makes that query NaN, and can
    reach the other rows of its block through 0 * NaN in P V, as in flash-attn and SDPA (docs/ops/attention.md)."""
    q, k, v = _make((1, 20, 2, 32), (1, 37, 2, 32), torch.float16, device)
    first = 6  # rows 0..5 see keys 0..5 + 17 = 22
    kp, vp = k.clone(), v.clone()
    kp[:, first + 17:] = 1e4
    vp[:, first + 17:] = -1e4
    clean = attention(q, k, v, causal=True, backend=backend)
    dirty = attention(q, kp, vp, causal=True, backend=backend)
    torch.testing.assert_close(dirty[:, :first], clean[:, :first], rtol=0, atol=0)
    assert not torch.equal(dirty[:, first:], clean[:, first:])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_varlen_padding_rows_and_no_sequences(backend, device):
    """cu_seqlens_*[-1] < total: rows after it are padding (zeros in the output, zero gradients); B = 0
    (cu_seqlens = [0]) runs forward and backward (the reference used to crash in backward)."""
    q, k, v = _make((9, 2, 16), (6, 2, 16), torch.float32, device)
    cu0 = torch.zeros(1, dtype=torch.int32, device=device)
    out, dq, dk, dv = _fwd_bwd(attention, q, k, v, torch.ones(9, 2, 16), cu_seqlens_q=cu0, cu_seqlens_k=cu0,
                               backend=backend)
    for t in (out, dq, dk, dv):
        assert torch.all(t == 0)
    cu_q = torch.tensor([0, 4, 7], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    out, dq, dk, dv = check_against_reference(q, k, v, backend=backend, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.all(out[7:] == 0) and torch.all(dq[7:] == 0) and torch.all(dk[5:] == 0) and torch.all(dv[5:] == 0)


def test_float64_runs_on_the_reference(device, no_backend_env):
    q, k, v = _make((1, 5, 2, 8), (1, 7, 1, 8), torch.float64, device)
    q.requires_grad_()
    out = attention(q, k, v, causal=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a: attention(a, k, v, causal=True), (q,))
    with pytest.raises(BackendError, match="float64"):
        attention(q, k, v, backend="triton")


def test_numpy_softmax_scale(device):
    np = pytest.importorskip("numpy")
    q, k, v = _make((1, 7, 2, 16), (1, 9, 2, 16), torch.float32, device)
    for backend in ("reference", "triton"):
        got = attention(q, k, v, softmax_scale=np.float32(0.3), backend=backend)
        torch.testing.assert_close(got, attention_reference(q, k, v, softmax_scale=0.3), rtol=1e-5, atol=1e-6)


def test_grid_folds_sequences_and_heads_into_axis_0():
    """More than 65535 sequences x heads (many short varlen sequences): one grid axis of up to 2**31 - 1 programs,
    decoded as (block, head, sequence) with the blocks fastest; too many programs is a clear error."""
    from mmkernels.kernels.triton.attention import MAX_PROGRAMS, _grid

    assert _grid(3, 16, 70_000) == (3 * 16 * 70_000,)
    assert _grid(1, 65536, 2) == (131072,)
    with pytest.raises(ValueError, match="exceed the CUDA grid limit"):
        _grid(2, 2**16, 2**15)
    assert MAX_PROGRAMS == 2**31 - 1


@pytest.mark.gpu
def test_many_sequences_times_heads(device):
    """B * H > 65535 through the op: 4097 one-token sequences x 16 heads (65k+ programs take minutes under the
    interpreter, so on CPU only the grid function is tested, above)."""
    n, h = 4097, 16
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)
    q, k, v = _make((n, h, 8), (n, h, 8), torch.float16, device)
    check_against_reference(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1, max_seqlen_k=1)


# ---------------------------------------------------------------------------------------------------------------
# attention dropout
# ---------------------------------------------------------------------------------------------------------------


def _keep_from_output(backend, p, device, **kwargs):
    """q = 0 makes every probability 1/Lk; v = one-hot keys (Lk = D) makes out[.., i, h, j] = keep_ij / (Lk (1-p)):
    the output spells out the keep mask and the 1 / (1 - p) scale."""
    lk = 32
    q = torch.zeros(2, 24, 2, lk, device=device)
    v = torch.eye(lk, device=device)[None, :, None, :].expand(2, lk, 2, lk).contiguous()
    out = attention(q, torch.randn(2, lk, 2, lk, device=device), v, dropout_p=p, backend=backend, **kwargs)
    return out * lk * (1 - p)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_semantics(backend, p, device):
    """Inverted dropout: each probability kept with probability 1 - p and scaled by 1 / (1 - p); mean output over
    many draws is the no-dropout output."""
    keep = _keep_from_output(backend, p, device)
    torch.testing.assert_close(keep, keep.round(), rtol=0, atol=1e-5)  # exactly 0 or 1 / (1 - p) before scaling
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5  # 4 sigma
    q, k, v = _make((1, 9, 2, 16), (1, 13, 2, 16), torch.float32, device)
    want = attention_reference(q, k, v, causal=True)
    runs = 100
    mean = sum(attention(q, k, v, causal=True, dropout_p=p, backend=backend) for _ in range(runs)) / runs
    # per element Var(out) = sum_j P_j^2 v_j^2 p / (1 - p) <= max|v|^2 p / (1 - p): a 5-sigma bound on the mean
    bound = 5 * v.abs().max().item() * (p / (1 - p) / runs) ** 0.5
    assert (mean - want).abs().max().item() < bound


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dropout_reproducible_and_p0_is_no_dropout(backend, device):
    q, k, v = _make((2, 17, 4, 24), (2, 23, 2, 24), torch.float32, device)
    dout = torch.randn(q.shape, device=device)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with mmkernels.deterministic():
            runs.append(_fwd_bwd(attention, q, k, v, dout, causal=True, dropout_p=0.2, backend=backend))
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])
    state = torch.get_rng_state()
    plain = _fwd_bwd(attention, q, k, v, dout, causal=True, backend=backend)
    zero = _fwd_bwd(attention, q, k, v, dout, causal=True, dropout_p=0.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_backward_matches_reference_with_the_same_mask(dtype, varlen, device):
    """The Triton kernels' own keep mask (test hook) fed to the reference: forward and every gradient agree, so the
    backward regenerates the forward's mask (dQ kernel, dK/dV kernel, atomic and deterministic dQ)."""
    from mmkernels.kernels.triton.attention import dropout_keep_mask

    p = 0.3
    seed = torch.tensor([20240601], dtype=torch.int64, device=device)
    if varlen:
        lens_q, lens_k = [7, 0, 40, 12], [9, 5, 33, 4]
        cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
        q, k, v = _make((sum(lens_q) + 2, 4, 40), (sum(lens_k), 2, 40), dtype, device)
        kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40, max_seqlen_k=33)
        batch, lq, lk = 4, 40, 33
    else:
        q, k, v = _make((2, 45, 4, 40), (2, 70, 2, 40), dtype, device)
        kwargs, batch, lq, lk = {}, 2, 45, 70
    mask = dropout_keep_mask(seed, batch, 4, lq, lk, p)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02
    args = (kwargs.get("cu_seqlens_q"), kwargs.get("cu_seqlens_k"), lq, lk, True, 40**-0.5, p, seed)
    fn = lambda a, b, c: torch.ops.mmkernels.attention_fwd_triton(a, b, c, *args)[0]  # noqa: E731
    dout = torch.randn(q.shape, dtype=torch.float32).to(device)
    ref_kwargs = dict(kwargs, dropout_p=p, dropout_mask=mask)
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=True,
                     **ref_kwargs)
    same = _fwd_bwd(attention_reference, q, k, v, dout, causal=True, upcast=False, **ref_kwargs)
    for deterministic in (False, True):
        with mmkernels.deterministic(deterministic):
            ours = _fwd_bwd(fn, q, k, v, dout)
        for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, same, truth, strict=True):
            assert_within_ref_error(a, r, t, name=name)


def test_dropout_under_torch_compile(device):
    q, k, v = _make((2, 11, 2, 16), (2, 11, 2, 16), torch.float32, device)
    f = torch.compile(lambda a, b, c: attention(a, b, c, dropout_p=0.25, backend="triton"), fullgraph=True,
                      backend="inductor" if device.type == "cuda" else "aot_eager")
    torch.manual_seed(3)
    first = f(q, k, v)
    torch.manual_seed(3)
    assert torch.equal(f(q, k, v), first)
    assert not torch.equal(f(q, k, v), first)


def test_double_backward_is_a_clear_error(device):
    q, k, v = (t.requires_grad_() for t in _make((1, 6, 2, 16), (1, 6, 2, 16), torch.float32, device))
    out = attention(q, k, v, backend="triton")
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=False)
    assert g.shape == q.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(attention(q, k, v, backend="triton").square().sum(), q, create_graph=True)
    # the reference is differentiable twice
    (g,) = torch.autograd.grad(attention(q, k, v, backend="reference").square().sum(), q, create_graph=True)
    g.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# -- issue 19: keys past seqlen_k in a partial block never enter the backward's products ----------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_overflow_issue_repro(causal, dtype, deterministic, device):
    """The issue's case: one key, q = 2, k = -2 (a low log-sum-exp), v = 1, dO = 1: dq and dk are exactly 0 and dv
    exactly dO (the softmax over one key is constant). The keys that pad the key block read as zeros scored
    exp(0 - lse) = exp(16): fp16 dS overflowed and inf x 0 in the atomic dQ product gave NaN everywhere."""
    q = torch.full((1, 1, 1, 16), 2.0, dtype=dtype, device=device, requires_grad=True)
    k = torch.full((1, 1, 1, 16), -2.0, dtype=dtype, device=device, requires_grad=True)
    v = torch.ones((1, 1, 1, 16), dtype=dtype, device=device, requires_grad=True)
    with mmkernels.deterministic(deterministic):
        out = attention(q, k, v, causal=causal, backend="triton")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.equal(out, v.detach())
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    assert torch.equal(dv, torch.ones_like(dv))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bwd_varlen_overflow(causal, deterministic, device):
    """flash-attn's ``test_flash_attn_bwd_varlen_overflow`` at interpreter size: long query sequences over one key
    each (fp16, inputs x 3): no NaN in any gradient, and the values within flash-attn's rule."""
    lens_q, lens_k = [40, 17, 35], [1, 1, 1]
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(sum(lens_q), 2, 16, generator=g)).to(device=device, dtype=torch.float16)
    k = (3 * torch.randn(sum(lens_k), 2, 16, generator=g)).to(device=device, dtype=torch.float16)
    v = (3 * torch.randn(sum(lens_k), 2, 16, generator=g)).to(device=device, dtype=torch.float16)
    # one key per sequence: dq = dk = 0 exactly in the reference, and ours carries the fp32 rounding of
    # p = exp(s - lse) ~ 1 at these logits (mmkernels.testing.ref_error_floor)
    logits = (q.double().flatten(0, 1) @ k.double().flatten(0, 1).T).abs().max().item() * 16**-0.5
    with mmkernels.deterministic(deterministic):
        out, dq, dk, dv = check_against_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                  max_seqlen_q=max(lens_q), max_seqlen_k=1, logits=logits)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


# ---- debug checks off: cu_seqlens guarded on the device (issue 20 item 4) -------------------------------------------

_GUARD_BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
                                   else [])


@pytest.mark.parametrize("backend", _GUARD_BACKENDS)
@pytest.mark.parametrize("bad, guarded", [
    ([0, 3, 11], [0, 3, 9]),  # past the rows: clamped to the row count
    ([0, 5, 3, 9], [0, 5, 5, 9]),  # decreasing: a running maximum
    ([-2, 3, 9], [0, 3, 9]),  # before row 0
])
def test_unchecked_cu_seqlens_are_guarded_on_the_device(bad, guarded, backend, device):
    """With debug checks off and max_seqlen_* given (no host read), bad cu_seqlens values are clamped into [0, rows]
    and made non-decreasing on the device: the result is exactly the call with those guarded values (no read out of
    bounds, no crash), forward and every gradient. With debug checks on (the suite's default) they raise."""
    q, k, v = (torch.randn(9, 2, 8, device=device, requires_grad=True) for _ in range(3))
    bad_cu, good_cu = (torch.tensor(c, dtype=torch.int32, device=device) for c in (bad, guarded))
    kwargs = dict(max_seqlen_q=9, max_seqlen_k=9, backend=backend, causal=True)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention(q, k, v, cu_seqlens_q=bad_cu, cu_seqlens_k=bad_cu, **kwargs)
    dout = torch.randn(9, 2, 8, device=device)

    def run(cu):
        a, b, c = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = attention(a, b, c, cu_seqlens_q=cu, cu_seqlens_k=cu, **kwargs)
        out.backward(dout)
        return out.detach(), a.grad, b.grad, c.grad

    with mmkernels.debug_checks(False):
        got = run(bad_cu)
    want = run(good_cu)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", _GUARD_BACKENDS)
@pytest.mark.parametrize("cu, max_seqlen", [
    ([0, 7, 9], 2),  # max_seqlen shorter than the longest sequence
    ([4, 2, 9], 9),  # not starting at 0 (and decreasing): the rows before cu_seqlens[0] belong to no sequence
    ([0, 50, -7], 9),  # everything wrong at once
])
def test_unchecked_cu_seqlens_without_a_right_answer_stay_in_bounds(cu, max_seqlen, backend, device):
    """Values that no guarded cu_seqlens makes meaningful are unspecified with debug checks off, but never a crash,
    an out-of-bounds read or a non-finite value, forward and backward; with them on they raise (test_bad_input)."""
    q, k, v = (torch.randn(9, 2, 8, device=device, requires_grad=True) for _ in range(3))
    cu = torch.tensor(cu, dtype=torch.int32, device=device)
    with mmkernels.debug_checks(False):
        out = attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                        backend=backend)
        out.sum().backward()
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
