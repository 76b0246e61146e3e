"""Valid-region sweep (issue 19, finding 1): no value outside the valid region enters any product of any forward
or backward kernel, whatever the scores.

The valid region is the rows of each sequence, its keys (``seqlen_k``, ``cu_seqlens_k``, ``kv_lens``) and the head
dim ``D``. Every input here is a view into a larger buffer whose other elements are NaN: rows past each sequence,
key rows past its length, head-dim columns past ``D`` (the kernels pad ``D`` to a power of two), and for the Q-Former
the keys past ``kv_lens``. A kernel that reads any of them, or that lets a masked score into a product (FlashAttention
-2's ``test_flash_attn_bwd_overflow``: an fp16 ``dS`` overflowing at keys past ``seqlen_k`` when a row's log-sum-exp
is low, then ``inf * 0``), returns NaN. Scores reach ``|logit| ~ 1e4`` (all ~ -9.5e3, all ~ +9.5e3; mixed signs up
to ~2e3), lengths sit on and around every block edge the interpreter's configs use (16/32/64), with one-key and
zero-key sequences, fp16 and fp32, causal and not, atomic and deterministic dQ, per-sequence and packed varlen,
Q-Former with one key chunk and split-K (``num_splits=3``: 66 keys in two 64-key chunks, the second partial).
Values: flash-attn's rule for its overflow tests (output 2x, gradients 5x the same-dtype reference's error,
:func:`mmkernels.testing.assert_within_ref_error`) against float64, with the floor of
:func:`mmkernels.testing.ref_error_floor` at the problem's largest |logit| (two documented exceptions: :func:`_loose`
under the interpreter and the Q-Former's split-K combine).

Patch embedding has no softmax; its sweep puts pixels, weight, bias, cls token and position embedding in NaN-filled
buffers (strided views) and checks the forward and every gradient.
"""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.kernels.reference.attention import attention_reference
from mmkernels.kernels.reference.qformer_attention import qformer_attention_reference
from mmkernels.ops import attention, patch_embed, qformer_cross_attention
from mmkernels.ops.attention import ATTENTION_BACKENDS
from mmkernels.testing import assert_within_ref_error, ref_error_floor, tolerance

pytestmark = pytest.mark.skipif("triton" not in ATTENTION_BACKENDS.available(torch.device("cpu"))
                                and not torch.cuda.is_available(), reason="needs triton")

D = 24  # padded to BLOCK_D = 32 inside the kernels: eight NaN columns sit in the padding
NAN = float("nan")
# Score regimes, logits ~ scale * q . k with scale = D ** -0.5: "low" (every logit ~ -9.5e3: the lse is so low that
# exp(0 - lse) overflows for any key past the sequence read as zeros), "high" (~ +9.5e3) and "mixed" (random signs,
# |logit| up to ~2e3: rows with near-ties, where the fp32 resolution of such scores decides the gradients). The fp16
# raw dot products stay below 65504.
REGIMES = ("low", "high", "mixed")


def _scores(shape_q, shape_k, regime, g):
    if regime == "mixed":
        return 20 * torch.randn(shape_q, generator=g), 20 * torch.randn(shape_k, generator=g)
    sign = -1.0 if regime == "low" else 1.0
    return (44 + 0.3 * torch.randn(shape_q, generator=g),
            sign * (44 + 0.3 * torch.randn(shape_k, generator=g)))


def _in_nan_buffer(t: torch.Tensor, pad_rows: int, row_dim: int) -> torch.Tensor:
    """A view equal to ``t`` inside a NaN buffer that has ``pad_rows`` more rows on ``row_dim`` and 8 more columns on
    the last dim (unit stride kept, so the kernels read the view in place)."""
    shape = list(t.shape)
    shape[row_dim] += pad_rows
    shape[-1] += 8
    buf = torch.full(shape, NAN, dtype=t.dtype, device=t.device)
    view = buf.narrow(row_dim, 0, t.shape[row_dim]).narrow(-1, 0, t.shape[-1])
    view.copy_(t)
    return view


def _fwd_bwd(fn, inputs, dout):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
    return [out.detach(), *grads]


def _check(fn, ref, inputs, dout, views, what, *, loose=()):
    """fn on NaN-surrounded views (NaN anywhere it reads outside the valid region would come out as NaN): every result
    finite, and flash-attn's rule for these extreme scores (``test_flash_attn_bwd_overflow``): the output within 2x,
    the gradients within 5x the error of the same-dtype reference against a float64 truth, plus the floor of
    :func:`ref_error_floor` at the problem's largest |logit| (64 floors for the results named in ``loose``, see
    :func:`_loose`)."""
    ours = _fwd_bwd(fn, views, dout)
    truth = _fwd_bwd(lambda *t: ref(*t, upcast=True), [t.double() for t in inputs], dout.double())
    same = _fwd_bwd(lambda *t: ref(*t, upcast=False), inputs, dout)
    # every q row against every key row bounds the largest |logit|
    logits = (inputs[0].double().reshape(-1, D) @ inputs[1].double().reshape(-1, D).T).abs().max().item() * D**-0.5
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, same, truth, strict=True):
        floor = (64.0 if name in loose else 1.0) * ref_error_floor(t, logits=logits, dtype=a.dtype)
        assert_within_ref_error(a, r, t, factor=2.0 if name == "out" else 5.0, floor=floor, name=f"{what}: {name}")
    return ours


def _modes(regime):
    """Deterministic dQ for every regime; the atomic-dQ mode (the dK/dV kernel adds dQ: where the overflow bug lived)
    for the low scores that trigger it (the interpreter is slow: every run counts)."""
    return (False, True) if regime == "low" else (True,)


def _loose(dtype, deterministic, device):
    """What the dK/dV kernel computes (dk; dq too in the atomic mode) in fp32 under the interpreter. That kernel
    recomputes the scores as ``k q^T``, the forward as ``q k^T``, and the interpreter's NumPy dot rounds the two
    orientations differently (a few fp32 ulps of the raw product: ~0.01 at |q . k| ~ 5e4), so its p is not the
    forward's p: delta = rowsum(dO * O) no longer cancels, and dk = scale * sum_i dS_ij q_i, dq = scale * sum_j dS_ij
    k_j amplify the mismatch by the common component of q or k (44 in every column in the low/high regimes). Seen:
    25 floors where the reference is exact. A GPU's FMA/MMA loop accumulates
    both orientations in the same order, so on a GPU (and for the deterministic dQ kernel, in the forward's
    orientation) every result gets the plain rule; fp16's reference error dwarfs the mismatch. NaN or a wrong key
    range still fails."""
    if dtype != torch.float32 or device.type != "cpu":
        return ()
    return ("dk",) if deterministic else ("dq", "dk")


# (B, Lq, Lk): one key, rows below / on / above the 16, 32 and 64 block edges on both axes (the interpreter fits
# blocks of 16..64 to the lengths), Lq > Lk (causal rows that see no key) and Lq < Lk.
DENSE = [(2, 1, 1), (1, 3, 16), (2, 20, 17), (1, 17, 33), (1, 33, 65), (1, 65, 31)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", DENSE, ids=lambda s: "B{}-Lq{}-Lk{}".format(*s))
def test_dense_attention_extreme_scores(shape, causal, dtype, device):
    b, lq, lk = shape
    g = torch.Generator().manual_seed(lq * 100 + lk)
    for regime in REGIMES:
        q, k = _scores((b, lq, 2, D), (b, lk, 1, D), regime, g)
        v = torch.randn(b, lk, 1, D, generator=g)
        dout = torch.randn(b, lq, 2, D, generator=g).to(device)
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        views = [_in_nan_buffer(t, 5, 1) for t in (q, k, v)]
        ref = lambda a, b_, c, upcast: attention_reference(a, b_, c, causal=causal, upcast=upcast)  # noqa: E731
        for deterministic in _modes(regime):
            with mmkernels.deterministic(deterministic):
                _check(lambda a, b_, c: attention(a, b_, c, causal=causal, backend="triton"), ref, [q, k, v], dout,
                       views, f"{regime}, deterministic={deterministic}",
                       loose=_loose(dtype, deterministic, device))


# (Lq, Lk) per sequence: one key, no queries, queries without keys, block edges both ways; then padding rows past
# cu_seqlens[-1] on both sides.
VARLEN_Q = [3, 0, 4, 17, 33, 1]
VARLEN_K = [1, 4, 0, 33, 17, 16]


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("packed", [False, True], ids=["per-sequence", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_attention_extreme_scores(causal, dtype, packed, device, monkeypatch):
    monkeypatch.setenv("MMKERNELS_ATTENTION_PACKED", "1" if packed else "0")
    cu_q, cu_k = _cu(VARLEN_Q, device), _cu(VARLEN_K, device)
    total_q, total_k = sum(VARLEN_Q) + 3, sum(VARLEN_K) + 2  # padding rows past cu_seqlens[-1]
    kwargs = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)
    lens = dict(max_seqlen_q=max(VARLEN_Q), max_seqlen_k=max(VARLEN_K))
    g = torch.Generator().manual_seed(7)
    for regime in REGIMES:
        q, k = _scores((total_q, 2, D), (total_k, 1, D), regime, g)
        v = torch.randn(total_k, 1, D, generator=g)
        dout = torch.randn(total_q, 2, D, generator=g).to(device)
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        # the padding rows of the clean tensors hold finite extreme values; the views' hold NaN
        views = [_in_nan_buffer(t, 2, 0) for t in (q, k, v)]
        for t, n in zip(views, (sum(VARLEN_Q), sum(VARLEN_K), sum(VARLEN_K)), strict=True):
            t[n:] = NAN
        ref = lambda a, b, c, upcast: attention_reference(a, b, c, upcast=upcast, **kwargs)  # noqa: E731
        for deterministic in _modes(regime):
            with mmkernels.deterministic(deterministic):
                out, dq, dk, dv = _check(lambda a, b, c: attention(a, b, c, backend="triton", **kwargs, **lens), ref,
                                         [q, k, v], dout, views, f"{regime}, deterministic={deterministic}",
                                         loose=_loose(dtype, deterministic, device))
            assert torch.all(out[sum(VARLEN_Q):] == 0) and torch.all(dq[sum(VARLEN_Q):] == 0)
            assert torch.all(dk[sum(VARLEN_K):] == 0) and torch.all(dv[sum(VARLEN_K):] == 0)


# kv_lens on and around the interpreter's 64-key block edge, one key, and (unvalidated) zero keys.
QF_LENS = [1, 63, 64, 65, 0]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_qformer_extreme_scores(dtype, splits, device):
    b, lq, lk = len(QF_LENS), 5, 66
    kv_lens = torch.tensor(QF_LENS, dtype=torch.int32, device=device)
    op = torch.ops.mmkernels.qformer_attention_fwd_triton
    scale = D**-0.5
    g = torch.Generator().manual_seed(11)
    for regime in REGIMES:
        q, k = _scores((b, lq, 2, D), (b, lk, 2, D), regime, g)
        v = torch.randn(b, lk, 2, D, generator=g)
        dout = torch.randn(b, lq, 2, D, generator=g).to(device)
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        views = [_in_nan_buffer(t, 3, 1) for t in (q, k, v)]
        for t in views[1:]:  # the masked keys hold NaN too
            for i, n in enumerate(QF_LENS):
                t[i, n:] = NAN
        ref = lambda a, b_, c, upcast: qformer_attention_reference(a, b_, c, kv_lens, scale, upcast=upcast)  # noqa
        # split-K: the combine weighs the chunks' outputs by exp(lse_s - lse), each lse_s rounded to 0.5 fp32 ulp of
        # |logit|, so O (hence delta) moves by that, and dq = scale * sum_j dS_ij k_j amplifies it by the keys'
        # common component, as the atomic dQ above (fp16's reference error dwarfs it)
        loose = ("dq",) if splits > 1 and dtype == torch.float32 else ()
        out, dq, dk, dv = _check(lambda a, b_, c: op(a, b_, c, kv_lens, scale, splits, 0.0, None)[0], ref,
                                 [q, k, v], dout, views, f"{regime}, {splits} split(s)", loose=loose)
        for i, n in enumerate(QF_LENS):
            assert torch.all(dk[i, n:] == 0) and torch.all(dv[i, n:] == 0)
        assert torch.all(out[-1] == 0) and torch.all(dq[-1] == 0)  # the sample without keys
    # the public function (validated kv_lens >= 1) agrees with the op
    pub = qformer_cross_attention(views[0][:-1], views[1][:-1], views[2][:-1], kv_lens=kv_lens[:-1],
                                  backend="triton")
    assert torch.equal(pub, out[:-1])


# (B, C, H, W, P, D, cls, channels_last): D below/above the 16/32 column blocks, K = C*P*P not a multiple of the
# reduction block, M = B * L rows off the row blocks.
PATCH = [(2, 3, 12, 8, 4, 17, True, False), (1, 2, 10, 15, 5, 33, False, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", PATCH, ids=lambda c: "B{}-C{}-{}x{}-P{}-D{}".format(*c[:6]))
def test_patch_embed_nan_surroundings(case, dtype, device):
    b, c, h, w, p, d, has_cls, channels_last = case
    g = torch.Generator().manual_seed(5)
    seq = int(has_cls) + (h // p) * (w // p)
    pixels = 3 * torch.randn(b, c, h, w, generator=g)
    clean = {
        "pixels": pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels,
        "weight": torch.randn(d, c, p, p, generator=g) / (c * p * p) ** 0.5,
        "bias": torch.randn(d, generator=g),
        "pos_embed": torch.randn(seq, d, generator=g),
        "cls_token": torch.randn(d, generator=g) if has_cls else None,
    }
    clean = {n: None if t is None else t.to(device=device, dtype=dtype) for n, t in clean.items()}
    views = {}
    for name, t in clean.items():
        if t is None:
            views[name] = None
            continue
        pad = [3] * t.dim()
        if name == "pixels" and channels_last:  # channels stay adjacent (the kernel's channels-last order)
            pad[1] = 0
        buf = torch.full([n + e for n, e in zip(t.shape, pad, strict=True)], NAN, dtype=dtype, device=device)
        if name == "pixels" and channels_last:
            buf = buf.contiguous(memory_format=torch.channels_last)
        view = buf[tuple(slice(0, n) for n in t.shape)]
        if t.dim() == 1:  # a strided vector: every other element of a NaN buffer
            view = torch.full((2 * t.shape[0],), NAN, dtype=dtype, device=device)[::2]
        view.copy_(t)
        views[name] = view
    dout = torch.randn(b, seq, d, generator=g).to(device)
    names = [n for n, t in clean.items() if t is not None]

    def run(tensors, backend):
        def fn(*args):
            kw = dict(zip(names, args, strict=True))
            return patch_embed(kw.pop("pixels"), kw.pop("weight"), kw.pop("bias"), backend=backend, **kw)
        return _fwd_bwd(fn, [tensors[n] for n in names], dout)

    ours_clean = run(clean, "triton")
    ours = run(views, "triton")
    truth = run({n: None if t is None else t.double() for n, t in clean.items()}, "reference")
    for name, a, a_clean, t in zip(["out", *names], ours, ours_clean, truth, strict=True):
        assert torch.equal(a, a_clean), f"{name} changed when NaN surrounds the inputs"
        rtol, atol = tolerance(dtype, reduction_length={"out": c * p * p, "pixels": d}.get(name, b * seq))
        torch.testing.assert_close(a.double(), t, rtol=rtol, atol=atol * max(1.0, t.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")
