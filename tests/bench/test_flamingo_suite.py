"""The ``flamingo`` bench suite: its rows time the same computation (outputs and gradients agree across providers on
the same inputs), its FLOP counts match a counter run on flamingo-pytorch, and without flamingo_pytorch it still
builds (ours and ``sdpa[mask]``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmkernels.bench.suites.flamingo as fl
from mmkernels.bench import BenchConfig, registered_suites
from mmkernels.bench.suites.media_cross_attention import _pairs
from mmkernels.models import GatedCrossAttentionBlock, PerceiverResampler

CPU = torch.device("cpu")
QUICK_REF = BenchConfig(CPU, None, "quick", ["reference"])


def _quick_keys():
    (_, rf, _, media, _), = fl.RESAMPLER_SHAPES["quick"]
    (_, bf, *_), = fl.BLOCK_SHAPES["quick"]
    return tuple(sorted({**rf, "num_media_embeds": media}.items())), tuple(sorted(bf.items()))


def _module(provider: str, case_name: str):
    """The module a quick row of ``provider`` runs (fp32, CPU)."""
    rkey, bkey = _quick_keys()
    if case_name.startswith("PerceiverResampler"):
        return fl._resampler(rkey, CPU, torch.float32, None if provider == fl.THEIRS_R else "reference",
                             provider == fl.THEIRS_R)
    if provider == fl.SDPA_B:
        return fl._block(bkey, CPU, torch.float32, None, False)
    return fl._block(bkey, CPU, torch.float32, None if provider == fl.THEIRS_B else "reference",
                     provider == fl.THEIRS_B)


def test_flamingo_suite_is_a_model_suite_naming_every_op_of_both_modules():
    suite = registered_suites()["flamingo"]
    assert suite.model and set(suite.modes) == {"fwd", "fwd+bwd"}
    declared = set(PerceiverResampler.__dict__["backend"].ops) | set(GatedCrossAttentionBlock.__dict__["backend"].ops)
    assert set(suite.ops) == declared


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_flamingo_quick_rows_agree_on_outputs_and_gradients(mode):
    pytest.importorskip("flamingo_pytorch", reason="flamingo-pytorch (the `hf` extra) is the suite's reference")
    cases = [c for c in registered_suites()["flamingo"].build(QUICK_REF) if c.mode == mode]
    assert [c.name.split()[0] for c in cases] == ["PerceiverResampler", "GatedCrossAttentionBlock"]
    for case in cases:
        expected = {"PerceiverResampler": {"mmkernels PerceiverResampler[reference]", fl.THEIRS_R},
                    "GatedCrossAttentionBlock": {"mmkernels GatedCrossAttentionBlock[reference]", fl.THEIRS_B,
                                                 fl.SDPA_B}}[case.name.split()[0]]
        assert set(case.providers) == expected
        results = {}
        for name, fn in case.providers.items():
            module = _module(name, case.name)
            module.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            x = case.make_inputs()  # the same inputs for every provider (fresh leaves: no shared .grad)
            out = fn(x).detach().clone()
            grads = {} if mode == "fwd" else {n: p.grad.clone() for n, p in module.named_parameters()}
            if mode != "fwd":
                grads.update({f"input{i}": a.grad.clone() for i, a in enumerate(x.args) if a.requires_grad})
            results[name] = (out, grads)
        base_out, base_grads = results[case.baseline]
        assert base_out.abs().max() > 0 and (mode == "fwd" or len(base_grads) > 2)
        for name, (out, grads) in results.items():
            scale = base_out.abs().max()
            assert (out - base_out).abs().max() <= 1e-5 * scale, (case.name, name)
            assert grads.keys() == base_grads.keys(), (case.name, name)
            for k, g in grads.items():
                assert g.abs().max() > 0, (case.name, name, k)
                assert (g - base_grads[k]).abs().max() <= 1e-5 * base_grads[k].abs().max(), (case.name, name, k)


def test_flamingo_flop_counts_match_a_counter_on_flamingo_pytorch():
    """The analytic counts equal torch's FLOP counter on flamingo-pytorch's modules (the block's with every
    (token, latent) pair, as flamingo-pytorch computes them; the suite's rows count the attended pairs only)."""
    pytest.importorskip("flamingo_pytorch", reason="flamingo-pytorch (the `hf` extra) is the suite's reference")
    shapes = {s.name.split()[0]: s for s in fl._shapes(BenchConfig(CPU, torch.float32, "quick", None), [None])}
    (_, rf, batch, media, tokens), = fl.RESAMPLER_SHAPES["quick"]
    rkey, bkey = _quick_keys()
    x = torch.randn(batch, media, tokens, rf["dim"])
    with FlopCounterMode(display=False) as counter:
        fl._resampler(rkey, CPU, torch.float32, None, True)(x)
    ff = int(rf["dim"] * rf["ff_mult"])
    count = fl.resampler_flops(rf["dim"], rf["depth"], rf["dim_head"], rf["heads"], rf["num_latents"], ff,
                               batch * media, tokens)
    assert counter.get_total_flops() == count == shapes["PerceiverResampler"].flops

    (_, bf, batch, text, media, latents), = fl.BLOCK_SHAPES["quick"]
    x = fl._block_inputs(batch, text, media, latents, bf["dim"], CPU, torch.float32, False)
    with FlopCounterMode(display=False) as counter:
        fl._block(bkey, CPU, torch.float32, None, True)(*x.args)
    ff = int(bf["dim"] * bf["ff_mult"])
    dense = fl.block_flops(bf["dim"], bf["dim_head"], bf["heads"], ff, batch, text, media * latents,
                           text * media * latents)
    assert counter.get_total_flops() == dense
    attended = fl.block_flops(bf["dim"], bf["dim_head"], bf["heads"], ff, batch, text, media * latents,
                              _pairs(text, media, latents, True))
    assert shapes["GatedCrossAttentionBlock"].flops == attended < dense


def test_flamingo_suite_without_flamingo_pytorch_times_ours_and_sdpa(monkeypatch):
    real = fl.has_module
    monkeypatch.setattr(fl, "has_module", lambda name: name != "flamingo_pytorch" and real(name))
    fl._resampler.cache_clear()
    fl._block.cache_clear()
    try:
        cases = registered_suites()["flamingo"].build(QUICK_REF)
        resampler, block = (next(c for c in cases if c.mode == "fwd" and c.name.startswith(k))
                            for k in ("PerceiverResampler", "GatedCrossAttentionBlock"))
        assert list(resampler.providers) == ["mmkernels PerceiverResampler[reference]"]
        assert resampler.baseline == "mmkernels PerceiverResampler[reference]"
        assert list(block.providers) == ["mmkernels GatedCrossAttentionBlock[reference]", fl.SDPA_B]
        assert block.baseline == fl.SDPA_B
        torch.manual_seed(0)
        x = block.make_inputs()
        ours, sdpa = (block.providers[n](x) for n in block.providers)
        torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5)
        assert resampler.providers["mmkernels PerceiverResampler[reference]"](resampler.make_inputs()).isfinite().all()
    finally:
        fl._resampler.cache_clear()
        fl._block.cache_clear()


def test_sdpa_block_zeroes_text_before_the_first_media_like_flamingo_pytorch():
    """The hand-written baseline is right where SDPA's own answer is not defined (fully masked rows)."""
    flamingo_pytorch = pytest.importorskip("flamingo_pytorch", reason="flamingo-pytorch is the reference")
    torch.manual_seed(0)
    ref = flamingo_pytorch.GatedCrossAttentionBlock(dim=32, dim_head=8, heads=4)
    with torch.no_grad():
        ref.attn_gate.fill_(0.7)
        ref.ff_gate.fill_(-0.3)
    x, media = torch.randn(3, 20, 32, requires_grad=True), torch.randn(3, 2, 4, 32)
    ml = torch.zeros(3, 20, dtype=torch.bool)
    ml[0, [5, 12]] = True  # text before the first media
    ml[1, [0, 1]] = True  # media at 0, back to back
    # sample 2: no media at all
    out = fl.sdpa_block(ref, x, media, ml)
    want = ref(x, media, ml)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    assert gx.isfinite().all()
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
