"""Tiny random-initialised Hugging Face models (offline) for the integration tests, and a spy on our ops."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


# Odd sizes on purpose: 3 heads of dim 6, 7 image tokens with padding, batch 3.
V = dict(hidden_size=18, intermediate_size=20, num_hidden_layers=2, num_attention_heads=3, image_size=8, patch_size=4,
         attention_dropout=0.0)
Q = dict(hidden_size=18, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20, encoder_hidden_size=18,
         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IMAGE_TOKEN = 60


def _opt():
    return transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=24, num_attention_heads=2,
                                  max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0)


def _pixels(b=3, h=8, w=8):
    return torch.randn(b, 3, h, w)


def _ids(n_image: int):
    return torch.tensor([[IMAGE_TOKEN] * n_image + [5, 6, 7], [IMAGE_TOKEN] * n_image + [8, 9, 10],
                         [IMAGE_TOKEN] * n_image + [11, 12, 13]])


def vit():
    cfg = transformers.ViTConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 **{k: v for k, v in V.items() if k != "attention_dropout"})
    return transformers.ViTModel(cfg, add_pooling_layer=False, use_mask_token=True)


def clip():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**V))


def siglip():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**V))


def blip2_vision():
    return transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**V))


def blip2_qformer():
    return transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**Q))


def blip2():
    cfg = transformers.Blip2Config(vision_config=transformers.Blip2VisionConfig(**V),
                                   qformer_config=transformers.Blip2QFormerConfig(**Q), text_config=_opt(),
                                   num_query_tokens=5, image_token_index=IMAGE_TOKEN)
    return transformers.Blip2ForConditionalGeneration(cfg)


def instructblip():
    cfg = transformers.InstructBlipConfig(
        vision_config=transformers.InstructBlipVisionConfig(**V),
        qformer_config=transformers.InstructBlipQFormerConfig(vocab_size=64, max_position_embeddings=32, **Q),
        text_config=_opt(), num_query_tokens=5, image_token_index=IMAGE_TOKEN)
    return transformers.InstructBlipForConditionalGeneration(cfg)


def llava():
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**V), text_config=llama,
                                   image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, projector_hidden_act="gelu")
    return transformers.LlavaForConditionalGeneration(cfg)


def _qformer_inputs():
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padded image tokens of a smaller image
    return dict(query_embeds=torch.randn(3, 5, 18), encoder_hidden_states=torch.randn(3, 7, 18),
                encoder_attention_mask=mask)


def _hidden(out):
    return out.last_hidden_state


def _logits(out):
    return out.logits


# name: (build, inputs, output tensor, the kinds patch must report, the ops that must run)
MODELS = {
    "ViTModel": (vit, lambda: dict(pixel_values=_pixels()), _hidden, {"attention": 2, "patch_embed": 1},
                 {"attention", "patch_embed"}),
    "CLIPVisionModel": (clip, lambda: dict(pixel_values=_pixels()), _hidden, {"attention": 2, "patch_embed": 1},
                        {"attention", "patch_embed"}),
    "SiglipVisionModel": (siglip, lambda: dict(pixel_values=_pixels()), _hidden, {"attention": 2, "patch_embed": 1},
                          {"attention", "patch_embed"}),
    "Blip2VisionModel": (blip2_vision, lambda: dict(pixel_values=_pixels()), _hidden,
                         {"attention": 2, "patch_embed": 1}, {"attention", "patch_embed"}),
    "Blip2QFormerModel": (blip2_qformer, _qformer_inputs, _hidden, {"attention": 2, "qformer": 1},
                          {"attention", "qformer_cross_attention"}),
    "Blip2ForConditionalGeneration": (blip2, lambda: dict(pixel_values=_pixels(), input_ids=_ids(5)), _logits,
                                      {"attention": 4, "patch_embed": 1, "qformer": 1},
                                      {"attention", "patch_embed", "qformer_cross_attention"}),
    "InstructBlipForConditionalGeneration": (
        instructblip,
        lambda: dict(pixel_values=_pixels(), input_ids=_ids(5),
                     qformer_input_ids=torch.tensor([[1, 2], [3, 4], [5, 6]]),
                     qformer_attention_mask=torch.tensor([[1, 1], [1, 0], [1, 1]])),
        _logits, {"attention": 4, "patch_embed": 1, "qformer": 1},
        {"attention", "patch_embed", "qformer_cross_attention"}),
    "LlavaForConditionalGeneration": (llava, lambda: dict(pixel_values=_pixels(), input_ids=_ids(4)), _logits,
                                      {"attention": 2, "patch_embed": 1}, {"attention", "patch_embed"}),
}


def pytest_generate_tests(metafunc):
    """``hf_vision_model`` parametrizes a test over every covered vision / Q-Former model (by name), ``hf_any_model``
    over those and the MoE families."""
    if "hf_vision_model" in metafunc.fixturenames:
        metafunc.parametrize("hf_vision_model", sorted(MODELS))
    if "hf_any_model" in metafunc.fixturenames:
        metafunc.parametrize("hf_any_model", sorted(EVERY_MODEL))


@pytest.fixture
def hf_models():
    """name -> (build, inputs, output tensor of the model output, reported kinds, ops that run): the vision /
    Q-Former models and the MoE families."""
    return EVERY_MODEL


# ---- MoE families (patched through integrations/hf/moe.py): tiny *ForCausalLM, logits out -------------------------

MOE_VOCAB = 61


def mixtral():
    cfg = transformers.MixtralConfig(vocab_size=MOE_VOCAB, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=5,
                                     num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


def longcat():
    cfg = transformers.LongcatFlashConfig(
        vocab_size=MOE_VOCAB, hidden_size=24, num_layers=1, num_attention_heads=2, ffn_hidden_size=20, q_lora_rank=8,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, head_dim=4, v_head_dim=6, moe_topk=3,
        n_routed_experts=5, zero_expert_num=3, expert_ffn_hidden_size=12, routed_scaling_factor=2.0)
    return transformers.LongcatFlashForCausalLM(cfg)


def deepseek_v3():
    cfg = transformers.DeepseekV3Config(
        vocab_size=MOE_VOCAB, hidden_size=24, intermediate_size=20, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=12, n_group=4,
        topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, routed_scaling_factor=2.5)
    return transformers.DeepseekV3ForCausalLM(cfg)


def _moe_ids():
    return dict(input_ids=torch.randint(0, MOE_VOCAB, (2, 7), generator=torch.Generator().manual_seed(5)))


# name: (build, inputs, output tensor, the kinds patch must report at least, the ops that must run)
MOE_MODELS = {
    "MixtralForCausalLM": (mixtral, _moe_ids, _logits, {"moe": 2}, {"moe_route", "moe_experts"}),
    # MLA attention (query/key 8 wide, values 6: one call of the op) as well as the MoE block
    "LongcatFlashForCausalLM": (longcat, _moe_ids, _logits, {"moe": 1, "attention": 2},
                                {"attention", "moe_route", "moe_experts"}),
    "DeepseekV3ForCausalLM": (deepseek_v3, _moe_ids, _logits, {"moe": 1}, {"moe_route", "moe_experts"}),
}
EVERY_MODEL = {**MODELS, **MOE_MODELS}
