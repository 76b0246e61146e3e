"""mmkernels.models.PerceiverResampler / GatedCrossAttentionBlock: parity with random-initialised flamingo-pytorch
modules (fp32, CPU, reference and triton backends), forward and every parameter's gradient within 1e-5 relative;
media_locations patterns (text before the first image, a sample without media, consecutive media, none given),
both only_attend_immediate_media settings (pre-media rows: zeros by design, checked), NaN in unused media, the dense
fallback of the resampler, bad inputs."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels._backends import registered_ops
from mmkernels.models import GatedCrossAttentionBlock, PerceiverResampler

fp = pytest.importorskip("flamingo_pytorch")

CPU = torch.device("cpu")
REL = 1e-5  # the acceptance bound: max |ours - theirs| / max |theirs|, per tensor


def _backends(op: str) -> list[str]:
    ops = registered_ops()
    return [b for b in ("reference", "triton") if op in ops and b in ops[op].available(CPU)]


RESAMPLER_BACKENDS = _backends("qformer_cross_attention")
BLOCK_BACKENDS = _backends("media_cross_attention")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _randomise(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms at 1 / 0 and gates at 0 would hide mistakes), gates non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * (1 if p.dim() == 2 else 4))
    return m


def _parity(ours, theirs, inputs, theirs_fn=None, extra=()):
    """Forward and the gradient of every parameter and input, for one random cotangent; ``extra`` are more inputs
    to ours (the media locations)."""
    theirs_fn = theirs_fn or theirs
    ins_o = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ins_t = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out_o, out_t = ours(*ins_o, *extra), theirs_fn(*ins_t)
    cot = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(5))
    (out_o * cot).sum().backward()
    (out_t * cot).sum().backward()
    errors = {"forward": _rel(out_o, out_t)}
    grads_t = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and grads_t[name].grad is not None, name
        errors[name] = _rel(p.grad, grads_t[name].grad)
    for i, (a, b) in enumerate(zip(ins_o, ins_t)):
        if a.requires_grad:
            errors[f"input{i}"] = _rel(a.grad, b.grad)
    bad = {k: e for k, e in errors.items() if not e <= REL}
    assert not bad, f"relative errors above {REL}: {bad}"
    assert set(grads_t) == {n for n, _ in ours.named_parameters()}
    return out_o, errors


# ---- PerceiverResampler ----------------------------------------------------------------------------------------------

RESAMPLER_CASES = {
    # name: (constructor kwargs, input shape)
    "4d-several-media": (dict(dim=24, depth=2, dim_head=8, heads=3, num_latents=5, num_media_embeds=4, ff_mult=2),
                         (2, 3, 7, 24)),
    "3d-one-media": (dict(dim=20, depth=1, dim_head=10, heads=2, num_latents=6, num_media_embeds=2, ff_mult=3),
                     (3, 11, 20)),
    "odd-dims": (dict(dim=18, depth=3, dim_head=7, heads=3, num_latents=9, num_media_embeds=5, ff_mult=1.5),
                 (1, 5, 13, 18)),
}


@pytest.mark.parametrize("backend", RESAMPLER_BACKENDS)
@pytest.mark.parametrize("case", list(RESAMPLER_CASES))
def test_resampler_matches_flamingo_pytorch(case, backend):
    kw, shape = RESAMPLER_CASES[case]
    torch.manual_seed(0)
    theirs = _randomise(fp.PerceiverResampler(**kw))
    ours = PerceiverResampler.from_flamingo_pytorch(theirs, backend=backend)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out, _ = _parity(ours, theirs, [x])
    T = shape[1] if len(shape) == 4 else 1
    assert out.shape == (shape[0], T, kw["num_latents"], kw["dim"])


def test_resampler_dense_fallback_matches():
    """More than 128 latents or a head dim above 128: the dense attention op (same math)."""
    for kw in (dict(dim=16, depth=1, dim_head=8, heads=2, num_latents=130, num_media_embeds=2, ff_mult=2),
               dict(dim=16, depth=1, dim_head=136, heads=1, num_latents=4, num_media_embeds=2, ff_mult=2)):
        torch.manual_seed(0)
        theirs = _randomise(fp.PerceiverResampler(**kw))
        ours = PerceiverResampler.from_flamingo_pytorch(theirs, backend="reference")
        _parity(ours, theirs, [torch.randn(2, 2, 9, 16, generator=torch.Generator().manual_seed(2))])


def test_resampler_state_dict_is_flamingo_pytorchs():
    torch.manual_seed(0)
    theirs = _randomise(fp.PerceiverResampler(dim=16, depth=2, dim_head=4, heads=2, num_latents=3))
    ours = PerceiverResampler(16, 2, dim_head=4, heads=2, num_latents=3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 2, 5, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=REL, atol=REL)
    copied = PerceiverResampler.from_flamingo_pytorch(theirs)
    for (n, a), (_, b) in zip(copied.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n  # copied, not shared


# ---- GatedCrossAttentionBlock ----------------------------------------------------------------------------------------

def _locations(B: int, Lt: int, where: list[list[int]]) -> torch.Tensor:
    loc = torch.zeros(B, Lt, dtype=torch.bool)
    for b, positions in enumerate(where):
        loc[b, positions] = True
    return loc


LOCATION_PATTERNS = {
    # sample 0: text before the first image, 3 media; 1: no media; 2: image first, consecutive media tokens
    "mixed": [[2, 5, 9], [], [0, 1, 6]],
    "text-before-first-image": [[4], [7, 8], [1, 10]],
    "media-first": [[0, 1, 2], [0], [0, 2]],  # no text before the first image: no pre-media row
    "none": None,
}


def _block_inputs(pattern, B=3, Lt=12, M=3, Nl=5, dim=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, media = torch.randn(B, Lt, dim, generator=g), torch.randn(B, M, Nl, dim, generator=g)
    where = LOCATION_PATTERNS[pattern]
    return x, media, (None if where is None else _locations(B, Lt, where))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
@pytest.mark.parametrize("pattern", list(LOCATION_PATTERNS))
def test_block_matches_flamingo_pytorch(pattern, immediate, backend):
    torch.manual_seed(0)
    theirs = _randomise(fp.GatedCrossAttentionBlock(dim=24, dim_head=8, heads=3, ff_mult=2,
                                                    only_attend_immediate_media=immediate))
    ours = GatedCrossAttentionBlock.from_flamingo_pytorch(theirs, backend=backend)
    assert ours.only_attend_immediate_media is immediate
    x, media, loc = _block_inputs(pattern)
    if loc is None or immediate:
        _parity(ours, theirs, [x, media], lambda x, m: theirs(x, m, loc), (loc,))
        return
    # flamingo-pytorch averages every latent for the rows before the first media in this mode; ours gives them zeros,
    # as its immediate mode does: the right answer there is that mode's row (same parameters, so every gradient lands
    # on theirs' parameters).
    pre = (loc.cumsum(-1) == 0)[:, :, None]

    def reference(x, m):
        theirs.attn.only_attend_immediate_media = True
        zeroed = theirs(x, m, loc)
        theirs.attn.only_attend_immediate_media = False
        return torch.where(pre, zeroed, theirs(x, m, loc))

    _parity(ours, theirs, [x, media], reference, (loc,))
    # the rows before the first media do differ from flamingo-pytorch's all-False-mask average (the one difference)
    with torch.no_grad():
        diff = (ours(x, media, loc) - theirs(x, media, loc)).abs().amax(-1)
    assert (diff[pre[..., 0]] > 1e-3).all() and (diff[~pre[..., 0]] < 1e-4).all()
    assert pre.any() or pattern == "media-first"


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_block_pre_media_rows_get_only_the_feed_forward(backend):
    """Rows before the first media: the attention branch is exactly zero in both modes, and so is every gradient
    that would flow from those rows into the attention's projections and the media."""
    torch.manual_seed(0)
    for immediate in (True, False):
        ours = _randomise(GatedCrossAttentionBlock(24, dim_head=8, heads=3, ff_mult=2,
                                                   only_attend_immediate_media=immediate, backend=backend))
        x, media, loc = _block_inputs("mixed")
        media.requires_grad_(True)
        out = ours.attn(x, media, loc)
        pre = loc.cumsum(-1) == 0
        assert torch.equal(out[pre], torch.zeros_like(out[pre]))
        (out * pre[..., None] * torch.randn(out.shape)).sum().backward()  # a cotangent on the pre-media rows only
        assert torch.equal(media.grad, torch.zeros_like(media))
        for p in (ours.attn.to_kv.weight, ours.attn.to_q.weight, ours.attn.to_out.weight):
            assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_block_unused_media_never_leak(backend):
    """NaN in media items a sample does not reach (fewer media tokens than M) changes nothing, forward or backward."""
    torch.manual_seed(0)
    ours = _randomise(GatedCrossAttentionBlock(24, dim_head=8, heads=3, ff_mult=2, backend=backend))
    x, media, loc = _block_inputs("text-before-first-image")  # sample 0 uses media 0 only, 1 and 2 use 0..1
    used = loc.sum(-1)
    clean = media.clone().requires_grad_(True)
    dirty = media.clone()
    for b, n in enumerate(used.tolist()):
        dirty[b, n:] = float("nan")
    dirty.requires_grad_(True)
    for immediate in (True, False):
        ours.only_attend_immediate_media = immediate
        a, b_ = ours(x, clean, loc), ours(x, dirty, loc)
        assert torch.isfinite(b_).all()
        torch.testing.assert_close(b_, a, rtol=0, atol=0)
        clean.grad = dirty.grad = None
        a.sum().backward()
        b_.sum().backward()
        assert torch.isfinite(dirty.grad).all()
        torch.testing.assert_close(dirty.grad, clean.grad, rtol=0, atol=0)


def test_block_backend_reaches_the_op():
    m = GatedCrossAttentionBlock(16, dim_head=4, heads=2, backend="reference")
    assert m.attn._backends == {"media_cross_attention": "reference"}
    r = PerceiverResampler(16, 1, dim_head=4, heads=2, num_latents=3, backend={"qformer_cross_attention": "reference"})
    assert r.layers[0][0]._backends == {"qformer_cross_attention": "reference", "attention": None}
    with pytest.raises(mmkernels.BackendError, match="bogus"):
        GatedCrossAttentionBlock(16, backend="bogus")


@pytest.mark.parametrize("backend", sorted(set(RESAMPLER_BACKENDS) & set(BLOCK_BACKENDS)))
def test_empty_shapes_and_compiled_no_locations(backend):
    """Empty batch, no text tokens, no media items: right shapes and a backward; media_locations=None compiles
    (fullgraph) to the eager result."""
    torch.manual_seed(0)
    block = _randomise(GatedCrossAttentionBlock(16, dim_head=4, heads=2, backend=backend))
    resampler = PerceiverResampler(16, 1, dim_head=4, heads=2, num_latents=3, backend=backend)
    for B, Lt in ((0, 5), (2, 0)):
        x = torch.randn(B, Lt, 16, requires_grad=True)
        out = block(x, torch.randn(B, 2, 3, 16), torch.zeros(B, Lt, dtype=torch.bool))
        assert out.shape == (B, Lt, 16)
        out.sum().backward()
    for shape in ((0, 2, 5, 16), (2, 0, 5, 16)):
        x = torch.randn(shape, requires_grad=True)
        out = resampler(x)
        assert out.shape == (*shape[:2], 3, 16)
        out.sum().backward()
    torch._dynamo.reset()
    x, media = torch.randn(2, 5, 16), torch.randn(2, 2, 3, 16)
    compiled = torch.compile(lambda x, m: block(x, m), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, media), block(x, media), rtol=1e-6, atol=1e-6)


def test_more_media_tokens_than_media_is_an_error():
    """Three media tokens in a sample but M = 2 media given (the tests run under mmkernels.debug_checks)."""
    m = GatedCrossAttentionBlock(16, dim_head=4, heads=2)
    with pytest.raises(ValueError, match="media_locations"):
        m(torch.randn(1, 6, 16), torch.randn(1, 2, 3, 16), _locations(1, 6, [[0, 2, 4]]))


def test_gates_start_at_zero_so_the_block_starts_as_identity():
    m = GatedCrossAttentionBlock(16, dim_head=4, heads=2)
    x, media, loc = torch.randn(2, 5, 16), torch.randn(2, 2, 3, 16), _locations(2, 5, [[1], [0, 3]])
    assert torch.equal(m(x, media, loc), x)


# ---- bad input ------------------------------------------------------------------------------------------------------

def _r(*shape):
    return torch.randn(*shape)


BAD_CALLS = [
    ("PerceiverResampler", "x", lambda: PerceiverResampler(16, 1, dim_head=4, heads=2, num_latents=3)(_r(2, 16)),
     ValueError),
    ("PerceiverResampler", "x", lambda: PerceiverResampler(16, 1, dim_head=4, heads=2)(_r(2, 3, 15)), ValueError),
    ("PerceiverResampler", "x", lambda: PerceiverResampler(16, 1, dim_head=4, heads=2)(_r(2, 3, 16).half()),
     TypeError),
    ("PerceiverResampler", "num_media_embeds",
     lambda: PerceiverResampler(16, 1, dim_head=4, heads=2, num_media_embeds=2)(_r(1, 3, 4, 16)), ValueError),
    ("PerceiverResampler", "x", lambda: PerceiverResampler(16, 1, dim_head=4, heads=2)([1.0]), TypeError),
    ("GatedCrossAttentionBlock", "x", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 16), _r(2, 1, 3, 16)), ValueError),
    ("GatedCrossAttentionBlock", "media", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 5, 16), _r(2, 3, 16)), ValueError),
    ("GatedCrossAttentionBlock", "media", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 5, 16), _r(3, 1, 3, 16)), ValueError),
    ("GatedCrossAttentionBlock", "media", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 5, 16), _r(2, 0, 3, 16)), ValueError),
    ("GatedCrossAttentionBlock", "media_locations", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 5, 16), _r(2, 1, 3, 16), torch.zeros(2, 5, dtype=torch.long)), TypeError),
    ("GatedCrossAttentionBlock", "media_locations", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 5, 16), _r(2, 1, 3, 16), torch.zeros(2, 4, dtype=torch.bool)), ValueError),
    ("GatedCrossAttentionBlock", "media", lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2)(
        _r(2, 5, 16), _r(2, 1, 3, 16).double()), TypeError),
    ("GatedCrossAttentionBlock", "only_attend_immediate_media",
     lambda: GatedCrossAttentionBlock(16, only_attend_immediate_media=1), TypeError),
    ("GatedCrossAttentionBlock", "ff_mult", lambda: GatedCrossAttentionBlock(16, ff_mult="4"), TypeError),
    ("GatedCrossAttentionBlock", "dim_head", lambda: GatedCrossAttentionBlock(16, dim_head=300), ValueError),
    ("PerceiverResampler", "dtype", lambda: PerceiverResampler(16, 1, dtype=torch.int32), TypeError),
    ("PerceiverResampler", "depth", lambda: PerceiverResampler(16, 0), ValueError),
    ("PerceiverResampler", "ff_dim", lambda: PerceiverResampler(16, 1, ff_dim=0), ValueError),
    ("PerceiverResampler.from_flamingo_pytorch", "module",
     lambda: PerceiverResampler.from_flamingo_pytorch(torch.nn.Linear(2, 2)), TypeError),
    ("GatedCrossAttentionBlock.from_flamingo_pytorch", "module",
     lambda: GatedCrossAttentionBlock.from_flamingo_pytorch(fp.PerceiverResampler(dim=8, depth=1)), TypeError),
]


@pytest.mark.parametrize("owner,arg,call,error", BAD_CALLS, ids=[f"{o}-{a}-{i}" for i, (o, a, _, _) in
                                                                 enumerate(BAD_CALLS)])
def test_bad_input_names_the_module_and_argument(owner, arg, call, error):
    with pytest.raises(error, match=rf"^{owner}: .*\b{arg}\b"):
        call()
