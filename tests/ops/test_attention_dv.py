"""mmkernels.ops.attention with a value head dim D_v different from the query/key head dim D_qk (issue 21 item 1:
MLA's 192 / 128): forward and every gradient against a float64 reference (flash-attn's 2x rule), dense and varlen,
causal and not, GQA, both dQ modes, dropout, the softmax-scale default, the packed-path routing, bad input, opcheck
and the host-sync budget. Triton runs under the interpreter on CPU (fp32/fp16, small shapes)."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.attention import attention_reference
from mmkernels.kernels.triton import attention as tattn
from mmkernels.kernels.triton import attention_packed as tpacked
from mmkernels.ops import attention
from mmkernels.testing import assert_all_within_ref_error, count_host_syncs, run_opcheck

# (D_qk, D_v): MLA's real pair (Q/K split 128 + 64), small odd pairs (one chunk of 16 / two chunks 32 + 16 and
# 64 + 16, V padded 8 -> 16, 24 -> 32), and D_v > D_qk once.
PAIRS = [(192, 128), (12, 8), (40, 24), (72, 64), (8, 12)]
DTYPES = [torch.float32, torch.float16]


def _rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _heads(dqk):
    return (2, 1) if dqk >= 128 else (4, 2)  # GQA everywhere; 192 / 128 with few heads (the interpreter is slow)


def _fwd_bwd(fn, q, k, v, dout, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _check(q, k, v, *, causal, backend="triton", deterministic=(False, True), ref_kwargs=None, **kwargs):
    """ours (each dQ mode) vs float64 truth within 2x the same-dtype reference's error, for out, dq, dk, dv; returns
    the last run."""
    ref_kwargs = dict(ref_kwargs or {})
    ref_kwargs.update({key: kwargs[key] for key in ("cu_seqlens_q", "cu_seqlens_k") if key in kwargs})
    out_shape = (*q.shape[:-1], v.shape[-1])
    dout = _rand(out_shape, torch.float32, q.device, 7)
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=causal,
                     **ref_kwargs)
    same = _fwd_bwd(attention_reference, q, k, v, dout, causal=causal, upcast=False, **ref_kwargs)
    for det in deterministic:
        with mmkernels.deterministic(det):
            ours = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend=backend, **kwargs)
        for name, a, t in zip(("out", "dq", "dk", "dv"), ours, truth, strict=True):
            assert a.dtype == q.dtype and a.shape == t.shape, name
        assert ours[0].shape == out_shape
        assert_all_within_ref_error(ours, same, truth, prefix=f"{backend} det={det} ")
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dqk, dv", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_dense(dqk, dv, causal, dtype, device):
    hq, hkv = _heads(dqk)
    # Lq > Lk with causal leaves rows that see no key; lengths are no multiple of any block
    for lq, lk in ((19, 23), (23, 13)):
        q = _rand((2, lq, hq, dqk), dtype, device, 1)
        k = _rand((2, lk, hkv, dqk), dtype, device, 2)
        v = _rand((2, lk, hkv, dv), dtype, device, 3)
        _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dqk, dv", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_reference_backend(dqk, dv, device):
    hq, hkv = _heads(dqk)
    q = _rand((1, 9, hq, dqk), torch.float32, device, 1)
    k = _rand((1, 11, hkv, dqk), torch.float32, device, 2)
    v = _rand((1, 11, hkv, dv), torch.float32, device, 3)
    _check(q, k, v, causal=True, backend="reference", deterministic=(False,))


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dqk, dv", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_varlen(dqk, dv, causal, dtype, device):
    """Varlen, per-sequence kernels: empty pairs, Lq > Lk, keys without queries and the reverse, and two padding
    rows past cu_seqlens[-1] (zero output and gradients)."""
    hq, hkv = _heads(dqk)
    lens_q, lens_k = [5, 0, 17, 9, 0], [9, 0, 6, 21, 4]
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    q = _rand((sum(lens_q) + 2, hq, dqk), dtype, device, 1)
    k = _rand((sum(lens_k) + 1, hkv, dqk), dtype, device, 2)
    v = _rand((sum(lens_k) + 1, hkv, dv), dtype, device, 3)
    out, dq, dk, dvv = _check(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.all(out[-2:] == 0) and torch.all(dq[-2:] == 0) and torch.all(dk[-1:] == 0)
    assert torch.all(dvv[-1:] == 0)


def test_varlen_routes_to_per_sequence_kernels(monkeypatch, device):
    """The packed kernels take one head dim: D_v != D_qk runs the per-sequence kernels even when packed is forced
    (MMKERNELS_ATTENTION_PACKED=1), forward and backward, with correct results; equal dims still go packed."""
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "1")
    calls = []
    for name in ("attention_packed_fwd", "attention_packed_bwd"):
        original = getattr(tpacked, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tpacked, name, spy)
    lens = [7, 12, 3]
    cu = _cu(lens, device)
    q = _rand((sum(lens), 2, 40), torch.float32, device, 1)
    k = _rand((sum(lens), 1, 40), torch.float32, device, 2)
    v = _rand((sum(lens), 1, 24), torch.float32, device, 3)
    _check(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert calls == []
    _fwd_bwd(attention, q, k, _rand((sum(lens), 1, 40), torch.float32, device, 4), q, causal=True, backend="triton",
             cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert calls == ["attention_packed_fwd", "attention_packed_bwd"]


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dqk, dv", [(40, 24), (8, 12)], ids=["40-24", "8-12"])
def test_dropout_with_the_kernels_mask(dqk, dv, varlen, device):
    """The Triton kernels' keep mask fed to the reference: forward and every gradient agree in both dQ modes."""
    p = 0.3
    seed = torch.tensor([20240601], dtype=torch.int64, device=device)
    if varlen:
        lens_q, lens_k = [7, 0, 20], [9, 5, 16]
        cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
        shapes = (sum(lens_q), 4, dqk), (sum(lens_k), 2, dqk), (sum(lens_k), 2, dv)
        args = (cu_q, cu_k, 20, 16)
        ref_kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=16)
        batch, lq, lk = 3, 20, 16
    else:
        shapes = (2, 21, 4, dqk), (2, 30, 2, dqk), (2, 30, 2, dv)
        args, ref_kwargs, (batch, lq, lk) = (None, None, 21, 30), {}, (2, 21, 30)
    q, k, v = (_rand(s, torch.float32, device, i) for i, s in enumerate(shapes))
    mask = tattn.dropout_keep_mask(seed, batch, 4, lq, lk, p)
    fn = lambda a, b, c, causal: torch.ops.mmkernels.attention_fwd_triton(  # noqa: E731
        a, b, c, *args, causal, dqk**-0.5, p, seed)[0]
    dout = _rand((*q.shape[:-1], dv), torch.float32, device, 7)
    ref_kwargs.update(dropout_p=p, dropout_mask=mask)
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=True,
                     **ref_kwargs)
    same = _fwd_bwd(attention_reference, q, k, v, dout, causal=True, upcast=False, **ref_kwargs)
    for det in (False, True):
        with mmkernels.deterministic(det):
            ours = _fwd_bwd(fn, q, k, v, dout, causal=True)
        assert_all_within_ref_error(ours, same, truth, prefix=f"det={det} ")


def test_softmax_scale_defaults_to_qk_head_dim(device):
    q = _rand((1, 9, 2, 40), torch.float32, device, 1)
    k = _rand((1, 9, 2, 40), torch.float32, device, 2)
    v = _rand((1, 9, 2, 24), torch.float32, device, 3)
    for backend in ("triton", "reference"):
        default = attention(q, k, v, backend=backend)
        assert torch.equal(default, attention(q, k, v, softmax_scale=40**-0.5, backend=backend))
        assert not torch.allclose(default, attention(q, k, v, softmax_scale=24**-0.5, backend=backend))


def test_head_dims_split_qk_and_size_v_alone():
    """192 / 128 is not padded to 256: Q/K in 128 + 64, V in 128; equal dims keep one chunk (the kernels of before)."""
    assert tattn._head_dims(192, 128) == tattn._HeadDims(128, 64, 128, True, 256)
    assert tattn._head_dims(40, 24) == tattn._HeadDims(32, 16, 32, False, 64)
    assert tattn._head_dims(12, 8) == tattn._HeadDims(16, 0, 16, False, 16)
    assert tattn._head_dims(8, 12) == tattn._HeadDims(16, 0, 16, False, 16)
    assert tattn._head_dims(72, 72) == tattn._HeadDims(128, 0, 128, False, 128)
    assert tattn._head_dims(192, 192) == tattn._HeadDims(256, 0, 256, False, 256)


def _t(*shape):
    return torch.zeros(shape)


BAD = [
    ("q/k head dims", (_t(1, 4, 2, 12), _t(1, 4, 2, 8), _t(1, 4, 2, 8)), {}, "q and k must have the same head dim"),
    ("v length", (_t(1, 4, 2, 12), _t(1, 4, 2, 12), _t(1, 5, 2, 8)), {}, "v must have the same shape as k"),
    ("v heads", (_t(1, 4, 2, 12), _t(1, 4, 2, 12), _t(1, 4, 1, 8)), {}, "v must have the same shape as k"),
    ("v batch", (_t(1, 4, 2, 12), _t(1, 4, 2, 12), _t(2, 4, 2, 8)), {}, "v must have the same shape as k"),
    ("v head dim 0", (_t(1, 4, 2, 12), _t(1, 4, 2, 12), _t(1, 4, 2, 0)), {}, r"v head dim must be in \[1, 256\]"),
    ("v head dim 264", (_t(1, 4, 2, 12), _t(1, 4, 2, 12), _t(1, 4, 2, 264)), {}, r"v head dim must be in"),
    ("v dims", (_t(1, 4, 2, 12), _t(1, 4, 2, 12), _t(4, 2, 8)), {}, "v must be"),
    ("varlen v rows", (_t(4, 2, 12), _t(4, 2, 12), _t(3, 2, 8)),
     dict(cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32)),
     r"v must have the same shape as k but for the head dim \(\[total_k, Hkv, D_v\]\)"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case, backend):
    _, args, kwargs, match = case
    with pytest.raises(ValueError, match=match):
        attention(*args, backend=backend, **kwargs)


def test_opcheck(device):
    """Schema, fake (the output takes D_v) and autograd registration of the Triton op at D_qk != D_v."""
    fwd = torch.ops.mmkernels.attention_fwd_triton
    q = _rand((1, 9, 2, 40), torch.float32, device, 1).requires_grad_()
    k = _rand((1, 11, 1, 40), torch.float32, device, 2).requires_grad_()
    v = _rand((1, 11, 1, 24), torch.float32, device, 3).requires_grad_()
    run_opcheck(fwd, (q, k, v, None, None, 9, 11, True, 0.2, 0.0, None))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_no_host_sync(varlen, device):
    """The hot path stays sync-free at D_qk != D_v: forward and backward (both dQ modes), max_seqlen_* given."""
    if varlen:
        cu = _cu([5, 11], device)
        shapes, kwargs = ((16, 2, 40), (16, 1, 40), (16, 1, 24)), dict(cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                                       max_seqlen_q=11, max_seqlen_k=11)
    else:
        shapes, kwargs = ((1, 9, 2, 40), (1, 11, 1, 40), (1, 11, 1, 24)), {}
    q, k, v = (_rand(s, torch.float32, device, i).requires_grad_() for i, s in enumerate(shapes))
    for det in (False, True):
        with mmkernels.debug_checks(False), mmkernels.deterministic(det), count_host_syncs() as syncs:
            out = attention(q, k, v, causal=True, backend="triton", **kwargs)
            out.sum().backward()
        assert syncs.count == 0, syncs.calls
