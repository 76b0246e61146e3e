"""mmkernels.nn.ExpertBiasController: convergence on a skewed synthetic router, checkpoints, metrics, no host sync."""

from __future__ import annotations

import math

import pytest
import torch

import mmkernels
from mmkernels.nn import ExpertBiasController
from mmkernels.ops import expert_bias_update_


class SkewedRouter:
    """Fixed per-expert logits (``skew`` x N(0, 1)) plus per-token noise N(0, 1); softmax over all N+Z experts,
    top-k of probability + bias (the LongCat rule: the bias only steers the choice)."""

    def __init__(self, n_experts: int, top_k: int, skew: float, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.base = skew * torch.randn(n_experts, generator=self.gen)
        self.top_k = top_k

    def counts(self, bias: torch.Tensor, tokens: int, chunk: int = 8192) -> torch.Tensor:
        total = torch.zeros(self.base.numel(), dtype=torch.int64)
        for start in range(0, tokens, chunk):
            t = min(chunk, tokens - start)
            logits = self.base + torch.randn(t, self.base.numel(), generator=self.gen)
            ids = torch.topk(torch.softmax(logits, -1) + bias, self.top_k, dim=-1).indices
            total += torch.bincount(ids.flatten(), minlength=self.base.numel())
        return total.to(torch.int32)


def ffn_metrics(counts: torch.Tensor, n: int, k: int) -> tuple[float, float]:
    c = counts.double()
    return float(k * c[:n].sum() / c.sum()), float(c[:n].max() / c[:n].mean())


# (N, Z, K, K_e, skew, tokens per step): small, mid, and LongCat-Flash's 768 experts with K=12, K_e=8.
CONVERGENCE_CASES = [
    (64, 32, 8, 5.0, 0.5, 4096),
    (96, 64, 6, 4.0, 0.25, 4096),
    (200, 56, 8, 6.5, 0.75, 8192),
    (512, 256, 12, 8.0, 0.5, 8192),
]
MAX_STEPS = 200


@pytest.mark.slow
@pytest.mark.parametrize("n,z,k,k_e,skew,tokens", CONVERGENCE_CASES)
def test_controller_balances_skewed_router(n, z, k, k_e, skew, tokens):
    router = SkewedRouter(n + z, k, skew)
    start_ffn, start_ratio = ffn_metrics(router.counts(torch.zeros(n + z), 65536), n, k)
    ctrl = ExpertBiasController(n, z, k, k_e, ki=0.3, gain_schedule=lambda t: max(0.1, math.exp(-t / 100)))
    zero_bias_before = ctrl.bias[n:].clone()
    for _ in range(MAX_STEPS):
        ctrl.update(router.counts(ctrl.bias, tokens))
    # Judge the final bias on a large fresh batch, so sampling noise in the counts stays well under the bar.
    ffn_per_token, ratio = ffn_metrics(router.counts(ctrl.bias, 65536), n, k)
    assert abs(ffn_per_token - k_e) < 0.05, f"mean FFN experts/token {ffn_per_token:.3f}, want {k_e} +- 0.05"
    assert ratio < 1.2, f"max/mean FFN load {ratio:.3f} (started at {start_ratio:.2f}), want < 1.2"
    assert start_ratio > 1.3 or abs(start_ffn - k_e) > 0.5, "the synthetic router should start out of balance"
    assert torch.equal(ctrl.bias[n:], zero_bias_before), "zero-expert biases must be bit-identical"


def test_zero_expert_bias_frozen_even_when_nonzero():
    ctrl = ExpertBiasController(10, 6, 4, 3.0, ki=1.0, kp=0.5)
    with torch.no_grad():
        ctrl.bias[10:] = torch.linspace(-1, 1, 6)
    frozen = ctrl.bias[10:].clone()
    router = SkewedRouter(16, 4, 1.0)
    for _ in range(5):
        ctrl.update(router.counts(ctrl.bias, 512))
    assert torch.equal(ctrl.bias[10:], frozen)
    assert not torch.equal(ctrl.bias[:10], torch.zeros(10))


def test_state_dict_round_trip_resumes_exactly():
    kw = dict(kp=0.1, ki=0.2, kd=0.05, gain_schedule=lambda t: 1.0 / (1 + t))
    a = ExpertBiasController(40, 20, 6, 4.0, **kw)
    router = SkewedRouter(60, 6, 0.7)
    for _ in range(7):
        a.update(router.counts(a.bias, 1000))
    sd = a.state_dict()
    assert set(sd) == {"bias", "state", "_extra_state"}
    b = ExpertBiasController(40, 20, 6, 4.0, **kw)
    b.load_state_dict(sd)
    assert b.steps == 7 and torch.equal(b.bias, a.bias) and torch.equal(b.state, a.state)
    counts = router.counts(a.bias, 1000)
    a.update(counts)
    b.update(counts)
    assert torch.equal(a.bias, b.bias) and torch.equal(a.state, b.state)


def test_old_checkpoints_with_a_dict_step_counter_still_load():
    """Checkpoints written when the extra state was ``{"steps": n}`` load into today's tensor counter, through the
    controller and through a ZeroComputeMoE; a malformed counter is a ValueError naming it."""
    a = ExpertBiasController(8, 4, 3, 2.0, ki=0.1)
    a.update(torch.tensor([5, 1, 0, 2, 7, 3, 1, 1, 4, 0, 2, 2], dtype=torch.int32))
    sd = a.state_dict()
    assert sd["_extra_state"].dtype == torch.int64 and int(sd["_extra_state"]) == 1
    old = dict(sd, _extra_state={"steps": 5})
    b = ExpertBiasController(8, 4, 3, 2.0, ki=0.1)
    b.load_state_dict(old, strict=True)
    assert b.steps == 5 and torch.equal(b.bias, a.bias)
    moe = mmkernels.nn.ZeroComputeMoE(16, 8, 4, 3, 20, target_ffn_per_token=2.0)
    moe_sd = dict(moe.state_dict(), **{"balancer._extra_state": {"steps": 9}})
    moe.load_state_dict(moe_sd, strict=True)
    assert moe.balancer.steps == 9
    for bad in (torch.tensor(1.5), torch.tensor([1, 2]), torch.tensor(-3), {"steps": "x"}):
        with pytest.raises((ValueError, TypeError), match="step counter"):
            b.load_state_dict(dict(sd, _extra_state=bad))


def test_gain_schedule_scales_the_gains():
    n, z, k = 30, 10, 4
    sched = lambda t: 0.5**t  # noqa: E731
    ctrl = ExpertBiasController(n, z, k, 3.0, kp=0.2, ki=0.4, kd=0.1, gain_schedule=sched)
    bias, state = torch.zeros(n + z), torch.zeros(2, n)
    router = SkewedRouter(n + z, k, 0.5)
    for t in range(3):
        counts = router.counts(ctrl.bias, 300)
        expert_bias_update_(bias, counts, state, num_ffn_experts=n, top_k=k, target_ffn_per_token=3.0,
                            kp=0.2 * sched(t), ki=0.4 * sched(t), kd=0.1 * sched(t))
        ctrl.update(counts)
        assert torch.equal(ctrl.bias, bias) and torch.equal(ctrl.state, state)
    assert ctrl.gains() == pytest.approx((0.2 / 8, 0.4 / 8, 0.1 / 8))


def test_metrics():
    ctrl = ExpertBiasController(4, 2, 3, 2.0, ki=0.1)
    counts = torch.tensor([10, 20, 30, 20, 15, 5], dtype=torch.int32)  # 100 selections, 100/3 tokens
    ctrl.update(counts)
    m = ctrl.metrics()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
    assert m["ffn_experts_per_token"].item() == pytest.approx(3 * 80 / 100)
    assert m["max_over_mean_ffn_load"].item() == pytest.approx(30 / 20)
    assert m["zero_share"].item() == pytest.approx(0.2)
    assert m["bias_min"].item() == pytest.approx(float(ctrl.bias[:4].min()))
    assert m["bias_max"].item() == pytest.approx(float(ctrl.bias[:4].max()))


def test_start_update_then_wait():
    ctrl = ExpertBiasController(8, 4, 2, 1.5, ki=0.1)
    counts = torch.arange(12, dtype=torch.int32)
    pending = ctrl.start_update(counts)
    assert torch.equal(ctrl.bias, torch.zeros(12)), "nothing is applied before wait()"
    pending.wait()
    pending.wait()  # idempotent
    assert ctrl.steps == 1 and not torch.equal(ctrl.bias, torch.zeros(12))
    assert torch.equal(counts, torch.arange(12, dtype=torch.int32)), "the caller's counts are not modified"


def test_update_path_never_reads_device_values(monkeypatch):
    """No .item(), .cpu(), .tolist(), bool() or float() on a tensor while updating: those are host syncs on GPU."""
    ctrl = ExpertBiasController(16, 8, 4, 3.0, kp=0.1, ki=0.2, max_abs=0.5, gain_schedule=lambda t: 0.9**t)
    counts = torch.randint(0, 50, (24,), dtype=torch.int32)

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called on the update path")

        return fail

    for name in ("item", "cpu", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    for _ in range(3):
        ctrl.update(counts)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_ffn_experts=0), ValueError, "num_ffn_experts"),
        (dict(num_zero_experts=-1), ValueError, "num_zero_experts"),
        (dict(top_k=13), ValueError, "top_k"),
        (dict(target_ffn_per_token=5.0), ValueError, "target_ffn_per_token"),
        (dict(mode="p"), ValueError, "mode"),
        (dict(max_abs=-0.1), ValueError, "max_abs"),
        (dict(ki="0.1"), TypeError, "ki"),
    ],
)
def test_bad_construction(kwargs, error, match):
    args = dict(num_ffn_experts=8, num_zero_experts=4, top_k=4, target_ffn_per_token=3.0) | kwargs
    with pytest.raises(error, match=match):
        ExpertBiasController(**args)


@pytest.mark.parametrize(
    "counts,error,match",
    [
        (torch.zeros(11, dtype=torch.int32), ValueError, r"N\+Z = 8\+4 = 12 entries, got 11"),
        (torch.zeros(12), TypeError, "counts must be int32 or int64"),
        (torch.zeros(3, 4, dtype=torch.int32), ValueError, "1 dimension"),
        (torch.zeros(12, dtype=torch.int32, device="meta"), ValueError, "one device"),
        ([0] * 12, TypeError, "torch.Tensor"),
    ],
)
def test_bad_counts(counts, error, match):
    ctrl = ExpertBiasController(8, 4, 4, 3.0)
    with pytest.raises(error, match=match):
        ctrl.update(counts)


@pytest.mark.gpu
def test_update_captures_in_cuda_graph():
    dev = torch.device("cuda")
    for backend in ("triton", "reference"):  # the fused kernel on CUDA is triton (docs/ops/expert_bias.md)
        ctrl = ExpertBiasController(512, 256, 12, 8.0, kp=0.1, ki=0.3, device=dev, backend=backend)
        eager = ExpertBiasController(512, 256, 12, 8.0, kp=0.1, ki=0.3, device=dev, backend=backend)
        static_counts = torch.zeros(768, dtype=torch.int32, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside capture (kernel compilation, allocator)
            ctrl.update(static_counts)
        torch.cuda.current_stream().wait_stream(s)
        eager.update(static_counts)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ctrl.update(static_counts)
        for _ in range(5):
            counts = torch.randint(0, 100, (768,), dtype=torch.int32, device=dev)
            static_counts.copy_(counts)
            graph.replay()
            eager.update(counts)
        torch.cuda.synchronize()
        assert torch.equal(ctrl.bias, eager.bias) and torch.equal(ctrl.state, eager.state), backend


@pytest.mark.gpu
def test_update_has_no_host_sync_on_gpu():
    dev = torch.device("cuda")
    ctrl = ExpertBiasController(512, 256, 12, 8.0, ki=0.3, device=dev)
    counts = torch.randint(0, 100, (768,), dtype=torch.int32, device=dev)
    ctrl.update(counts)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ctrl.update(counts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
