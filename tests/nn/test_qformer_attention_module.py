"""mmkernels.nn.QFormerCrossAttention: parity with HF's Blip2QFormerMultiHeadAttention (cross-attention, with and
without a padding mask), the precomputed-K/V path, gradients to every parameter, bad input."""

from __future__ import annotations

import pytest
import torch

from mmkernels.nn import QFormerCrossAttention
from mmkernels.ops.qformer_attention import QFORMER_BACKENDS

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
BACKENDS_HERE = [b for b in ("reference", "triton") if b in QFORMER_BACKENDS.available(CPU)]


def hf_cross_attention(hidden=48, heads=4, enc=40):
    cfg = transformers.Blip2QFormerConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1,
                                          intermediate_size=64, encoder_hidden_size=enc, attn_implementation="eager")
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention

    module = Blip2QFormerMultiHeadAttention(cfg, is_cross_attention=True).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "kv_lens"])
def test_matches_hf_cross_attention(backend, masked):
    hf = hf_cross_attention()
    ours = QFormerCrossAttention.from_hf(hf, backend=backend)
    B, Lq, Lk = 3, 8, 29
    x, img = torch.randn(B, Lq, 48), torch.randn(B, Lk, 40)
    lens = torch.tensor([29, 1, 13], dtype=torch.int32) if masked else None
    mask = None
    if masked:
        keep = torch.arange(Lk)[None, :] < lens[:, None]
        mask = torch.zeros(B, 1, 1, Lk).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    want, _ = hf(x, encoder_hidden_states=img, encoder_attention_mask=mask)
    got = ours(x, img, kv_lens=lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_precomputed_kv_and_gradients(backend):
    m = QFormerCrossAttention(32, 2, 24, backend=backend)
    x = torch.randn(2, 5, 32)
    img = torch.randn(2, 11, 24)
    lens = torch.tensor([11, 6], dtype=torch.int32)
    out = m(x, img, kv_lens=lens)
    k, v = m.key(img), m.value(img)  # [B, Lk, hidden] form
    torch.testing.assert_close(m(x, key=k, value=v, kv_lens=lens), out)
    kv = torch.stack([k, v], 2).unflatten(-1, (2, 16))  # [B, Lk, 2, H, D]: strided per-head views
    torch.testing.assert_close(m(x, key=kv[:, :, 0], value=kv[:, :, 1], kv_lens=lens), out)
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_query_only_module():
    m = QFormerCrossAttention(32, 4, project_kv=False)
    assert m.key is None and sorted(n for n, _ in m.named_parameters()) == ["query.bias", "query.weight"]
    k = torch.randn(2, 7, 4, 8)
    assert m(torch.randn(2, 3, 32), key=k, value=k).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="project_kv=False"):
        m(torch.randn(2, 3, 32), torch.randn(2, 7, 32))


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.randn(2, 3, 31), torch.randn(2, 5, 24)), "hidden_states must be"),
    (lambda m: m(torch.randn(2, 3, 32), torch.randn(3, 5, 24)), "encoder_hidden_states must be"),
    (lambda m: m(torch.randn(2, 3, 32), torch.randn(2, 5, 23)), "encoder_hidden_states must be"),
    (lambda m: m(torch.randn(2, 3, 32)), "either encoder_hidden_states"),
    (lambda m: m(torch.randn(2, 3, 32), torch.randn(2, 5, 24), key=torch.randn(2, 5, 32)), "either"),
    (lambda m: m(torch.randn(2, 3, 32), key=torch.randn(2, 5, 32)), "together"),
    (lambda m: m(torch.randn(2, 3, 32), key=torch.randn(2, 5, 30), value=torch.randn(2, 5, 30)), "key must be"),
    (lambda m: m(torch.randn(2, 200, 32), torch.randn(2, 5, 24)), "Lq <= 128"),
    (lambda m: m(torch.randn(2, 3, 32), torch.randn(2, 5, 24), kv_lens=torch.tensor([5, 6], dtype=torch.int32)),
     "kv_lens values"),
], ids=["hidden", "batch", "kv_dim", "neither", "both", "key-only", "key-shape", "too-many-queries", "kv_lens"])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(QFormerCrossAttention(32, 4, 24))


def test_bad_construction():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        QFormerCrossAttention(30, 4)
    with pytest.raises(ValueError, match="exceeds 128"):
        QFormerCrossAttention(512, 2)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_dropout_in_training_only_and_from_hf(backend):
    hf = hf_cross_attention()
    if hasattr(hf, "attention_dropout"):  # transformers >= 4.48-ish: a float; older: an nn.Dropout
        hf.attention_dropout = 0.2
    else:
        hf.dropout.p = 0.2
    m = QFormerCrossAttention.from_hf(hf, backend=backend)
    assert m.dropout == 0.2
    plain = QFormerCrossAttention.from_hf(hf, backend=backend)
    plain.dropout = 0.0
    x, img = torch.randn(2, 8, 48), torch.randn(2, 29, 40)
    m.eval()
    torch.testing.assert_close(m(x, img), plain(x, img), rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    first = m(x, img)
    torch.manual_seed(1)
    torch.testing.assert_close(m(x, img), first, rtol=0, atol=0)
    assert not torch.allclose(first, plain(x, img))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_validate_kv_lens_false_clamps(backend):
    """validate_kv_lens=False skips the host read of kv_lens; out-of-range values are clamped to [0, Lk]."""
    m = QFormerCrossAttention(32, 4, 24, backend=backend)
    x, img = torch.randn(2, 3, 32), torch.randn(2, 5, 24)
    wild = torch.tensor([9, 0], dtype=torch.int32)
    out = m(x, img, kv_lens=wild, validate_kv_lens=False)
    torch.testing.assert_close(out[0], m(x, img)[0], rtol=1e-6, atol=1e-6)
    assert torch.all(out[1] == 0)
    assert not hasattr(m, "kv_lens_prevalidated")
