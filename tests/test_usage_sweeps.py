"""Sweeps of the kinds of failure users hit, over every op, backend, module and model.

- autocast: every op, on every backend that runs here, gives with fp32 inputs inside a bf16 autocast region exactly
  what it gives outside (the ops document their precision; autocast must not silently recast their math);
- a backend given to a module or model reaches every op inside it (a spy on the backend registry records which
  backend each op resolved to);
- constructors and configs validate every integer argument up front, naming it.

The ops' inputs are the ``USAGE_SAMPLES`` (else ``SAMPLES``) of each op's own ``tests/ops/test_<name>.py``, collected
by ``tests/op_samples.py``: a new op needs no edit here.
"""

from __future__ import annotations

import inspect

import op_samples  # (tests/op_samples.py: every op's valid call, from its own test file)
import pytest
import torch

import mmkernels
from mmkernels import ops
from mmkernels._backends import registered_ops
from mmkernels.models.qformer import QFormer, QFormerConfig
from mmkernels.models.scmoe import ScMoEConfig, ScMoEDecoderLayer
from mmkernels.models.vit import ViT, ViTConfig
from mmkernels.nn import (
    Attention,
    ExpertBiasController,
    PatchEmbed,
    QFormerCrossAttention,
    SwiGLUExperts,
    ZeroComputeMoE,
)
from mmkernels.nn.moe import MoEConfig

CPU = torch.device("cpu")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _op_inputs(op: str):
    """(function, args, kwargs) with fp32 inputs, awkward sizes: the ``USAGE_SAMPLES`` (else the ``SAMPLES``) of the
    op's own test file ``tests/ops/test_<name>.py`` (tests/op_samples.py collects them)."""
    return op_samples.usage(op)


SAMPLED_OPS = op_samples.ops()  # every registered op with a sample; one without fails test_every_op_has_inputs
OP_BACKENDS = [(op, b) for op in SAMPLED_OPS for b in registered_ops()[op].available(CPU)]


def test_every_op_has_inputs():
    op_samples.check()
    for op in registered_ops():
        _op_inputs(op)


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_autocast_does_not_change_an_op(op, backend):
    fn, args, kwargs = _op_inputs(op)
    want = fn(*args, **kwargs, backend=backend)
    with torch.autocast("cpu", torch.bfloat16):
        got = fn(*args, **kwargs, backend=backend)
    for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_every_op_returns_contiguous_results(op, backend):
    """The docs promise contiguous results (``patch_embed``: ``[B, N, D]``, ``attention``: ``[B, L, H, D]``...), so a
    caller's ``.view`` works on every backend alike (found by the fresh-user trial: the reference patch embedding
    returned the convolution's memory transposed, strides ``(20, 1, 4)``; ``.view`` raised there and not on Triton).
    Both valid calls of the op's test file (its SAMPLES and its USAGE_SAMPLES)."""
    samples = [_op_inputs(op)]
    if op != "expert_bias_update_":  # its sample builds its own state
        samples.append((getattr(ops, op), (), {**op_samples.good_args(op)}))
    for fn, args, kwargs in samples:
        out = fn(*args, **kwargs, backend=backend)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        assert leaves, op
        for i, t in enumerate(leaves):
            assert t.is_contiguous(), f"{op} on {backend}: result {i} {tuple(t.shape)} has strides {t.stride()}"


# ---- a backend reaches every op ------------------------------------------------------------------------------------

TINY_VIT = ViTConfig(image_size=8, patch_size=4, hidden_size=12, num_layers=1, num_heads=2, mlp_dim=16)
TINY_QF = QFormerConfig(hidden_size=12, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                        encoder_hidden_size=10, hidden_dropout_prob=0.0)

MODELS = {
    # name: (build(backend), inputs, the ops it runs)
    "ViT": (lambda b: ViT(TINY_VIT, backend=b), lambda: (torch.randn(1, 3, 8, 8),), {"patch_embed", "attention"}),
    "QFormer": (lambda b: QFormer(TINY_QF, backend=b).eval(), lambda: (torch.randn(2, 3, 12), torch.randn(2, 5, 10)),
                {"qformer_cross_attention"}),
    "Attention": (lambda b: Attention(12, 2, backend=b), lambda: (torch.randn(2, 3, 12),), {"attention"}),
    "QFormerCrossAttention": (lambda b: QFormerCrossAttention(12, 2, 10, backend=b),
                              lambda: (torch.randn(2, 3, 12), torch.randn(2, 5, 10)), {"qformer_cross_attention"}),
    "PatchEmbed": (lambda b: PatchEmbed(8, 4, 3, 12, backend=b), lambda: (torch.randn(1, 3, 8, 8),), {"patch_embed"}),
    "ScMoEDecoderLayer": (lambda b: ScMoEDecoderLayer(ScMoEConfig.preset("tiny"), backend=b).eval(),
                          lambda: (torch.randn(1, 5, 32),), {"attention", "moe_route", "moe_experts"}),
    "ZeroComputeMoE": (lambda b: ZeroComputeMoE(12, 4, 2, 2, 8, target_ffn_per_token=1.5, backend=b).train(),
                       lambda: (torch.randn(5, 12),), {"moe_route", "moe_experts", "expert_bias_update_"}),
}


def _run_model(name, model, inputs):
    out = model(*inputs)
    if isinstance(model, ZeroComputeMoE):
        model.update_bias()
    return out


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_backend_reaches_every_op(name, backend, ops_run, no_backend_env):
    build, inputs, model_ops = MODELS[name]
    missing = sorted(op for op in model_ops if backend not in registered_ops()[op].impls)
    if missing:
        with pytest.raises(mmkernels.BackendError, match="|".join(missing)):
            build(backend)
        return
    if any(backend not in registered_ops()[op].available(CPU) for op in model_ops):
        pytest.skip(f"{backend} cannot run here")
    _run_model(name, build(backend), inputs())
    assert {op for op, _ in ops_run} == model_ops
    assert {b for _, b in ops_run} == {backend}, ops_run


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mapping_picks_per_op(name, ops_run, no_backend_env):
    build, inputs, model_ops = MODELS[name]
    choice = {op: "reference" for op in sorted(model_ops)[:1]}
    _run_model(name, build(choice), inputs())
    assert all(b == "reference" for op, b in ops_run if op in choice)


# ---- every integer argument is validated up front ------------------------------------------------------------------

VALID_KWARGS = {
    Attention: dict(dim=16, num_heads=4, num_kv_heads=2, head_dim=4),
    QFormerCrossAttention: dict(hidden_size=16, num_heads=2, kv_dim=12),
    PatchEmbed: dict(image_size=16, patch_size=4, in_channels=3, embed_dim=8),
    SwiGLUExperts: dict(num_experts=3, hidden_size=16, intermediate_size=20),
    ZeroComputeMoE: dict(hidden_size=16, num_ffn_experts=8, num_zero_experts=4, top_k=4, expert_intermediate_size=32),
    ExpertBiasController: dict(num_ffn_experts=8, num_zero_experts=4, top_k=4, target_ffn_per_token=3.0),
    mmkernels.nn.MultiHeadLatentAttention: dict(hidden_size=16, num_heads=2, q_lora_rank=8, kv_lora_rank=6,
                                                qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4),
    mmkernels.models.PerceiverResampler: dict(dim=16, depth=2, dim_head=4, heads=2, num_latents=3, num_media_embeds=2,
                                              ff_dim=20),
    mmkernels.models.GatedCrossAttentionBlock: dict(dim=16, dim_head=4, heads=2, ff_dim=20),
    ViTConfig: dict(image_size=16, patch_size=4, in_channels=3, hidden_size=12, num_layers=1, num_heads=2, mlp_dim=8),
    QFormerConfig: dict(hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                        encoder_hidden_size=10, cross_attention_frequency=1),
    MoEConfig: dict(hidden_size=16, num_ffn_experts=8, num_zero_experts=4, top_k=4, expert_intermediate_size=32),
    ScMoEConfig: dict(hidden_size=16, num_heads=4, num_kv_heads=2, dense_intermediate_size=24, num_ffn_experts=8,
                      num_zero_experts=4, top_k=3, expert_intermediate_size=12, vocab_size=50, num_layers=2),
}
ZERO_ALLOWED = {"num_zero_experts", "num_layers", "num_hidden_layers", "num_experts"}

INT_CASES = [(cls, arg) for cls, kw in VALID_KWARGS.items() for arg, val in kw.items()
             if isinstance(val, int) and not isinstance(val, bool)]


@pytest.mark.parametrize("cls", list(VALID_KWARGS), ids=lambda c: c.__name__)
def test_valid_kwargs_build(cls):
    cls(**VALID_KWARGS[cls])


@pytest.mark.parametrize("cls,arg", INT_CASES, ids=lambda x: getattr(x, "__name__", x))
def test_integer_arguments_are_checked(cls, arg):
    kwargs = VALID_KWARGS[cls]
    bad_values = [-1] if arg in ZERO_ALLOWED else [0, -1]
    for bad in bad_values:
        with pytest.raises(ValueError, match=arg):
            cls(**(kwargs | {arg: bad}))
    for bad in (2.5, "4", True):
        with pytest.raises(TypeError, match=arg):
            cls(**(kwargs | {arg: bad}))


def test_all_module_and_config_classes_are_swept():
    swept = {c.__name__ for c in VALID_KWARGS}
    for pkg in (mmkernels.nn, mmkernels.models):
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if not (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)):
                continue
            params = list(inspect.signature(obj.__init__).parameters)
            if params[1:2] == ["config"]:  # built from a config class: the config's fields are what is swept
                continue
            assert name in swept, f"add {name} to VALID_KWARGS"


@pytest.mark.parametrize("value", ["no", 1, None, "true"])
def test_set_deterministic_takes_a_bool(value):
    with pytest.raises(TypeError, match="enabled"):
        mmkernels.set_deterministic(value)
    assert not mmkernels.is_deterministic()


@pytest.mark.parametrize("backend", registered_ops()["expert_bias_update_"].available(CPU))
def test_negative_counts_are_an_error(backend):
    counts = torch.tensor([3, -1, 2, 0, 1, 1], dtype=torch.int32)
    bias, state = torch.zeros(6), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="counts must be >= 0"):
        ops.expert_bias_update_(bias, counts, state, num_ffn_experts=4, top_k=2, target_ffn_per_token=1.0,
                                backend=backend)
    assert not bias.any() and not state.any()
    controller = ExpertBiasController(4, 2, 2, 1.0, backend=backend)
    with pytest.raises(RuntimeError, match="counts must be >= 0"):
        controller.update(counts)
    assert controller.steps == 0


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("op,backend", OP_BACKENDS)
def test_every_op_compiles_fullgraph(op, backend, dynamic):
    """Dynamo traces every op on every backend without a graph break, static and dynamic shapes; the compiled call
    returns what the eager call returns."""
    torch._dynamo.reset()
    fn, args, kwargs = _op_inputs(op)
    want = fn(*args, **kwargs, backend=backend)
    got = torch.compile(lambda *a: fn(*a, **kwargs, backend=backend), fullgraph=True, dynamic=dynamic,
                        backend="aot_eager")(*args)
    for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, equal_nan=True)


DOUBLE_BACKWARD = {  # op -> position of the input differentiated twice in _op_inputs(op)
    "attention": 0, "qformer_cross_attention": 0, "patch_embed": 0, "moe_experts": 0, "moe_grouped_swiglu": 0,
}


@pytest.mark.parametrize("op", sorted(DOUBLE_BACKWARD))
def test_double_backward_fails_up_front_on_fused_kernels(op):
    """create_graph=True through a Triton kernel's backward raises a clear error at the first backward; the reference
    backend gives the second derivative."""
    if "triton" not in registered_ops()[op].available(CPU):
        pytest.skip("triton cannot run here")
    fn, args, kwargs = _op_inputs(op)
    x = args[DOUBLE_BACKWARD[op]].clone().requires_grad_()
    args = (x, *args[1:])
    out = fn(*args, **kwargs, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(fn(*args, **kwargs, backend="reference").square().sum(), x, create_graph=True)
    assert g.requires_grad


# ---- the same sweeps on a GPU (skipped without CUDA) ---------------------------------------------------------------

def _to_cuda(tree):
    return torch.utils._pytree.tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, tree)


GPU_OP_BACKENDS = [(op, b) for op in SAMPLED_OPS for b in registered_ops()[op].impls if b != "cpp"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,backend", GPU_OP_BACKENDS)
def test_cuda_autocast_does_not_change_an_op(op, backend, dtype):
    if backend not in registered_ops()[op].available(torch.device("cuda")):
        pytest.skip(f"{backend} cannot run on this GPU")
    fn, args, kwargs = _op_inputs(op)
    args, kwargs = _to_cuda(args), _to_cuda(kwargs)
    want = fn(*args, **kwargs, backend=backend)
    with torch.autocast("cuda", dtype):
        got = fn(*args, **kwargs, backend=backend)
    for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_modules_compile_with_inductor(name, dynamic):
    """On a card, every module compiles with Inductor (Triton backends, fullgraph) and matches eager."""
    torch._dynamo.reset()
    build, inputs, _ = MODELS[name]
    torch.manual_seed(0)
    model = build(None).cuda()
    if isinstance(model, ZeroComputeMoE):
        model.eval()
    x = _to_cuda(inputs())
    want = model(*x)
    got = torch.compile(model, fullgraph=True, dynamic=dynamic)(*x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("ids", ["valid", "invalid"])
def test_reference_experts_registered_backward_matches_autograd(ids):
    """Inside torch.compile the reference experts run as a registered op with a written-out backward: it equals
    autograd through the eager reference (float64), every gradient, with undispatched and zero-expert slots."""
    from mmkernels.kernels.reference.moe import moe_experts_reference, moe_experts_reference_backward

    g = _g(7)
    t, k, n, dm, di = 9, 3, 4, 6, 5
    topk = torch.randint(0, n + 2, (t, k), generator=g)
    if ids == "invalid":
        topk[0, 0], topk[3, 2], topk[5] = -1, 99, -1
    args = [torch.randn(t, dm, generator=g, dtype=torch.float64), topk,
            torch.rand(t, k, generator=g, dtype=torch.float64), torch.rand(t, generator=g, dtype=torch.float64),
            torch.randn(n, 2 * di, dm, generator=g, dtype=torch.float64),
            torch.randn(n, dm, di, generator=g, dtype=torch.float64)]
    leaves = [a.requires_grad_() for i, a in enumerate(args) if i != 1]
    out = moe_experts_reference(*args)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(out, leaves, grad)
    got = moe_experts_reference_backward(grad, *[a.detach() for a in args])
    for w, h in zip(want, got, strict=True):
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-12)


def test_compiled_zero_compute_moe_backward_on_the_reference():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = ZeroComputeMoE(16, 8, 4, 3, 24, backend={"moe_experts": "reference"})
    x = torch.randn(2, 5, 16, requires_grad=True)
    m(x).square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    torch.compile(m, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    got = [x.grad] + [p.grad for p in m.parameters()]
    for w, h in zip(want, got, strict=True):
        torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-6)


def test_accumulate_counts_op_passes_opcheck():
    from mmkernels.testing import run_opcheck

    run_opcheck(torch.ops.mmkernels.accumulate_counts_.default,
                (torch.zeros(6, dtype=torch.int64), torch.tensor([1, 0, 2, 3, 0, 1], dtype=torch.int32)))


@pytest.mark.parametrize("op", SAMPLED_OPS)
def test_float64_runs_on_the_reference_and_kernels_say_why_not(op):
    """Every op takes float64 on its reference backend (auto picks it); a kernel backend asked for float64 raises
    BackendError naming the dtype."""
    fn, args, kwargs = _op_inputs(op)
    to64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t  # noqa: E731
    keep32 = {"topk_weights", "zero_weight", "bias"}  # routing outputs and the selection bias stay fp32
    args64 = torch.utils._pytree.tree_map(to64, args)
    if op in ("moe_experts",):
        args64 = (args64[0], args[1], args64[2], args64[3])
    if op == "moe_unpermute":
        args64 = (args64[0], args[1], args[2])
    kwargs64 = {k: (val if k in keep32 else torch.utils._pytree.tree_map(to64, val)) for k, val in kwargs.items()}
    if op == "expert_bias_update_":
        pytest.skip("its state is float32 by definition")
    out = fn(*args64, **kwargs64)
    want = fn(*args, **kwargs)
    for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(out), strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g.float(), w, rtol=1e-4, atol=1e-5)
    for backend in registered_ops()[op].impls:
        if backend != "reference" and backend in registered_ops()[op].available(CPU):
            with pytest.raises(mmkernels.BackendError, match="float64"):
                fn(*args64, **kwargs64, backend=backend)


# ---- every op runs on the meta device (shape-only forwards) ---------------------------------------------------------

@pytest.mark.parametrize("op", SAMPLED_OPS)
def test_every_op_runs_on_the_meta_device(op):
    """Auto backend on meta tensors: the CPU reference's output shapes and dtypes (and a backward), no data-dependent
    op without a meta path (finding 11: ``bincount`` in the router reference; the experts' and split ops' loops)."""
    fn, args, kwargs = _op_inputs(op)
    want = fn(*args, **kwargs, backend="reference")
    to_meta = lambda x: x.detach().to("meta").requires_grad_(x.requires_grad or x.is_floating_point())  # noqa: E731
    meta_args, meta_kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, to_meta, (args, kwargs))
    if op == "expert_bias_update_":  # the helper builds its own tensors: run the op itself on meta ones
        bias, state = torch.zeros(12, device="meta"), torch.zeros(2, 8, device="meta")
        ops.expert_bias_update_(bias, torch.zeros(12, dtype=torch.int32, device="meta"), state, num_ffn_experts=8,
                                top_k=3, target_ffn_per_token=2.0, kp=0.1, ki=0.3)
        return
    with torch.no_grad():
        got = fn(*meta_args, **meta_kwargs)
    want_leaves, got_leaves = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
    assert [(tuple(w.shape), w.dtype) for w in want_leaves] == [(tuple(g.shape), g.dtype) for g in got_leaves]
    assert all(g.is_meta for g in got_leaves)
    out = fn(*meta_args, **meta_kwargs)
    first = torch.utils._pytree.tree_leaves(out)[0]
    if first.requires_grad:
        first.float().sum().backward()
