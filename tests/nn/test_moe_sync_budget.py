"""Host-sync budget of the MoE modules (issue 20 item 4): the module layer adds no host sync on the single-process
path (ZeroComputeMoE, the ScMoE layer, the balance loss), forward or backward, whatever the backend; on the Triton
path under the interpreter the whole step takes none. Expert parallelism (at most one per layer per forward, the
split sizes) is checked on 2 gloo ranks by the ``sync_budget`` scenario of tests/distributed/_ep_worker.py."""

from __future__ import annotations

import os

import pytest
import torch

import mmkernels
from mmkernels.models import ScMoEConfig, ScMoEDecoderLayer
from mmkernels.nn import ZeroComputeMoE
from mmkernels.testing import count_host_syncs

PACKAGE = os.path.dirname(mmkernels.__file__)
# The module layer: what this budget is about. ops/ and kernels/ are the ops' own budget (reported, not asserted
# here, on the reference backend).
MODULE_LAYER = tuple(os.path.join(PACKAGE, part) + os.sep for part in ("nn", "models", "distributed"))

BACKENDS = {
    "reference": "reference",
    "triton": {"moe_experts": "triton"},  # moe_route has no Triton kernel (auto); the experts run the fused kernel
}


def module_layer_calls(syncs) -> list[str]:
    return [call for call in syncs.calls if call.split(" at ", 1)[1].startswith(MODULE_LAYER)]


def padded_batch(b, length, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, dim, generator=g)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[-1, length // 2:] = True
    x[pad] = float("nan")  # padding may hold anything
    return x.requires_grad_(True), pad


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("training", [True, False])
def test_zero_compute_moe_adds_no_host_sync(name, training):
    torch.manual_seed(0)
    moe = ZeroComputeMoE(16, 6, 3, 3, 24, target_ffn_per_token=2.0, backend=BACKENDS[name]).train(training)
    x, pad = padded_batch(2, 5, 16)
    with count_host_syncs() as fwd:
        y, logits = moe(x, padding_mask=pad, return_router_logits=True)
    with count_host_syncs() as bwd:
        (y.nan_to_num().sum() + logits.sum()).backward()
    with count_host_syncs() as step:
        moe.update_bias()
    assert module_layer_calls(fwd) == [] and module_layer_calls(bwd) == [] and step.count == 0, (fwd, bwd, step)
    if name == "triton":
        assert fwd.count == 0 and bwd.count == 0, (fwd, bwd)
    # the split protocol takes none either (handles complete at once)
    with count_host_syncs() as split:
        handle = moe.dispatch(x, padding_mask=pad)
        d = handle.send().wait()
        moe.combine(moe.run_experts(d), d).wait()
    assert module_layer_calls(split) == [], split


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_scmoe_layer_adds_no_host_sync(name):
    """The whole ScMoE layer in a world of one, training with the device-level balance loss on."""
    cfg = ScMoEConfig.preset("tiny").replace(balance_loss_coef=0.5)
    torch.manual_seed(0)
    backend = "reference" if name == "reference" else {"moe_experts": "triton", "attention": "triton"}
    layer = ScMoEDecoderLayer(cfg, backend=backend).train()
    x, pad = padded_batch(2, 6, cfg.hidden_size)
    x = torch.where(pad[..., None], 0.0, x.detach()).requires_grad_(True)
    with count_host_syncs() as fwd:
        y = layer(x, padding_mask=pad)
        loss = y.sum() + layer.balance_loss()
    with count_host_syncs() as bwd:
        loss.backward()
    assert module_layer_calls(fwd) == [] and module_layer_calls(bwd) == [], (fwd, bwd)
    if name == "triton":
        assert fwd.count == 0 and bwd.count == 0, (fwd, bwd)
