"""mmkernels.ops.media_cross_attention (Flamingo's media-masked cross-attention): forward and every gradient against
a float64 reference by flash-attn's 2x rule on both backends and both modes (awkward shapes: Lt = 1, M = 1, Nl = 5,
odd heads, GQA/MQA, D != Dv, text before the first media, a sample with no media, fewer media than M, media at the
last position), parity with flamingo-pytorch's ``MaskedCrossAttention`` math, NaN in unused latents never leaking,
pre-media rows exactly zero in output and gradients, the varlen plan's values, zero host syncs, the attention op's
zero-length key segments, opcheck of what the Triton path launches, torch.compile fullgraph, bad input.
On CPU the Triton path runs under TRITON_INTERPRET=1 (fp32/fp16)."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import BackendError
from mmkernels.kernels.reference.media_cross_attention import media_cross_attention_reference
from mmkernels.ops import media_cross_attention
from mmkernels.ops.media_cross_attention import MEDIA_CROSS_ATTENTION_BACKENDS, packed_prefixes, varlen_plan
from mmkernels.testing import assert_all_within_ref_error, count_host_syncs, run_opcheck

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
TRITON_HERE = "triton" in MEDIA_CROSS_ATTENTION_BACKENDS.available(CPU) or HAS_CUDA
BACKENDS = ["reference"] + (["triton"] if TRITON_HERE else [])
# The Triton path with each family of varlen attention kernels forced (MMKERNELS_ATTENTION_PACKED): the packed
# kernels load the union of a tile's key ranges, so they are where a leak between runs would show.
KERNELS = ["reference"] + (["triton[per-sequence]", "triton[packed]"] if TRITON_HERE else [])


def kernels(name: str, monkeypatch) -> str:
    """The backend of a ``KERNELS`` entry, with its varlen kernel family forced."""
    if name.startswith("triton["):
        monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "1" if name == "triton[packed]" else "0")
        return "triton"
    return name
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="needs triton (GPU or TRITON_INTERPRET=1)")


def locations(B: int, Lt: int, positions, device=CPU) -> torch.Tensor:
    """bool [B, Lt], True at ``positions[b]``."""
    ml = torch.zeros(B, Lt, dtype=torch.bool)
    for b, pos in enumerate(positions):
        ml[b, list(pos)] = True
    return ml.to(device)


# The central sweeps' valid calls (tests/op_samples.py): text before the first media, a sample without media, GQA.
SAMPLES = {
    "media_cross_attention": lambda r: dict(
        q=r(2, 7, 4, 8), k=r(2, 3, 5, 2, 8, seed=1), v=r(2, 3, 5, 2, 8, seed=2),
        media_locations=locations(2, 7, [[1, 4], []]), only_immediate=True, softmax_scale=0.4),
}
USAGE_SAMPLES = {
    "media_cross_attention": lambda r: (
        media_cross_attention, (r(2, 9, 2, 8), r(2, 3, 4, 2, 8, seed=1), r(2, 3, 4, 2, 8, seed=2)),
        {"media_locations": locations(2, 9, [[0, 3, 8], [2]]), "only_immediate": False}),
}

# (B, Lt, Hq, Hkv, D, Dv, M, Nl, media positions per sample)
SHAPES = [
    (3, 11, 4, 2, 16, 16, 3, 5, [[2, 6], [0, 4, 10], []]),  # text before media, media last, no media; GQA
    (1, 1, 1, 1, 8, 8, 1, 5, [[0]]),  # Lt = 1, M = 1
    (2, 1, 3, 3, 8, 8, 2, 3, [[0], []]),  # Lt = 1, odd heads, one sample without media
    (2, 13, 3, 1, 24, 40, 4, 7, [[1], [0, 3, 7, 12]]),  # MQA, D != Dv, fewer media than M, media at the last token
    (2, 37, 2, 2, 72, 48, 5, 9, [[0, 5, 6, 20, 30], [16]]),  # adjacent media, D != Dv not powers of two
    (1, 7, 2, 2, 8, 8, 2, 1, [[3, 4]]),  # one latent per media
]


def _ids(shapes):
    return [f"B{s[0]}-Lt{s[1]}-H{s[2]}x{s[3]}-D{s[4]}-Dv{s[5]}-M{s[6]}-Nl{s[7]}" for s in shapes]


def make(B, Lt, Hq, Hkv, D, Dv, M, Nl, positions, dtype=torch.float32, device=CPU, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lt, Hq, D, generator=g)
    k = torch.randn(B, M, Nl, Hkv, D, generator=g)
    v = torch.randn(B, M, Nl, Hkv, Dv, generator=g)
    dout = torch.randn(B, Lt, Hq, Dv, generator=g)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), dout.to(**to), locations(B, Lt, positions, device)


def fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def ours_ref_truth(q, k, v, dout, ml, only_immediate, backend):
    """(out, dq, dk, dv) of the op on ``backend``, of the same-dtype reference and of the float64 reference."""
    ours = fwd_bwd(lambda a, b, c: media_cross_attention(a, b, c, ml, only_immediate=only_immediate,
                                                         backend=backend), q, k, v, dout)
    ref = fwd_bwd(lambda a, b, c: media_cross_attention_reference(a, b, c, ml, only_immediate, upcast=False),
                  q, k, v, dout)
    truth = fwd_bwd(lambda a, b, c: media_cross_attention_reference(a, b, c, ml, only_immediate),
                    q.double(), k.double(), v.double(), dout.double())
    return ours, ref, truth


def pre_media(ml: torch.Tensor) -> torch.Tensor:
    """bool [B, Lt]: the text tokens with no media at or before them."""
    return ml.cumsum(1) == 0


@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_matches_float64_reference(shape, backend, dtype, only_immediate, device):
    """Forward and every gradient within 2x the error of the same-dtype PyTorch reference (flash-attn's rule), and
    the rows before the first media exactly zero in the output and in dq."""
    q, k, v, dout, ml = make(*shape, dtype=dtype, device=device)
    ours, ref, truth = ours_ref_truth(q, k, v, dout, ml, only_immediate, backend)
    for name, t in zip(("out", "dq", "dk", "dv"), ours):
        assert t.dtype == dtype, name
    assert_all_within_ref_error(ours, ref, truth, prefix=f"{backend} ")
    empty = pre_media(ml)
    assert torch.all(ours[0][empty] == 0) and torch.all(ours[1][empty] == 0)
    for b in range(q.shape[0]):  # the media a sample does not use get exactly zero gradients
        used = int(ml[b].sum())
        assert torch.all(ours[2][b, used:] == 0) and torch.all(ours[3][b, used:] == 0)


PACKABLE = [s for s in SHAPES if s[4] == s[5]]  # the packed varlen kernels take one head dim for Q/K and V


@needs_triton
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("shape", PACKABLE, ids=_ids(PACKABLE))
def test_packed_varlen_kernels_match_reference(shape, only_immediate, device, monkeypatch):
    """The Triton path on the packed varlen kernels (chosen on GPUs for short runs; forced here), fp16: the 2x rule."""
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "1")
    q, k, v, dout, ml = make(*shape, dtype=torch.float16, device=device)
    ours, ref, truth = ours_ref_truth(q, k, v, dout, ml, only_immediate, "triton")
    assert_all_within_ref_error(ours, ref, truth, prefix="packed ")


def _flamingo_masked_cross_attention(only_immediate: bool, heads: int, dim_head: int):
    """flamingo-pytorch's MaskedCrossAttention with its norm and projections replaced by identity: its masked
    einsum / softmax on ``x = q [B, Lt, H*D]`` and ``media = cat(k, v) [B, M, Nl, 2*H*D]``."""
    fp = pytest.importorskip("flamingo_pytorch.flamingo_pytorch")
    module = fp.MaskedCrossAttention(dim=heads * dim_head, dim_head=dim_head, heads=heads,
                                     only_attend_immediate_media=only_immediate)
    module.norm = module.to_q = module.to_kv = module.to_out = torch.nn.Identity()
    return module


@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_flamingo_pytorch(backend, only_immediate, device):
    """Same output and gradients as flamingo-pytorch's masked cross-attention (its own module, projections set to
    identity), within 1e-5 relative in fp32. The one difference: in all-media mode flamingo-pytorch gives the tokens
    before the first media the uniform average of every latent, we give zeros; those rows get no output gradient here
    so every gradient is comparable."""
    B, Lt, H, D, M, Nl = 3, 12, 2, 16, 3, 5
    q, k, v, dout, ml = make(B, Lt, H, H, D, D, M, Nl, [[2, 6], [0, 4, 11], [5]], dtype=torch.float64)
    module = _flamingo_masked_cross_attention(only_immediate, H, D).to(device)
    empty = pre_media(ml)
    dout = torch.where(empty[:, :, None, None], 0.0, dout)

    def flamingo(a, b, c):
        media = torch.cat([b.reshape(B, M, Nl, H * D), c.reshape(B, M, Nl, H * D)], -1)
        return module(a.reshape(B, Lt, H * D), media, media_locations=ml).reshape(B, Lt, H, D)

    want = fwd_bwd(flamingo, q, k, v, dout)
    got = fwd_bwd(lambda a, b, c: media_cross_attention(a, b, c, ml, only_immediate=only_immediate,
                                                        backend=backend),
                  *(t.float() for t in (q, k, v, dout)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        if name == "out":
            assert torch.all(g[empty] == 0)
            if not only_immediate:  # the documented difference
                assert not torch.allclose(w[empty], torch.zeros_like(w[empty]))
            g, w = g[~empty], w[~empty]
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=name)


POISONS = [float("nan"), float("inf"), -1e4]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter: masked
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("name", KERNELS)
def test_unused_latents_and_pre_media_queries_never_leak(name, only_immediate, compiled, device, monkeypatch):
    """NaN/inf/huge values in the latents of media a sample does not use, and in the q rows of tokens before the first
    media, reach no output or gradient: the results equal those with zeros there, and those rows' output and every
    gradient are exactly zero. Both varlen kernel families (the packed ones span the unused media's key segment
    between two samples: the Triton path zeroes those latents first)."""
    backend = kernels(name, monkeypatch)
    B, Lt, H, D, M, Nl = 3, 10, 2, 8, 3, 5
    q, k, v, dout, ml = make(B, Lt, H, H, D, D, M, Nl, [[3], [0, 2, 9], []], device=device)
    unused = torch.arange(M, device=device)[None, :] >= ml.sum(1, keepdim=True)  # [B, M]
    empty = pre_media(ml)

    def fn(a, b, c):
        return media_cross_attention(a, b, c, ml, only_immediate=only_immediate, backend=backend)

    run = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
    clean = fwd_bwd(fn, torch.where(empty[..., None, None], 0.0, q), torch.where(unused[..., None, None, None], 0.0, k),
                    torch.where(unused[..., None, None, None], 0.0, v), dout)
    for poison in POISONS:
        got = fwd_bwd(run, torch.where(empty[..., None, None], poison, q),
                      torch.where(unused[..., None, None, None], poison, k),
                      torch.where(unused[..., None, None, None], poison, v), dout)
        for name, g, c in zip(("out", "dq", "dk", "dv"), got, clean):
            assert torch.isfinite(g).all(), (poison, name)
            torch.testing.assert_close(g, c, rtol=1e-6, atol=1e-6, msg=f"{poison} {name}")
        assert torch.all(got[0][empty] == 0) and torch.all(got[1][empty] == 0)
        assert torch.all(got[2][unused] == 0) and torch.all(got[3][unused] == 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter: masked
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("name", KERNELS)
def test_strided_views_into_nan_buffers(name, only_immediate, device, monkeypatch):
    """q a head-dim slice of a NaN-padded buffer, k and v slices of one ``[B, M, Nl, 2, H, D + 3]`` projection with NaN
    past ``D`` (QFormer-style hoisted K/V): the same results as contiguous copies, and zero gradients in the NaN
    parts of the buffers."""
    backend = kernels(name, monkeypatch)
    B, Lt, H, D, M, Nl = 2, 9, 2, 12, 3, 4
    q, k, v, dout, ml = make(B, Lt, H, H, D, D, M, Nl, [[1, 4, 8], [3]], device=device)
    want = fwd_bwd(lambda a, b, c: media_cross_attention(a, b, c, ml, only_immediate=only_immediate,
                                                         backend=backend), q, k, v, dout)
    qbuf = torch.full((B, Lt, H, D + 3), float("nan"), device=device)
    kvbuf = torch.full((B, M, Nl, 2, H, D + 3), float("nan"), device=device)
    qbuf[..., :D], kvbuf[:, :, :, 0, :, :D], kvbuf[:, :, :, 1, :, :D] = q, k, v
    unused = torch.arange(M, device=device)[None, :] >= ml.sum(1, keepdim=True)
    kvbuf[unused] = float("nan")  # the latents of media a sample does not use hold NaN as well
    qbuf.requires_grad_(), kvbuf.requires_grad_()
    out = media_cross_attention(qbuf[..., :D], kvbuf[:, :, :, 0, :, :D], kvbuf[:, :, :, 1, :, :D], ml,
                                only_immediate=only_immediate, backend=backend)
    out.backward(dout)
    torch.testing.assert_close(out.detach(), want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qbuf.grad[..., :D], want[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kvbuf.grad[:, :, :, 0, :, :D], want[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kvbuf.grad[:, :, :, 1, :, :D], want[3], rtol=1e-6, atol=1e-6)
    assert torch.all(qbuf.grad[..., D:] == 0) and torch.all(kvbuf.grad[..., D:] == 0)


@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
def test_bench_baselines_are_what_they_say(only_immediate):
    """The suite's ``flamingo-pytorch`` row is flamingo-pytorch's module math (identity projections), and its
    ``sdpa[mask]`` row is the op (pre-media rows zeroed)."""
    from mmkernels.bench.suites.media_cross_attention import flamingo_masked_attention, sdpa_masked

    B, Lt, H, D, M, Nl = 2, 10, 2, 8, 3, 4
    q, k, v, _, ml = make(B, Lt, H, H, D, D, M, Nl, [[2, 5], [0, 3, 9]], dtype=torch.float64)
    module = _flamingo_masked_cross_attention(only_immediate, H, D)
    media = torch.cat([k.reshape(B, M, Nl, H * D), v.reshape(B, M, Nl, H * D)], -1)
    want = module(q.reshape(B, Lt, H * D), media, media_locations=ml).reshape(B, Lt, H, D)
    torch.testing.assert_close(flamingo_masked_attention(q, k, v, ml, only_immediate, D**-0.5), want)
    ours = media_cross_attention_reference(q, k, v, ml, only_immediate)
    torch.testing.assert_close(sdpa_masked(q, k, v, ml, only_immediate, D**-0.5), ours)


def test_varlen_plan_values():
    """The runs of the Triton path for a known pattern: per (sample, media index) query counts, static key
    segments (zero-length for the pre-media run), and the all-media packed prefixes."""
    ml = locations(2, 6, [[1, 3], [0]])  # media index: [-1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]
    M, Nl = 2, 3
    cu_q, cu_k, max_k = varlen_plan(ml, M, Nl, only_immediate=True)
    assert cu_q.tolist() == [0, 1, 3, 6, 6, 12, 12]
    assert cu_k.tolist() == [0, 0, 3, 6, 6, 9, 12] and max_k == 3
    cu_q2, cu_k2, max_k = varlen_plan(ml, M, Nl, only_immediate=False)
    assert torch.equal(cu_q2, cu_q) and cu_q2.dtype == cu_k2.dtype == torch.int32
    assert cu_k2.tolist() == [0, 0, 3, 9, 9, 12, 18] and max_k == 6  # M (M + 1) / 2 * Nl = 9 rows per sample
    latents = torch.arange(2 * M * Nl).reshape(2, M, Nl, 1, 1)  # row ids
    assert packed_prefixes(latents).flatten().tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11]


@needs_triton
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
def test_deterministic_backward_is_bitwise_reproducible(only_immediate, device):
    q, k, v, dout, ml = make(*SHAPES[0], device=device)
    with mmkernels.deterministic():
        first, second = (fwd_bwd(lambda a, b, c: media_cross_attention(a, b, c, ml, only_immediate=only_immediate,
                                                                       backend="triton"), q, k, v, dout)
                         for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("packed", ["0", "1"], ids=["per-sequence", "packed"])
def test_attention_gives_zeros_for_zero_length_key_segments(packed, device, monkeypatch):
    """What the Triton path relies on: varlen attention gives exact zeros, zero dq and no NaN for sequences with no
    key (both its kernel families), and never reads keys outside a sequence's segment."""
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", packed)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 2, 8, generator=g).to(device).requires_grad_()
    k, v = torch.randn(8, 1, 8, generator=g).to(device), torch.randn(8, 1, 8, generator=g).to(device)
    k[4:], v[4:] = float("nan"), float("nan")  # rows no sequence reads
    k.requires_grad_(), v.requires_grad_()
    cu_q = torch.tensor([0, 2, 5, 7], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 0, 4, 4], dtype=torch.int32, device=device)  # sequences 0 and 2 have no key
    out, lse = torch.ops.mmkernels.attention_fwd_triton(q, k, v, cu_q, cu_k, 3, 4, False, 0.3, 0.0, None)
    out.backward(torch.ones_like(out))
    for rows in (slice(0, 2), slice(5, 7)):
        assert torch.all(out[rows] == 0) and torch.all(q.grad[rows] == 0)
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert torch.all(k.grad[4:] == 0) and torch.all(v.grad[4:] == 0)
    want = mmkernels.ops.attention(q.detach(), k.detach()[:4], v.detach()[:4], cu_seqlens_q=cu_q,
                                   cu_seqlens_k=torch.tensor([0, 0, 4, 4], dtype=torch.int32, device=device),
                                   max_seqlen_q=3, max_seqlen_k=4, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("packed", ["0", "1"], ids=["per-sequence", "packed"])
def test_attention_keys_of_a_sequence_without_queries(packed, device, monkeypatch):
    """The attention op on its own: keys of a varlen sequence that has no query are seen by no query, so NaN there
    should reach nothing (DESIGN.md's valid-region rule), in the per-sequence and the packed kernels (the packed
    ones mask such key columns; tests/ops/test_attention_packed.py sweeps it)."""
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", packed)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 1, 8, generator=g).to(device).requires_grad_()
    from mmkernels.kernels.triton.attention_varlen import use_packed

    if use_packed(q, 2, 3, backward=False) != (packed == "1"):
        pytest.skip("the forced kernel family does not take this width here")
    k, v = torch.randn(9, 1, 8, generator=g).to(device), torch.randn(9, 1, 8, generator=g).to(device)
    k[3:6], v[3:6] = float("nan"), float("nan")  # the keys of sequence 1, which has no query
    k.requires_grad_(), v.requires_grad_()
    cu_q = torch.tensor([0, 2, 2, 4], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 6, 9], dtype=torch.int32, device=device)
    out, _ = torch.ops.mmkernels.attention_fwd_triton(q, k, v, cu_q, cu_k, 2, 3, False, 0.3, 0.0, None)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend, only_immediate, device):
    """Forward and backward take no host sync (production: debug checks off); with debug checks on, exactly one (the
    media count check)."""
    q, k, v, dout, ml = make(*SHAPES[0], device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for debug, expected in ((False, 0), (True, 1)):
        with mmkernels.debug_checks(debug), count_host_syncs() as syncs:
            out = media_cross_attention(q, k, v, ml, only_immediate=only_immediate, backend=backend)
            out.backward(dout)
        assert syncs.count == expected, syncs.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_media_tokens_than_media(backend, device):
    """More True entries in a sample than M: ValueError under debug checks; otherwise the media index is clamped to
    M - 1 (the later tokens keep attending the last media), the same on every backend, never out of bounds."""
    q, k, v, _, _ = make(2, 8, 2, 2, 8, 8, 2, 3, [[], []], device=device)
    ml = locations(2, 8, [[0, 2, 5], [1]], device)
    with pytest.raises(ValueError, match="has 3 media tokens but k/v hold M = 2"):
        media_cross_attention(q, k, v, ml, backend=backend)
    with mmkernels.debug_checks(False):
        got = media_cross_attention(q, k, v, ml, backend=backend)
    clamped = locations(2, 8, [[0, 2], [1]], device)
    torch.testing.assert_close(got, media_cross_attention(q, k, v, clamped, backend=backend), rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
def test_opcheck_of_the_launched_op(only_immediate, device):
    """The one op the Triton path launches, with the plan's cu_seqlens (zero-length key segments included)."""
    B, Lt, H, D, M, Nl = 2, 9, 2, 16, 3, 4
    q, k, v, dout, ml = make(B, Lt, H, H, D, D, M, Nl, [[2, 5], [0]], device=device)
    cu_q, cu_k, max_k = varlen_plan(ml, M, Nl, only_immediate)
    if not only_immediate:
        k, v = packed_prefixes(k), packed_prefixes(v)
    qf, kf, vf = q.reshape(-1, H, D), k.reshape(-1, H, D), v.reshape(-1, H, D)
    args = (qf.requires_grad_(), kf.requires_grad_(), vf.requires_grad_(), cu_q, cu_k, Lt, max_k, False, 0.25, 0.0,
            None)
    run_opcheck(torch.ops.mmkernels.attention_fwd_triton.default, args)
    out, lse = torch.ops.mmkernels.attention_fwd_triton(*args)
    run_opcheck(torch.ops.mmkernels.attention_bwd_triton.default,
                (dout.reshape(-1, H, D), qf.detach(), kf.detach(), vf.detach(), out.detach(), lse, cu_q, cu_k, Lt,
                 max_k, False, 0.25, False, 0.0, None))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, only_immediate, dynamic, device):
    torch._dynamo.reset()
    q, k, v, dout, ml = make(*SHAPES[0], device=device)
    compile_backend = "inductor" if device.type == "cuda" else "aot_eager"

    def f(a, b, c, m):
        return media_cross_attention(a, b, c, m, only_immediate=only_immediate, backend=backend) * 2

    compiled = torch.compile(f, backend=compile_backend, fullgraph=True, dynamic=dynamic)
    got = fwd_bwd(lambda a, b, c: compiled(a, b, c, ml), q, k, v, dout)
    want = fwd_bwd(lambda a, b, c: f(a, b, c, ml), q, k, v, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float64_and_auto_backend(no_backend_env, device):
    q, k, v, dout, ml = make(*SHAPES[0], dtype=torch.float64, device=device)
    got = media_cross_attention(q, k, v, ml, softmax_scale=0.3)
    torch.testing.assert_close(got, media_cross_attention_reference(q, k, v, ml, True, 0.3))
    if TRITON_HERE:
        with pytest.raises(BackendError, match="float64"):
            media_cross_attention(q, k, v, ml, backend="triton")
    assert MEDIA_CROSS_ATTENTION_BACKENDS.select(CPU)[0] == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_text(backend, device):
    for B, Lt in ((0, 5), (2, 0)):
        q, k, v, dout, ml = make(B, Lt, 2, 1, 8, 6, 2, 3, [[]] * B, device=device)
        out, dq, dk, dv = fwd_bwd(lambda a, b, c, ml=ml: media_cross_attention(a, b, c, ml, backend=backend),
                                  q, k, v, dout)
        assert out.shape == (B, Lt, 2, 6) and dq.shape == q.shape and dk.shape == k.shape
        assert torch.all(dk == 0) and torch.all(dv == 0)


@needs_triton
def test_double_backward_is_a_clear_error_on_triton(device):
    q, k, v, _, ml = make(*SHAPES[0], device=device)
    q.requires_grad_()
    out = media_cross_attention(q, k, v, ml, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (g,) = torch.autograd.grad(media_cross_attention(q, k, v, ml, backend="reference").square().sum(), q,
                               create_graph=True)
    assert g.requires_grad


def _bad_inputs():
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 3, 4, 2, 8), torch.randn(2, 3, 4, 2, 8)
    yield "q not a tensor", dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"
    yield "int dtype", dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must be"
    yield "dtype mismatch", dict(k=k.half(), v=v.half()), TypeError, "same dtype"
    yield "mask not bool", dict(media_locations=torch.zeros(2, 5, dtype=torch.int64)), TypeError, \
        "media_locations must be bool"
    yield "mask not tensor", dict(media_locations=[[True] * 5] * 2), TypeError, "media_locations must be a torch"
    yield "mask shape", dict(media_locations=torch.zeros(2, 4, dtype=torch.bool)), ValueError, \
        "media_locations must have shape [B, Lt] = [2, 5]"
    yield "3-d q", dict(q=q[0]), ValueError, "q must be [B, Lt, Hq, D]"
    yield "4-d k", dict(k=k[:, 0], v=v[:, 0]), ValueError, "k must be [B, M, Nl, Hkv, D]"
    yield "k/v shapes differ", dict(v=v[:, :2]), ValueError, "same shape as k"
    yield "batch", dict(k=k[:1], v=v[:1]), ValueError, "same batch size"
    yield "no media", dict(k=k[:, :0], v=v[:, :0]), ValueError, "M >= 1, Nl >= 1"
    yield "no latents", dict(k=k[:, :, :0], v=v[:, :, :0]), ValueError, "M >= 1, Nl >= 1"
    yield "head dim", dict(k=torch.randn(2, 3, 4, 2, 6), v=v), ValueError, "same head dim"
    yield "v head dim", dict(v=torch.randn(2, 3, 4, 2, 257)), ValueError, "v head dim must be in [1, 256]"
    yield "heads", dict(k=torch.randn(2, 3, 4, 3, 8), v=torch.randn(2, 3, 4, 3, 8)), ValueError, "multiple"
    yield "immediate not bool", dict(only_immediate=1), TypeError, "only_immediate must be a bool"
    yield "scale tensor", dict(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale"
    yield "scale inf", dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be finite"
    yield "fp64 on triton", dict(q=q.double(), k=k.double(), v=v.double(), backend="triton"), BackendError, "float64"
    yield "unknown backend", dict(backend="cuda"), BackendError, "not implemented"


@pytest.mark.parametrize("name,override,exc,match", list(_bad_inputs()), ids=[b[0] for b in _bad_inputs()])
def test_bad_input(name, override, exc, match):
    if name == "fp64 on triton" and not TRITON_HERE:
        pytest.skip("triton cannot run here")
    args = dict(q=torch.randn(2, 5, 4, 8), k=torch.randn(2, 3, 4, 2, 8), v=torch.randn(2, 3, 4, 2, 8),
                media_locations=locations(2, 5, [[1], [0, 3]]))
    args.update(override)
    q, k, v, ml = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("media_locations")
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("]", r"\]")):
        media_cross_attention(q, k, v, ml, **args)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 2, 1, 8)
    with pytest.raises(BackendError):
        media_cross_attention(q, k, k, torch.tensor([[True, False]]), backend="triton")


@pytest.mark.gpu
def test_device_mismatch():
    q, k = torch.randn(1, 2, 1, 8, device="cuda"), torch.randn(1, 1, 2, 1, 8, device="cuda")
    with pytest.raises(ValueError, match="media_locations is on cpu"):
        media_cross_attention(q, k, k, torch.tensor([[True, False]]))


GPU_SHAPES = [  # OpenFlamingo-9B's cross-attention (32 x 128 heads, 64 latents, 5 images), shortened text
    (2, 512, 32, 32, 128, 128, 5, 64, [[0, 100, 101, 300, 511], [37]]),
    (3, 257, 12, 4, 72, 40, 3, 17, [[5, 6], [], [0, 128, 256]]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all-media"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_ids(GPU_SHAPES))
def test_gpu_grid(shape, dtype, only_immediate):
    q, k, v, dout, ml = make(*shape, dtype=dtype, device=torch.device("cuda"))
    ours, ref, truth = ours_ref_truth(q, k, v, dout, ml, only_immediate, "triton")
    assert_all_within_ref_error(ours, ref, truth)
