"""Balance losses: parity with HF Mixtral's load_balancing_loss_func, values at balance, padding excluded, gradients
against float64, autocast, bad input."""

from __future__ import annotations

import pytest
import torch

from mmkernels.nn import device_balance_loss, load_balancing_loss, sequence_balance_loss


def _topk(logits, k):
    return torch.topk(logits, k, dim=-1).indices.to(torch.int32)


@pytest.mark.parametrize("t,e,k", [(1, 4, 1), (37, 8, 2), (50, 12, 5)])
def test_load_balancing_matches_hf_mixtral(t, e, k):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(t, e)
    ids = _topk(torch.softmax(logits, -1), k)
    ours = load_balancing_loss(logits, ids)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=e, top_k=k)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-7)


def test_load_balancing_padding_matches_hf_attention_mask():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    b, seq, e, k = 3, 7, 6, 2
    logits = torch.randn(b * seq, e)
    ids = _topk(logits, k)
    attention_mask = torch.ones(b, seq, dtype=torch.long)
    attention_mask[0, 5:] = 0
    attention_mask[2, 1:] = 0
    ours = load_balancing_loss(logits, ids, padding_mask=(attention_mask == 0).flatten())
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=e, top_k=k, attention_mask=attention_mask)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-7)


def test_values_at_perfect_balance():
    """Uniform logits and every expert chosen equally often: Switch = K, sequence-wise = 1, device-level = 1."""
    e, k, t = 8, 2, 16
    logits = torch.zeros(t, e)
    ids = torch.arange(t * k).remainder(e).view(t, k).to(torch.int32)
    assert load_balancing_loss(logits, ids).item() == pytest.approx(k)
    assert sequence_balance_loss(logits[None], ids[None], scoring="softmax").item() == pytest.approx(1.0)
    # N=6 FFN experts in D=3 groups, Z=2 zero experts, K=4, K_e=3: 3 FFN + 1 zero selection per token, spread evenly.
    n, z, kk, k_e = 6, 2, 4, 3.0
    ffn = torch.arange(t * 3).remainder(n).view(t, 3)
    zero = n + torch.arange(t).remainder(z)[:, None]
    ids = torch.cat([ffn, zero], 1).to(torch.int32)
    # probability mass in proportion to the targets: FFN groups 1/4 each (3 groups -> 3/4), zero group 1/4
    logits = torch.log(torch.tensor([1 / 8] * n + [1 / 8] * z)).expand(t, -1)
    loss = device_balance_loss(logits, ids, num_ffn_experts=n, num_groups=3, top_k=kk, target_ffn_per_token=k_e)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_padding_tokens_do_not_count():
    """Padding rows (holding anything, NaN included) give the loss of the unpadded tokens alone, and no gradient."""
    t, e, k = 12, 6, 2
    logits = torch.randn(t, e)
    ids = _topk(logits, k)
    pad = torch.zeros(t, dtype=torch.bool)
    pad[[2, 7, 11]] = True
    dirty = logits.clone()
    dirty[pad] = float("nan")
    dirty.requires_grad_()
    keep = ~pad
    kwargs = dict(num_ffn_experts=4, num_groups=2, top_k=k, target_ffn_per_token=1.5)
    for fn, extra in ((load_balancing_loss, {}), (device_balance_loss, kwargs)):
        got = fn(dirty, ids, padding_mask=pad, **extra)
        want = fn(logits[keep], ids[keep], **extra)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        (g,) = torch.autograd.grad(got, dirty)
        assert torch.isfinite(g).all() and not g[pad].any()
    seq_pad = pad.view(2, 6)
    got = sequence_balance_loss(dirty.view(2, 6, e), ids.view(2, 6, k), padding_mask=seq_pad)
    want = torch.stack([sequence_balance_loss(logits.view(2, 6, e)[b, ~seq_pad[b]][None],
                                              ids.view(2, 6, k)[b, ~seq_pad[b]][None]) for b in range(2)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_invalid_ids_are_not_counted():
    logits = torch.randn(4, 5)
    ids = torch.tensor([[0, -1], [1, 2], [-1, -1], [4, 3]], dtype=torch.int32)
    clean = torch.tensor([[0, 0], [1, 2], [0, 0], [4, 3]], dtype=torch.int32)
    got = load_balancing_loss(logits, ids)
    # the same selections without the invalid slots: count by hand
    f = torch.zeros(5)
    for row in clean.tolist()[1:2] + clean.tolist()[3:] + [[0]]:
        for i in row:
            f[i] += 1
    want = 5 * (f / 4 * torch.softmax(logits, -1).mean(0)).sum()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn", ["switch", "sequence", "device"])
def test_gradients_match_float64(fn):
    e, k = 8, 3
    logits = torch.randn(2, 9, e, dtype=torch.float64, requires_grad=True)
    ids = _topk(logits.detach(), k)

    def run(x):
        if fn == "switch":
            return load_balancing_loss(x.reshape(-1, e), ids.reshape(-1, k))
        if fn == "sequence":
            return sequence_balance_loss(x, ids)
        return device_balance_loss(x.reshape(-1, e), ids.reshape(-1, k), num_ffn_experts=6, num_groups=3, top_k=k,
                                   target_ffn_per_token=2.0)

    truth = torch.autograd.grad(run(logits), logits)[0]
    x32 = logits.detach().float().requires_grad_()
    loss = run(x32)
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss, x32)[0]
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-7)


def test_autocast_keeps_fp32():
    logits = torch.randn(30, 8)
    ids = _topk(logits, 2)
    plain = load_balancing_loss(logits, ids)
    with torch.autocast("cpu", torch.bfloat16):
        inside = load_balancing_loss(logits, ids)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_bad_input():
    logits = torch.randn(4, 6)
    ids = _topk(logits, 2)
    with pytest.raises(ValueError, match="topk_ids"):
        load_balancing_loss(logits, ids[:3])
    with pytest.raises(TypeError, match="topk_ids"):
        load_balancing_loss(logits, ids.float())
    with pytest.raises(ValueError, match="padding_mask"):
        load_balancing_loss(logits, ids, padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_groups"):
        device_balance_loss(logits, ids, num_ffn_experts=4, num_groups=3, top_k=2, target_ffn_per_token=1.0)
    with pytest.raises(ValueError, match="target_ffn_per_token"):
        device_balance_loss(logits, ids, num_ffn_experts=4, num_groups=2, top_k=2, target_ffn_per_token=2.0)
    with pytest.raises(ValueError, match="scoring"):
        sequence_balance_loss(logits[None], ids[None], scoring="relu")
