"""The MoE step protocol (issue 20 item 2): route -> dispatch -> experts -> combine through a dispatcher at every
expert-parallel size; the local dispatcher's numerics are one fused ``moe_experts`` call; one router GEMM per layer
per training step; backend choices fan out through ``ModuleBackend``; and the import structure the protocol buys
(models never import distributed; the LongCat converter imports no nn module class)."""

from __future__ import annotations

import ast
import os

import pytest
import torch

import mmkernels
from mmkernels import BackendError
from mmkernels.models import ScMoEConfig, ScMoEDecoder, ScMoEDecoderLayer
from mmkernels.nn import ZeroComputeMoE, device_balance_loss, moe_dispatch
from mmkernels.nn.moe_dispatch import CompletedHandle, LocalDispatcher
from mmkernels.ops import moe_experts

PACKAGE = os.path.dirname(mmkernels.__file__)
TINY = ScMoEConfig.preset("tiny")
BACKENDS = ["reference", "triton"]


def make(backend, seed=0):
    torch.manual_seed(seed)
    moe = ZeroComputeMoE(16, 6, 3, 3, 24, routed_scaling_factor=2.0, target_ffn_per_token=2.0,
                         backend={"moe_experts": backend})
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)
    return moe


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_dispatcher_is_one_fused_moe_experts_call(backend):
    moe = make(backend)
    assert isinstance(moe.dispatcher, LocalDispatcher)
    x = torch.randn(3, 5, 16, requires_grad=True)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 1:] = True
    handle = moe.dispatch(x, padding_mask=pad)
    assert isinstance(handle, CompletedHandle) and handle.is_completed() and handle.send() is handle
    d = handle.wait()
    combined = moe.combine(moe.run_experts(d), d)
    assert combined.is_completed()
    y = combined.wait()
    routed = handle.routed
    want = moe_experts(routed.hidden, routed.routing, moe.experts.w_gate_up, moe.experts.w_down,
                       backend=backend).view(x.shape)
    assert torch.equal(y, want)
    y2, logits = moe(x, padding_mask=pad, return_router_logits=True)
    assert torch.equal(y2, y) and torch.equal(logits, routed.router_logits)
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (15, 9)
    assert (routed.routing.topk_ids[11:] == -1).all() and (routed.routing.topk_ids[:11] >= 0).all()  # padding: nowhere


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(3, 15), ValueError),
    (torch.zeros(3, 16, dtype=torch.int64), TypeError),
])
def test_dispatch_rejects_bad_input_naming_x(bad, error):
    with pytest.raises(error, match=r"ZeroComputeMoE: (input )?x"):
        make("reference").dispatch(bad)


def test_one_router_gemm_per_training_step_and_the_same_balance_loss():
    """The device-level balance loss reads the MoE's own logits and picks: the router runs once per forward, the
    backward adds no second GEMM, and the loss and its router gradient are those of the loss recomputed by hand."""
    cfg = TINY.replace(balance_loss_coef=0.5)
    torch.manual_seed(0)
    layer = ScMoEDecoderLayer(cfg).train()
    with torch.no_grad():
        layer.mlp.router.weight.normal_(0.0, 1.0)
    calls = []
    layer.mlp.router.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 7, cfg.hidden_size)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    layer(x, padding_mask=pad)
    loss = layer.balance_loss()
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 1
    got_grad = layer.mlp.router.weight.grad.clone()
    # by hand: the MoE's input, its fp32 logits, its picks
    layer.zero_grad(set_to_none=True)
    h1 = x + layer.self_attn[0](layer.input_layernorm[0](x), torch.arange(7)[None])
    u = torch.where(pad.reshape(-1, 1), 0.0, layer.post_attention_layernorm[0](h1).reshape(-1, cfg.hidden_size))
    logits = layer.mlp.router(u.detach())
    picks = layer.mlp.route(u.detach()).topk_ids
    want = cfg.balance_loss_coef * device_balance_loss(
        logits, picks, num_ffn_experts=cfg.num_ffn_experts, num_groups=1, top_k=cfg.top_k,
        target_ffn_per_token=cfg.target_ffn_per_token, padding_mask=pad.reshape(-1))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, layer.mlp.router.weight.grad, rtol=1e-5, atol=1e-7)


def test_backend_fans_out_to_every_part():
    model = ScMoEDecoder(TINY.replace(num_layers=2), backend={"attention": "reference", "moe_experts": "triton"})
    for layer in model.layers:
        assert layer._backends["attention"] == "reference" and layer._backends["moe_experts"] == "triton"
        assert all(attn._backends == {"attention": "reference"} for attn in layer.self_attn)
        assert layer.mlp.experts._backends == {"moe_experts": "triton"}
        assert layer.mlp._backends["moe_route"] is None and layer.mlp.balancer._backends["expert_bias_update_"] is None
    model.backend = "reference"
    for layer in model.layers:
        assert layer.self_attn[1]._backends == {"attention": "reference"}
        assert layer.mlp.experts.backend == "reference" and layer.mlp.balancer.backend == "reference"
    with pytest.raises(BackendError, match="moe_route has no 'triton'"):
        model.backend = "triton"
    assert model.layers[0].mlp.experts.backend == "reference"  # a refused choice changes nothing
    with pytest.raises(BackendError, match="does not run"):
        model.backend = {"patch_embed": "reference"}


def test_expert_parallel_group_without_the_distributed_side_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(moe_dispatch, "_EXPERT_PARALLEL", {})
    assert moe_dispatch.expert_parallel_group(None, owner="X") is None  # no process group: a world of one
    with pytest.raises(RuntimeError, match="X: expert parallelism is not available"):
        moe_dispatch.expert_parallel_group(object(), owner="X")


def _imports(path: str) -> list[str]:
    """Every module a file imports (top level, inside functions, and importlib.import_module("...") by name),
    resolved to absolute ``mmkernels.*`` names."""
    with open(path) as f:
        tree = ast.parse(f.read())
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].split(os.sep)
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append(str(node.args[0].value))
    return found


def test_models_never_import_distributed():
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(PACKAGE, "models"))
             for name in names if name.endswith(".py")]
    assert files
    bad = {os.path.relpath(f, PACKAGE): [m for m in _imports(f) if m.startswith("mmkernels.distributed")]
           for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_longcat_converter_imports_no_nn_module_class():
    path = os.path.join(PACKAGE, "models", "convert", "longcat.py")
    assert not [m for m in _imports(path) if m.startswith("mmkernels.nn.moe") and
                not m.startswith("mmkernels.nn.moe_config")]
    assert "mmkernels.nn.moe_config.MoEConfig" in _imports(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts", [[[2, 0, 3], [1, 4, 0]], [[0, 0, 0], [0, 0, 0]], [[5, 1, 0], [0, 0, 2], [3, 0, 1]]])
def test_chunk_permutation_is_bitwise_the_sorted_path(backend, counts):
    """The expert-parallel receive side: the chunk permutation from the [W, E] counts gives exactly what the row sort
    (``moe_permute`` by local expert) plus the ones-weighted ``moe_unpermute`` gave, forward and every gradient."""
    from mmkernels.distributed import chunk_permutation
    from mmkernels.distributed.expert_parallel import _Permute
    from mmkernels.ops import moe_grouped_swiglu, moe_permute, moe_unpermute

    counts = torch.tensor(counts, dtype=torch.int64)
    w, e = counts.shape
    m = int(counts.sum())
    ids = torch.repeat_interleave(torch.arange(e).repeat(w), counts.reshape(-1))  # source-major (source, expert)
    torch.manual_seed(1)
    rows = torch.randn(m, 16)
    w_gu, w_down = torch.randn(e, 2 * 12, 16) / 4, torch.randn(e, 16, 12) / 4
    grad = torch.randn(m, 16)

    def run(new):
        r, a, b = (t.clone().requires_grad_(True) for t in (rows, w_gu, w_down))
        if new:
            by_expert, by_source, offsets = chunk_permutation(counts, m)
            out = moe_grouped_swiglu(_Permute.apply(r, by_expert, by_source), offsets, a, b, backend=backend)
            out = _Permute.apply(out, by_source, by_expert)
        else:
            grouped, perm = moe_permute(r, ids[:, None], num_local_experts=e, backend=backend)
            out = moe_grouped_swiglu(grouped, perm.offsets, a, b, backend=backend)
            out = moe_unpermute(out, perm, torch.ones(m, 1), backend=backend)
        (out * grad).sum().backward()
        return out.detach(), r.grad, a.grad, b.grad

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


def test_a_dispatcher_argument_plugs_in_and_a_bad_one_is_refused():
    class Counting(LocalDispatcher):
        def __init__(self):
            self.calls = []

        def dispatch(self, moe, routed):
            self.calls.append("dispatch")
            return super().dispatch(moe, routed)

        def combine(self, moe, expert_out, dispatched):
            self.calls.append("combine")
            return super().combine(moe, expert_out, dispatched)

    torch.manual_seed(0)
    plain = ZeroComputeMoE(16, 4, 2, 2, 8, backend="reference")
    counting = Counting()
    torch.manual_seed(0)
    custom = ZeroComputeMoE(16, 4, 2, 2, 8, backend="reference", dispatcher=counting)
    x = torch.randn(7, 16)
    assert torch.equal(custom(x), plain(x)) and counting.calls == ["dispatch", "combine"]
    assert custom.dispatcher is counting and "dispatcher" not in dict(custom.named_children())
    for bad in (object(), torch.nn.Linear(2, 2), 3):
        with pytest.raises(TypeError, match="dispatcher must implement the MoEDispatcher protocol"):
            ZeroComputeMoE(16, 4, 2, 2, 8, dispatcher=bad)
        with pytest.raises(TypeError, match="dispatcher must implement"):
            plain.dispatcher = bad
    assert isinstance(plain.dispatcher, LocalDispatcher)
