"""InstructBLIP's instruction-aware Q-Former (issue 23 item 4): ``QFormer(..., input_ids=, attention_mask=)`` against a
random-initialised HF ``InstructBlipQFormerModel`` (fp32, offline): forward and every parameter's gradient with 7
instruction tokens, one sample padded, on every backend here; every padding pattern (right, left, holes, a fully
padded row, HF's full-length mask, bool); more rows than one kernel call takes; padded tokens never leak; the
query-only forward unchanged; the converter's text path; ``VisionLanguageModel`` with an instruction (converted from
a tiny ``InstructBlipForConditionalGeneration``); bad input; ``torch.compile``."""

from __future__ import annotations

import pytest
import torch
from random_weights import randomise  # tests/random_weights.py

from mmkernels.models import QFormer, ScMoEConfig, VisionLanguageModel, VLMConfig
from mmkernels.models.convert.qformer import ConversionError, hf_to_mmkernels
from mmkernels.models.qformer import PRESETS, QFormerConfig
from mmkernels.ops.qformer_attention import QFORMER_BACKENDS

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
BACKENDS_HERE = [b for b in ("reference", "triton") if b in QFORMER_BACKENDS.available(CPU)]
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
             encoder_hidden_size=40, cross_attention_frequency=2)
VOCAB, MAX_POS = 50, 160
B, LQ, LT, LK = 3, 8, 7, 11
RTOL = 1e-5  # fp32 parity, relative (outputs are LayerNorm-ed, O(1))


def hf_qformer(attn: str = "eager", **overrides):
    cfg = transformers.InstructBlipQFormerConfig(**{**SMALL, **overrides}, vocab_size=VOCAB,
                                                 max_position_embeddings=MAX_POS, attn_implementation=attn)
    return randomise(transformers.InstructBlipQFormerModel(cfg))


def inputs(b=B, lq=LQ, lt=LT, lk=LK, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, img = torch.randn(b, lq, 64, generator=g), torch.randn(b, lk, 40, generator=g)
    ids = torch.randint(1, VOCAB, (b, lt), generator=g)
    return q, img, ids


def right_padded(b=B, lt=LT, row=1, length=4):
    mask = torch.ones(b, lt, dtype=torch.long)
    mask[row, length:] = 0
    return mask


def hf_forward(hf, q, img, ids, mask):
    """What HF's InstructBlipModel does: ones over the queries, then the instruction's mask; keep the query rows."""
    full = None if mask is None else torch.cat([torch.ones(q.shape[0], q.shape[1], dtype=mask.dtype), mask], 1)
    out = hf(input_ids=ids, attention_mask=full, query_embeds=q, encoder_hidden_states=img).last_hidden_state
    return out[:, :q.shape[1]]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().norm() / want.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_forward_and_every_gradient_match_hf(backend):
    """7 instruction tokens, sample 1 padded to 4: output and the gradient of every parameter and input within 1e-5
    relative of HF. HF's last-layer text FFN (dropped by the converter) gets exactly zero gradient there."""
    hf = hf_qformer()
    ours = QFormer.from_hf(hf, backend=backend)
    assert ours.config.vocab_size == VOCAB and ours.config.max_position_embeddings == MAX_POS
    q, img, ids = inputs()
    mask = right_padded()
    w = torch.randn(B, LQ, 64, generator=torch.Generator().manual_seed(3))
    q1, img1 = q.clone().requires_grad_(), img.clone().requires_grad_()
    want = hf_forward(hf, q1, img1, ids, mask)
    (want * w).sum().backward()
    q2, img2 = q.clone().requires_grad_(), img.clone().requires_grad_()
    got = ours(q2, img2, input_ids=ids, attention_mask=mask)
    (got * w).sum().backward()
    assert got.shape == (B, LQ, 64)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL)
    assert _rel(got, want) <= RTOL
    assert _rel(q2.grad, q1.grad) <= RTOL and _rel(img2.grad, img1.grad) <= RTOL
    last = SMALL["num_hidden_layers"] - 1
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for n, g in hf_grads.items():
        if n.startswith((f"encoder.layer.{last}.intermediate.", f"encoder.layer.{last}.output.")):
            assert g is None or not g.any(), n  # the text rows of the last layer never reach the query outputs
    want_grads = hf_to_mmkernels(hf_grads, ours.config)
    params = dict(ours.named_parameters())
    assert set(want_grads) == set(params)
    assert any(n.startswith("layers.0.text_fc1") for n in params) and "word_embeddings.weight" in params
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert _rel(p.grad, want_grads[name]) <= RTOL, (name, _rel(p.grad, want_grads[name]))
    assert not ours.word_embeddings.weight.grad[0].any()  # padding_idx, as HF


def _patterns():
    """(name, [B, LT] mask or None, as_full_length, as_bool)."""
    yield "no_mask", None, False, False
    yield "all_ones", torch.ones(B, LT, dtype=torch.long), False, False
    yield "right", right_padded(), False, False
    left = torch.ones(B, LT, dtype=torch.long)
    left[0, :3] = 0
    yield "left", left, False, False
    holes = torch.ones(B, LT, dtype=torch.long)
    holes[2, [1, 4, 5]] = 0
    holes[0, 6] = 0
    yield "holes", holes, False, False
    empty = right_padded()
    empty[2] = 0
    yield "fully_padded_row", empty, False, False
    yield "hf_full_length", holes, True, False
    yield "bool", holes, False, True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name,mask,full,as_bool", list(_patterns()), ids=[p[0] for p in _patterns()])
def test_every_padding_pattern_matches_hf(name, mask, full, as_bool, attn):
    hf = hf_qformer(attn)
    ours = QFormer.from_hf(hf, backend="reference")
    q, img, ids = inputs(seed=1)
    with torch.no_grad():
        want = hf_forward(hf, q, img, ids, mask)
        arg = mask
        if mask is not None and full:
            arg = torch.cat([torch.ones(B, LQ, dtype=mask.dtype), mask], 1)
        if mask is not None and as_bool:
            arg = arg.bool()
        got = ours(q, img, input_ids=ids, attention_mask=arg)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_padded_tokens_never_leak(backend):
    """Any id at a padded position (left, right or in a hole) leaves every output and gradient unchanged."""
    hf = hf_qformer()
    ours = QFormer.from_hf(hf, backend=backend)
    q, img, ids = inputs(seed=2)
    mask = torch.ones(B, LT, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, 3] = 0
    mask[2, 5:] = 0
    other = torch.where(mask.bool(), ids, torch.randint(0, VOCAB, ids.shape, generator=torch.Generator()))
    outs, grads = [], []
    for i in (ids, other):
        ours.zero_grad()
        out = ours(q, img, input_ids=i, attention_mask=mask)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)
    padded = set(ids[mask == 0].tolist()) | set(other[mask == 0].tolist())
    kept = set(ids[mask == 1].tolist())
    for token in padded - kept:
        assert not grads[0]["word_embeddings.weight"][token].any(), token


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_more_rows_than_one_kernel_call(backend):
    """Lq + Lt = 8 + 130 rows: the self-attention runs in chunks of 128 query rows over every key."""
    hf = hf_qformer(num_hidden_layers=2)
    ours = QFormer.from_hf(hf, backend=backend)
    q, img, ids = inputs(b=2, lt=130, seed=3)
    mask = torch.ones(2, 130, dtype=torch.long)
    mask[1, 77:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(q, img, input_ids=ids, attention_mask=mask),
                                   hf_forward(hf, q, img, ids, mask), rtol=RTOL, atol=RTOL)


def test_without_instruction_unchanged():
    """No instruction: HF's query-only forward, and bit for bit what a Q-Former without the text path computes from
    the same weights (and an empty instruction is no instruction)."""
    hf = hf_qformer()
    ours = QFormer.from_hf(hf, backend="reference")
    q, img, _ = inputs(seed=4)
    mask = (torch.arange(LK)[None, :] < torch.tensor([LK, 4, 9])[:, None]).long()
    with torch.no_grad():
        got = ours(q, img, mask)
        want = hf(input_ids=None, query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=mask)
        torch.testing.assert_close(got, want.last_hidden_state, rtol=RTOL, atol=2 * RTOL)
        plain = QFormer(ours.config.replace(vocab_size=None), backend="reference").eval()
        text_keys = ("word_embeddings.", "position_embeddings.", ".text_")
        plain.load_state_dict({k: t for k, t in ours.state_dict().items() if not any(s in k for s in text_keys)})
        assert torch.equal(plain(q, img, mask), got)
        assert torch.equal(ours(q, img, mask, input_ids=torch.zeros(B, 0, dtype=torch.long)), got)


def test_converter_and_config_text_path():
    hf = hf_qformer()
    cfg = QFormerConfig.from_hf(hf.config)
    assert cfg.has_text_input and cfg.vocab_size == VOCAB and cfg.pad_token_id == 0
    assert not QFormerConfig.from_hf(hf.config, text_input=False).has_text_input
    assert not QFormerConfig.from_hf(transformers.Blip2QFormerConfig(**SMALL)).has_text_input
    assert PRESETS["instructblip"].has_text_input and not PRESETS["blip2"].has_text_input
    with pytest.raises(TypeError, match="text_input must be a bool"):
        QFormerConfig.from_hf(hf.config, text_input=1)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        QFormerConfig(vocab_size=0)
    with pytest.raises(ValueError, match="pad_token_id must be in"):
        QFormerConfig(vocab_size=5, pad_token_id=5)
    sd = hf.state_dict()
    # without the text path the text weights are dropped (the BLIP-2-shaped model), with it they are required
    QFormer(cfg.replace(vocab_size=None)).load_state_dict(hf_to_mmkernels(sd, cfg.replace(vocab_size=None)))
    bad = {k: t for k, t in sd.items() if k != "embeddings.word_embeddings.weight"}
    with pytest.raises(ConversionError, match="missing key.*embeddings.word_embeddings.weight"):
        hf_to_mmkernels(bad, cfg)
    bad = {k: t for k, t in sd.items() if k != "encoder.layer.0.intermediate.dense.bias"}
    with pytest.raises(ConversionError, match="missing key.*encoder.layer.0.intermediate.dense.bias"):
        hf_to_mmkernels(bad, cfg)
    # parameters: HF's minus the last layer's text FFN, which the query outputs never see
    ours = QFormer.from_preset("instructblip", device="meta")
    real = transformers.InstructBlipQFormerModel(transformers.InstructBlipQFormerConfig())
    last = real.encoder.layer[-1]
    dropped = sum(p.numel() for m in (last.intermediate, last.output) for p in m.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in real.parameters()) - dropped


def _bad_calls():
    q, img, ids = inputs(b=2)
    mask = torch.ones(2, LT, dtype=torch.long)
    yield "no text path", "plain", dict(input_ids=ids), ValueError, "no word embeddings"
    yield "mask without ids", "text", dict(attention_mask=mask), ValueError, "needs input_ids"
    yield "ids dtype", "text", dict(input_ids=ids.float()), TypeError, "input_ids"
    yield "ids dim", "text", dict(input_ids=ids[0]), ValueError, "input_ids"
    yield "ids batch", "text", dict(input_ids=ids[:1]), ValueError, r"input_ids must be \[B, Lt\]"
    yield "ids too long", "text", dict(input_ids=torch.ones(2, MAX_POS + 1, dtype=torch.long)), ValueError, \
        "max_position_embeddings"
    yield "ids range", "text", dict(input_ids=ids + VOCAB), ValueError, r"input_ids must lie in \[0, 50\)"
    yield "ids negative", "text", dict(input_ids=-ids), ValueError, "input_ids must lie in"
    yield "ids device", "text", dict(input_ids=ids.to("meta")), ValueError, "input_ids is on meta"
    yield "mask shape", "text", dict(input_ids=ids, attention_mask=mask[:, :5]), ValueError, \
        r"attention_mask must be \[B, Lt\] = \[2, 7\].*\[B, Lq \+ Lt\] = \[2, 15\]"
    yield "mask batch", "text", dict(input_ids=ids, attention_mask=mask[:1]), ValueError, "attention_mask must be"
    yield "mask values", "text", dict(input_ids=ids, attention_mask=mask * 2), ValueError, "0/1"
    yield "mask nan", "text", dict(input_ids=ids, attention_mask=mask.float().fill_(float("nan"))), ValueError, "0/1"
    full = torch.ones(2, LQ + LT, dtype=torch.long)
    full[1, 2] = 0
    yield "query masked", "text", dict(input_ids=ids, attention_mask=full), ValueError, "1 at every query position"
    yield "mask type", "text", dict(input_ids=ids, attention_mask=[[1] * LT] * 2), TypeError, "attention_mask"


@pytest.mark.parametrize("name,which,kwargs,exc,match", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_bad_input(name, which, kwargs, exc, match):
    cfg = QFormerConfig(**SMALL, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    model = QFormer(cfg if which == "text" else cfg.replace(vocab_size=None))
    q, img, _ = inputs(b=2)
    with pytest.raises(exc, match=match):
        model(q, img, **kwargs)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    hf = hf_qformer()
    ours = QFormer.from_hf(hf, backend=BACKENDS_HERE[-1])
    q, img, ids = inputs(seed=5)
    mask = right_padded()
    mask[0, 0] = 0  # a hole
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    got = compiled(q, img, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, ours(q, img, input_ids=ids, attention_mask=mask), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert ours.word_embeddings.weight.grad is not None and ours.layers[0].text_fc1.weight.grad is not None


# ---- VisionLanguageModel ---------------------------------------------------------------------------------------------


def _tiny_instructblip():
    vc = transformers.InstructBlipVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2)
    qc = transformers.InstructBlipQFormerConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=40, encoder_hidden_size=32,
                                                cross_attention_frequency=1, vocab_size=40, max_position_embeddings=16)
    tc = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                word_embed_proj_dim=16, max_position_embeddings=64)
    cfg = transformers.InstructBlipConfig(vision_config=vc.to_dict(), qformer_config=qc.to_dict(),
                                          text_config=tc.to_dict(), num_query_tokens=5, image_token_index=63)
    torch.manual_seed(12)
    return randomise(transformers.InstructBlipForConditionalGeneration(cfg), seed=12)


def test_vision_language_model_with_an_instruction():
    """Converted from InstructBLIP: the image prefix with an instruction (one sample padded) equals HF's query
    outputs (vision tower, queries and mask as InstructBlipForConditionalGeneration passes them); forward and generate
    take the instruction; a model without the text path refuses one."""
    hf = _tiny_instructblip()
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 3:] = 0
    with torch.no_grad():
        image = hf.vision_model(pixel_values=pixels).last_hidden_state
        queries = hf.query_tokens.expand(2, -1, -1)
        full = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], 1)
        want = hf.qformer(input_ids=ids, attention_mask=full, query_embeds=queries,
                          encoder_hidden_states=image).last_hidden_state[:, :5]
        plain = hf.qformer(input_ids=None, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    decoder = ScMoEConfig.preset("tiny").replace(vocab_size=40)
    for ours in (VisionLanguageModel.from_hf_blip2(hf, decoder=decoder),
                 VisionLanguageModel.from_hf_blip2(hf.state_dict(), hf_config=hf.config, decoder=decoder)):
        assert ours.config.qformer.vocab_size == 40
        with torch.no_grad():
            got = ours.encode_image(pixels, qformer_input_ids=ids, qformer_attention_mask=mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.encode_image(pixels), plain, rtol=1e-5, atol=1e-5)
            assert (got - plain).abs().max() > 1e-3  # the instruction changes the prefix
    text = torch.randint(0, 40, (2, 4))
    with torch.no_grad():
        logits = ours(pixels, text, qformer_input_ids=ids, qformer_attention_mask=mask)
        assert logits.shape == (2, 4, 40) and torch.isfinite(logits).all()
        prefix = ours.image_prefix(pixels, qformer_input_ids=ids, qformer_attention_mask=mask)
        embeds = torch.cat([prefix, ours.decoder.embed_tokens(text)], 1)
        direct = ours.decoder.lm_head(ours.decoder.hidden_states(inputs_embeds=embeds)[:, 5:])
        torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-5)
        out = ours.generate(pixels, text, 3, qformer_input_ids=ids, qformer_attention_mask=mask)
        assert out.shape == (2, 7) and torch.equal(out[:, :4], text)
        assert torch.equal(out[:, 4], logits[:, -1].argmax(-1))
    tiny = VisionLanguageModel(VLMConfig.preset("tiny"))
    with pytest.raises(ValueError, match="no word embeddings"):
        tiny.encode_image(torch.randn(2, 3, 16, 16), qformer_input_ids=ids)


def test_vision_language_model_instruction_trains():
    """A VLMConfig whose Q-Former has the text path: gradients reach the Q-Former's text weights through the
    decoder's loss."""
    tiny = VLMConfig.preset("tiny")
    config = tiny.replace(qformer=tiny.qformer.replace(vocab_size=30, max_position_embeddings=8))
    model = VisionLanguageModel(config, backend="reference")
    pixels, text = torch.randn(2, 3, 16, 16), torch.randint(0, 128, (2, 5))
    ids = torch.randint(1, 30, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])
    logits = model(pixels, text, qformer_input_ids=ids, qformer_attention_mask=mask)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), text[:, 1:].flatten()).backward()
    assert model.qformer.word_embeddings.weight.grad[ids[0]].abs().sum() > 0
    assert model.qformer.position_embeddings.weight.grad[:6].abs().sum() > 0


def test_module_api_with_the_text_path():
    """What test_module_api does to every module, for a Q-Former with the text path called with an instruction:
    deepcopy and moves, .half() (fp16 forward close to fp32), to_empty from meta then load, a state-dict round trip
    (the text weights travel), a forward on the meta device."""
    import copy

    cfg = QFormerConfig(**SMALL, vocab_size=VOCAB, max_position_embeddings=MAX_POS, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    src = QFormer(cfg).eval()
    q, img, ids = inputs(seed=6)
    mask = right_padded()
    mask[0, 0] = 0

    def run(m, dtype=torch.float32, device="cpu"):
        return m(q.to(device, dtype), img.to(device, dtype), input_ids=ids.to(device),
                 attention_mask=mask.to(device))

    with torch.no_grad():
        expected = run(src)
        for moved in (copy.deepcopy(src), copy.deepcopy(src).to("cpu", torch.float32), copy.deepcopy(src).float()):
            torch.testing.assert_close(run(moved), expected, rtol=0, atol=0)
        half = copy.deepcopy(src).half()
        assert half.word_embeddings.weight.dtype == torch.float16
        got = run(half, torch.float16)
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)
        with torch.device("meta"):
            empty = QFormer(cfg).eval()
        assert run(empty, device="meta").shape == (B, LQ, 64)
        empty = empty.to_empty(device="cpu")
        empty.load_state_dict(src.state_dict(), strict=True)
        torch.testing.assert_close(run(empty), expected, rtol=0, atol=0)
        torch.manual_seed(7)
        dst = QFormer(cfg).eval()
        dst.load_state_dict(src.state_dict(), strict=True)
        torch.testing.assert_close(run(dst), expected, rtol=0, atol=0)
    assert {"word_embeddings.weight", "position_embeddings.weight", "layers.2.text_fc2.bias"} <= set(src.state_dict())
    assert not any(k.startswith("layers.3.text_") for k in src.state_dict())  # the last layer: query rows only


def test_flops_with_instruction_tokens():
    """``qformer_flops(text_tokens=)``: unchanged without text; with it, the text FFN of every layer but the last and
    the self-attention over all rows, counted term by term for the real config."""
    from mmkernels.models.qformer import qformer_flops

    cfg = PRESETS["instructblip"]
    base, text = qformer_flops(cfg), qformer_flops(cfg, text_tokens=16)
    d, ffn, n, Lq = 768, 3072, 12, 32
    assert base["text_ffn"] == 0 and base["self_attn_proj"] == n * 4 * 2 * Lq * d * d
    assert text["text_ffn"] == (n - 1) * 2 * 2 * 16 * d * ffn
    assert text["self_attn_proj"] == n * 3 * 2 * 48 * d * d + ((n - 1) * 48 + Lq) * 2 * d * d
    assert text["attention_math"] - base["attention_math"] == ((n - 1) * 48 + Lq) * 4 * 48 * d - n * 4 * Lq * Lq * d
    for key in ("cross_kv_proj", "cross_q_out_proj", "ffn"):
        assert text[key] == base[key]
    assert abs(sum(v for k, v in text.items() if k.endswith("_share")) - 1) < 1e-12
