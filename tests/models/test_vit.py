"""mmkernels.models.ViT: presets, parity with random-initialised HF ViTModel / Blip2VisionModel and timm
VisionTransformer built offline from tiny configs (both HF key-name generations, interpolated position
embeddings), conversion errors, gradients to every parameter, torch.compile."""

from __future__ import annotations

import re

import pytest
import torch
from random_weights import randomise  # tests/random_weights.py

from mmkernels.models import ViT
from mmkernels.models.convert.vit import ConversionError, hf_to_mmkernels, timm_to_mmkernels
from mmkernels.models.vit import PRESETS, ViTConfig

transformers = pytest.importorskip("transformers")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

RTOL, ATOL = 1e-5, 1e-5  # fp32 parity (LayerNorm-normalised outputs are O(1))


def hf_vit(image_size=32, patch_size=8, channels=3, qkv_bias=True):
    cfg = transformers.ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, qkv_bias=qkv_bias,
                                 attn_implementation="sdpa")
    return randomise(transformers.ViTModel(cfg))


def hf_blip2(image_size=28, patch_size=14):
    cfg = transformers.Blip2VisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=64,
                                         num_hidden_layers=2, num_attention_heads=8, intermediate_size=96)
    return randomise(transformers.Blip2VisionModel(cfg))


def timm_model(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10,
                dynamic_img_size=True)
    args.update(kw)
    return randomise(timm_vit.VisionTransformer(**args))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


# -- presets ---------------------------------------------------------------------------------------------------


def test_presets():
    assert set(PRESETS) == {"vit_b_16", "vit_l_14", "vit_h_14", "vit_g_14"}
    g = PRESETS["vit_g_14"]
    assert (g.hidden_size, g.num_heads, g.head_dim, g.num_layers, g.mlp_dim, g.patch_size) == (1408, 16, 88, 39, 6144,
                                                                                              14)
    assert PRESETS["vit_l_14"].head_dim == 64 and PRESETS["vit_h_14"].head_dim == 80
    with torch.device("meta"):
        base = ViT("vit_b_16")
        large336 = ViT.preset("vit_l_14", image_size=336)
    n_params = sum(p.numel() for p in base.parameters())
    assert n_params == 85_798_656  # ViT-B/16 encoder without head, as google/vit-base-patch16-224-in21k minus pooler
    assert large336.patch_embed.pos_embed.shape == (1, 1 + 24 * 24, 1024)
    with pytest.raises(ValueError, match="unknown preset"):
        ViT("vit_x")
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig(hidden_size=100, num_heads=3)


def test_tiny_forward_shape(device):
    vit = ViT(ViTConfig(image_size=28, patch_size=14, hidden_size=88 * 2, num_layers=1, num_heads=2, mlp_dim=64),
              backend="triton").to(device)
    y = vit(torch.randn(2, 3, 28, 42, device=device))
    assert y.shape == (2, 1 + 2 * 3, 176)


# -- HF ViTModel -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_vit_parity(qkv_bias):
    hf = hf_vit(qkv_bias=qkv_bias)
    ours = ViT.from_hf(hf)
    assert ours.config.pos_interpolation == "hf" and ours.config.layer_norm_eps == hf.config.layer_norm_eps
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(ours(x), hf(x).last_hidden_state)
        x2 = torch.randn(2, 3, 48, 40)  # other size: interpolated position embeddings, non-square grid
        close(ours(x2), hf(x2, interpolate_pos_encoding=True).last_hidden_state)


def _to_old_hf_names(sd: dict) -> dict:
    """transformers 5 in-memory names -> the transformers 4 names of checkpoints on disk."""
    out = {}
    for k, t in sd.items():
        k = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", k)
        k = k.replace("attention.q_proj", "attention.attention.query").replace("attention.k_proj",
                                                                               "attention.attention.key")
        k = k.replace("attention.v_proj", "attention.attention.value").replace("attention.o_proj",
                                                                               "attention.output.dense")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[k] = t
    return out


def test_hf_vit_old_key_names():
    hf = hf_vit()
    new_sd = hf.state_dict()
    old_sd = _to_old_hf_names(new_sd)
    assert any(k.startswith("encoder.layer.0.attention.attention.query") for k in old_sd)
    a, b = hf_to_mmkernels(new_sd), hf_to_mmkernels(old_sd)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ours = ViT.from_hf(hf)
    ours.load_state_dict(b)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        close(ours(x), hf(x).last_hidden_state)


def test_hf_classification_wrapper_and_prefix():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=40, num_labels=5)
    clf = randomise(transformers.ViTForImageClassification(cfg))
    ours = ViT.from_hf(clf)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        close(ours(x), clf.vit(x).last_hidden_state)
    sd = hf_to_mmkernels(clf.state_dict())  # "vit." found and stripped; the classifier is outside it
    assert "patch_embed.weight" in sd


def test_hf_errors_list_keys():
    sd = hf_vit().state_dict()
    sd["layers.0.attention.extra.weight"] = torch.zeros(1)
    del sd["layernorm.bias"]
    with pytest.raises(ConversionError) as info:
        hf_to_mmkernels(sd)
    msg = str(info.value)
    assert "1 unknown key(s): layers.0.attention.extra.weight" in msg and "1 missing key(s): layernorm.bias" in msg
    with pytest.raises(ConversionError, match=r"missing key\(s\).*layers\.2\."):
        hf_to_mmkernels(hf_vit().state_dict(), num_layers=3)


# -- HF Blip2VisionModel ---------------------------------------------------------------------------------------


def test_blip2_parity():
    hf = hf_blip2()
    ours = ViT.from_hf(hf)
    assert ours.config.head_dim == 8
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        close(ours(x), hf(x).last_hidden_state)
        x2 = torch.randn(1, 3, 42, 56)
        close(ours(x2), hf(x2, interpolate_pos_encoding=True).last_hidden_state)


def test_blip2_old_qv_bias_names_and_prefix():
    hf = hf_blip2()
    sd = {}
    for k, t in hf.state_dict().items():
        if k.endswith("self_attn.qkv.bias"):  # transformers 4 kept q and v biases apart (k bias is zero)
            d = t.shape[0] // 3
            sd[k.replace("qkv.bias", "q_bias")] = t[:d]
            sd[k.replace("qkv.bias", "v_bias")] = t[2 * d:]
        else:
            sd[k] = t
    full = {"vision_model." + k: t for k, t in sd.items()}
    full["qformer.layer.0.weight"] = torch.zeros(1)  # other parts of a Blip2ForConditionalGeneration
    converted = hf_to_mmkernels(full)
    ours = ViT.from_hf(hf)
    reference = ours.state_dict()
    for k in reference:
        if k.endswith("attn.qkv.bias"):
            d = reference[k].shape[0] // 3
            # the k part is zero in the old format: compare q and v
            torch.testing.assert_close(converted[k][:d], reference[k][:d], rtol=0, atol=0)
            torch.testing.assert_close(converted[k][2 * d:], reference[k][2 * d:], rtol=0, atol=0)
            assert torch.count_nonzero(converted[k][d:2 * d]) == 0
        else:
            torch.testing.assert_close(converted[k], reference[k], rtol=0, atol=0)


def test_blip2_g14_head_dim_88_tiny():
    """Head dim 88 (ViT-g/14) with few layers and a small image, against HF."""
    cfg = transformers.Blip2VisionConfig(image_size=28, patch_size=14, hidden_size=176, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64)
    hf = randomise(transformers.Blip2VisionModel(cfg))
    ours = ViT.from_hf(hf)
    assert ours.config.head_dim == 88
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        close(ours(x), hf(x).last_hidden_state)


# -- timm VisionTransformer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "pre_norm", "no_cls", "no_qkv_bias"])
def test_timm_parity(variant):
    kw = {"plain": {}, "pre_norm": {"pre_norm": True}, "no_cls": {"class_token": False, "global_pool": "avg",
                                                                    "fc_norm": False},
          "no_qkv_bias": {"qkv_bias": False}}[variant]
    tm = timm_model(**kw)
    ours = ViT.from_timm(tm)
    assert ours.config.pos_interpolation == "timm"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(ours(x), tm.forward_features(x))
        x2 = torch.randn(2, 3, 40, 56)
        close(ours(x2), tm.forward_features(x2))
        x3 = torch.randn(1, 3, 16, 24)  # smaller than trained: timm antialiases when shrinking
        close(ours(x3), tm.forward_features(x3))


def test_timm_errors():
    with pytest.raises(ConversionError, match="layer scale"):
        ViT.from_timm(timm_model(init_values=1e-5))
    with pytest.raises(ConversionError, match="register tokens"):
        ViT.from_timm(timm_model(reg_tokens=2))
    sd = timm_model().state_dict()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(12)
    with pytest.raises(ConversionError, match=r"unknown key\(s\): blocks\.0\.attn\.q_norm\.weight"):
        timm_to_mmkernels(sd)


# -- training-side checks --------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter(device):
    vit = ViT.from_timm(timm_model()).to(device)
    vit.patch_embed.backend = "triton"
    x = torch.randn(2, 3, 32, 40, device=device, requires_grad=True)
    vit(x).square().mean().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and torch.count_nonzero(p.grad) > 0, name
    assert x.grad is not None


def test_matches_hf_gradients():
    hf = hf_vit()
    ours = ViT.from_hf(hf)
    ours.patch_embed.backend = "triton"
    x = torch.randn(2, 3, 32, 32)
    g = torch.randn(2, 17, 48)
    (ours(x) * g).sum().backward()
    (hf(x).last_hidden_state * g).sum().backward()
    pairs = {"patch_embed.weight": hf.embeddings.patch_embeddings.projection.weight,
             "patch_embed.pos_embed": hf.embeddings.position_embeddings,
             "patch_embed.cls_token": hf.embeddings.cls_token, "norm.weight": hf.layernorm.weight}
    params = dict(ours.named_parameters())
    for name, ref in pairs.items():
        torch.testing.assert_close(params[name].grad, ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_fullgraph(device):
    vit = ViT(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=48),
              backend="triton").to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    compiled = torch.compile(vit, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(x), vit(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hf_parity_gpu_low_precision(dtype):
    cfg = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=768, attn_implementation="sdpa")
    hf = transformers.ViTModel(cfg).cuda().eval()
    ours = ViT.from_hf(hf)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        truth = hf(x).last_hidden_state
        ours_lp, hf_lp = ours.to(dtype)(x.to(dtype)), hf.to(dtype)(x.to(dtype)).last_hidden_state
    assert max_err(ours_lp.float(), truth) <= 2 * max_err(hf_lp.float(), truth) + 1e-3
