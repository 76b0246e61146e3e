"""Packed varlen attention (``kernels/triton/attention_packed.py``): query tiles across sequence boundaries with
block-diagonal masks, head dims in two power-of-two chunks.

The packed path must compute what the per-sequence path computes: forward and every gradient against a float64
reference (flash-attn's 2x rule) and against the per-sequence kernels, with mixed lengths that cross and fill the
interpreter's 16-row tiles, GQA, causal, dropout on the same Philox stream, NaN in padding rows and in rows that see
no key, through the registered op and under torch.compile. Also: the head-dim split, the dispatch rule and the
analytic occupancy on a hand-computed case.

Under the interpreter (CPU) the kernels run on fp32/fp16 with 32 x 32 tiles.
"""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.attention import attention_reference
from mmkernels.kernels.triton import attention_packed as packed
from mmkernels.kernels.triton import attention_varlen as varlen
from mmkernels.kernels.triton import tuning
from mmkernels.ops import attention
from mmkernels.testing import assert_within_ref_error

# lengths around the interpreter's 32-row tiles: 1, odd, exactly a tile, longer than two tiles, an empty query
# sequence with keys, keys but no queries, more queries than keys (causal: blind rows), fewer
LENS_Q = [1, 7, 32, 37, 0, 23, 5, 16, 9]
LENS_K = [1, 9, 32, 30, 4, 23, 0, 20, 9]
PAD_Q, PAD_K = 3, 2  # padding rows past cu_seqlens[-1]


def _cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _blind_rows(causal):
    """Valid query rows that see no key: a sequence without keys, and causal rows before the diagonal."""
    bad = torch.zeros(sum(LENS_Q) + PAD_Q, dtype=torch.bool)
    start = 0
    for lq, lk in zip(LENS_Q, LENS_K, strict=True):
        blind = lq if lk == 0 else (max(lq - lk, 0) if causal else 0)
        bad[start:start + blind] = True
        start += lq
    return bad


def _problem(dtype, d, device, *, hq=4, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(LENS_Q) + PAD_Q, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(LENS_K) + PAD_K, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(LENS_K) + PAD_K, hkv, d, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(q.shape, generator=g).to(device)
    kwargs = dict(cu_seqlens_q=_cu(LENS_Q, device), cu_seqlens_k=_cu(LENS_K, device), max_seqlen_q=max(LENS_Q),
                  max_seqlen_k=max(LENS_K))
    return q, k, v, dout, kwargs


def _fwd_bwd(fn, q, k, v, dout, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _spy(monkeypatch) -> dict[str, int]:
    """Count the packed launchers' calls (the varlen launchers import them at call time), so a test knows which
    kernels ran."""
    calls = {"fwd": 0, "bwd": 0}

    def counting(key, fn):
        def counted(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(packed, "attention_packed_fwd", counting("fwd", packed.attention_packed_fwd))
    monkeypatch.setattr(packed, "attention_packed_bwd", counting("bwd", packed.attention_packed_bwd))
    return calls


def _with_mode(monkeypatch, packed_mode: bool | None):
    if packed_mode is None:
        monkeypatch.delenv("MMKERNELS_ATTENTION_PACKED", raising=False)
    else:
        monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "1" if packed_mode else "0")


# (dtype, causal, head dim): each dtype and mask once with head dim 72 (64 + 16) and once with 40 (32 + 16); the
# dropout test runs a power of two (one chunk)
CASES = [(torch.float32, False, 72), (torch.float32, True, 40), (torch.float16, False, 40),
         (torch.float16, True, 72)]


@pytest.mark.parametrize("dtype,causal,d", CASES, ids=[f"{str(c[0])[6:]}-{'causal' if c[1] else 'full'}-D{c[2]}"
                                                      for c in CASES])
def test_packed_matches_reference_and_per_sequence_path(dtype, causal, d, device, monkeypatch):
    """Through the public op (the registered op, autograd): packed forward and dq/dk/dv within 2x the same-dtype
    reference's error of float64 truth and close to the per-sequence kernels; NaN in the padding rows and in the
    blind rows changes nothing (bitwise) and their outputs/gradients are zero; atomic and deterministic dQ agree."""
    q, k, v, dout, kwargs = _problem(dtype, d, device)
    ref_kwargs = {key: kwargs[key] for key in ("cu_seqlens_q", "cu_seqlens_k")}
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=causal,
                     **ref_kwargs)
    same_dtype = _fwd_bwd(attention_reference, q, k, v, dout, causal=causal, upcast=False, **ref_kwargs)
    calls = _spy(monkeypatch)
    _with_mode(monkeypatch, False)
    with mmkernels.deterministic(False):
        unpacked = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend="triton", **kwargs)
    assert calls == {"fwd": 0, "bwd": 0}
    _with_mode(monkeypatch, True)
    with mmkernels.deterministic():
        ours = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend="triton", **kwargs)
    assert calls == {"fwd": 1, "bwd": 1}
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for name, a, r, t, u in zip(("out", "dq", "dk", "dv"), ours, same_dtype, truth, unpacked, strict=True):
        assert a.dtype == dtype and a.shape == t.shape, name
        assert_within_ref_error(a, r, t, name=name)
        torch.testing.assert_close(a, u, **close, msg=f"{name}: packed differs from the per-sequence kernels")

    # invalid values: NaN in padding rows of q/k/v and in the q rows that see no key
    nq, nk = sum(LENS_Q), sum(LENS_K)
    blind = _blind_rows(causal).to(device)
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    qp[blind] = float("nan")
    qp[nq:], kp[nk:], vp[nk:] = float("nan"), float("nan"), float("nan")
    with mmkernels.deterministic():
        poisoned = _fwd_bwd(attention, qp, kp, vp, dout, causal=causal, backend="triton", **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), poisoned, ours, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: NaN in invalid rows changed the result")
    out, dq, dk, dv = poisoned
    assert torch.all(out[nq:] == 0) and torch.all(dq[nq:] == 0) and torch.all(dk[nk:] == 0) and torch.all(dv[nk:] == 0)
    assert torch.all(out[blind] == 0) and torch.all(dq[blind] == 0)

    # the default (atomic dQ) mode of the packed dK/dV kernel agrees with the deterministic dQ kernel
    with mmkernels.deterministic(False):
        atomic = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend="triton", **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), atomic, ours, strict=True):
        torch.testing.assert_close(a, b, **close, msg=name)


# Sequences without queries (keys only) and without keys (queries only) around the interpreter's 32-row query tiles
# and 32-key key tiles. Query tile 0 (rows 0-31): sequences 1, 2 (no keys), 3 and the start of 7, with 4, 5 (40
# keys: a whole key block of them) and 6 (no queries) between them; sequence 0 (no queries) holds the first keys (key
# tile 0, with the keys of 1 and 3); tile 1: the end of 7, then 8 (no queries) between the tiles, 9, 10 (no keys),
# 11, and 12 (no queries) after the last query's keys, and padding rows. Causal: sequences 3 and 7 have 2 and 1 blind
# rows.
GAP_Q = [0, 10, 3, 12, 0, 0, 0, 10, 0, 13, 5, 7, 0]
GAP_K = [6, 10, 0, 10, 7, 40, 3, 9, 5, 13, 0, 9, 4]
GAP_CASES = [(torch.float32, False, 40, float("nan")), (torch.float32, True, 32, float("inf")),
             (torch.float16, False, 32, float("inf")), (torch.float16, True, 40, float("nan"))]


def _gap_problem(dtype, d, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(GAP_Q) + PAD_Q, 4, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(GAP_K) + PAD_K, 2, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(GAP_K) + PAD_K, 2, d, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(q.shape, generator=g).to(device)
    kwargs = dict(cu_seqlens_q=_cu(GAP_Q, device), cu_seqlens_k=_cu(GAP_K, device), max_seqlen_q=max(GAP_Q),
                  max_seqlen_k=max(GAP_K))
    return q, k, v, dout, kwargs


def _segments(lengths, keep, total, device):
    """bool mask over ``total`` packed rows: the rows of the sequences ``b`` with ``keep(b)``."""
    mask = torch.zeros(total, dtype=torch.bool)
    start = 0
    for b, n in enumerate(lengths):
        mask[start:start + n] = keep(b)
        start += n
    return mask.to(device)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype,causal,d,poison", GAP_CASES,
                         ids=[f"{str(c[0])[6:]}-{'causal' if c[1] else 'full'}-D{c[2]}-{c[3]}" for c in GAP_CASES])
def test_packed_keys_of_sequences_without_queries_never_leak(dtype, causal, d, poison, device, monkeypatch):
    """Keys/values of sequences without queries (before, inside, between and after the query tiles, one longer than
    a key block) hold NaN or +inf (-inf in V), as do the padding rows and the q rows of sequences without keys: the
    packed kernels never read them. Forward and dq/dk/dv, both dQ modes, are bitwise those of clean inputs, within
    2x the same-dtype reference's error of float64 truth and close to the per-sequence kernels; the query-less keys
    get exact-zero dk/dv, the key-less rows exact-zero out/dq."""
    q, k, v, dout, kwargs = _gap_problem(dtype, d, device)
    nq, nk = sum(GAP_Q), sum(GAP_K)
    dead_k = _segments(GAP_K, lambda b: GAP_Q[b] == 0, k.shape[0], device)  # keys no query sees
    dead_k[nk:] = True
    blind = _segments(GAP_Q, lambda b: GAP_K[b] == 0, q.shape[0], device)  # rows that see no key
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    kp[dead_k], vp[dead_k], qp[blind] = poison, -poison, poison
    qp[nq:] = poison
    assert dead_k[:nk].sum() == 6 + 7 + 40 + 3 + 5 + 4 and blind[:nq].sum() == 3 + 5

    ref_kwargs = dict(cu_seqlens_q=kwargs["cu_seqlens_q"], cu_seqlens_k=kwargs["cu_seqlens_k"], causal=causal)
    truth = _fwd_bwd(attention_reference, qp.double(), kp.double(), vp.double(), dout.double(), **ref_kwargs)
    same_dtype = _fwd_bwd(attention_reference, qp, kp, vp, dout, upcast=False, **ref_kwargs)
    calls = _spy(monkeypatch)
    _with_mode(monkeypatch, False)
    unpacked = _fwd_bwd(attention, qp, kp, vp, dout, causal=causal, backend="triton", **kwargs)
    assert calls == {"fwd": 0, "bwd": 0}
    _with_mode(monkeypatch, True)
    runs = {}
    for name, det, inputs in (("clean", True, (q, k, v)), ("poisoned", True, (qp, kp, vp)),
                              ("atomic", False, (qp, kp, vp))):
        with mmkernels.deterministic(det):
            runs[name] = _fwd_bwd(attention, *inputs, dout, causal=causal, backend="triton", **kwargs)
    assert calls == {"fwd": 3, "bwd": 3}
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        ours = runs["poisoned"][i]
        torch.testing.assert_close(ours, runs["clean"][i], rtol=0, atol=0,
                                   msg=f"{name}: a value no query may see changed the packed result")
        assert_within_ref_error(ours, same_dtype[i], truth[i], name=name)
        assert_within_ref_error(runs["atomic"][i], same_dtype[i], truth[i], name=f"{name} (atomic dQ)")
        torch.testing.assert_close(ours, unpacked[i], **close, msg=f"{name}: packed differs from the per-sequence "
                                                                    "kernels")
    for out, dq, dk, dv in (runs["poisoned"], runs["atomic"]):
        assert torch.all(dk[dead_k] == 0) and torch.all(dv[dead_k] == 0)
        assert torch.all(out[blind] == 0) and torch.all(dq[blind] == 0)
        assert torch.all(out[nq:] == 0) and torch.all(dq[nq:] == 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_nan_in_a_real_sequence_reaches_its_tile_neighbours_only(dtype, device, monkeypatch):
    """The documented property of sharing a tile (docs/ops/attention.md): NaN in the valid K/V rows of sequence 1
    reaches the out and dq of sequence 3 (same query tile and key block: ``0 * NaN`` in ``P V`` and ``dS K``), where
    the per-sequence kernels keep it in sequence 1. It reaches nothing else: the key-less rows of that tile keep
    exact-zero out/dq, the query-less keys exact-zero dk/dv, and the sequences of the other query tile and key blocks
    (9, 11) are bitwise those of clean inputs."""
    q, k, v, dout, kwargs = _gap_problem(dtype, 32, device)
    s1_k = _segments(GAP_K, lambda b: b == 1, k.shape[0], device)
    kp, vp = k.clone(), v.clone()
    kp[s1_k], vp[s1_k] = float("nan"), float("nan")
    dead_k = _segments(GAP_K, lambda b: GAP_Q[b] == 0, k.shape[0], device)
    blind = _segments(GAP_Q, lambda b: GAP_K[b] == 0, q.shape[0], device)
    s3 = _segments(GAP_Q, lambda b: b == 3, q.shape[0], device)
    later_q = _segments(GAP_Q, lambda b: b in (9, 11), q.shape[0], device)
    later_k = _segments(GAP_K, lambda b: b in (9, 11), k.shape[0], device)
    _with_mode(monkeypatch, False)
    unpacked = _fwd_bwd(attention, q, kp, vp, dout, backend="triton", **kwargs)
    _with_mode(monkeypatch, True)
    for det in (True, False):
        with mmkernels.deterministic(det):
            clean = _fwd_bwd(attention, q, k, v, dout, backend="triton", **kwargs)
            out, dq, dk, dv = _fwd_bwd(attention, q, kp, vp, dout, backend="triton", **kwargs)
        assert torch.isnan(out[s3]).all() and torch.isnan(dq[s3]).all()  # the tile neighbour: the known property
        assert torch.isfinite(unpacked[0][s3]).all() and torch.isfinite(unpacked[1][s3]).all()
        assert torch.all(out[blind] == 0) and torch.all(dq[blind] == 0)
        assert torch.all(dk[dead_k] == 0) and torch.all(dv[dead_k] == 0)
        for a, b, rows in zip((out, dq, dk, dv), clean, (later_q, later_q, later_k, later_k), strict=True):
            torch.testing.assert_close(a[rows], b[rows], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_dropout_uses_the_per_sequence_stream(dtype, device, monkeypatch):
    """Same seed, same kept probabilities: the packed path equals the per-sequence one (forward and gradients, to
    rounding: a different mask would differ by O(1)), and both equal the reference fed the kernels' own mask."""
    from mmkernels.kernels.triton.attention import dropout_keep_mask

    p, d = 0.3, 32
    q, k, v, dout, kwargs = _problem(dtype, d, device, seed=1)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    lq, lk = kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]
    args = (kwargs["cu_seqlens_q"], kwargs["cu_seqlens_k"], lq, lk, True, d**-0.5, p, seed)
    fn = lambda a, b, c: torch.ops.mmkernels.attention_fwd_triton(a, b, c, *args)[0]  # noqa: E731
    runs = {}
    calls = _spy(monkeypatch)
    for mode in (False, True):
        _with_mode(monkeypatch, mode)
        with mmkernels.deterministic():
            runs[mode] = _fwd_bwd(fn, q, k, v, dout)
        assert calls == ({"fwd": 1, "bwd": 1} if mode else {"fwd": 0, "bwd": 0})
    close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), runs[True], runs[False], strict=True):
        torch.testing.assert_close(a, b, **close, msg=name)
    mask = dropout_keep_mask(seed, len(LENS_Q), q.shape[1], lq, lk, p)
    ref_kwargs = dict(cu_seqlens_q=kwargs["cu_seqlens_q"], cu_seqlens_k=kwargs["cu_seqlens_k"], dropout_p=p,
                      dropout_mask=mask, softmax_scale=d**-0.5)
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=True,
                     **ref_kwargs)
    same = _fwd_bwd(attention_reference, q, k, v, dout, causal=True, upcast=False, **ref_kwargs)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), runs[True], same, truth, strict=True):
        assert_within_ref_error(a, r, t, name=name)


def test_packed_under_torch_compile(device, monkeypatch):
    """The registered op with the packed kernels compiles with fullgraph=True (aot_eager on CPU) and matches eager."""
    _with_mode(monkeypatch, True)
    calls = _spy(monkeypatch)
    q, k, v, dout, kwargs = _problem(torch.float32, 24, device, hq=2, hkv=1, seed=2)

    def f(q, k, v):
        return attention(q, k, v, causal=True, backend="triton", **kwargs)

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    eager = _fwd_bwd(f, q, k, v, dout)
    got = _fwd_bwd(compiled, q, k, v, dout)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls["fwd"] >= 2 and calls["bwd"] >= 2  # eager and compiled both ran the packed kernels


def test_packed_empty_batches(device, monkeypatch):
    """B = 0 and all-empty sequences: zeros everywhere, lse +inf, no launch errors."""
    _with_mode(monkeypatch, True)
    q = torch.randn(5, 2, 24, device=device)
    k = torch.randn(4, 2, 24, device=device)
    for cu_q, cu_k in (([0], [0]), ([0, 0, 0], [0, 3, 3])):
        cq, ck = (torch.tensor(c, dtype=torch.int32, device=device) for c in (cu_q, cu_k))
        out, dq, dk, dv = _fwd_bwd(attention, q, k, k, torch.ones_like(q), cu_seqlens_q=cq, cu_seqlens_k=ck,
                                   backend="triton")
        assert all(torch.all(t == 0) for t in (out, dq, dk, dv))


@pytest.mark.parametrize("head_dim,chunks", [(16, (16, 0)), (8, (16, 0)), (24, (32, 0)), (40, (32, 16)),
                                             (64, (64, 0)), (72, (64, 16)), (80, (64, 16)), (88, (64, 32)),
                                             (96, (64, 32)), (112, (128, 0)), (128, (128, 0)), (144, (128, 16)),
                                             (200, (256, 0)), (256, (256, 0))])
def test_head_dim_chunks(head_dim, chunks):
    d0, d1 = packed.head_dim_chunks(head_dim)
    assert (d0, d1) == chunks
    assert d0 + d1 >= head_dim and d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0 and (d1 == 0 or d1 >= 16)


def test_occupancy_hand_computed():
    """Two sequences of 3 and 5 tokens, 4 x 4 tiles, head dim 24.
    Valid: 3*3 + 5*5 = 34 entries. Per-sequence: 1 block of 4 rows x 4 keys + 2 blocks of 4 rows x 8 keys = 80.
    Packed: tile 0 = rows 0-2 (keys 0-2) and row 3 (keys 3-7): span 8 keys -> 4 x 8; tile 1 = rows 4-7 (keys 3-7):
    span 5 -> 8 keys -> 4 x 8; 64 in all. Head dim 24 runs at 32 either way (16 + 16 gains nothing)."""
    un = varlen.occupancy([3, 5], 24, "unpacked", block_m=4, block_n=4)
    pk = varlen.occupancy([3, 5], 24, "packed", block_m=4, block_n=4)
    assert (un.valid, un.computed, pk.valid, pk.computed) == (34, 80, 34, 64)
    assert un.score_fraction == 34 / 80 and pk.score_fraction == 34 / 64
    assert un.block_d == pk.block_d == 32 and un.fraction == 34 / 80 * 0.75
    # causal, 3 queries on 3 keys: 1 + 2 + 3 valid; one 4 x 4 tile either way
    c = varlen.occupancy([3], 16, "packed", causal=True, block_m=4, block_n=4)
    assert (c.valid, c.computed) == (6, 16)
    # head dim 72: 128 per-sequence, 80 packed
    assert varlen.occupancy([197], 72, "unpacked").block_d == 128
    assert varlen.occupancy([197], 72, "packed").head_dim_fraction == 72 / 80
    with pytest.raises(ValueError, match="mode"):
        varlen.occupancy([3], 16, "padded")


def test_packed_pays_rule(monkeypatch):
    """The dispatch rule on GPU configs (the interpreter never picks packed on its own); the env override wins."""
    monkeypatch.delenv("MMKERNELS_ATTENTION_PACKED", raising=False)
    q72 = torch.empty(32 * 197, 12, 72, dtype=torch.float16)
    q64 = torch.empty(4096, 16, 64, dtype=torch.float16)
    assert not varlen.packed_pays(q72, 197, 197)  # CPU tensor: interpreter
    gpu = tuning.SM90
    assert varlen.packed_pays(q72, 197, 197, gpu)  # ViT-B-like images, D = 72
    assert varlen.packed_pays(q64, 257, 257, gpu)  # D = 64: 257 tokens, the packed tiles alone do 1.25x less work
    assert not varlen.packed_pays(q64, 197, 197, gpu)  # D = 64: 197 tokens, only 1.05x: not worth the masks
    assert not varlen.packed_pays(q64, 4096, 4096, gpu)  # one long sequence: nothing to pack
    assert not varlen.packed_pays(q64, 7, 7, gpu)  # very short sequences: 64-row tiles would waste more
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "0")
    assert not varlen.packed_pays(q72, 197, 197, gpu)
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "1")
    assert varlen.packed_pays(q64, 4096, 4096, gpu)
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "yes")
    with pytest.raises(ValueError, match="MMKERNELS_ATTENTION_PACKED"):
        varlen.packed_pays(q64, 197, 197, gpu)


GPU_SHAPES = [(197, 72, False), (257, 88, False), (577, 80, False), (1025, 64, True), (197, 64, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens,d,causal", GPU_SHAPES, ids=[f"L{s[0]}-D{s[1]}{'-causal' if s[2] else ''}"
                                                             for s in GPU_SHAPES])
def test_packed_gpu_vision_shapes(tokens, d, causal, dtype, device, monkeypatch):
    """The GPU configs on vision shapes (images of one length, a shorter one, a one-token one, padding rows), GQA
    6:2, both dQ modes, against float64 truth (2x the same-dtype reference's error)."""
    _with_mode(monkeypatch, True)
    lens = [tokens, tokens, tokens - 5, 1, tokens]
    g = torch.Generator().manual_seed(tokens + d)
    q = torch.randn(sum(lens) + 4, 6, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(lens) + 4, 2, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(lens) + 4, 2, d, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(q.shape, generator=g).to(device)
    cu = _cu(lens, device)
    truth = _fwd_bwd(attention_reference, q.double(), k.double(), v.double(), dout.double(), causal=causal,
                     cu_seqlens_q=cu, cu_seqlens_k=cu)
    same = _fwd_bwd(attention_reference, q, k, v, dout, causal=causal, upcast=False, cu_seqlens_q=cu,
                    cu_seqlens_k=cu)
    calls = _spy(monkeypatch)
    for deterministic in (False, True):
        with mmkernels.deterministic(deterministic):
            ours = _fwd_bwd(attention, q, k, v, dout, causal=causal, backend="triton", cu_seqlens_q=cu,
                            cu_seqlens_k=cu, max_seqlen_q=tokens, max_seqlen_k=tokens)
        for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, same, truth, strict=True):
            mode = "deterministic" if deterministic else "atomic"
            assert_within_ref_error(a, r, t, name=f"{name} ({mode})")
    assert calls == {"fwd": 2, "bwd": 2}


@pytest.mark.parametrize("d,dtype,forward,backward", [
    (64, torch.float16, True, True), (40, torch.bfloat16, True, True), (72, torch.float16, True, False),
    (88, torch.bfloat16, True, False), (128, torch.float16, True, False), (136, torch.float16, False, False),
    (40, torch.float32, False, False), (72, torch.float32, False, False)])
def test_packed_runs_on_a_gpu_only_where_it_compiles_spill_free(d, dtype, forward, backward, monkeypatch):
    """As on a GPU (the interpreter always runs packed when asked): the widths and dtypes whose packed configs spill
    (make check-triton) go to the per-sequence kernels, forced or not."""
    q = torch.empty(10, 2, d, dtype=dtype)
    assert packed.packed_fits(q, backward=False, target=tuning.SM90) is forward
    assert packed.packed_fits(q, backward=True, target=tuning.SM90) is backward
