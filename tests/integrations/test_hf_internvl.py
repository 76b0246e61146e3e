"""InternVL's InternViT patched (attention through "mmkernels" with the model's QK-norm before it; the embeddings
through ops.patch_embed): 1 and 4 tiles in fp32 and fp16, the forced Triton backend, mask tokens falling back. (The
shared sweeps over every covered model in tests/integrations/ cover it too: unpatch, gradients, flags, offload, LoRA,
pickling.)"""

from __future__ import annotations

import pytest
import torch

from mmkernels.integrations.hf import patch
from mmkernels.testing import assert_within_ref_error

transformers = pytest.importorskip("transformers")

CONFIG = dict(hidden_size=18, num_attention_heads=3, intermediate_size=20, num_hidden_layers=2, image_size=16,
              patch_size=4, use_qk_norm=True, use_absolute_position_embeddings=True, use_mask_token=True,
              attention_dropout=0.0)


def _tower(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**{**CONFIG, **overrides}))
    with torch.no_grad():  # HF initialises these to zeros: make them matter
        model.embeddings.cls_token.normal_()
        if model.embeddings.position_embeddings is not None:
            model.embeddings.position_embeddings.normal_(std=0.5)
    return model.to(dtype).eval()


def _pixels(tiles: int, dtype=torch.float32, size: int = 16):
    return torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(tiles)).to(dtype)


@pytest.mark.parametrize("tiles", [1, 4])
def test_fp32_and_fp16_match(tiles, ops_run, no_backend_env):
    model = _tower()
    x = _pixels(tiles)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        report = patch(model)
        out = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert report.kinds() == {"attention": 2, "patch_embed": 1} and not report.fallbacks
    assert {op for op, _ in ops_run} == {"attention", "patch_embed"}

    truth = _tower(torch.float64)(pixel_values=x.double()).last_hidden_state.detach()
    half = _tower(torch.float16)
    with torch.no_grad():
        ref16 = half(pixel_values=x.half()).last_hidden_state
        patch(half)
        out16 = half(pixel_values=x.half()).last_hidden_state
    assert out16.dtype == torch.float16
    assert_within_ref_error(out16, ref16, truth, name="InternViT fp16")


def test_without_absolute_positions_and_at_another_size(ops_run, no_backend_env):
    """No position embeddings in the config; and a 24 px image (the model's own bicubic resize of its 16 px grid)."""
    for overrides, size in (({"use_absolute_position_embeddings": False}, 16), ({}, 24)):
        model = _tower(**overrides)
        x = _pixels(2, size=size)
        with torch.no_grad():
            ref = model(pixel_values=x).last_hidden_state
            report = patch(model)
            out = model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        assert not report.fallbacks, report.fallbacks


def test_forced_triton_backend(ops_run, no_backend_env):
    model = _tower()
    x = _pixels(3)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        patch(model, backend="triton")
        out = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert set(ops_run) == {("attention", "triton"), ("patch_embed", "triton")}


def test_mask_tokens_fall_back(ops_run, no_backend_env):
    model = _tower()
    x = _pixels(2)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad():
        ref = model(pixel_values=x, bool_masked_pos=masked).last_hidden_state
        report = patch(model)
        out = model(pixel_values=x, bool_masked_pos=masked).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert any("bool_masked_pos" in r for r in report.fallbacks), report.fallbacks
