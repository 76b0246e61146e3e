"""mmkernels.ops.attention: Triton forward and backward against a float64 reference (flash-attn's 2x rule), on
awkward shapes; registration (opcheck, torch.compile); determinism; bad input.

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
from mmkernels.ops.attention import BACKENDS
from mmkernels.testing import assert_within_ref_error, run_opcheck

HAS_CUDA = torch.cuda.is_available()


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


def check_against_reference(q, k, v, *, causal=False, backend="triton", **kwargs):
    """ours vs float64 truth, bounded by 2x the error of the same-dtype PyTorch reference, for out, dq, dk, dv.

    The floor is a few fp32 ulps (the kernels accumulate in fp32) of the largest true value: where the reference
    is exact by construction (Lk = 1 makes dq and dk exactly 0 in autograd's order of operations) the rule would
    otherwise demand bit-exactness. It is far below the fp16 reference's own error."""
    dout = torch.randn(q.shape, dtype=torch.float32).to(q.device)
    ref_kwargs = {key: kwargs[key] for key in ("cu_seqlens_q", "cu_seqlens_k") if key in kwargs}
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=causal,
                     **ref_kwargs)
    same_dtype = _fwd_bwd(attention_reference, q, k, v, dout, causal=causal, upcast=False, **ref_kwargs)
    ours = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend=backend, **kwargs)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, same_dtype, truth, strict=True):
        assert a.dtype == q.dtype and a.shape == t.shape, name
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, t.abs().max().item() if t.numel() else 0.0)
        assert_within_ref_error(a, r, t, floor=floor, name=name)
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
    run_opcheck(fwd, (q, k, v, None, None, 37, 45, True, 0.2))
    cu = torch.tensor([0, 5, 5, 30], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(30, h, 72, device=device, requires_grad=True) for h in (4, 2, 2))
    run_opcheck(fwd, (qv, kv, vv, cu, cu, 25, 25, False, 0.2))
    with torch.no_grad():
        out, lse = fwd(q, k, v, None, None, 37, 45, True, 0.2)
    dout = torch.randn_like(out)
    run_opcheck(torch.ops.mmkernels.attention_bwd_triton.default,
                (dout, q.detach(), k.detach(), v.detach(), out, lse, None, None, 37, 45, True, 0.2, True))


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
    name, _ = BACKENDS.select(torch.device("cpu"))
    assert name == "reference"
    if HAS_CUDA:
        assert BACKENDS.select(torch.device("cuda"))[0] == "triton"
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
    ("fp64", lambda: ((_t(1, 4, 2, 8, dtype=torch.float64),) * 3, {}), TypeError, "float16 or bfloat16"),
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
    ("cu_seqlens end", lambda: ((_t(5, 2, 8),) * 3, {"cu_seqlens_q": _CU, "cu_seqlens_k": _CU}), ValueError,
     "number of rows"),
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
