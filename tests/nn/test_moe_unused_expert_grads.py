"""Expert weights that no token reached get a zero gradient, never None, on every backend and path (DDP without
``find_unused_parameters`` needs a gradient for every parameter every step). The expert-parallel and DDP halves of
the sweep run in spawned worlds: ``tests/distributed/_ep_worker.py`` (``unused_expert_grads``, ``ddp_unused``)."""

from __future__ import annotations

import pytest
import torch

from mmkernels.nn import ZeroComputeMoE
from mmkernels.ops import moe_grouped_swiglu

N, Z, K, HIDDEN, INTER = 8, 4, 3, 16, 12
BACKENDS = ["reference", "triton"]


def routing_bias(case: str) -> torch.Tensor:
    bias = torch.zeros(N + Z)
    if case == "all_zero_experts":  # every slot on a zero expert: no row reaches any FFN expert
        bias[N:] = 50.0
    elif case == "two_experts":  # experts 0 and 1, then zero experts: experts 2..N-1 unused
        bias[:2] = 100.0
        bias[N:] = 50.0
    return bias


def run(backend: str, case: str, dtype=torch.float32):
    torch.manual_seed(0)
    moe = ZeroComputeMoE(HIDDEN, N, Z, K, INTER, routed_scaling_factor=2.0, dtype=dtype,
                         backend={"moe_experts": backend})
    moe.balancer.bias.copy_(routing_bias(case))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(0 if case == "no_tokens" else 7, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    y = moe(x)
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return moe, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["all_zero_experts", "no_tokens", "two_experts"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_experts_get_zero_grads(backend, case, dtype):
    moe, x = run(backend, case, dtype)
    used = slice(0, 2) if case == "two_experts" else slice(0, 0)
    for name in ("w_gate_up", "w_down"):
        w = getattr(moe.experts, name)
        assert w.grad is not None, f"{backend}/{case}: experts.{name}.grad is None"
        assert w.grad.shape == w.shape and w.grad.dtype == w.dtype
        unused = torch.ones(N, dtype=torch.bool)
        unused[used] = False
        assert torch.equal(w.grad[unused], torch.zeros_like(w.grad[unused])), f"{backend}/{case}: {name}"
        if case == "two_experts":  # the used experts' gradients are real (and match the reference backend)
            assert w.grad[used].abs().sum() > 0
            ref, _ = run("reference", case, dtype)
            torch.testing.assert_close(w.grad, getattr(ref.experts, name).grad, rtol=2e-3 if dtype == torch.float16
                                       else 1e-5, atol=2e-3 if dtype == torch.float16 else 1e-5)
    assert x.grad is not None and moe.router.weight.grad is not None


def test_zero_grads_keep_nan_out():
    """The zero gradient does not come from ``0 * w``: NaN in an unused expert stays out of every output and
    gradient (and its own gradient is 0, not NaN)."""
    for backend in BACKENDS:
        torch.manual_seed(0)
        moe = ZeroComputeMoE(HIDDEN, N, Z, K, INTER, backend={"moe_experts": backend})
        moe.balancer.bias.copy_(routing_bias("all_zero_experts"))
        with torch.no_grad():
            moe.experts.w_gate_up[3] = float("nan")
            moe.experts.w_down[5] = float("inf")
        x = torch.randn(4, HIDDEN, requires_grad=True)
        y = moe(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), backend
        for w in (moe.experts.w_gate_up, moe.experts.w_down):
            assert torch.equal(w.grad, torch.zeros_like(w)), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_swiglu_without_rows_gives_zero_grads(backend):
    """The EP path's expert GEMM on a rank that received no rows: zero weight gradients, not None."""
    w_gu = torch.randn(3, 2 * INTER, HIDDEN, requires_grad=True)
    w_down = torch.randn(3, HIDDEN, INTER, requires_grad=True)
    rows = torch.zeros(0, HIDDEN, requires_grad=True)
    out = moe_grouped_swiglu(rows, torch.zeros(4, dtype=torch.int32), w_gu, w_down, backend=backend)
    out.sum().backward()
    for w in (w_gu, w_down):
        assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
