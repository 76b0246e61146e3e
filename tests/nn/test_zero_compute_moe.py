"""mmkernels.nn.ZeroComputeMoE: parity with Hugging Face LongcatFlashMoE, converters, the balancer wiring."""

from __future__ import annotations

import pytest
import torch

from mmkernels.models.convert._common import ConversionError
from mmkernels.models.convert.longcat import hf_to_mmkernels, mmkernels_to_hf
from mmkernels.nn import ZeroComputeMoE, update_expert_biases
from mmkernels.nn.moe import MOE_PRESETS
from mmkernels.ops.moe import EXPERTS_BACKENDS

transformers = pytest.importorskip("transformers")
from transformers.models.longcat_flash.configuration_longcat_flash import LongcatFlashConfig  # noqa: E402
from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE  # noqa: E402

BACKENDS = EXPERTS_BACKENDS.available(torch.device("cpu"))


def hf_moe(hidden=48, n=6, z=3, k=3, inter=20, scale=6.0, seed=0):
    torch.manual_seed(seed)
    cfg = LongcatFlashConfig(hidden_size=hidden, n_routed_experts=n, zero_expert_num=z, moe_topk=k,
                             expert_ffn_hidden_size=inter, routed_scaling_factor=scale)
    m = LongcatFlashMoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.1)
        m.router.e_score_correction_bias.normal_(std=0.01)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [dict(), dict(hidden=40, n=8, z=4, k=12, inter=24), dict(n=5, z=0, k=2)])
def test_matches_hf_outputs_and_gradients(backend, shape):
    hf = hf_moe(**shape)
    ours = ZeroComputeMoE.from_hf(hf, backend=None)
    ours.experts.backend = backend
    x = torch.randn(3, 7, hf.router.classifier.weight.shape[1])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y = hf(x1), ours(x2)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    n = hf.experts.down_proj.shape[0]  # N FFN experts (transformers releases differ in where they keep N)
    hf_params = [x1, hf.experts.gate_up_proj, hf.experts.down_proj, hf.router.classifier.weight]
    our_params = [x2, ours.experts.w_gate_up, ours.experts.w_down, ours.router.weight]
    g_hf = torch.autograd.grad(y_hf, hf_params, g)
    g_ours = torch.autograd.grad(y, our_params, g)
    torch.testing.assert_close(g_ours[0], g_hf[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours[1], g_hf[1][:n], rtol=1e-5, atol=1e-5)
    assert not g_hf[1][n:].any(), "HF's gate_up_proj rows for zero experts are never used"
    torch.testing.assert_close(g_ours[2], g_hf[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours[3], g_hf[3], rtol=1e-5, atol=1e-5)


def test_identity_term_scaled_like_hf():
    """A token routed only to zero experts comes out as routed_scaling_factor * (sum of its scores) * x."""
    hf = hf_moe(n=2, z=6, k=2, scale=6.0)
    with torch.no_grad():
        hf.router.e_score_correction_bias[:2] = -10.0  # FFN experts never chosen
    ours = ZeroComputeMoE.from_hf(hf)
    x = torch.randn(5, hf.router.classifier.weight.shape[1])
    r = ours.route(x)
    assert (r.topk_ids >= 2).all()
    torch.testing.assert_close(ours(x), r.zero_weight[:, None] * x)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)
    assert (r.zero_weight > 0).all() and (r.zero_weight <= 6.0).all()


def test_state_dict_round_trip_both_ways():
    hf = hf_moe(n=6, z=3)
    sd = hf_to_mmkernels(hf.state_dict(), num_ffn_experts=6)
    back = mmkernels_to_hf(sd, num_zero_experts=3)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    assert back["experts.gate_up_proj"].shape == ref["experts.gate_up_proj"].shape  # HF allocates N+Z rows
    for key in ("router.classifier.weight", "router.e_score_correction_bias", "experts.down_proj"):
        assert torch.equal(back[key], ref[key])
    assert torch.equal(back["experts.gate_up_proj"][:6], ref["experts.gate_up_proj"][:6])
    hf2 = hf_moe(n=6, z=3, seed=5)
    hf2.load_state_dict(back)
    x = torch.randn(4, 48)
    torch.testing.assert_close(hf2(x), hf(x))
    prefixed = hf_to_mmkernels({"model.layers.0.mlp." + k: v for k, v in ref.items()}, num_ffn_experts=6,
                               prefix="model.layers.0.mlp.")
    assert all(torch.equal(prefixed[k], sd[k]) for k in sd)


def test_converter_reports_unknown_and_missing_keys():
    sd = hf_moe().state_dict()
    sd["router.extra"] = torch.zeros(1)
    del sd["experts.down_proj"]
    with pytest.raises(ConversionError, match=r"unknown key\(s\): router.extra.*missing key\(s\): experts.down_proj"):
        hf_to_mmkernels(sd, num_ffn_experts=6)
    with pytest.raises(ConversionError, match="expected 7 FFN experts"):
        hf_to_mmkernels(hf_moe().state_dict(), num_ffn_experts=7)


def test_training_feeds_the_balancer():
    moe = ZeroComputeMoE(32, 8, 4, 3, 16, routed_scaling_factor=2.0, target_ffn_per_token=2.0,
                         balancer_kwargs=dict(ki=0.5))
    x = torch.randn(2, 10, 32)
    moe.train()
    moe(x)
    moe(x)
    assert moe.pending_counts.sum() == 2 * 20 * 3
    update_expert_biases(torch.nn.Sequential(moe))
    assert moe.pending_counts.sum() == 0 and moe.balancer.steps == 1
    assert not torch.equal(moe.expert_bias[:8], torch.zeros(8)) and torch.equal(moe.expert_bias[8:], torch.zeros(4))
    moe.eval()
    moe(x)
    assert moe.pending_counts.sum() == 0, "eval forwards do not count"


def test_fixed_bias_without_target():
    moe = ZeroComputeMoE.from_hf(hf_moe())
    before = moe.expert_bias.clone()
    moe.train()
    moe(torch.randn(4, 48))
    moe.update_bias()
    assert torch.equal(moe.expert_bias, before) and moe.pending_counts.sum() == 0


def test_presets():
    assert MOE_PRESETS["longcat-flash"].num_ffn_experts == 512 and MOE_PRESETS["longcat-flash"].top_k == 12
    with torch.device("meta"):
        moe = ZeroComputeMoE.from_preset("longcat-flash-lite", dtype=torch.bfloat16)
    assert moe.experts.w_gate_up.shape == (256, 2048, 3072) and moe.router.weight.dtype == torch.float32
    assert moe.router.weight.shape == (384, 3072) and moe.routed_scaling_factor == 6.0
    with pytest.raises(ValueError, match="unknown preset"):
        ZeroComputeMoE.from_preset("longcat-pro")


def test_bad_input():
    moe = ZeroComputeMoE(16, 4, 2, 2, 8)
    with pytest.raises(ValueError, match=r"x must be \[..., 16\]"):
        moe(torch.randn(3, 15))
    with pytest.raises(ValueError, match="num_ffn_experts"):
        ZeroComputeMoE(16, 0, 2, 2, 8)
    with pytest.raises(ValueError, match="top_k"):
        ZeroComputeMoE(16, 4, 2, 7, 8)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_compiles_fullgraph():
    """The whole block (fp32 router, routing op, grouped experts) traces without graph breaks."""
    moe = ZeroComputeMoE(32, 6, 3, 3, 16, routed_scaling_factor=6.0, backend=None)
    moe.experts.backend = "triton"  # the reference experts loop over experts on the host: not traceable
    moe.eval()
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, moe(x))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_eager,) = torch.autograd.grad(moe(x).square().sum(), x)
    torch.testing.assert_close(g, g_eager)
