"""mmkernels.nn.Attention: self/cross attention, GQA, biases, varlen, against a plain-PyTorch computation of the same
weights (forward and every parameter gradient), torch.compile, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmkernels.kernels.reference.attention import attention_reference
from mmkernels.nn import Attention


def manual(m: Attention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The module's math written out with F.linear and the reference attention (dense inputs)."""
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    if m.cross:
        q = F.linear(x, m.q.weight, m.q.bias).unflatten(-1, (hq, d))
        k, v = F.linear(context, m.kv.weight, m.kv.bias).unflatten(-1, (2, hkv, d)).unbind(-3)
    else:
        q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
    out = attention_reference(q, k, v, causal=m.causal, softmax_scale=m.softmax_scale)
    return F.linear(out.flatten(-2), m.proj.weight, m.proj.bias)


def _grads(m: Attention, fn, *inputs):
    """Output, input gradients and parameter gradients of ``fn(*inputs)`` (fn uses m's parameters)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    m.zero_grad()
    out = fn(*inputs)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return [out.detach()] + [t.grad for t in inputs] + [p.grad.clone() for p in m.parameters()]


def _compare(m: Attention, *inputs) -> None:
    ours = _grads(m, m, *inputs)
    expected = _grads(m, lambda *a: manual(m, *a), *inputs)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,bias,causal",
    [(4, 4, None, True, False), (4, 2, None, False, True), (6, 1, 40, True, True), (2, 2, 88, False, False)],
    ids=["mha-bias", "gqa-causal", "mqa-d40", "d88"],
)
def test_self_attention(heads, kv_heads, head_dim, bias, causal, device):
    m = Attention(64, heads, num_kv_heads=kv_heads, head_dim=head_dim, qkv_bias=bias, causal=causal,
                  backend="triton", device=device)
    x = torch.randn(2, 37, 64, device=device)
    assert m(x).shape == x.shape
    _compare(m, x)


@pytest.mark.parametrize("lengths", [(32, 257), (1, 1), (50, 20)], ids=lambda x: f"{x[0]}x{x[1]}")
def test_cross_attention(lengths, device):
    lq, lk = lengths
    m = Attention(48, 4, num_kv_heads=2, head_dim=24, cross=True, kv_dim=80, qkv_bias=True, backend="triton",
                  device=device)
    x = torch.randn(2, lq, 48, device=device)
    ctx = torch.randn(2, lk, 80, device=device)
    assert m(x, ctx).shape == x.shape
    _compare(m, x, ctx)


def test_varlen_self_attention_matches_per_sequence(device):
    m = Attention(32, 2, qkv_bias=True, causal=True, backend="triton", device=device)
    lens = [7, 0, 19, 1]
    x = torch.randn(sum(lens), 32, device=device)
    cu = torch.tensor([0, 7, 7, 26, 27], dtype=torch.int32, device=device)
    out = m(x, cu_seqlens_q=cu)
    assert out.shape == x.shape
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if e > s:
            torch.testing.assert_close(out[s:e], m(x[None, s:e])[0], rtol=1e-5, atol=1e-5)


def test_backends_agree_and_half_precision(device):
    m = Attention(64, 4, num_kv_heads=2, qkv_bias=True, causal=True, backend="triton", device=device)
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    x = torch.randn(2, 45, 64, device=device)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    m16 = copy.deepcopy(m).half()
    y = m16(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref(x), rtol=1e-2, atol=1e-2)


def test_torch_compile_fullgraph(device):
    m = Attention(64, 4, num_kv_heads=1, qkv_bias=True, causal=True, backend="triton", device=device)
    x = torch.randn(2, 21, 64, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    m(x).square().sum().backward()
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_compiled, x.grad, rtol=1e-5, atol=1e-5)


def test_state_dict_layout():
    m = Attention(64, 8, num_kv_heads=2, qkv_bias=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"qkv.weight": (64 + 2 * 16, 64), "qkv.bias": (96,), "proj.weight": (64, 64),
                      "proj.bias": (64,)}
    c = Attention(64, 8, cross=True, kv_dim=32)
    assert {k: tuple(v.shape) for k, v in c.state_dict().items()} == {
        "q.weight": (64, 64), "kv.weight": (2 * 64, 32), "proj.weight": (64, 64), "proj.bias": (64,)}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 64, "num_heads": 6}, "not divisible"),
        ({"dim": 64, "num_heads": 4, "num_kv_heads": 3}, "multiple"),
        ({"dim": 64, "num_heads": 1, "head_dim": 300}, "head_dim"),
        ({"dim": 64, "num_heads": 4, "kv_dim": 32}, "cross=True"),
    ],
    ids=["dim", "gqa", "head_dim", "kv_dim"],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(**kwargs)


def test_bad_forward():
    m = Attention(32, 2)
    with pytest.raises(ValueError, match="32 features"):
        m(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="3 dimension"):
        m(torch.randn(4, 32))
    with pytest.raises(ValueError, match="no context"):
        m(torch.randn(1, 4, 32), torch.randn(1, 4, 32))
    c = Attention(32, 2, cross=True)
    with pytest.raises(ValueError, match="needs a context"):
        c(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="32 features"):
        c(torch.randn(1, 4, 32), torch.randn(1, 4, 16))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dropout_in_training_only(backend, device):
    m = Attention(32, 4, num_kv_heads=2, causal=True, dropout=0.3, backend=backend, device=device)
    plain = copy.deepcopy(m)
    plain.dropout = 0.0
    x = torch.randn(2, 19, 32, device=device)
    m.eval()
    torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(4)
    first = m(x)
    torch.manual_seed(4)
    torch.testing.assert_close(m(x), first, rtol=0, atol=0)
    assert not torch.allclose(first, plain(x))
    assert "dropout=0.3" in repr(m)
    with pytest.raises(ValueError, match="Attention: dropout must be in"):
        Attention(32, 4, dropout=1.0)
