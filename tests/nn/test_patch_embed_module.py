"""mmkernels.nn.PatchEmbed: Conv2d state-dict compatibility, cls/pos handling, both position-embedding
interpolation conventions against their own libraries, gradients, compile, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmkernels.nn import PatchEmbed
from mmkernels.nn.patch_embed import interpolate_pos_embed


def test_conv2d_state_dict_compatible(device):
    conv = nn.Conv2d(3, 24, 14, stride=14).to(device)
    pe = PatchEmbed(28, 14, 3, 24, backend="triton").to(device)
    assert set(pe.state_dict()) == {"weight", "bias"}
    pe.load_state_dict(conv.state_dict(), strict=True)
    conv2 = nn.Conv2d(3, 24, 14, stride=14).to(device)
    conv2.load_state_dict(pe.state_dict(), strict=True)
    x = torch.randn(2, 3, 28, 42, device=device)
    expected = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pe(x), expected, rtol=1e-5, atol=1e-5)


def test_without_bias_and_tokens(device):
    pe = PatchEmbed(16, 8, 1, 10, bias=False, backend="triton").to(device)
    assert set(pe.state_dict()) == {"weight"}
    x = torch.randn(1, 1, 16, 8, device=device)
    expected = nn.functional.conv2d(x, pe.weight, stride=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pe(x), expected, rtol=1e-5, atol=1e-5)


def test_cls_and_pos(device):
    pe = PatchEmbed((16, 24), 8, 3, 12, cls_token=True, pos_embed=True, backend="triton").to(device)
    assert pe.cls_token.shape == (1, 1, 12) and pe.pos_embed.shape == (1, 1 + 2 * 3, 12)
    with torch.no_grad():
        pe.cls_token.normal_()
    x = torch.randn(2, 3, 16, 24, device=device)
    y = pe(x)
    conv = nn.functional.conv2d(x, pe.weight, pe.bias, stride=8).flatten(2).transpose(1, 2)
    expected = torch.cat([pe.cls_token.expand(2, 1, 12), conv], 1) + pe.pos_embed
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter(device):
    pe = PatchEmbed(16, 8, 4, 16, cls_token=True, pos_embed=True, backend="triton").to(device)
    x = torch.randn(2, 4, 24, 16, device=device, requires_grad=True)  # other size: interpolated pos embed
    pe(x).square().sum().backward()
    for name, p in pe.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert x.grad is not None


def test_input_follows_weight_dtype(device):
    pe = PatchEmbed(16, 8, 3, 8, backend="reference").to(device=device, dtype=torch.float64)
    y = pe(torch.randn(1, 3, 16, 16, device=device))
    assert y.dtype == torch.float64


def _hf_embeddings(grid: int, dim: int, patch: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=grid * patch, patch_size=patch, hidden_size=dim, num_hidden_layers=1,
                                 num_attention_heads=1, intermediate_size=dim)
    return transformers.models.vit.modeling_vit.ViTEmbeddings(cfg)


@pytest.mark.parametrize("new_hw", [(48, 64), (16, 16), (32, 32), (40, 24)])
def test_hf_interpolation_matches_transformers(new_hw):
    patch, grid, dim = 8, 4, 12
    emb = _hf_embeddings(grid, dim, patch)
    h, w = new_hw
    tokens = torch.zeros(1, 1 + (h // patch) * (w // patch), dim)
    with torch.no_grad():
        expected = emb.interpolate_pos_encoding(tokens, h, w)
    ours = interpolate_pos_embed(emb.position_embeddings.detach(), (grid, grid), (h // patch, w // patch), mode="hf")
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("new_grid,old_grid", [((6, 5), (4, 4)), ((2, 3), (4, 4)), ((4, 4), (3, 5)), ((3, 3), (3, 3))])
@pytest.mark.parametrize("prefix", [0, 1])
def test_timm_interpolation_matches_timm(new_grid, old_grid, prefix):
    pos_mod = pytest.importorskip("timm.layers.pos_embed")
    pos = torch.randn(1, prefix + old_grid[0] * old_grid[1], 10)
    expected = pos_mod.resample_abs_pos_embed(pos, new_size=new_grid, old_size=old_grid, num_prefix_tokens=prefix)
    ours = interpolate_pos_embed(pos, old_grid, new_grid, num_prefix_tokens=prefix, mode="timm")
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_conventions_differ():
    pos = torch.randn(1, 1 + 16, 8)
    hf = interpolate_pos_embed(pos, (4, 4), (6, 6), mode="hf")
    tm = interpolate_pos_embed(pos, (4, 4), (6, 6), mode="timm")
    assert hf.shape == tm.shape == (1, 37, 8)
    torch.testing.assert_close(hf[:, :1], tm[:, :1], rtol=0, atol=0)  # the cls row is kept as is
    assert (hf - tm).abs().max() > 1e-3


def test_module_uses_its_convention(device):
    for mode in ("hf", "timm"):
        pe = PatchEmbed(16, 8, 3, 8, cls_token=True, pos_embed=True, pos_interpolation=mode, backend="triton")
        pe = pe.to(device)
        x = torch.randn(1, 3, 24, 32, device=device)
        pos = interpolate_pos_embed(pe.pos_embed, (2, 2), (3, 4), mode=mode)
        conv = nn.functional.conv2d(x, pe.weight, pe.bias, stride=8).flatten(2).transpose(1, 2)
        expected = torch.cat([pe.cls_token, conv], 1) + pos
        torch.testing.assert_close(pe(x), expected, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph(device):
    pe = PatchEmbed(16, 8, 3, 16, cls_token=True, pos_embed=True, backend="triton").to(device)
    compiled = torch.compile(pe, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    x = torch.randn(2, 3, 16, 24, device=device)
    torch.testing.assert_close(compiled(x), pe(x), rtol=1e-5, atol=1e-5)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        PatchEmbed(30, 16)
    with pytest.raises(ValueError, match="pos_interpolation"):
        PatchEmbed(32, 16, pos_interpolation="bilinear")
    with pytest.raises(TypeError, match="image_size"):
        PatchEmbed("224", 16)
    pe = PatchEmbed(32, 16, 3, 8, cls_token=True, pos_embed=True, backend="reference")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        pe(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"PatchEmbed: pixels must be \[B, in_channels=3, H, W\], got \(1, 4, 32, "):
        pe(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="pos_embed has 5 rows"):
        interpolate_pos_embed(torch.randn(1, 5, 8), (3, 3), (4, 4))
