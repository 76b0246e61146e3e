"""ScMoEDecoder in LongCat-Flash mode (attention="mla") against Hugging Face's ``LongcatFlashForCausalLM``:
``ScMoEDecoder.from_hf`` takes every weight over; logits within 1e-5 and every parameter's gradient within 1e-4
(relative, norm-wise) of HF's, on HF's tiny test config and on a wide config with the real head dims (qk 128 + 64,
v 128), with zero experts, top-k > 1 and a padded batch; incremental decoding with the latent cache equals the full
run; HF-style RMSNorm in MLA mode; bad input. Random-initialised HF models, nothing downloaded, fp32 CPU."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from mmkernels.models import KVCache, ScMoEConfig, ScMoEDecoder
from mmkernels.models.convert._common import ConversionError
from mmkernels.nn.mla import MLACache

transformers = pytest.importorskip("transformers")
from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashRMSNorm  # noqa: E402

# HF's own test config (tests/models/longcat_flash/test_modeling_longcat_flash.py, LongcatFlashModelTester)
HF_TINY = dict(vocab_size=99, hidden_size=144, ffn_hidden_size=288, expert_ffn_hidden_size=48, num_layers=1,
               num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=16, q_lora_rank=48, qk_rope_head_dim=4,
               v_head_dim=8, qk_nope_head_dim=8, head_dim=4, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
               routed_scaling_factor=1.0, hidden_act="silu", max_position_embeddings=128, initializer_range=0.02,
               rms_norm_eps=1e-6, pad_token_id=3)
# The real model's head dims (qk 128 + 64 = 192, v 128) with few heads, two layers, small widths; more zero experts
# and top-k 3, attention biases, a routed scaling factor as LongCat-Flash's, tied embeddings.
WIDE = dict(vocab_size=64, hidden_size=96, ffn_hidden_size=64, expert_ffn_hidden_size=32, num_layers=2,
            num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=64,
            v_head_dim=128, qk_nope_head_dim=128, head_dim=64, n_routed_experts=4, zero_expert_num=3, moe_topk=3,
            routed_scaling_factor=6.0, hidden_act="silu", max_position_embeddings=256, initializer_range=0.02,
            rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=True, pad_token_id=0)
CONFIGS = {"hf_tiny": HF_TINY, "wide_192_128": WIDE}


@pytest.fixture(autouse=True)
def one_thread(cpu_threads):
    cpu_threads(1)


def _hf_model(name: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    cfg = transformers.LongcatFlashConfig(**{**CONFIGS[name], **changes})
    cfg._attn_implementation = "eager"
    model = transformers.LongcatFlashForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1 and the correction bias to 0: make both matter
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0, 0.05)
            layer.mlp.router.classifier.weight.normal_(0, 0.5)  # spread the routing over FFN and zero experts
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _hf_grad(hf, ours_name: str, num_ffn: int) -> torch.Tensor | None:
    """HF's gradient of the parameter our decoder calls ``ours_name``."""
    params = dict(hf.named_parameters())
    if ours_name == "lm_head.weight":
        return params["lm_head.weight"].grad if "lm_head.weight" in params else params["model.embed_tokens.weight"].grad
    name = "model." + ours_name
    for mine, theirs in ((".mlp.router.weight", ".mlp.router.classifier.weight"),
                         (".mlp.experts.w_gate_up", ".mlp.experts.gate_up_proj"),
                         (".mlp.experts.w_down", ".mlp.experts.down_proj")):
        if name.endswith(mine):
            g = params[name[: -len(mine)] + theirs].grad
            return g[:num_ffn] if g is not None and mine.endswith("w_gate_up") else g
    return params[name].grad


def _compare(hf, ours, ids, attention_mask=None):
    """Forward both, backward one random projection of the valid logits; max relative errors (logits, grads)."""
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    a = hf(ids, attention_mask=attention_mask).logits
    b = ours(ids, padding_mask=None if attention_mask is None else ~valid)
    logit_err = _rel(b[valid], a[valid])
    w = torch.randn_like(a)
    (a[valid] * w[valid]).sum().backward()
    (b[valid] * w[valid]).sum().backward()
    grad_errs = {}
    for name, p in ours.named_parameters():
        g_hf = _hf_grad(hf, name, ours.config.num_ffn_experts)
        assert (p.grad is None) == (g_hf is None), name
        if p.grad is not None:
            grad_errs[name] = _rel(p.grad, g_hf)
    return logit_err, grad_errs


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_logits_and_every_gradient_match_hf(name, padded):
    hf = _hf_model(name)
    ours = ScMoEDecoder.from_hf(hf, backend="reference")
    c = ours.config
    assert (c.attention, c.num_zero_experts > 0, c.top_k > 1) == ("mla", True, True)
    assert c.tie_word_embeddings == (name == "wide_192_128")
    torch.manual_seed(1)
    b, length = 3, 9
    ids = torch.randint(0, c.vocab_size, (b, length))
    ids[0, 2] = c.pad_token_id  # the embedding's padding_idx row gets no gradient, in HF and here
    mask = None
    if padded:
        mask = torch.ones(b, length, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
    picks = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, args, out: picks.append(out[-1].flatten()))
             for layer in hf.model.layers]
    start = time.perf_counter()
    logit_err, grad_errs = _compare(hf, ours, ids, mask)
    for h in hooks:
        h.remove()
    picked = torch.cat(picks)
    assert (picked >= c.num_ffn_experts).any() and (picked < c.num_ffn_experts).any()  # zero and FFN experts
    worst = max(grad_errs, key=grad_errs.get)
    print(f"{name} {'padded' if padded else 'dense'}: logits rel {logit_err:.2e}, worst grad rel "
          f"{grad_errs[worst]:.2e} ({worst}), {len(grad_errs)} grads, {time.perf_counter() - start:.2f}s")
    assert logit_err <= 1e-5
    assert grad_errs[worst] <= 1e-4, worst
    # every parameter took part: the MoE (router, experts), both MLAs, norms, dense MLPs, embedding, head
    assert len(grad_errs) == len(list(ours.parameters()))
    if not c.tie_word_embeddings:  # tied: the LM head's gradient reaches that row (in HF too: checked above)
        assert ours.embed_tokens.weight.grad[c.pad_token_id].abs().max() == 0


def test_every_weight_is_taken_over():
    hf = _hf_model("wide_192_128")
    ours = ScMoEDecoder.from_hf(hf)
    theirs = hf.state_dict()
    n = ours.config.num_ffn_experts
    for name, t in ours.state_dict().items():
        if name.endswith(("balancer.state", "balancer._extra_state", "balancer.step")):
            continue
        key = "model." + name
        for mine, hf_name in ((".mlp.router.weight", ".mlp.router.classifier.weight"),
                              (".mlp.experts.w_gate_up", ".mlp.experts.gate_up_proj"),
                              (".mlp.experts.w_down", ".mlp.experts.down_proj"),
                              (".mlp.balancer.bias", ".mlp.router.e_score_correction_bias")):
            if key.endswith(mine):
                key = key[: -len(mine)] + hf_name
        if name == "lm_head.weight":
            key = "lm_head.weight"
        want = theirs[key][:n] if key.endswith("gate_up_proj") else theirs[key]
        assert torch.equal(t, want.to(t.dtype)), name
    assert ours.lm_head.weight is ours.embed_tokens.weight  # tied as HF's
    assert ours.embed_tokens.padding_idx == 0
    assert [type(a).__name__ for layer in ours.layers for a in layer.self_attn] == ["MultiHeadLatentAttention"] * 4


def test_bare_longcat_model_hidden_states_match():
    hf = _hf_model("hf_tiny")
    base = hf.model
    ours = ScMoEDecoder.from_hf(base, backend="reference")
    ids = torch.randint(4, 99, (2, 6))
    err = _rel(ours.hidden_states(ids), base(ids).last_hidden_state)
    assert err <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_with_latent_cache_equals_full_run(name):
    hf = _hf_model(name)
    ours = ScMoEDecoder.from_hf(hf, backend="reference")
    c = ours.config
    torch.manual_seed(2)
    ids = torch.randint(1, c.vocab_size, (2, 8))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        assert isinstance(cache, KVCache) and cache.is_latent and len(cache.latents) == 2 * c.num_layers
        steps = [ours(ids[:, :5], kv_cache=cache)]  # prefill
        for i in range(5, 8):
            steps.append(ours(ids[:, i: i + 1], kv_cache=cache))
        hf_full = hf(ids).logits
    got = torch.cat(steps, dim=1)
    assert _rel(got, full) <= 1e-5 and _rel(got, hf_full) <= 1e-5
    # one slot per MLA (HF's layer indices 2l, 2l + 1), each the compressed latent + rope key per token
    for slot in range(2 * c.num_layers):
        assert isinstance(cache.latents[slot], MLACache)
        assert cache.latents[slot].entries.shape == (2, 8, c.kv_lora_rank + c.qk_rope_head_dim)
    assert cache.latent(1, 0) is cache.latents[2] if c.num_layers > 1 else cache.latent(0, 1) is cache.latents[1]
    assert cache.seq_len == 8
    cache.reset()
    assert cache.seq_len == 0


def test_greedy_generation_matches_hf_generate():
    hf = _hf_model("hf_tiny")
    ours = ScMoEDecoder.from_hf(hf, backend="reference")
    prompt = torch.randint(4, 99, (2, 5))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=3, eos_token_id=None)
        cache, tokens, nxt = ours.new_cache(), prompt, prompt
        for _ in range(4):
            nxt = ours(nxt, kv_cache=cache)[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(tokens, want)


def test_rmsnorms_are_hf_style_in_mla_mode():
    """Every RMSNorm of the MLA decoder (4 per layer, the final one, the MLAs' own) computes as HF's
    LongcatFlashRMSNorm, bit for bit in bf16 (torch.nn.RMSNorm multiplies by the weight before casting back)."""
    hf = _hf_model("hf_tiny")
    ours = ScMoEDecoder.from_hf(hf).to(torch.bfloat16)
    norms = {n: m for n, m in ours.named_modules()
             if isinstance(m, torch.nn.RMSNorm) or hasattr(m, "variance_epsilon")}
    assert not any(isinstance(m, torch.nn.RMSNorm) for m in norms.values())
    assert len(norms) == 4 * ours.config.num_layers + 1 + 2 * 2 * ours.config.num_layers
    x = torch.randn(3, 5, 144, dtype=torch.bfloat16)
    differs = False
    for name, m in norms.items():
        d = m.weight.shape[0]
        ref = LongcatFlashRMSNorm(d, eps=m.variance_epsilon).to(torch.bfloat16)
        with torch.no_grad():
            ref.weight.copy_(torch.rand(d) + 0.5)
            m.weight.copy_(ref.weight)
        assert torch.equal(m(x[..., :d]), ref(x[..., :d])), name
        plain = torch.nn.RMSNorm(d, eps=m.variance_epsilon).to(torch.bfloat16)
        with torch.no_grad():
            plain.weight.copy_(ref.weight)
        differs |= not torch.equal(plain(x[..., :d]), ref(x[..., :d]))
    assert differs  # the check can fail: torch's RMSNorm is not HF's in bf16
    gqa = ScMoEDecoder(ScMoEConfig.preset("tiny"))
    assert isinstance(gqa.norm, torch.nn.RMSNorm)  # the GQA mode keeps torch.nn.RMSNorm


def test_triton_backend_tiny():
    hf = _hf_model("hf_tiny")
    ref = ScMoEDecoder.from_hf(hf, backend="reference")
    triton_ops = ("attention", "moe_experts", "moe_permute", "moe_unpermute", "moe_grouped_swiglu")
    tri = ScMoEDecoder.from_hf(hf, backend={op: "triton" for op in triton_ops})
    assert tri.layers[0].self_attn[1]._backends["attention"] == "triton"  # the mapping reaches both MLAs
    ids = torch.randint(4, 99, (1, 5))
    with torch.no_grad():
        err = _rel(tri(ids), hf(ids).logits)
    assert err <= 1e-5 and _rel(ref(ids), hf(ids).logits) <= 1e-5


def test_mla_config_and_its_errors():
    c = ScMoEConfig.preset("tiny").replace(attention="mla", num_kv_heads=4, q_lora_rank=16, kv_lora_rank=8,
                                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    assert c.head_dim == 12
    model = ScMoEDecoder(c)
    assert model(torch.randint(0, c.vocab_size, (2, 5))).shape == (2, 5, c.vocab_size)
    assert c.replace(attention="mla", qk_nope_head_dim=4).head_dim == 8
    bad = [
        (dict(attention="mha"), ValueError, "attention must be 'gqa' or 'mla'"),
        (dict(kv_lora_rank=None), ValueError, "needs kv_lora_rank"),
        (dict(qk_rope_head_dim=3), ValueError, "qk_rope_head_dim must be even"),
        (dict(qk_nope_head_dim=254), ValueError, "qk_nope_head_dim \\+ qk_rope_head_dim must be <= 256"),
        (dict(num_kv_heads=2), ValueError, "num_kv_heads \\(2\\) must equal num_heads"),
        (dict(head_dim=8), ValueError, "head_dim is qk_nope_head_dim"),
        (dict(q_lora_rank=0), ValueError, "q_lora_rank"),
        (dict(v_head_dim=2.0), TypeError, "v_head_dim"),
        (dict(attention_bias=1), TypeError, "attention_bias must be a bool"),
        (dict(attention_dropout=1.0), ValueError, "attention_dropout"),
        (dict(rope_scaling=[("rope_type", "yarn")]), TypeError, "rope_scaling must be None or a dict"),
        (dict(rope_scaling={"rope_type": "yarn"}), ValueError, "needs 'factor'"),
        (dict(pad_token_id=c.vocab_size), ValueError, "pad_token_id"),
    ]
    for changes, err, match in bad:
        with pytest.raises(err, match=match):
            c.replace(**changes)
    with pytest.raises(ValueError, match="only apply with attention='mla'"):
        ScMoEConfig.preset("tiny").replace(kv_lora_rank=8)
    with pytest.raises(ValueError, match="only apply with attention='mla'"):
        c.replace(attention="gqa", num_kv_heads=2)


def test_bad_input():
    hf = _hf_model("hf_tiny")
    ours = ScMoEDecoder.from_hf(hf, backend="reference")
    with pytest.raises(TypeError, match="LongcatFlashForCausalLM or LongcatFlashModel"):
        ScMoEDecoder.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LongcatFlashForCausalLM"):
        ScMoEDecoder.from_hf({"model.embed_tokens.weight": torch.zeros(2, 2)})
    ids = torch.randint(4, 99, (2, 4))
    with pytest.raises(ValueError, match="kv_cache holds GQA keys"):
        ours(ids, kv_cache=KVCache(1))
    gqa = ScMoEDecoder(ScMoEConfig.preset("tiny").replace(num_layers=1))
    with pytest.raises(ValueError, match="kv_cache holds MLA latents"):
        gqa(ids % 128, kv_cache=KVCache(1, latent=True))
    with pytest.raises(ValueError, match="use latent"):
        KVCache(1, latent=True).update(0, 0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(TypeError, match="latent must be a bool"):
        KVCache(1, latent=1)
    with pytest.raises(ValueError, match="padding_mask cannot be combined with kv_cache"):
        ours(ids, padding_mask=torch.zeros(2, 4, dtype=torch.bool), kv_cache=ours.new_cache())
    broken = _hf_model("hf_tiny")
    broken.model.layers[0].mlps[0].act_fn = torch.nn.GELU()
    with pytest.raises(ConversionError, match="only SiLU dense MLPs"):
        ScMoEDecoder.from_hf(broken)
    odd = _hf_model("hf_tiny", head_dim=8)
    with pytest.raises(ConversionError, match="config.head_dim = 8"):
        ScMoEDecoder.from_hf(odd)


MLA_TINY = ScMoEConfig.preset("tiny").replace(attention="mla", num_kv_heads=4, q_lora_rank=16, kv_lora_rank=8,
                                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def test_mla_decoder_survives_the_module_api():
    cfg = MLA_TINY.replace(tie_word_embeddings=True, pad_token_id=1)
    model = ScMoEDecoder(cfg).eval()
    assert torch.equal(model.embed_tokens.weight[1], torch.zeros(cfg.hidden_size))  # padding_idx row: zero at init
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    y = model(ids)
    clone = copy.deepcopy(model)
    assert clone.lm_head.weight is clone.embed_tokens.weight and torch.equal(clone(ids), y)
    with torch.device("meta"):
        empty = ScMoEDecoder(cfg)
    empty = empty.to_empty(device="cpu").eval()
    empty.load_state_dict(model.state_dict())
    assert torch.equal(empty(ids), y)
    d = copy.deepcopy(model).double()
    assert d(ids).dtype == torch.float64 and _rel(d(ids), y) <= 1e-5


def test_mla_decoder_trains_every_parameter_with_the_balancer():
    cfg = MLA_TINY.replace(balance_loss_coef=0.5)
    model = ScMoEDecoder(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (loss + model.balance_loss()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.update_bias()
    assert all(layer.mlp.balancer.steps == 1 for layer in model.layers)


def test_mla_right_padding_even_nan_reaches_no_real_token():
    model = ScMoEDecoder(MLA_TINY).eval()
    emb = torch.randn(2, 6, MLA_TINY.hidden_size, requires_grad=True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    dirty = emb.detach().clone()
    dirty[1, 4:] = float("nan")
    dirty.requires_grad_(True)
    out = model(inputs_embeds=dirty, padding_mask=pad)
    assert torch.isfinite(out[~pad]).all()
    torch.testing.assert_close(out[1, :4], model(inputs_embeds=emb[1:2, :4])[0], rtol=1e-5, atol=1e-5)
    out[~pad].sum().backward()
    assert torch.isfinite(dirty.grad).all() and dirty.grad[1, 4:].abs().max() == 0


def test_mla_decoder_takes_no_more_host_syncs_than_gqa():
    from mmkernels.testing import count_host_syncs

    ids = torch.randint(0, MLA_TINY.vocab_size, (2, 5))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    counts = {}
    for name, cfg in (("gqa", ScMoEConfig.preset("tiny")), ("mla", MLA_TINY)):
        model = ScMoEDecoder(cfg, backend="reference").train()
        with count_host_syncs() as syncs:
            model(ids, padding_mask=pad)
        counts[name] = syncs.count
        assert not [c for c in syncs.calls if "mla.py" in c or "longcat" in c], syncs.calls
    assert counts["mla"] == counts["gqa"], counts


def test_mla_decoder_compiles_fullgraph():
    torch._dynamo.reset()
    model = ScMoEDecoder(MLA_TINY).train()
    ids = torch.randint(0, MLA_TINY.vocab_size, (2, 5))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    want = model(ids, padding_mask=pad)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, padding_mask=pad), want, rtol=1e-5, atol=1e-5)


def test_vlm_runs_on_an_mla_decoder():
    from mmkernels.models import VisionLanguageModel, VLMConfig

    base = VLMConfig.preset("tiny")
    d = base.decoder
    cfg = VLMConfig(base.vision, base.qformer, d.replace(attention="mla", num_kv_heads=d.num_heads, q_lora_rank=16,
                                                         kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                         v_head_dim=8), base.num_query_tokens)
    model = VisionLanguageModel(cfg).eval()
    pixels = torch.randn(1, base.vision.in_channels, base.vision.image_size, base.vision.image_size)
    ids = torch.randint(0, d.vocab_size, (1, 3))
    out = model.generate(pixels, ids, max_new_tokens=2)
    assert out.shape == (1, 5)
    # the cached generation equals greedy decoding by full re-runs
    full = ids
    for _ in range(2):
        full = torch.cat([full, model(pixels, full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, full)


def test_longcat_flash_preset_is_hf_default_config():
    """The "longcat-flash" preset is what from_hf reads from HF's default LongcatFlashConfig (a one-layer model on the
    meta device: no memory), with its 28 layers and the balancer target of MOE_PRESETS["longcat-flash"]."""
    from mmkernels.models.convert.longcat_decoder import decoder_config_fields
    from mmkernels.nn.moe_config import MoEConfig

    with torch.device("meta"):
        hf = transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(num_layers=1))
    fields = decoder_config_fields(hf)
    # the preset trains (balancer target and balance loss on); the conversion of a loaded model has both off
    assert fields["target_ffn_per_token"] is None and fields["balance_loss_coef"] == 0.0
    want = ScMoEConfig(**fields).replace(num_layers=transformers.LongcatFlashConfig().num_layers,
                                         target_ffn_per_token=MoEConfig.preset("longcat-flash").target_ffn_per_token,
                                         balance_loss_coef=ScMoEConfig.balance_loss_coef)
    assert ScMoEConfig.preset("longcat-flash") == want
    assert want.head_dim == 192 and want.v_head_dim == 128


def test_from_hf_reads_the_structure_tolerantly():
    """Sizes that a release does not keep on the modules are read from the config (and the reverse), and the
    5.17 .. 5.24 expert layout (gate_up_proj rows allocated for the zero experts too) converts the same."""
    hf = _hf_model("hf_tiny")
    ids = torch.randint(4, 99, (2, 6))
    want = hf(ids).logits
    for attn in hf.model.layers[0].self_attn:
        for name in ("num_heads", "kv_lora_rank", "v_head_dim"):
            delattr(attn, name)  # now only the config has them
    experts = hf.model.layers[0].mlp.experts
    n, z = 4, 2
    if experts.gate_up_proj.shape[0] == n:  # 5.25's layout: make it the older one (5.17 .. 5.24 build it so)
        with torch.no_grad():
            padded = torch.cat([experts.gate_up_proj, torch.zeros(z, *experts.gate_up_proj.shape[1:])])
        experts.gate_up_proj = torch.nn.Parameter(padded)
    padded = experts.gate_up_proj.detach()
    assert padded.shape[0] == n + z
    ours = ScMoEDecoder.from_hf(hf, backend="reference")
    assert torch.equal(ours.layers[0].mlp.experts.w_gate_up, padded[:n])
    assert _rel(ours(ids), want) <= 1e-5
    hf.config.num_layers = 2
    with pytest.raises(ConversionError, match="num_layers = 2 but the model holds 1"):
        ScMoEDecoder.from_hf(hf)


def test_from_hf_bf16_model():
    hf = _hf_model("hf_tiny").to(torch.bfloat16)
    hf.model.layers[0].mlp.router.classifier.float()  # HF keeps the router in fp32 (_keep_in_fp32_modules)
    ours = ScMoEDecoder.from_hf(hf, backend="reference")
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    assert ours.layers[0].mlp.router.weight.dtype == torch.float32
    ids = torch.randint(4, 99, (2, 6))
    with torch.no_grad():
        assert _rel(ours(ids).float(), hf(ids).logits.float()) <= 2e-2


@pytest.mark.parametrize("field", ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                   "pad_token_id"])
def test_every_mla_integer_field_is_checked(field):
    """The sweep of tests/test_usage_sweeps.py (integer arguments: ValueError below the range, TypeError for a float,
    a string or a bool, naming the field), for the fields the MLA mode adds."""
    for bad in ([-1] if field == "pad_token_id" else [0, -1]):
        with pytest.raises(ValueError, match=field):
            MLA_TINY.replace(**{field: bad})
    for bad in (2.5, "4", True):
        with pytest.raises(TypeError, match=field):
            MLA_TINY.replace(**{field: bad})


def test_converted_decoder_says_its_balancing_is_off_and_turns_on_by_config():
    """HF's correction bias is fixed: the converted decoder has no balancer target and no balance loss (not a loss
    coefficient that silently computes nothing); ``config.replace`` turns both on for fine-tuning."""
    hf = _hf_model("wide_192_128")
    ours = ScMoEDecoder.from_hf(hf, backend="reference").train()
    assert ours.config.target_ffn_per_token is None and ours.config.balance_loss_coef == 0.0
    ids = torch.randint(0, ours.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    ours(ids)
    assert ours.balance_loss() is None
    tuned = ScMoEDecoder(ours.config.replace(target_ffn_per_token=1.5, balance_loss_coef=0.1), backend="reference")
    tuned.load_state_dict(ours.state_dict())
    tuned.train()(ids)
    loss = tuned.balance_loss()
    assert loss is not None and torch.isfinite(loss) and loss > 0
