"""The batch-invariant mode's reductions (mmkernels.batch_invariance_reductions): a row's row-wise reduction over a
large vocabulary (sum, an entropy, a log-softmax, the norms...) is the same bits alone as inside a batch, at 1, 3
and 4 CPU threads (alone, ATen splits the one row across threads; in a batch each thread takes whole rows), forward
and input gradient; and the padded kernels give ATen's shapes, dtypes and values for every form of the call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkernels

pytestmark = pytest.mark.usefixtures("batch_invariant_mode")  # every test inside the mode (tests/conftest.py)


def _entropy(t):
    return torch.distributions.Categorical(logits=t.float()).entropy()


ROW_WISE = {
    "sum": lambda t: t.sum(-1),
    "sum keepdim fp64": lambda t: t.sum(-1, keepdim=True, dtype=torch.float64),
    "nansum": lambda t: t.nansum(-1),
    "prod": lambda t: (1 + t * 1e-4).prod(-1),
    "mean": lambda t: t.mean(-1),
    "norm": lambda t: t.norm(dim=-1),
    "var": lambda t: t.var(-1),
    "logsumexp": lambda t: t.logsumexp(-1),
    "log_softmax": lambda t: F.log_softmax(t, -1),
    "softmax": lambda t: F.softmax(t, -1),
    "entropy": _entropy,
    "kl": lambda t: (F.softmax(t.float(), -1) * (F.log_softmax(t.float(), -1) - t.float() * 0.5)).sum(-1),
    "layer_norm": lambda t: F.layer_norm(t, t.shape[-1:]),
    "rms_norm": lambda t: F.rms_norm(t, t.shape[-1:]),
    "normalize": lambda t: F.normalize(t, dim=-1),
}


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("vocab", [1000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_rows_reduction_is_the_same_alone_and_in_a_batch(threads, vocab, dtype, cpu_threads):
    cpu_threads(threads)
    x = torch.randn(7, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    failures = []
    for name, fn in ROW_WISE.items():
        if dtype != torch.float32 and name in ("prod", "var"):
            continue  # half-precision products of 50k factors and variances: not a model's row reduction
        for batch, row in ((x[3:4], 0), (x[2:4], 1), (x, 3)):  # row 3 of x alone, second of 2, fourth of 7
            leaf = batch.detach().clone().requires_grad_()
            out = fn(leaf)
            (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
            if batch.shape[0] == 1:
                alone = (out[0].detach(), grad[0])
            elif not (torch.equal(out[row].detach(), alone[0]) and torch.equal(grad[row], alone[1])):
                failures.append(f"{name} in a batch of {batch.shape[0]}")
    assert failures == [], failures


@pytest.mark.parametrize("threads", [1, 4])
def test_reduction_kernels_keep_atens_results(threads, cpu_threads):
    """Every form of the padded reductions (dims as a list, an int, None or []; keepdim; dtype=; integer inputs;
    0-dim and empty tensors; a non-contiguous input; the single-output split and not) gives ATen's shape and dtype
    and its value up to the order of additions."""
    cpu_threads(threads)
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(3, 40000, generator=gen)
    calls = [
        lambda: big[1].sum(), lambda: big[1:2].sum(-1), lambda: big[1:2].sum(-1, keepdim=True),
        lambda: big.sum(), lambda: big.sum([0, 1]), lambda: big.sum([]), lambda: big.sum(1, dtype=torch.float64),
        lambda: big.t()[:, 1].sum(0), lambda: big[1:2].nansum(), lambda: big[1:2].nansum(-1, keepdim=True),
        lambda: (1 + big[1] * 1e-5).prod(), lambda: (1 + big[1:2] * 1e-5).prod(1, keepdim=True),
        lambda: (1 + big * 1e-5).prod(), lambda: torch.arange(50000).sum(),
        lambda: torch.ones(50000, dtype=torch.bool).sum(),
        lambda: torch.arange(7).prod(0), lambda: torch.tensor(2.5).sum(), lambda: torch.empty(0, 3).sum(0),
        lambda: torch.tensor(2.5).prod(), lambda: big[1:2].sum(-1, dtype=torch.float16),
        lambda: big[1].mean(), lambda: big[1:2].mean(-1, keepdim=True), lambda: big.mean([0, 1]),
        lambda: big[1].mean(dtype=torch.float64), lambda: torch.linalg.vector_norm(big[1]),
        lambda: torch.linalg.vector_norm(big[1:2], 1, -1, keepdim=True),
        lambda: torch.linalg.vector_norm(big[1:2].to(torch.complex64), dim=-1),
        lambda: torch.linalg.vector_norm(big, float("inf"), dim=1), lambda: big[1].norm(),
    ]
    got = [call() for call in calls]
    with mmkernels.batch_invariant(False):
        want = [call() for call in calls]
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), i
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-3, msg=lambda m, i=i: f"call {i}: {m}")
