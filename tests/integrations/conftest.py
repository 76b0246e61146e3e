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



# ---- Qwen-VL packed native-resolution towers and InternVL (integrations/hf/qwen_vl.py, vision.py) ---------------
# Three images of different sizes and a 2-frame video (t=2 after the temporal patch): 88 patches of 3*2*4*4 values,
# head dim 20 (2 heads of a 40-wide tower). Qwen2.5-VL: window layers (2x2 merged tokens = 16 patches per window)
# split every image into several windows, and full-attention layers.
QWEN_GRID = ((1, 4, 6), (1, 8, 4), (2, 4, 4))
QWEN_V = dict(in_channels=3, patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_heads=2)
QWEN_TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})
VISION_START, VISION_END = 62, 63


def _qwen_vision(family: str) -> dict:
    if family == "qwen2_vl":
        return dict(depth=2, embed_dim=40, hidden_size=24, mlp_ratio=2, **QWEN_V)
    if family == "qwen2_5_vl":
        return dict(depth=4, hidden_size=40, intermediate_size=48, window_size=16, fullatt_block_indexes=[1, 3],
                    out_hidden_size=24, **QWEN_V)
    return dict(depth=3, hidden_size=40, intermediate_size=48, out_hidden_size=24, num_position_embeddings=16,
                deepstack_visual_indexes=[1], **QWEN_V)


_QWEN = {"qwen2_vl": ("Qwen2VLVisionConfig", "Qwen2VisionTransformerPretrainedModel", "Qwen2VLConfig",
                      "Qwen2VLForConditionalGeneration"),
         "qwen2_5_vl": ("Qwen2_5_VLVisionConfig", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLConfig",
                        "Qwen2_5_VLForConditionalGeneration"),
         "qwen3_vl": ("Qwen3VLVisionConfig", "Qwen3VLVisionModel", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}


def qwen_tower(family: str):
    import importlib

    vision_cfg, tower, _, _ = _QWEN[family]
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(mod, tower)(getattr(transformers, vision_cfg)(**_qwen_vision(family)))


def qwen_vlm(family: str):
    _, _, cfg, cls = _QWEN[family]
    text = dict(QWEN_TEXT, head_dim=12) if family == "qwen3_vl" else QWEN_TEXT
    config = getattr(transformers, cfg)(text_config=text, vision_config=_qwen_vision(family),
                                        image_token_id=IMAGE_TOKEN, video_token_id=61,
                                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return getattr(transformers, cls)(config)


def qwen_patches(grid=QWEN_GRID, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [patches, 96], grid_thw [n, 3]) of the packed images."""
    grid_thw = torch.tensor(grid)
    n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    return torch.randn(n, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(seed)), grid_thw


def _qwen_tower_inputs():
    hidden, grid = qwen_patches()
    return dict(hidden_states=hidden, grid_thw=grid)


def _qwen_vlm_inputs():
    hidden, grid = qwen_patches(QWEN_GRID[:2])  # two images: 6 and 8 merged tokens
    ids = [5, VISION_START] + [IMAGE_TOKEN] * 6 + [VISION_END, VISION_START] + [IMAGE_TOKEN] * 8 + [VISION_END, 7]
    ids = torch.tensor([ids])
    return dict(input_ids=ids, pixel_values=hidden, image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE_TOKEN).int())


def _tower_out(out):
    """Both outputs of a Qwen tower: the blocks' (window-ordered) hidden states and the merged features."""
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


INTERNVL_V = dict(hidden_size=18, num_attention_heads=3, intermediate_size=20, num_hidden_layers=2, image_size=16,
                  patch_size=4, use_qk_norm=True, use_absolute_position_embeddings=True, attention_dropout=0.0)


def internvl_vision():
    return transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**INTERNVL_V))


def internvl():
    text = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    cfg = transformers.InternVLConfig(vision_config=transformers.InternVLVisionConfig(**INTERNVL_V), text_config=text,
                                      image_token_id=IMAGE_TOKEN, downsample_ratio=0.5, vision_feature_layer=-1)
    return transformers.InternVLForConditionalGeneration(cfg)



# ---- IDEFICS (v1): perceiver resampler + gated cross-attention (integrations/hf/idefics.py) -----------------------
IDEFICS_B, IDEFICS_LT, IDEFICS_M, IDEFICS_IMG = 2, 11, 3, 8  # 3 image slots per sample


def idefics_config(qk: bool = True, resampler: bool = True, alpha_type: str = "vector", dropout: float = 0.0):
    return transformers.IdeficsConfig(
        vocab_size=64, additional_vocab_size=2, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
        num_attention_heads=3, cross_layer_interval=1, qk_layer_norms=qk, dropout=dropout,
        freeze_text_layers=False, freeze_vision_layers=False, freeze_lm_head=False,
        # HF's "normal" init of a float alpha passes an int size to torch.normal: "ones" there (tanh(1) = 0.76)
        alpha_initializer="normal" if alpha_type == "vector" else "ones", alphas_initializer_range=1.0,
        alpha_type=alpha_type, use_resampler=resampler,
        max_position_embeddings=64,
        vision_config=dict(embed_dim=18, image_size=IDEFICS_IMG, intermediate_size=20, patch_size=4,
                           num_hidden_layers=1, num_attention_heads=3),
        perceiver_config=dict(use_resampler=resampler, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=7, qk_layer_norms_perceiver=qk))


def idefics(**kw):
    torch.manual_seed(0)
    return transformers.IdeficsForVisionText2Text(idefics_config(**kw)).eval()


def idefics_inputs(mask: torch.Tensor | None = None, seed: int = 1) -> dict:
    """Token ids, pixels of 3 image slots per sample and the image attention mask ``[B, Lt, M]`` (default: text
    before the first image, two images, an end of document, a third image; sample 0 uses two slots)."""
    if mask is None:
        rows = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, -1, -1, 1, 1, 2, 2, 2, 2]])
        mask = torch.nn.functional.one_hot(rows.clamp(min=0), IDEFICS_M) * (rows >= 0)[..., None]
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(3, 60, (IDEFICS_B, IDEFICS_LT), generator=g),
                pixel_values=torch.randn(IDEFICS_B, IDEFICS_M, 3, IDEFICS_IMG, IDEFICS_IMG, generator=g),
                image_attention_mask=mask)

def _qwen_models() -> dict:
    """The Qwen-VL towers and models, each where this transformers has it."""
    out = {}
    depth = {"qwen2_vl": 2, "qwen2_5_vl": 4, "qwen3_vl": 3}
    for family, (vision_cfg, tower, _, cls) in _QWEN.items():
        if not hasattr(transformers, vision_cfg):
            continue
        kinds = {"attention": depth[family], "rotary": depth[family], "patch_embed": 1, "tower": 1}
        ops = {"attention", "rotary_embedding", "patch_embed"}
        out[tower] = (lambda f=family: qwen_tower(f), _qwen_tower_inputs, _tower_out, kinds, ops)
        out[cls] = (lambda f=family: qwen_vlm(f), _qwen_vlm_inputs, _logits, kinds, ops)
    return out

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
    "InternVLVisionModel": (internvl_vision, lambda: dict(pixel_values=_pixels(h=16, w=16)), _hidden,
                            {"attention": 2, "patch_embed": 1}, {"attention", "patch_embed"}),
    "InternVLForConditionalGeneration": (
        internvl, lambda: dict(pixel_values=_pixels(b=2, h=16, w=16),
                               input_ids=torch.tensor([[IMAGE_TOKEN] * 4 + [5, 6], [IMAGE_TOKEN] * 4 + [7, 8]])),
        _logits, {"attention": 2, "patch_embed": 1}, {"attention", "patch_embed"}),
    **_qwen_models(),
    **({"IdeficsForVisionText2Text": (
        idefics, idefics_inputs, _logits,
        # the resampler's 2 attentions (swapped forwards) + the vision tower's layer (config switch)
        {"attention": 3, "patch_embed": 1, "gated_cross_attention": 2, "media_cross_attention": 2},
        {"attention", "patch_embed", "media_cross_attention"})} if hasattr(transformers, "IdeficsConfig") else {}),
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
