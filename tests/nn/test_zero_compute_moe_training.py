"""ZeroComputeMoE inside real training code: activation checkpointing, padded batches with garbage in the padding,
router logits for the balance losses, autocast, backends chosen per op."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mmkernels
from mmkernels.nn import ZeroComputeMoE, load_balancing_loss
from mmkernels.ops.moe import EXPERTS_BACKENDS

BACKENDS = EXPERTS_BACKENDS.available(torch.device("cpu"))


def make(**kw) -> ZeroComputeMoE:
    torch.manual_seed(0)
    return ZeroComputeMoE(16, 6, 3, 3, 24, routed_scaling_factor=2.0, target_ffn_per_token=2.0, **kw).train()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_counts_each_token_once(use_reentrant):
    m = make()
    plain = copy.deepcopy(m)
    x = torch.randn(4, 5, 16, requires_grad=True)
    plain(x).sum().backward()
    y = checkpoint(m, x, use_reentrant=use_reentrant)
    y.sum().backward()
    assert int(m.pending_counts.sum()) == 4 * 5 * 3
    torch.testing.assert_close(m.pending_counts, plain.pending_counts, rtol=0, atol=0)
    torch.testing.assert_close(m.experts.w_down.grad, plain.experts.w_down.grad)


def test_counts_only_in_training_with_a_target():
    m = make().eval()
    m(torch.randn(3, 16))
    assert not m.pending_counts.any()
    fixed = ZeroComputeMoE(16, 6, 3, 3, 24).train()  # no target: the bias is fixed, nothing to count
    fixed(torch.randn(3, 16))
    assert not fixed.pending_counts.any()


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_mask_excludes_padding(backend, garbage):
    m = make()
    m.experts.backend = backend
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    dirty = x.clone()
    dirty[pad] = garbage
    dirty.requires_grad_()
    y, logits = m(dirty, padding_mask=pad, return_router_logits=True)
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (18, 9)
    assert torch.isfinite(y).all()
    assert not y[pad].any(), "padding rows of the output are zero"

    alone = copy.deepcopy(m)
    alone.pending_counts.zero_()
    for p in alone.parameters():
        p.grad = None
    valid = x[~pad].clone().requires_grad_()
    y_valid = alone(valid)
    torch.testing.assert_close(y[~pad], y_valid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.pending_counts, alone.pending_counts, rtol=0, atol=0)
    assert int(m.pending_counts.sum()) == int((~pad).sum()) * 3

    g = torch.randn_like(y)
    y.backward(g)
    y_valid.backward(g[~pad])
    assert torch.isfinite(dirty.grad).all() and not dirty.grad[pad].any()
    torch.testing.assert_close(dirty.grad[~pad], valid.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(m.named_parameters(), alone.parameters(), strict=True):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_router_logits_feed_the_balance_losses():
    m = make()
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 3:] = True
    y, logits = m(x, padding_mask=pad, return_router_logits=True)
    ids = m.route(x.reshape(-1, 16)).topk_ids
    loss = load_balancing_loss(logits, ids, padding_mask=pad.flatten())
    loss.backward()
    assert m.router.weight.grad is not None and torch.isfinite(m.router.weight.grad).all()
    valid = ~pad.flatten()
    torch.testing.assert_close(logits[valid], x.reshape(-1, 16)[valid] @ m.router.weight.t(), rtol=0, atol=0)
    assert not logits[~valid].any(), "padding rows are routed as zero vectors"


def test_autocast_keeps_the_router_fp32():
    """Under CPU bf16 autocast the router logits stay fp32 and every token keeps its fp32 expert set."""
    m = make()
    x = torch.randn(4096, 16)
    want = m.route(x)
    with torch.autocast("cpu", torch.bfloat16):
        got = m.route(x)
        y, logits = m(x, return_router_logits=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(got.topk_ids, want.topk_ids, rtol=0, atol=0)
    torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=0, atol=0)


def test_backend_per_op_and_clear_errors():
    with pytest.raises(mmkernels.BackendError, match="moe_route has no 'triton' backend"):
        ZeroComputeMoE(16, 6, 3, 3, 24, backend="triton")
    with pytest.raises(mmkernels.BackendError, match="does not run"):
        ZeroComputeMoE(16, 6, 3, 3, 24, backend={"attention": "triton"})
    m = ZeroComputeMoE(16, 6, 3, 3, 24, backend={"moe_route": "reference", "moe_experts": "reference"})
    # what each part runs (the fan-out ModuleBackend hands a one-op part that op's entry)
    assert m.experts._backends == {"moe_experts": "reference"}
    m.backend = {"expert_bias_update_": "reference"}
    assert m.balancer.backend == "reference" and m.experts._backends == {"moe_experts": None}
    with pytest.raises(mmkernels.BackendError):
        m.backend = "nope"


@pytest.mark.parametrize("bad", [torch.zeros(3, 6, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.bool)])
def test_bad_padding_mask(bad):
    with pytest.raises((TypeError, ValueError), match="padding_mask"):
        make()(torch.randn(3, 6, 16), padding_mask=bad)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_around_a_compiled_block_counts_once(use_reentrant):
    torch._dynamo.reset()
    m = make()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 16, requires_grad=True)
    checkpoint(compiled, x, use_reentrant=use_reentrant).sum().backward()
    assert int(m.pending_counts.sum()) == 6 * 3


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """A bf16 activation under autocast (e.g. from an autocast Linear) runs; the router stays fp32 and the experts
    compute in bf16, close to the fp32 block."""
    m = make()
    x = torch.randn(12, 16)
    want = m(x)
    lin = torch.nn.Linear(16, 16)
    torch.nn.init.eye_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    with torch.autocast("cpu", torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y, logits = m(h, return_router_logits=True)
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)


def test_update_expert_biases_steps_each_balancer_once():
    from mmkernels.models import ScMoEConfig, ScMoEDecoder
    from mmkernels.nn import update_expert_biases

    model = ScMoEDecoder(ScMoEConfig.preset("tiny")).train()
    model(torch.randint(0, 100, (2, 5)))
    update_expert_biases(model)
    steps = [m.balancer.steps for m in model.modules() if isinstance(m, ZeroComputeMoE)]
    assert steps and all(s == 1 for s in steps), steps
    single = make()
    single(torch.randn(4, 16))
    update_expert_biases(single)
    assert single.balancer.steps == 1
