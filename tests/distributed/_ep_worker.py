"""Worker of the expert-parallel tests: run under ``mmkernels.distributed.launch.run_local_world`` (torchrun's
environment), one process per rank, gloo on CPU.

``python _ep_worker.py OUT_DIR SCENARIO [SCENARIO ...]``: runs each scenario, writes ``OUT_DIR/rank{r}.json``
({scenario: "ok" | traceback}); scenarios may also save tensors for the parent to check. Every scenario runs on every
rank (collectives), so one failing scenario does not desynchronise the next unless it failed inside a collective.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU workers: Triton backends run under the interpreter

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint.api  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=120)  # every collective (and the rendezvous) gives up after this; the parent
# kills the whole world at its own deadline anyway


def close(name, got, want, rtol=2e-5, atol=2e-6):
    if want is None:
        raise AssertionError(f"{name}: no reference value")
    if got is None:
        got = torch.zeros_like(want)  # a missing gradient counts as zeros only where the reference is zero
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        err = (got.float() - want.float()).abs().max().item()
        raise AssertionError(f"{name}: max abs error {err:.3g} (rtol {rtol}, atol {atol})")


def make_moe(seed, *, hidden=24, n=8, z=4, k=3, inter=20, scale=2.0, k_e=2.0, dtype=torch.float32, backend=None):
    from mmkernels.nn import ZeroComputeMoE

    torch.manual_seed(seed)
    moe = ZeroComputeMoE(hidden, n, z, k, inter, routed_scaling_factor=scale, target_ffn_per_token=k_e, dtype=dtype,
                         backend=backend)
    with torch.no_grad():  # spread the router so that every expert gets picked
        moe.router.weight.normal_(0.0, 1.0)
    return moe


def rank_inputs(tokens, hidden, dtype=torch.float32):
    """Every rank's input and output-gradient, the same on every rank (rank j's from seed 100 + j)."""
    xs, gs = [], []
    for j, t in enumerate(tokens):
        g = torch.Generator().manual_seed(100 + j)
        xs.append(torch.randn(t, hidden, generator=g).to(dtype))
        gs.append(torch.randn(t, hidden, generator=g).to(dtype))
    return xs, gs


def check_against_single(moe_kwargs=None, tokens=None, bias=None, expect_received=None, ep_backend=None):
    """EP forward/backward on this rank's tokens == the single-process ZeroComputeMoE (outputs, input gradients,
    this rank's expert-weight gradients, the router gradient summed over the ranks). Expert weights that no row
    reaches must get zero gradients, never None, on both sides."""
    from mmkernels.distributed import ExpertParallelMoE

    w, r = dist.get_world_size(), dist.get_rank()
    moe_kwargs = moe_kwargs or {}
    ref = make_moe(0, **moe_kwargs)
    if bias is not None:
        ref.balancer.bias.copy_(bias)
    ep = ExpertParallelMoE.from_moe(ref, backend=ep_backend)
    tokens = tokens or [5 + 3 * j for j in range(w)]
    xs, gs = rank_inputs(tokens, ref.hidden_size)

    x = xs[r].clone().requires_grad_(True)
    d = ep.dispatch(x).wait()
    if expect_received is not None and d.rows.shape[0] != expect_received[r]:
        raise AssertionError(f"rank {r} received {d.rows.shape[0]} rows, expected {expect_received[r]}")
    y = ep.combine(ep.run_experts(d), d).wait()
    (y * gs[r]).sum().backward()

    ref_x = [xj.clone().requires_grad_(True) for xj in xs]
    ref_y = [ref(xj) for xj in ref_x]
    sum((yj * gj).sum() for yj, gj in zip(ref_y, gs)).backward()
    close("y", y, ref_y[r])
    close("x.grad", x.grad, ref_x[r].grad)
    lo, e = ep.expert_offset, ep.num_local_experts
    for name in ("w_gate_up", "w_down"):
        local = getattr(ep.experts, name)
        if local.grad is None:
            raise AssertionError(f"{name}.grad is None (expected zeros when no rows arrive)")
        full = getattr(ref.experts, name)
        if full.grad is None:
            raise AssertionError(f"ZeroComputeMoE: experts.{name}.grad is None (expected zeros for unused experts)")
        close(f"experts.{name}.grad", local.grad, full.grad[lo: lo + e])
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    close("router.weight.grad (summed over ranks)", router_grad, ref.router.weight.grad, atol=1e-5)
    return ep, ref


# ---- scenarios --------------------------------------------------------------------------------------------------


def sc_equal():
    check_against_single()


def sc_equal_uneven_shapes():
    # Odd sizes everywhere: hidden 19, intermediate 7, K = 5 of N + Z = 8 + 3.
    check_against_single(dict(hidden=19, n=8, z=3, k=5, inter=7, scale=1.5), tokens=[3 + 4 * j for j in
                                                                                     range(dist.get_world_size())])


def sc_skewed():
    """Every FFN slot lands on the last rank's experts (and zero experts): the other ranks receive nothing."""
    w = dist.get_world_size()
    n, z, k = 8, 4, 3
    e = n // w
    bias = torch.zeros(n + z)
    bias[n - e: n] = 100.0  # the last rank's experts win first,
    bias[n:] = 50.0  # then zero experts: no FFN slot goes anywhere but the last rank
    tokens = [5 + 3 * j for j in range(w)]
    # With a bias this large the picks are fixed: the last rank's experts first (E of them, up to K), then zeros.
    per_token = min(e, k)
    expected = [0] * (w - 1) + [per_token * sum(tokens)]
    check_against_single(tokens=tokens, bias=bias, expect_received=expected)


def sc_zero_tokens():
    """Rank 0 has no tokens at all."""
    w = dist.get_world_size()
    check_against_single(tokens=[0] + [4 + j for j in range(1, w)])


def sc_all_zero_experts():
    """Every slot picks a zero expert: nothing is sent anywhere, y = zero_weight * x."""
    w = dist.get_world_size()
    n, z = 8, 4
    bias = torch.zeros(n + z)
    bias[n:] = 50.0
    check_against_single(bias=bias, expect_received=[0] * w)


def sc_padding():
    """3-D input, padding mask with NaN in the padding: same as ZeroComputeMoE with the same mask."""
    from mmkernels.distributed import ExpertParallelMoE

    r = dist.get_rank()
    ref = make_moe(1)
    ep = ExpertParallelMoE.from_moe(ref)
    g = torch.Generator().manual_seed(7 + r)
    x = torch.randn(2, 5, ref.hidden_size, generator=g)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[1, 1:] = r == 0  # rank 0: most of the batch is padding
    x[pad] = float("nan")
    gy = torch.randn(x.shape, generator=g)
    x_ep, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, logits = ep(x_ep, padding_mask=pad, return_router_logits=True)
    (y * gy).sum().backward()
    y_ref, logits_ref = ref(x_ref, padding_mask=pad, return_router_logits=True)
    (y_ref * gy).sum().backward()
    close("y", y, y_ref)
    close("logits", logits, logits_ref)
    close("x.grad", x_ep.grad, x_ref.grad)
    if not torch.equal(y[pad], torch.zeros_like(y[pad])) or torch.isnan(x_ep.grad).any():
        raise AssertionError("padding rows must give zero output and zero, finite gradients")


def sc_async_handles():
    from mmkernels.distributed import ExpertParallelMoE

    ref = make_moe(2)
    ep = ExpertParallelMoE.from_moe(ref)
    x = torch.randn(6, ref.hidden_size)
    h = ep.dispatch(x)  # the count exchange in flight
    if h.send() is not h or h.send() is not h:  # rows in flight; a second send is a no-op
        raise AssertionError("send() must return the handle and be idempotent")
    d1 = h.wait()
    if h.wait() is not d1 or not h.is_completed():
        raise AssertionError("wait() must return the same Dispatched and leave the handle completed")
    polled = ep.dispatch(x)  # polling alone makes progress: is_completed() sends once the counts are in
    deadline = time.monotonic() + 60
    while not polled.is_completed():
        if time.monotonic() > deadline:
            raise AssertionError("is_completed() never became True without send() / wait()")
        time.sleep(0.001)
    close("rows (polled)", polled.wait().rows, d1.rows, rtol=0, atol=0)
    c = ep.combine(ep.run_experts(d1), d1)
    y = c.wait()
    if c.wait() is not y:
        raise AssertionError("combine wait() must be idempotent")
    close("y", y, ref(x))
    twin = copy.deepcopy(ep)  # shares the process group, copies everything else
    if twin.group is not ep.group or twin.experts.w_down is ep.experts.w_down:
        raise AssertionError("deepcopy must share the group and copy the parameters")
    close("deepcopy", twin(x), y, rtol=0, atol=0)


def sc_mesh_and_all_to_all():
    """A 1-D DeviceMesh works as the group (a 2-D one is refused); the public all_to_all moves rows and gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    from mmkernels.distributed import ExpertParallelMoE, all_to_all

    w, r = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (w,))
    ref = make_moe(8)
    ep = ExpertParallelMoE.from_moe(ref, mesh)
    x = torch.randn(4 + r, ref.hidden_size)
    close("y (mesh group)", ep(x), ref(x))
    if w % 2 == 0:
        try:
            ExpertParallelMoE.from_moe(ref, init_device_mesh("cpu", (2, w // 2), mesh_dim_names=("dp", "ep")))
        except ValueError as err:
            if "1-D" not in str(err):
                raise
        else:
            raise AssertionError("a 2-D DeviceMesh must be refused")
    # Rank r sends (j + r) rows to rank j, row values encode (source, destination, index).
    in_splits = [j + r for j in range(w)]
    out_splits = [r + j for j in range(w)]
    rows = torch.cat([torch.full((j + r, 3), float(100 * r + j)) for j in range(w)]).requires_grad_(True)
    out, work = all_to_all(rows, out_splits, in_splits, async_op=True)
    work.wait()
    want = torch.cat([torch.full((r + j, 3), float(100 * j + r)) for j in range(w)])
    close("all_to_all rows", out, want, rtol=0, atol=0)
    (out * torch.arange(out.shape[0], dtype=torch.float32)[:, None]).sum().backward()
    # The gradient of a row sent to rank j is its position in j's output: j received blocks of sizes i + j from
    # ranks i < r before ours.
    grad_want = torch.cat([torch.arange(sum(i + j for i in range(r)), sum(i + j for i in range(r)) + j + r,
                                        dtype=torch.float32)[:, None].expand(-1, 3) for j in range(w)])
    close("all_to_all backward", rows.grad, grad_want, rtol=0, atol=0)


def sc_balancer():
    """Training-mode counts, one all-reduce per update_bias: every rank ends with the single-process bias."""
    from mmkernels.distributed import ExpertParallelMoE

    w, r = dist.get_world_size(), dist.get_rank()
    ref = make_moe(3)
    ep = ExpertParallelMoE.from_moe(ref)
    ep.train()
    ref.train()
    xs, _ = rank_inputs([6 + j for j in range(w)], ref.hidden_size)
    for step in range(2):
        ep(xs[r] * (step + 1))
        ep.update_bias()
        for xj in xs:
            ref(xj * (step + 1))
        ref.update_bias()
    if not torch.equal(ep.balancer.bias, ref.balancer.bias) or not torch.equal(ep.balancer.state, ref.balancer.state):
        raise AssertionError(f"balancer differs: {ep.balancer.bias} vs {ref.balancer.bias}")
    if torch.equal(ref.balancer.bias, torch.zeros_like(ref.balancer.bias)):
        raise AssertionError("the balancer did not move: the test checks nothing")


def sc_state_dict():
    from mmkernels.distributed import ExpertParallelMoE

    r = dist.get_rank()
    ref = make_moe(4)
    ep = ExpertParallelMoE.from_moe(ref)
    full = ep.state_dict()  # collective: every rank
    want = ref.state_dict()
    if set(full) != set(want):
        raise AssertionError(f"keys differ: {sorted(set(full) ^ set(want))}")
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and not torch.equal(full[key], value):
            raise AssertionError(f"gathered {key} differs from the unsharded module's")
    fresh = make_moe(5)
    fresh.load_state_dict(full)  # ZeroComputeMoE reads the gathered dict
    other = ExpertParallelMoE.from_moe(make_moe(6))
    other.load_state_dict(full)  # full -> shard
    lo, e = other.expert_offset, other.num_local_experts
    if not torch.equal(other.experts.w_gate_up, ref.experts.w_gate_up[lo: lo + e]) or \
            not torch.equal(other.experts.w_down, ref.experts.w_down[lo: lo + e]):
        raise AssertionError(f"rank {r}: the shard loaded from a full state dict is wrong")
    ep.full_state_dict = False
    sharded = ep.state_dict()  # no communication
    from torch.distributed.tensor import DTensor, Shard

    shard = sharded["experts.w_gate_up"]
    if not isinstance(shard, DTensor) or shard.placements != (Shard(0),) or shard.shape[0] != ep.num_ffn_experts \
            or not torch.equal(shard.to_local(), ep.experts.w_gate_up):
        raise AssertionError("full_state_dict=False must save the local shard as a DTensor sharded on dim 0")
    third = ExpertParallelMoE.from_moe(make_moe(7))
    third.load_state_dict(sharded)
    x = torch.randn(5, ref.hidden_size)
    close("y after sharded round trip", third(x), ep(x), rtol=0, atol=0)  # same sharding: bitwise
    # Built on the meta device (no memory for the full experts), materialised, loaded from the full state dict.
    from mmkernels.nn import ZeroComputeMoE

    meta = ExpertParallelMoE.from_moe(ZeroComputeMoE(24, 8, 4, 3, 20, routed_scaling_factor=2.0,
                                                     target_ffn_per_token=2.0, device="meta"))
    meta.to_empty(device="cpu")
    meta.load_state_dict(full)
    if meta.pending_counts.any():
        raise AssertionError("pending counts must start at zero after a load")
    close("y of a meta-built block after loading", meta(x), ep(x), rtol=0, atol=0)
    # A module that holds the EP block saves the same gathered keys under its prefix.
    holder = torch.nn.ModuleDict({"mlp": other})
    if not torch.equal(holder.state_dict()["mlp.experts.w_down"], ref.experts.w_down):
        raise AssertionError("a parent module's state_dict must gather the experts too")


def sc_mismatch():
    """Configurations that differ between ranks raise on every rank, naming the field, without hanging."""
    from mmkernels.distributed import ExpertParallelMoE

    w, r = dist.get_world_size(), dist.get_rank()
    cases = {
        "hidden_size": dict(hidden=24 if r == 0 else 32),
        "num_ffn_experts": dict(n=8 if r == 0 else 4 * w),
        "top_k": dict(k=3 if r == 0 else 2),
        "dtype": dict(dtype=torch.float32 if r == 0 else torch.float16),
    }
    if 4 * w == 8:
        cases["num_ffn_experts"] = dict(n=8 if r == 0 else 16)
    for field, kwargs in cases.items():
        try:
            ExpertParallelMoE.from_moe(make_moe(0, **kwargs))
        except ValueError as err:
            if field not in str(err):
                raise AssertionError(f"{field}: the error does not name the field: {err}") from err
        else:
            raise AssertionError(f"{field}: differing {field} between ranks did not raise on rank {r}")
    try:
        ExpertParallelMoE.from_moe(make_moe(0, n=2 * w + 1))
    except ValueError as err:
        if "N % W" not in str(err):
            raise AssertionError(f"N % W != 0: unclear error {err}") from err
    else:
        raise AssertionError("N not divisible by the world size did not raise")
    # A bad input on one rank at forward time: that rank raises its own error, the others a RuntimeError naming it.
    ep = ExpertParallelMoE.from_moe(make_moe(0))
    x = torch.randn(3, 24 if r != w - 1 else 25)
    try:
        ep(x)
    except ValueError as err:
        if r != w - 1 or "x must be" not in str(err):
            raise
    except RuntimeError as err:
        if r == w - 1 or f"[{w - 1}]" not in str(err):
            raise
    else:
        raise AssertionError("a bad input on the last rank did not raise everywhere")
    # Through the async API: the other ranks' handle keeps raising (never a None "result"); combine refuses a handle.
    handle = None
    try:
        handle = ep.dispatch(x)
        handle.wait()
    except (ValueError, RuntimeError) as err:
        first = err
    else:
        raise AssertionError("a bad input on the last rank did not raise through dispatch/wait")
    if handle is not None:  # the ranks with a good input got a handle; its error sticks
        for again in (handle.wait, handle.send, handle.is_completed):
            try:
                again()
            except RuntimeError as err:
                if err is not first:
                    raise AssertionError("a handle must raise the same error again") from err
            else:
                raise AssertionError(f"{again.__name__}() after the error did not raise")
    good = ep.dispatch(torch.ones(2, 24))
    try:
        ep.combine(torch.zeros(1, 24), good)
    except TypeError as err:
        if "wait()" not in str(err):
            raise
    else:
        raise AssertionError("combine(handle) must be a TypeError")
    d = good.wait()
    close("async after the error", ep.combine(ep.run_experts(d), d).wait(), make_moe(0)(torch.ones(2, 24)))
    close("forward after the error", ep(torch.ones(2, 24)), make_moe(0)(torch.ones(2, 24)))
    # The group still works after the errors (nobody is stuck in a collective).
    t = torch.ones(1)
    dist.all_reduce(t)
    if t.item() != w:
        raise AssertionError("the group is out of step after the mismatch errors")


def sc_unused_expert_grads():
    """Routing that leaves experts empty, on every EP backend: no slot on an FFN expert, a rank with no tokens, one
    rank's experts unused (every slot on the last rank's). Unused experts get zero gradients, never None, and every
    value equals the single-process module's."""
    w = dist.get_world_size()
    n, z = 8, 4
    e = n // w
    all_zero = torch.zeros(n + z)
    all_zero[n:] = 50.0
    skewed = torch.zeros(n + z)
    skewed[n - e: n] = 100.0
    skewed[n:] = 50.0
    for backend in ("reference", "triton"):
        split = {op: backend for op in ("moe_permute", "moe_grouped_swiglu", "moe_unpermute")}
        try:
            check_against_single(bias=all_zero, expect_received=[0] * w, ep_backend=split)
            check_against_single(tokens=[0] + [3] * (w - 1), ep_backend=split)
            check_against_single(tokens=[0] + [3] * (w - 1), bias=skewed, ep_backend=split)
        except AssertionError as err:
            raise AssertionError(f"backend {backend}: {err}") from err


def _ddp_step_inputs(step, w, hidden):
    """Every rank's tokens at a step: rank 0 has none at step 0."""
    return [torch.randn(0 if (step == 0 and j == 0) else 4, hidden, generator=torch.Generator().manual_seed(
        50 + 10 * step + j)) for j in range(w)]


def sc_ddp_unused():
    """DDP without find_unused_parameters, whatever the routing (a rank without tokens, every slot on a zero
    expert, one rank's experts unused): no reducer error, and the averaged gradients are the single-process ones.
    ZeroComputeMoE data-parallel on every world; on 4 ranks also ExpertParallelMoE over a (dp=2) x (ep=2) mesh,
    DDP over the dp dimension."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mmkernels.distributed import ExpertParallelMoE

    w, r = dist.get_world_size(), dist.get_rank()
    n, hidden = 8, 24
    all_zero = torch.zeros(n + 4)
    all_zero[n:] = 50.0
    biases = [None, all_zero, None]  # step 1: every slot on a zero expert (on every rank: buffers are broadcast)
    moe = make_moe(60)
    ref = copy.deepcopy(moe)
    ddp = DDP(moe)
    for step, bias in enumerate(biases):
        for m in (moe, ref):
            m.balancer.bias.copy_(bias if bias is not None else torch.zeros(n + 4))
            m.zero_grad(set_to_none=True)
        xs = _ddp_step_inputs(step, w, hidden)
        ddp(xs[r]).square().sum().backward()
        for xj in xs:
            ref(xj).square().sum().backward()
        for name in ("experts.w_gate_up", "experts.w_down", "router.weight"):
            got, want = moe.get_parameter(name).grad, ref.get_parameter(name).grad
            if want is None:
                raise AssertionError(f"step {step}: ZeroComputeMoE {name}.grad is None")
            close(f"DDP step {step} {name}.grad", got, want / w, atol=1e-5)
    if w != 4:
        return
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    skewed = torch.zeros(n + 4)
    skewed[n - n // 2: n] = 100.0  # the second EP rank's experts only: the first's are unused
    skewed[n:] = 50.0
    ref = make_moe(61)
    ep = ExpertParallelMoE.from_moe(ref, mesh["ep"])
    ddp = DDP(ep, process_group=mesh["dp"].get_group())
    lo, e = ep.expert_offset, ep.num_local_experts
    for step, bias in enumerate([None, all_zero, skewed]):
        for m in (ep, ref):
            m.balancer.bias.copy_(bias if bias is not None else torch.zeros(n + 4))
            m.zero_grad(set_to_none=True)
        xs = _ddp_step_inputs(step, w, hidden)
        ddp(xs[r]).square().sum().backward()
        for xj in xs:  # all 4 ranks' tokens: each EP shard's gradient covers its EP group's, DDP averages 2 groups
            ref(xj).square().sum().backward()
        for name in ("w_gate_up", "w_down"):
            got, want = getattr(ep.experts, name).grad, getattr(ref.experts, name).grad
            if got is None or want is None:
                raise AssertionError(f"step {step}: experts.{name}.grad is None")
            close(f"EP x DDP step {step} experts.{name}.grad", got, want[lo: lo + e] / 2, atol=1e-5)


def sc_dcp_reshard(out_dir):
    """torch.distributed.checkpoint with sharded expert state dicts: save at 2 ranks, load at 1 and 4 (and back to 2),
    each save loaded exactly by the next world size; a single-process ZeroComputeMoE checkpoint into EP and an EP
    checkpoint into ZeroComputeMoE; mismatched loads raise (DCP with another N, torch.load of another rank's or
    another world size's file, a shard that does not say which experts it holds)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from mmkernels.distributed import ExpertParallelMoE

    w, r = dist.get_world_size(), dist.get_rank()
    sizes = [2, 1, 4, 2] if w == 4 else [2, 1, 2]
    groups = {k: dist.new_group(list(range(k))) for k in sorted(set(sizes))}  # collective: every rank, same order
    root = os.path.join(out_dir, "dcp")
    ref = make_moe(70)
    with torch.no_grad():
        ref.balancer.bias.normal_()  # replicated state must round-trip too
        ref.balancer.state.normal_()
    x = torch.randn(5, ref.hidden_size, generator=torch.Generator().manual_seed(71 + r))
    y_ref = ref(x)

    def check(ep, what):
        lo, e = ep.expert_offset, ep.num_local_experts
        for name in ("w_gate_up", "w_down"):
            if not torch.equal(getattr(ep.experts, name), getattr(ref.experts, name)[lo: lo + e]):
                raise AssertionError(f"{what}: experts.{name} of rank {ep.rank} of {ep.world_size} are not experts "
                                     f"[{lo}, {lo + e}) of the saved model")
        for name in ("router.weight", "balancer.bias", "balancer.state"):
            if not torch.equal(ep.get_parameter(name) if name.startswith("router") else ep.get_buffer(name),
                               ref.get_parameter(name) if name.startswith("router") else ref.get_buffer(name)):
                raise AssertionError(f"{what}: {name} differs")
        close(f"{what}: y", ep(x), y_ref)  # collective over ep's group

    prev = None
    for step, k in enumerate(sizes):
        path = os.path.join(root, f"step{step}-world{k}")
        if r < k:
            g = groups[k]
            ep = ExpertParallelMoE.from_moe(ref if prev is None else make_moe(72 + step), g)
            ep.full_state_dict = False
            if prev is not None:
                sd = ep.state_dict()
                dcp.load(sd, checkpoint_id=prev, process_group=g)
                ep.load_state_dict(sd)
            check(ep, f"world {k} (step {step}, from {prev})")
            dcp.save(ep.state_dict(), checkpoint_id=path, process_group=g)
        prev = path
        dist.barrier()
    # A single-process ZeroComputeMoE checkpoint into EP over every rank, and the last EP checkpoint back into one.
    plain = os.path.join(root, "plain")
    if r == 0:
        dcp.save(ref.state_dict(), checkpoint_id=plain, process_group=groups[1])
    dist.barrier()
    ep = ExpertParallelMoE.from_moe(make_moe(80))
    ep.full_state_dict = False
    sd = ep.state_dict()
    dcp.load(sd, checkpoint_id=plain)
    ep.load_state_dict(sd)
    check(ep, "ZeroComputeMoE checkpoint -> EP")
    if r == 0:
        single = make_moe(81)
        sd = single.state_dict()
        dcp.load(sd, checkpoint_id=prev, process_group=groups[1])
        single.load_state_dict(sd)
        for key, value in ref.state_dict().items():
            if isinstance(value, torch.Tensor) and not torch.equal(single.state_dict()[key], value):
                raise AssertionError(f"EP checkpoint (world {sizes[-1]}) -> ZeroComputeMoE: {key} differs")
    dist.barrier()
    # DCP into a block with another N: DCP refuses on every rank (a BaseException).
    bigger = ExpertParallelMoE.from_moe(make_moe(82, n=16))
    bigger.full_state_dict = False
    try:
        dcp.load(bigger.state_dict(), checkpoint_id=plain)
    except CheckpointException as err:
        if "Size mismatch" not in str(err):
            raise AssertionError(f"DCP with another N: unclear error {err}") from err
    else:
        raise AssertionError("DCP loaded a checkpoint of 8 experts into a block of 16")
    # torch.save / torch.load per rank: the rank's own file loads exactly, any other rank's file raises.
    torch.save(ep.state_dict(), os.path.join(root, f"rank{r}.pt"))
    dist.barrier()
    before = [t.clone() for t in (ep.experts.w_gate_up, ep.experts.w_down)]
    for j in range(w):
        saved = torch.load(os.path.join(root, f"rank{j}.pt"), weights_only=False)
        try:
            ep.load_state_dict(saved)
        except ValueError as err:
            if j == r or f"rank {j} of {w}" not in str(err):
                raise
        else:
            if j != r:
                raise AssertionError(f"rank {r} loaded rank {j}'s experts without an error")
        if not torch.equal(ep.experts.w_gate_up, before[0]) or not torch.equal(ep.experts.w_down, before[1]):
            raise AssertionError(f"rank {r}: loading rank {j}'s file changed the experts")
    check(ep, "own torch.save file")
    # A plain shard without the saved identity (its metadata stripped) is refused.
    stripped = {key: (val.to_local() if hasattr(val, "to_local") else val) for key, val in ep.state_dict().items()}
    try:
        ep.load_state_dict(stripped)
    except ValueError as err:
        if "which experts" not in str(err):
            raise
    else:
        raise AssertionError("a plain shard without its identity loaded silently")
    # Another world size's file (rank 0 of this world into a world of 1) is refused.
    if r == 0:
        one = ExpertParallelMoE.from_moe(make_moe(83), groups[1])
        try:
            one.load_state_dict(torch.load(os.path.join(root, "rank0.pt"), weights_only=False))
        except ValueError as err:
            if "DTensor of another layout" not in str(err):
                raise
        else:
            raise AssertionError("a world-of-w shard loaded into a world of 1")
    dist.barrier()


def sc_scmoe(out_dir):
    """ScMoE layer under EP: overlapped and sequential schedules bitwise equal, forward and every gradient; saves the
    output, gradients and full state dict for the parent to compare with the world-of-one layer."""
    from mmkernels.distributed import ExpertParallelMoE
    from mmkernels.models import ScMoEConfig, ScMoEDecoderLayer

    r = dist.get_rank()
    cfg = ScMoEConfig.preset("tiny")
    torch.manual_seed(0)
    layer = ScMoEDecoderLayer(cfg, overlap=True)
    if not isinstance(layer.mlp, ExpertParallelMoE):
        raise AssertionError(f"an initialised world of {dist.get_world_size()} must shard the experts")
    g = torch.Generator().manual_seed(11 + r)
    x = torch.randn(2, 7 + 2 * r, cfg.hidden_size, generator=g)
    gy = torch.randn(x.shape, generator=g)
    runs = []
    for overlap in (True, False, True):
        layer.overlap = overlap
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * gy).sum().backward()
        runs.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y0, gx0, gp0), (y1, gx1, gp1), _ = runs
    if not torch.equal(y0, y1):
        raise AssertionError(f"outputs differ: max {(y0 - y1).abs().max().item():.3g}")
    if not torch.equal(gx0, gx1):
        raise AssertionError(f"input gradients differ: max {(gx0 - gx1).abs().max().item():.3g}")
    for name in gp0:
        if not torch.equal(gp0[name], gp1[name]):
            raise AssertionError(f"{name}.grad differs between overlap=True and False")
    if not torch.equal(runs[2][0], y0):
        raise AssertionError("two overlapped runs differ")
    state = layer.state_dict()
    torch.save({"x": x, "gy": gy, "y": y0, "x_grad": gx0, "grads": gp0, "state": state},
               os.path.join(out_dir, f"scmoe_rank{r}.pt"))


def sc_sync_budget():
    """Issue 20's sync budget under expert parallelism: one host sync per MoE layer per forward (the split sizes,
    in the module layer), none in backward, none added by the ScMoE layer around it (balance loss included); on the
    Triton path under the interpreter that one is the step's only sync. Also the chunk permutation: the received
    rows reach the experts in the order a stable sort by local expert gives."""
    import mmkernels
    from mmkernels.distributed import ExpertParallelMoE, chunk_permutation
    from mmkernels.models import ScMoEConfig, ScMoEDecoderLayer
    from mmkernels.testing import count_host_syncs

    package = os.path.dirname(mmkernels.__file__)
    module_layer = tuple(os.path.join(package, p) + os.sep for p in ("nn", "models", "distributed"))

    def ours(syncs):
        return [c for c in syncs.calls if c.split(" at ", 1)[1].startswith(module_layer)]

    r = dist.get_rank()
    for backend in ("reference", "triton"):
        split = {op: backend for op in ("moe_permute", "moe_grouped_swiglu", "moe_unpermute")}
        ep = ExpertParallelMoE.from_moe(make_moe(0), backend=split).train()
        x = rank_inputs([5 + 2 * j for j in range(dist.get_world_size())], 24)[0][r].requires_grad_(True)
        with count_host_syncs() as fwd:
            y = ep(x)
        with count_host_syncs() as bwd:
            y.sum().backward()
        if len(ours(fwd)) != 1 or "tolist" not in ours(fwd)[0] or ours(bwd):
            raise AssertionError(f"{backend}: module-layer syncs forward {ours(fwd)}, backward {ours(bwd)}")
        if backend == "triton" and (fwd.count != 1 or bwd.count):
            raise AssertionError(f"triton path: forward {fwd}, backward {bwd}")
        d = ep.dispatch(x.detach()).wait()
        ids = d.local_expert_ids
        want = torch.sort(ids, stable=True).indices
        got, back, offsets = chunk_permutation(
            torch.stack([torch.bincount(ids[sum(d.recv_splits[:j]): sum(d.recv_splits[:j + 1])],
                                        minlength=ep.num_local_experts) for j in range(ep.world_size)]),
            ids.numel())
        if not torch.equal(got, want) or not torch.equal(got[back], torch.arange(ids.numel())):
            raise AssertionError(f"chunk permutation {got.tolist()} != stable sort {want.tolist()}")
        if not torch.equal(offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long),
                                                      torch.bincount(ids, minlength=ep.num_local_experts).cumsum(0)])):
            raise AssertionError(f"expert offsets {offsets.tolist()}")
    torch.manual_seed(0)
    layer = ScMoEDecoderLayer(ScMoEConfig.preset("tiny").replace(balance_loss_coef=0.5)).train()
    x = torch.randn(2, 5 + r, 32, requires_grad=True)
    for overlap in (True, False):
        layer.overlap = overlap
        with count_host_syncs() as fwd:
            loss = layer(x).sum() + layer.balance_loss()
        with count_host_syncs() as bwd:
            loss.backward()
        if len(ours(fwd)) != 1 or ours(bwd):
            raise AssertionError(f"ScMoE layer (overlap={overlap}): module-layer syncs forward {ours(fwd)}, "
                                 f"backward {ours(bwd)}")


SCENARIOS = {
    "equal": sc_equal,
    "equal_uneven_shapes": sc_equal_uneven_shapes,
    "skewed": sc_skewed,
    "zero_tokens": sc_zero_tokens,
    "all_zero_experts": sc_all_zero_experts,
    "padding": sc_padding,
    "async_handles": sc_async_handles,
    "balancer": sc_balancer,
    "mesh_and_all_to_all": sc_mesh_and_all_to_all,
    "state_dict": sc_state_dict,
    "mismatch": sc_mismatch,
    "scmoe": sc_scmoe,
    "unused_expert_grads": sc_unused_expert_grads,
    "ddp_unused": sc_ddp_unused,
    "dcp_reshard": sc_dcp_reshard,
    "sync_budget": sc_sync_budget,
}
NEEDS_OUT_DIR = {"scmoe", "dcp_reshard"}


def main(argv: list[str]) -> int:
    out_dir, names = argv[0], argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    results = {}
    try:
        for name in names:
            fn = SCENARIOS[name]
            try:
                fn(out_dir) if name in NEEDS_OUT_DIR else fn()
                results[name] = "ok"
            except (Exception, torch.distributed.checkpoint.api.CheckpointException):  # DCP's is a BaseException
                # record and go on: the parent reports every failing scenario
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
