"""mmkernels.models.QFormer: parity with random-initialised HF Blip2QFormerModel (small and real config, offline,
fp32) with and without an image attention mask, gradients to every parameter, bf16 vs the fp32 reference,
InstructBLIP's Q-Former for query tokens, the converter's errors, the FLOP split, torch.compile."""

from __future__ import annotations

import pytest
import torch
from random_weights import randomise  # tests/random_weights.py

from mmkernels.models import QFormer
from mmkernels.models.convert.qformer import ConversionError, hf_to_mmkernels
from mmkernels.models.qformer import PRESETS, QFormerConfig, qformer_flops
from mmkernels.ops.qformer_attention import QFORMER_BACKENDS
from mmkernels.testing import assert_within_ref_error

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
BACKENDS_HERE = [b for b in ("reference", "triton") if b in QFORMER_BACKENDS.available(CPU)]
RTOL, ATOL = 1e-5, 2e-5  # fp32 parity on LayerNorm-normalised outputs (O(1))
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
             encoder_hidden_size=40, cross_attention_frequency=2)


def hf_qformer(attn="eager", **overrides):
    cfg = transformers.Blip2QFormerConfig(**{**SMALL, **overrides}, attn_implementation=attn)
    return randomise(transformers.Blip2QFormerModel(cfg))


def inputs(B, Lq, Lk, d, e, lens=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, img = torch.randn(B, Lq, d, generator=g), torch.randn(B, Lk, e, generator=g)
    mask = None if lens is None else (torch.arange(Lk)[None, :] < torch.tensor(lens)[:, None]).long()
    return q, img, mask


def hf_forward(hf, q, img, mask):
    return hf(query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lens", [None, [23, 1, 9]], ids=["nomask", "mask"])
def test_matches_hf_small(backend, attn, lens):
    hf = hf_qformer(attn)
    ours = QFormer.from_hf(hf, backend=backend)
    q, img, mask = inputs(3, 8, 23, 64, 40, lens)
    torch.testing.assert_close(ours(q, img, mask), hf_forward(hf, q, img, mask), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_gradients_match_hf_for_every_parameter(backend):
    hf = hf_qformer()
    ours = QFormer.from_hf(hf, backend=backend)
    q, img, mask = inputs(2, 8, 19, 64, 40, [19, 7])
    w = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    q1, img1 = q.clone().requires_grad_(), img.clone().requires_grad_()
    (hf_forward(hf, q1, img1, mask) * w).sum().backward()
    q2, img2 = q.clone().requires_grad_(), img.clone().requires_grad_()
    (ours(q2, img2, mask) * w).sum().backward()
    torch.testing.assert_close(q2.grad, q1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(img2.grad, img1.grad, rtol=1e-4, atol=1e-5)
    want = hf_to_mmkernels({n: p.grad for n, p in hf.named_parameters()}, ours.config)
    params = dict(ours.named_parameters())
    assert set(want) == set(params)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_within_2x_of_hf_bf16():
    """Our bf16 run (reference backend: no interpreter) vs the fp32 truth: error within 2x of HF's own bf16 run."""
    hf = hf_qformer()
    q, img, mask = inputs(2, 32, 45, 64, 40, [45, 20])
    truth = hf_forward(hf, q, img, mask)
    ours = QFormer.from_hf(hf, backend="reference").to(torch.bfloat16)
    hf_bf16 = hf.to(torch.bfloat16)
    got = ours(q, img, mask)
    assert got.dtype == torch.bfloat16
    assert_within_ref_error(got, hf_forward(hf_bf16, q, img, mask), truth, name="bf16 Q-Former", floor=1e-2)


@pytest.fixture(scope="module")
def hf_real():
    torch.manual_seed(0)
    return randomise(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(attn_implementation="sdpa")))


@pytest.mark.parametrize("lens", [None, [257, 130]], ids=["nomask", "mask"])
def test_matches_hf_real_config(hf_real, lens):
    """BLIP-2's Q-Former (768 wide, 12 layers, 6 cross-attention layers over 1408-wide ViT-g features, 257 tokens);
    reference backend to keep the CPU run short (the kernels are checked against it above)."""
    ours = QFormer.from_hf(hf_real, backend="reference")
    assert ours.config == PRESETS["blip2"]
    q, img, mask = inputs(2, 32, 257, 768, 1408, lens)
    with torch.no_grad():
        got, want = ours(q, img, mask), hf_forward(hf_real, q, img, mask)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_instructblip_query_only_forward_matches():
    """InstructBLIP's Q-Former with no instruction tokens (input_ids=None) computes the same as BLIP-2's (its text
    path, loaded, is unused; with an instruction: tests/models/test_qformer_instruction.py)."""
    cfg = transformers.InstructBlipQFormerConfig(**SMALL, attn_implementation="eager")
    hf = randomise(transformers.InstructBlipQFormerModel(cfg))
    ours = QFormer.from_hf(hf, backend="reference")
    q, img, mask = inputs(2, 8, 15, 64, 40, [15, 4])
    want = hf(input_ids=None, query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=mask)
    torch.testing.assert_close(ours(q, img, mask), want.last_hidden_state, rtol=RTOL, atol=ATOL)


def test_presets_match_hf_defaults():
    assert QFormerConfig.from_hf(transformers.Blip2QFormerConfig()) == PRESETS["blip2"]
    assert QFormerConfig.from_hf(transformers.InstructBlipQFormerConfig()) == PRESETS["instructblip"]
    with pytest.raises(ValueError, match="unknown preset"):
        QFormer.from_preset("blip3")
    model = QFormer.from_preset("blip2", device="meta")
    assert model.kv_proj.weight.shape == (6 * 2 * 768, 1408)  # all six cross-attention layers' K and V
    hf = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_hf


def test_hoisted_kv_rows_are_the_per_layer_projections():
    hf = hf_qformer()
    ours = QFormer.from_hf(hf)
    d = 64
    for c, layer in enumerate([0, 2]):
        att = hf.encoder.layer[layer].crossattention.attention
        assert torch.equal(ours.kv_proj.weight[2 * c * d:(2 * c + 1) * d], att.key.weight)
        assert torch.equal(ours.kv_proj.weight[(2 * c + 1) * d:(2 * c + 2) * d], att.value.weight)


def test_converter_errors_and_prefixes():
    hf = hf_qformer(use_qformer_text_input=True)  # carries the text FFN: dropped
    cfg = QFormerConfig.from_hf(hf.config)
    sd = hf.state_dict()
    assert any(".intermediate.dense" in k for k in sd)
    hf_to_mmkernels(sd, cfg)
    full = {f"qformer.{k}": t for k, t in sd.items()}
    full["query_tokens"] = torch.zeros(1, 32, 64)  # other parts of a whole BLIP-2 state dict: ignored
    full["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(1)
    QFormer(cfg).load_state_dict(hf_to_mmkernels(full, cfg))
    bad = dict(sd)
    bad["encoder.layer.0.attention.attention.rotary.weight"] = torch.zeros(1)
    del bad["encoder.layer.1.output_query.dense.bias"]
    with pytest.raises(ConversionError, match=r"1 unknown key\(s\): encoder.layer.0.attention.attention.rotary.weight"
                                              r".*1 missing key\(s\): encoder.layer.1.output_query.dense.bias"):
        hf_to_mmkernels(bad, cfg)
    bad = dict(sd)
    bad["layernorm.weight"] = torch.zeros(65)
    with pytest.raises(ConversionError, match="wrong shape"):
        hf_to_mmkernels(bad, cfg)
    with pytest.raises(ConversionError, match="missing"):  # wrong config: layers 4.. missing
        hf_to_mmkernels(sd, QFormerConfig(**{**SMALL, "num_hidden_layers": 6}))


def _bad_calls():
    yield "query width", lambda m: m(torch.randn(2, 4, 63), torch.randn(2, 5, 40)), "query_embeds must be"
    yield "image width", lambda m: m(torch.randn(2, 4, 64), torch.randn(2, 5, 41)), "image_embeds must be"
    yield "batch", lambda m: m(torch.randn(2, 4, 64), torch.randn(3, 5, 40)), "batch size"
    yield "queries", lambda m: m(torch.randn(2, 129, 64), torch.randn(2, 5, 40)), "Lq <= 128"
    yield "mask shape", lambda m: m(torch.randn(2, 4, 64), torch.randn(2, 5, 40), torch.ones(2, 4)), "\\[B, Lk\\]"
    yield "mask holes", lambda m: m(torch.randn(2, 4, 64), torch.randn(2, 5, 40),
                                    torch.tensor([[1, 0, 1, 1, 1], [1] * 5])), "prefix mask"
    yield "empty row", lambda m: m(torch.randn(2, 4, 64), torch.randn(2, 5, 40),
                                   torch.tensor([[0] * 5, [1] * 5])), "at least one"
    yield "not tensor", lambda m: m([1.0], torch.randn(2, 5, 40)), "must be a torch.Tensor"


@pytest.mark.parametrize("name,call,match", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_bad_input(name, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(QFormer(QFormerConfig(**SMALL)))


def test_torch_compile_fullgraph():
    hf = hf_qformer()
    backend = BACKENDS_HERE[-1]
    ours = QFormer.from_hf(hf, backend=backend)
    q, img, mask = inputs(2, 8, 13, 64, 40, [13, 5])
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    got = compiled(q, img, mask)
    torch.testing.assert_close(got, ours(q, img, mask), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert ours.kv_proj.weight.grad is not None


def test_flop_split_real_config():
    split = qformer_flops(PRESETS["blip2"], num_queries=32, image_tokens=257)
    assert 0.45 < split["cross_kv_proj_share"] < 0.6  # the hoisted K/V GEMM: about half
    assert split["attention_math_share"] < 0.03  # the attention math itself: a few percent at most
    assert abs(sum(v for k, v in split.items() if k.endswith("_share")) - 1) < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_config_triton(hf_real, dtype):
    hf = hf_real.cuda()
    ours = QFormer.from_hf(hf, backend="triton").to(dtype)
    q, img, mask = (t.cuda() if t is not None else None for t in inputs(8, 32, 257, 768, 1408, [257] * 7 + [100]))
    with torch.no_grad():
        truth = hf_forward(hf, q, img, mask)
        got = ours(q, img, mask)
        if dtype == torch.float32:
            torch.testing.assert_close(got, truth, rtol=1e-4, atol=1e-4)
        else:
            ref = QFormer.from_hf(hf, backend="reference").to(dtype)(q, img, mask)
            assert_within_ref_error(got, ref, truth, name="bf16 Q-Former", floor=1e-2)
    hf_real.cpu()
