"""Every nn.Module that mmkernels exports survives what training code does to a module.

The sweep enumerates the ``nn.Module`` subclasses exported by ``mmkernels.nn`` and ``mmkernels.models``; a new export
without a case here fails ``test_every_exported_module_has_a_case``. For each: ``.to()``, ``.cpu()``, ``.float()``,
``.half()``, ``.bfloat16()``, ``.double()``, ``.share_memory()``, ``.to_empty()`` from the meta device, inside an
``nn.Sequential``, ``copy.deepcopy``, a ``state_dict`` round trip with ``load_state_dict(strict=True)``, ``.cuda()``
on a GPU, and ``torch.compile(fullgraph=True)`` with ``dynamic`` False and True. State documented as float32
(routers, selection biases, balancer state) stays float32 through every cast.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import mmkernels.models
import mmkernels.nn
from mmkernels.models.qformer import QFormerConfig
from mmkernels.models.vit import ViTConfig


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], tuple]  # positional inputs in the given float dtype
    call: Callable[[nn.Module, tuple], torch.Tensor] = lambda m, args: m(*args)
    fp32_state: tuple[str, ...] = ()  # parameter/buffer names that stay float32 whatever the module dtype
    low_precision_forward: bool = True  # can run forward in fp16/bf16 on the CPU backends
    extra: dict = field(default_factory=dict)


def _randn(*shape, dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g).to(dtype)


def _counts(dtype):
    return (torch.tensor([5, 1, 0, 2, 7, 3, 1, 1, 4, 0, 2, 2], dtype=torch.int32),)


def _controller_call(m, args):
    m.update(args[0])
    return torch.cat([m.bias, m.state.flatten()])


def _moe_fp32(*prefixes: str) -> tuple[str, ...]:
    return tuple(p + n for p in prefixes for n in ("router.weight", "balancer.bias", "balancer.state"))


TINY_VIT = ViTConfig(image_size=(12, 8), patch_size=4, hidden_size=24, num_layers=2, num_heads=3, mlp_dim=40)
TINY_QFORMER = QFormerConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                             encoder_hidden_size=20, hidden_dropout_prob=0.0)

def _gated_block():
    m = mmkernels.models.GatedCrossAttentionBlock(16, dim_head=4, heads=3, ff_mult=1.5)
    with torch.no_grad():  # gates open (they start at 0: the attention would not reach the output)
        m.attn_gate.fill_(0.6)
        m.ff_gate.fill_(-0.3)
    return m


_MEDIA_LOCATIONS = torch.tensor([[False, True, False, False, True, False], [True, False, False, False, False, False]])

CASES: dict[str, Case] = {
    "Attention": Case(lambda: mmkernels.nn.Attention(16, 4, num_kv_heads=2, softmax_scale=0.3, causal=True),
                      lambda dt: (_randn(2, 5, 16, dtype=dt),)),
    "QFormerCrossAttention": Case(lambda: mmkernels.nn.QFormerCrossAttention(16, 2, 12, softmax_scale=0.4),
                                  lambda dt: (_randn(2, 3, 16, dtype=dt), _randn(2, 7, 12, dtype=dt))),
    "PatchEmbed": Case(lambda: mmkernels.nn.PatchEmbed((8, 12), 4, 3, 16),
                       lambda dt: (_randn(2, 3, 8, 12, dtype=dt),)),
    "SwiGLUExperts": Case(
        lambda: mmkernels.nn.SwiGLUExperts(3, 16, 20),
        lambda dt: (_randn(5, 16, dtype=dt),
                    (torch.tensor([[0, 2], [1, 4], [2, 2], [0, 1], [3, 0]], dtype=torch.int32),
                     torch.rand(5, 2, generator=torch.Generator().manual_seed(2)),
                     torch.rand(5, generator=torch.Generator().manual_seed(3))))),
    "ZeroComputeMoE": Case(lambda: mmkernels.nn.ZeroComputeMoE(16, 8, 4, 4, 32, routed_scaling_factor=2.5,
                                                               target_ffn_per_token=3.0),
                           lambda dt: (_randn(2, 5, 16, dtype=dt),),
                           fp32_state=("router.weight", "balancer.bias", "balancer.state")),
    "MultiHeadLatentAttention": Case(
        lambda: mmkernels.nn.MultiHeadLatentAttention(16, 2, q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4,
                                                      qk_rope_head_dim=2, v_head_dim=3, attention_bias=True),
        lambda dt: (_randn(2, 5, 16, dtype=dt),)),
    "ExpertBiasController": Case(lambda: mmkernels.nn.ExpertBiasController(8, 4, 4, 3.0, kp=0.01, ki=0.1),
                                 _counts, call=_controller_call, fp32_state=("bias", "state")),
    "ViT": Case(lambda: mmkernels.models.ViT(TINY_VIT), lambda dt: (_randn(2, 3, 12, 8, dtype=dt),)),
    "ScMoEDecoder": Case(lambda: mmkernels.models.ScMoEDecoder(mmkernels.models.ScMoEConfig.preset("tiny")).eval(),
                         lambda dt: (torch.tensor([[1, 5, 9, 2, 7], [3, 3, 0, 127, 64]]),),
                         fp32_state=_moe_fp32("layers.0.mlp.", "layers.1.mlp.")),
    "VisionLanguageModel": Case(
        lambda: mmkernels.models.VisionLanguageModel(mmkernels.models.VLMConfig.preset("tiny")).eval(),
        lambda dt: (_randn(2, 3, 16, 16, dtype=dt), torch.tensor([[1, 5, 9, 2], [3, 3, 0, 127]])),
        fp32_state=_moe_fp32("decoder.layers.0.mlp.", "decoder.layers.1.mlp.")),
    "ScMoEDecoderLayer": Case(lambda: mmkernels.models.ScMoEDecoderLayer(mmkernels.models.ScMoEConfig.preset("tiny")),
                              lambda dt: (_randn(2, 5, 32, dtype=dt),),
                              fp32_state=("mlp.router.weight", "mlp.balancer.bias", "mlp.balancer.state")),
    "PerceiverResampler": Case(lambda: mmkernels.models.PerceiverResampler(16, 2, dim_head=4, heads=3, num_latents=3,
                                                                           num_media_embeds=2, ff_mult=1.5),
                               lambda dt: (_randn(2, 2, 5, 16, dtype=dt),)),
    "GatedCrossAttentionBlock": Case(_gated_block, lambda dt: (_randn(2, 6, 16, dtype=dt),
                                                               _randn(2, 2, 3, 16, dtype=dt), _MEDIA_LOCATIONS)),
    "QFormer": Case(lambda: mmkernels.models.QFormer(TINY_QFORMER).eval(),
                    lambda dt: (_randn(2, 4, 24, dtype=dt), _randn(2, 9, 20, dtype=dt))),
}


def _exported_modules() -> set[str]:
    names = set()
    for pkg in (mmkernels.nn, mmkernels.models):
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isclass(obj) and issubclass(obj, nn.Module):
                names.add(name)
    return names


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name].build()


def _run(name: str, m: nn.Module, dtype=torch.float32) -> torch.Tensor:
    case = CASES[name]
    return case.call(m, case.inputs(dtype))


def _float_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_floating_point()}


def _check_dtypes(name: str, m: nn.Module, dtype: torch.dtype) -> None:
    pinned = set(CASES[name].fp32_state)
    for n, t in _float_tensors(m).items():
        want = torch.float32 if n in pinned else dtype
        assert t.dtype == want, f"{name}.{n}: {t.dtype} after casting the module to {dtype}, expected {want}"


def test_every_exported_module_has_a_case():
    assert _exported_modules() == set(CASES), "add a Case for each exported nn.Module (and drop removed ones)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_moves_and_casts(name):
    m = _build(name)
    expected = _run(name, copy.deepcopy(m))
    for move in (lambda x: x.to("cpu"), lambda x: x.cpu(), lambda x: x.float(), lambda x: x.to(torch.float32),
                 lambda x: x.share_memory(), lambda x: x.to(device="cpu", dtype=torch.float32)):
        moved = move(copy.deepcopy(m))
        assert isinstance(moved, type(m))
        torch.testing.assert_close(_run(name, moved), expected, rtol=0, atol=0)
    seq = nn.Sequential(copy.deepcopy(m)).to("cpu").float()
    torch.testing.assert_close(_run(name, seq[0]), expected, rtol=0, atol=0)
    clone = copy.deepcopy(m)
    torch.testing.assert_close(_run(name, clone), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dtype_casts_keep_fp32_state(name, dtype):
    m = _build(name)
    reference = {n: t.clone() for n, t in _float_tensors(m).items()}
    cast = {torch.float16: nn.Module.half, torch.bfloat16: nn.Module.bfloat16, torch.float64: nn.Module.double}[dtype]
    for converted in (cast(copy.deepcopy(m)), copy.deepcopy(m).to(dtype), nn.Sequential(copy.deepcopy(m)).to(dtype)[0]):
        _check_dtypes(name, converted, dtype)
        for n in CASES[name].fp32_state:  # not a float32 copy of a rounded value: the values themselves
            torch.testing.assert_close(converted.get_parameter(n) if n in dict(converted.named_parameters())
                                       else converted.get_buffer(n), reference[n], rtol=0, atol=0)
    back = cast(copy.deepcopy(m)).float()
    _check_dtypes(name, back, torch.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_low_precision_forward(name):
    """After .half(), a half input runs and stays close to the fp32 module (fp32 state kept fp32)."""
    m = _build(name)
    expected = _run(name, copy.deepcopy(m))
    half = copy.deepcopy(m).half()
    got = _run(name, half, torch.float16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_empty_from_meta_then_load(name):
    src = _build(name)
    expected = _run(name, copy.deepcopy(src))
    with torch.device("meta"):
        m = _build(name, seed=1)
    m = m.to_empty(device="cpu")
    _check_dtypes(name, m, torch.float32)
    m.load_state_dict(src.state_dict(), strict=True)
    torch.testing.assert_close(_run(name, m), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip(name):
    src = _build(name)
    if name == "ExpertBiasController":  # a controller with history: bias, state and the step counter travel
        _run(name, src)
    expected = _run(name, copy.deepcopy(src))
    dst = _build(name, seed=7)
    dst.load_state_dict(src.state_dict(), strict=True)
    torch.testing.assert_close(_run(name, dst), expected, rtol=0, atol=0)
    assert set(dst.state_dict()) == set(src.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_and_back(name):
    m = _build(name)
    expected = _run(name, copy.deepcopy(m))
    gpu = copy.deepcopy(m).cuda()
    case = CASES[name]
    got = case.call(gpu, tuple(a.cuda() if isinstance(a, torch.Tensor) else
                               tuple(t.cuda() for t in a) for a in case.inputs(torch.float32)))
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-3, atol=2e-3)
    _check_dtypes(name, gpu.half(), torch.float16)
    torch.testing.assert_close(_run(name, gpu.cpu().float()), _run(name, copy.deepcopy(m).half().float()))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiles_fullgraph(name, dynamic):
    """Dynamo traces the module without a graph break (backend="eager": tracing is what breaks; the compiled-kernel
    path is covered per op with aot_eager/inductor)."""
    torch._dynamo.reset()
    m = _build(name)
    expected = _run(name, copy.deepcopy(m))
    case = CASES[name]
    compiled = torch.compile(lambda *args: case.call(m, args), fullgraph=True, dynamic=dynamic, backend="eager")
    torch.testing.assert_close(compiled(*case.inputs(torch.float32)), expected, rtol=1e-6, atol=1e-6)


# ---- serialisation: every module survives pickle, torch.save/load, deepcopy and safetensors (finding 4) -------------

def _with_history(name: str, seed: int = 0) -> nn.Module:
    """A module with state beyond its init: a controller or MoE block that has stepped (biases, PID state and the
    step counter all non-trivial), so a round trip that drops any of it shows."""
    m = _build(name, seed)
    for sub in m.modules():
        if isinstance(sub, mmkernels.nn.ExpertBiasController):
            sub.kp = 0.01 if sub.kp == 0.0 else sub.kp
            sub.update(torch.tensor([5, 1, 0, 2, 7, 3, 1, 1, 4, 0, 2, 2][:sub.num_experts] +
                                    [3] * max(0, sub.num_experts - 12), dtype=torch.int32))
            sub.update(torch.arange(sub.num_experts, dtype=torch.int32) % 5)
    return m


def _assert_state_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, torch.Tensor), f"{k}: {type(g).__name__} in the state dict"
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.view(-1).view(torch.uint8) if g.numel() else g, w.view(-1).view(torch.uint8)
                           if w.numel() else w), k


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_holds_only_tensors(name):
    sd = _with_history(name).state_dict()
    bad = {k: type(t).__name__ for k, t in sd.items() if not isinstance(t, torch.Tensor)}
    assert not bad, f"{name}: non-tensor state dict entries {bad} (safetensors and tensor-only tooling refuse them)"
    {k: t.clone() for k, t in sd.items()}  # what users do with a state dict


@pytest.mark.parametrize("name", sorted(CASES))
def test_safetensors_round_trip(name, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = _with_history(name)
    expected = _run(name, copy.deepcopy(src))
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: t.contiguous() for k, t in src.state_dict().items()}, str(path))
    loaded = safetensors_torch.load_file(str(path))
    _assert_state_equal(loaded, src.state_dict())
    dst = _build(name, seed=7)
    dst.load_state_dict(loaded, strict=True)
    _assert_state_equal(dst.state_dict(), src.state_dict())
    torch.testing.assert_close(_run(name, dst), expected, rtol=0, atol=0)
    # and the model-level helper (shared tensors handled, as save_pretrained does)
    safetensors_torch.save_model(src, str(tmp_path / "model2.safetensors"))
    dst2 = _build(name, seed=9)
    missing, unexpected = safetensors_torch.load_model(dst2, str(tmp_path / "model2.safetensors"), strict=True)
    assert not missing and not unexpected
    torch.testing.assert_close(_run(name, dst2), expected, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_module_round_trip(name, how, tmp_path):
    import pickle

    src = _with_history(name)
    expected = _run(name, copy.deepcopy(src))
    if how == "torch.save":
        torch.save(src, tmp_path / "m.pt")
        dst = torch.load(tmp_path / "m.pt", weights_only=False)
    elif how == "pickle":
        dst = pickle.loads(pickle.dumps(src))
    else:
        dst = copy.deepcopy(src)
    assert type(dst) is type(src)
    _assert_state_equal(dst.state_dict(), src.state_dict())
    torch.testing.assert_close(_run(name, dst), expected, rtol=0, atol=0)
    _run(name, src)  # the same step on the original: both end in the same state (counters and buffers included)
    _assert_state_equal(dst.state_dict(), src.state_dict())


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_loads_with_weights_only(name, tmp_path):
    """``torch.load(weights_only=True)`` (the default) reads a saved state dict: nothing in it needs pickle."""
    src = _with_history(name)
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    dst = _build(name, seed=5)
    dst.load_state_dict(loaded, strict=True)
    _assert_state_equal(dst.state_dict(), src.state_dict())


# ---- shape-only forwards on the meta device (finding 11: no data-dependent op without a meta path) -------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_on_meta_device(name):
    """Built and run on the meta device (how frameworks size activations before materialising): same shapes and
    dtypes as on CPU, and the backward runs."""
    want = _run(name, _build(name))
    with torch.device("meta"):
        m = _build(name)
        case = CASES[name]
        args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else tuple(t.to("meta") for t in a)
                     for a in case.inputs(torch.float32))
        got = case.call(m, args)
    assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype
    if got.requires_grad:
        got.sum().backward()
