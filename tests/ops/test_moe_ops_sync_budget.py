"""Host syncs of the MoE ops and of ``expert_bias_update_`` (issue 20, item 4), on every backend that runs here
(triton under the interpreter, cpp, reference), forward and backward; and the backend names tell what runs.

Budget: no host sync anywhere, outputs sized by bounds (T*K rows, the worst-case tile map), except the per-expert
loops of two references, which need each expert's row count on the host: ``moe_experts`` reference (one read of the
plan's offsets, was one ``unique`` plus one ``nonzero`` per expert) and ``moe_grouped_swiglu`` reference (one read
of ``offsets``). Every backend's values are checked against the reference's, so a budget is never met by computing
something else.
"""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import ops
from mmkernels._backends import registered_ops
from mmkernels.testing import count_host_syncs

CPU = torch.device("cpu")
OPS = ("moe_route", "moe_experts", "moe_permute", "moe_grouped_swiglu", "moe_unpermute", "expert_bias_update_")
# (op, backend) -> allowed host syncs in the forward; every backward is 0.
LOOP_REFERENCES = {("moe_experts", "reference"): 1, ("moe_grouped_swiglu", "reference"): 1}
CASES = [(op, b) for op in OPS for b in registered_ops()[op].available(CPU)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def problem(seed=0, t=13, n=5, z=3, k=3, dm=24, di=40):
    """Routing with zero experts, an empty expert and a -1 slot (expert parallelism's "not mine")."""
    g = gen(seed)
    logits = torch.randn(t, n + z, generator=g)
    logits[:, 2] = -30.0  # expert 2 gets no rows
    r = ops.moe_route(logits, top_k=k, num_ffn_experts=n, backend="reference")
    ids = r.topk_ids.clone()
    ids[0, 0] = -1
    r = r._replace(topk_ids=ids)
    x = torch.randn(t, dm, generator=g)
    wgu = torch.randn(n, 2 * di, dm, generator=g) * dm**-0.5
    wd = torch.randn(n, dm, di, generator=g) * di**-0.5
    return logits, r, x, wgu, wd


def run_op(op, backend, p, *, grad=False):
    """The op's differentiable outputs (one tensor) on ``backend``; leaves require grad when ``grad``."""
    logits, r, x, wgu, wd = p
    n = wgu.shape[0]
    if grad:
        logits, x, wgu, wd = (a.clone().requires_grad_() for a in (logits, x, wgu, wd))
    if op == "moe_route":
        out = ops.moe_route(logits, top_k=r.topk_ids.shape[1], num_ffn_experts=n, backend=backend)
        return torch.cat([out.topk_weights.flatten(), out.zero_weight, out.topk_ids.flatten().float(),
                          out.counts.float()])
    if op == "moe_experts":
        return ops.moe_experts(x, r, wgu, wd, backend=backend)
    if op == "moe_permute":
        rows, perm = ops.moe_permute(x, r.topk_ids, num_local_experts=n, backend=backend)
        return torch.cat([rows.flatten(), perm.slots.float(), perm.offsets.float()])
    rows, perm = ops.moe_permute(x.detach(), r.topk_ids, num_local_experts=n, backend="reference")
    if op == "moe_grouped_swiglu":
        return ops.moe_grouped_swiglu(rows, perm.offsets, wgu, wd, backend=backend)
    if op == "moe_unpermute":
        return ops.moe_unpermute(rows, perm, r.topk_weights, zero_weight=r.zero_weight, hidden=x, backend=backend)
    bias, state = torch.zeros(n + 3), torch.zeros(2, n)
    counts = r.counts.clone()
    ops.expert_bias_update_(bias, counts, state, num_ffn_experts=n, top_k=3, target_ffn_per_token=2.0, kp=0.1,
                            backend=backend)
    return torch.cat([bias, state.flatten()])


def calls(syncs):
    return sorted({c.split(" at ")[-1] for c in syncs.calls})


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("op,backend", CASES)
def test_forward_sync_budget(op, backend, deterministic):
    p = problem()
    with mmkernels.deterministic(deterministic):
        run_op(op, backend, p)  # warm: first-call work (compilation caches, lazy imports) is not the budget
        with count_host_syncs() as syncs:
            out = run_op(op, backend, p)
    assert syncs.count == LOOP_REFERENCES.get((op, backend), 0), calls(syncs)
    want = run_op(op, "reference", p)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("op,backend", [c for c in CASES if c[0] != "expert_bias_update_"])
def test_backward_takes_no_host_sync(op, backend, deterministic):
    p = problem(1)
    with mmkernels.deterministic(deterministic):
        out = run_op(op, backend, p, grad=True)
        grad = torch.randn(out.shape, generator=gen(2))
        with count_host_syncs() as syncs:
            out.backward(grad)
    assert syncs.count == 0, calls(syncs)


def test_the_counter_sees_the_loop_references():
    """The budget is not met by a counter that misses calls: the reference's one read of the offsets is seen, at its
    line."""
    p = problem()
    with count_host_syncs() as syncs:
        run_op("moe_grouped_swiglu", "reference", p)
    assert syncs.count == 1 and "kernels/reference/moe.py" in syncs.calls[0], syncs


# ---- backend names tell what runs ------------------------------------------------------------------------------------


@pytest.fixture
def launched(monkeypatch):
    """Names of the Triton kernels launched (under the interpreter)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    names: list[str] = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return names


SPLIT_AND_FUSED = ("moe_experts", "moe_permute", "moe_grouped_swiglu", "moe_unpermute")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("op", SPLIT_AND_FUSED)
def test_triton_backends_launch_triton_kernels_forward_and_backward(op, deterministic, launched):
    if "triton" not in registered_ops()[op].available(CPU):
        pytest.skip("triton not available")
    p = problem(3)
    with mmkernels.deterministic(deterministic):
        out = run_op(op, "triton", p, grad=True)
        forward = list(launched)
        out.backward(torch.randn(out.shape, generator=gen(4)))
    backward = launched[len(forward):]
    assert forward and backward, (forward, backward)
    if op in ("moe_permute", "moe_unpermute"):  # the row movers are kernels, not torch ops labelled "triton"
        assert {"_gather_rows_kernel", "_scatter_rows_kernel"} & set(forward)
        assert {"_gather_rows_kernel", "_scatter_rows_kernel"} & set(backward)


@pytest.mark.parametrize("op", SPLIT_AND_FUSED)
def test_reference_backends_launch_no_triton_kernel_and_run_on_cpu(op, launched):
    """The reference is plain PyTorch on any device: the sync-free permute/unpermute run on CPU without Triton."""
    out = run_op(op, "reference", problem(5), grad=True)
    out.backward(torch.ones_like(out))
    assert launched == []
