"""Every value a caller hands us is checked, with an error naming the caller's argument, on every backend.

Finding 10's kind. For each public function of ``mmkernels.ops`` a valid call is written out once (every argument by
name), as ``SAMPLES`` in the op's own ``tests/ops/test_<name>.py`` (collected by ``tests/op_samples.py``, so a new op
needs no edit here); the sweep then replaces one argument at a time with a bad value of its kind and requires a
``TypeError`` or ``ValueError`` whose message names that argument (never a raw ``RuntimeError``/``IndexError``/
``AttributeError`` from deep inside, never a silent answer), on every backend that runs here and on auto:

- a tensor argument: a Python list, the wrong dtype family, three leading dimensions too many (one or two can be a
  documented layout, e.g. ``pos_embed`` [1, L, D]), another device (meta);
- an int: a float, a bool, a string, a negative number;
- a float: a string, a tensor (a host sync), NaN, inf;
- a bool: an int, a string;
- a choice string: an unknown name, an int.

Arguments with a right answer for an odd value (for instance out-of-range routing ids or slots, which are "not
dispatched") are covered by their op's tests. The module/model half: every constructor rejects bad values naming its
parameter, and every forward rejects bad inputs naming the module and its argument (a half-precision input to a
float32 module says ``"ZeroComputeMoE: input x is float16 but the module's weights are float32"``, not an inner op's
``w_gate_up``). Every bool switch of the rest of the public API (modules, configs, ``patch``, the library's own
switches, the bench API), found by signature, rejects a string, an int and a float.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable

import op_samples  # (tests/op_samples.py: every op's valid call, from its own test file)
import pytest
import torch

import mmkernels
from mmkernels import ops
from mmkernels._backends import registered_ops
from mmkernels.models import (
    GatedCrossAttentionBlock,
    PerceiverResampler,
    QFormer,
    ScMoEConfig,
    ScMoEDecoder,
    ScMoEDecoderLayer,
    VisionLanguageModel,
    ViT,
    VLMConfig,
)
from mmkernels.models.qformer import QFormerConfig
from mmkernels.models.vit import ViTConfig
from mmkernels.nn import (
    Attention,
    ExpertBiasController,
    PatchEmbed,
    QFormerCrossAttention,
    SwiGLUExperts,
    ZeroComputeMoE,
)

CPU = torch.device("cpu")


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _routing():
    return ops.moe_route(_r(9, 7, seed=4), top_k=2, num_ffn_experts=5, backend="reference")


def _good_args(op: str) -> dict:
    """One valid call of ``op`` (an op or ``op[variant]``), every argument by name: the ``SAMPLES`` its test file
    ``tests/ops/test_<name>.py`` declares (tests/op_samples.py collects them)."""
    return op_samples.good_args(op)


CHOICES = {"scoring", "mode"}  # string arguments with a fixed set of values


def _bad_values(name: str, good) -> list[tuple[str, object]]:
    """(label, value) pairs that are wrong for an argument whose valid value is ``good``."""
    if isinstance(good, torch.Tensor):
        wrong_dtype = torch.int64 if good.is_floating_point() else torch.float32
        return [("a list", good.tolist()), (f"dtype {wrong_dtype}", good.to(wrong_dtype)),
                ("three dims too many", good[None, None, None]), ("on meta", good.to("meta"))]
    if isinstance(good, bool):
        return [("int 1", 1), ("string", "yes")]
    if isinstance(good, int):
        return [("float", 2.5), ("bool", True), ("string", "3"), ("negative", -1)]
    if isinstance(good, float):
        return [("string", "0.5"), ("tensor", torch.tensor(good)), ("nan", float("nan")), ("inf", float("inf"))]
    if isinstance(good, str) and name in CHOICES:
        return [("unknown name", "bogus"), ("int", 3)]
    return []


# every declared call: each op with a sample, then the variants (a second valid call of an op whose other form has
# arguments of its own, e.g. "attention[varlen]"); an op without a sample fails test_every_public_op_has_a_valid_call
CALLS = op_samples.calls()
_op = op_samples.op_of


def _cases():
    out = []
    for op in CALLS:
        good = _good_args(op)
        for name, value in good.items():
            for label, _ in _bad_values(name, value):
                out.append(pytest.param(op, name, label, id=f"{op}-{name}-{label}"))
    return out


def _call(op: str, kwargs: dict, backend):
    return getattr(ops, _op(op))(**kwargs, backend=backend)


def test_every_public_op_has_a_valid_call():
    public = {n for n in ops.__all__ if callable(getattr(ops, n)) and not inspect.isclass(getattr(ops, n))}
    assert public == set(registered_ops()), "every public op is registered (and swept here)"
    op_samples.check()
    for op in CALLS:
        for backend in [None, *registered_ops()[_op(op)].available(CPU)]:
            _call(op, _good_args(op), backend)


@pytest.mark.parametrize("op,name,label", _cases())
def test_bad_argument_is_an_error_naming_it(op, name, label):
    bad = dict(_bad_values(name, _good_args(op)[name]))[label]
    for backend in [None, *registered_ops()[_op(op)].available(CPU)]:
        kwargs = _good_args(op)
        kwargs[name] = bad
        with pytest.raises((TypeError, ValueError)) as info:
            _call(op, kwargs, backend)
        assert re.search(rf"\b{name}\b", str(info.value)), (
            f"{op}(backend={backend!r}) with {name} = {label}: the error does not name {name!r}: {info.value!r}")
        assert str(info.value).startswith(f"{_op(op)}:"), f"the error does not name the op: {info.value!r}"
        if label == "on meta":  # the odd one out is named as such, not only listed among the others
            assert f"{name} is on meta" in str(info.value) or f"{name} must be on" in str(info.value), info.value


# The composite arguments: a MoERouting / MoEPermutation whose pieces are wrong names the piece.
COMPOSITE = [
    ("moe_experts", "routing", lambda r: r._replace(topk_ids=r.topk_ids.float()), "topk_ids"),
    ("moe_experts", "routing", lambda r: r._replace(topk_weights=r.topk_weights.double()), "topk_weights"),
    ("moe_experts", "routing", lambda r: r._replace(zero_weight=r.zero_weight[:-1]), "zero_weight"),
    ("moe_experts", "routing", lambda r: tuple(r)[:2], "routing"),
    ("moe_experts", "routing", lambda r: r.topk_ids, "routing"),
    ("moe_unpermute", "permutation", lambda p: p._replace(slots=p.slots.float()), "slots"),
    ("moe_unpermute", "permutation", lambda p: p._replace(offsets=p.offsets[None]), "offsets"),
    ("moe_unpermute", "permutation", lambda p: p._replace(slots=p.slots[:-1]), "slots"),
    ("moe_unpermute", "permutation", lambda p: p.slots, "permutation"),
]


@pytest.mark.parametrize("op,arg,change,name", COMPOSITE, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_piece_of_a_composite_argument_names_the_piece(op, arg, change, name):
    for backend in [None, *registered_ops()[op].available(CPU)]:
        kwargs = _good_args(op)
        kwargs[arg] = change(kwargs[arg])
        with pytest.raises((TypeError, ValueError), match=rf"^{op}: .*\b{name}\b"):
            _call(op, kwargs, backend)


@pytest.mark.parametrize("arg,bad", [("num_local_experts", 2**40), ("num_local_experts", 2**31 - 2),
                                     ("num_local_experts", 2**30), ("num_local_experts", 2**24 + 1),
                                     ("expert_offset", 2**70)])
def test_permute_sizes_past_the_plan_are_errors(arg, bad):
    """Too large for the int32 plan or the int64 id arithmetic: a ValueError naming the argument, not an
    OverflowError from torch (or a reference loop over 2**40 experts)."""
    for backend in [None, *registered_ops()["moe_permute"].available(CPU)]:
        with pytest.raises(ValueError, match=rf"^moe_permute: {arg} must be in"):
            _call("moe_permute", _good_args("moe_permute") | {arg: bad}, backend)


def test_permute_at_the_expert_cap_agrees_on_every_backend():
    """num_local_experts = 2**24 (the cap) still runs on every backend, in seconds (the reference sorts the slots
    instead of a pass per expert: before, 150 s here), and the backends agree exactly."""
    kwargs = _good_args("moe_permute") | {"num_local_experts": 2**24}
    outs = [_call("moe_permute", kwargs, b) for b in registered_ops()["moe_permute"].available(CPU)]
    for rows, perm in outs[1:]:
        assert torch.equal(rows, outs[0][0]) and torch.equal(perm.slots, outs[0][1].slots)
        assert torch.equal(perm.offsets, outs[0][1].offsets)
    assert outs[0][1].offsets.shape == (2**24 + 1,) and int(outs[0][1].offsets[-1]) > 0


def test_unknown_backend_names_the_op():
    for op in op_samples.ops():
        with pytest.raises(mmkernels.BackendError, match=rf"^{op}: backend='bogus' is not implemented"):
            _call(op, _good_args(op), "bogus")


# ---- modules and models: constructors and forwards ------------------------------------------------------------------

TINY_VIT = ViTConfig(image_size=8, patch_size=4, hidden_size=12, num_layers=1, num_heads=2, mlp_dim=16)
TINY_QF = QFormerConfig(hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        encoder_hidden_size=10, hidden_dropout_prob=0.0)
H = torch.float16

# name: (build, [(argument, call(module) that passes a bad value for it, error type), ...])
MODULE_INPUTS: dict[str, tuple[Callable, list[tuple[str, Callable, type]]]] = {
    "ZeroComputeMoE": (lambda: ZeroComputeMoE(12, 4, 2, 2, 8), [
        ("x", lambda m: m(_r(3, 12).to(H)), TypeError),
        ("x", lambda m: m(_r(3, 12).double()), TypeError),
        ("x", lambda m: m(torch.ones(3, 12, dtype=torch.long)), TypeError),
        ("x", lambda m: m(_r(3, 12).to("meta")), ValueError),
        ("x", lambda m: m(_r(3, 11)), ValueError),
        ("x", lambda m: m([0.0] * 12), TypeError),
        ("padding_mask", lambda m: m(_r(3, 12), padding_mask=torch.zeros(3)), TypeError),
        ("padding_mask", lambda m: m(_r(3, 12), padding_mask=torch.zeros(4, dtype=torch.bool)), ValueError),
        ("return_router_logits", lambda m: m(_r(3, 12), return_router_logits=1), TypeError),
    ]),
    "SwiGLUExperts": (lambda: SwiGLUExperts(5, 12, 6), [
        ("hidden", lambda m: m(_r(9, 12).to(H), _routing()), TypeError),
        ("hidden", lambda m: m(_r(9, 12).to("meta"), _routing()), ValueError),
        ("routing", lambda m: m(_r(9, 12), _routing().topk_ids), TypeError),
    ]),
    "Attention": (lambda: Attention(16, 4), [
        ("x", lambda m: m(_r(2, 5, 16).to(H)), TypeError),
        ("x", lambda m: m(_r(2, 5, 16).to("meta")), ValueError),
        ("x", lambda m: m(_r(5, 16)), ValueError),
        ("x", lambda m: m(_r(2, 5, 15)), ValueError),
    ]),
    "Attention(cross)": (lambda: Attention(16, 4, cross=True, kv_dim=10), [
        ("context", lambda m: m(_r(2, 5, 16), _r(2, 3, 10).to(H)), TypeError),
        ("context", lambda m: m(_r(2, 5, 16), _r(2, 3, 9)), ValueError),
    ]),
    "QFormerCrossAttention": (lambda: QFormerCrossAttention(16, 2, 12), [
        ("hidden_states", lambda m: m(_r(2, 3, 16).to(H), _r(2, 7, 12)), TypeError),
        ("encoder_hidden_states", lambda m: m(_r(2, 3, 16), _r(2, 7, 12).to(H)), TypeError),
        ("encoder_hidden_states", lambda m: m(_r(2, 3, 16), _r(2, 7, 11)), ValueError),
    ]),
    "PatchEmbed": (lambda: PatchEmbed(8, 4, 3, 16), [
        ("pixels", lambda m: m(_r(1, 2, 8, 8)), ValueError),
        ("pixels", lambda m: m(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TypeError),
        ("pixels", lambda m: m(_r(1, 3, 8, 8).to("meta")), ValueError),
        ("pixels", lambda m: m(_r(3, 8, 8)), ValueError),
    ]),
    "MultiHeadLatentAttention": (lambda: mmkernels.nn.MultiHeadLatentAttention(
            16, 2, q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4), [
        ("hidden_states", lambda m: m(_r(2, 5, 16).to(H)), TypeError),
        ("hidden_states", lambda m: m(_r(2, 5, 16).to("meta")), ValueError),
        ("hidden_states", lambda m: m(_r(2, 5, 15)), ValueError),
        ("padding_mask", lambda m: m(_r(2, 5, 16), padding_mask=torch.zeros(2, 5)), TypeError),
    ]),
    "ExpertBiasController": (lambda: ExpertBiasController(8, 4, 4, 3.0), [
        ("counts", lambda m: m.update(torch.ones(12)), TypeError),
        ("counts", lambda m: m.update(torch.ones(11, dtype=torch.int32)), ValueError),
    ]),
    "ViT": (lambda: ViT(TINY_VIT), [
        ("pixels", lambda m: m(_r(3, 8, 8)), ValueError),
        ("pixels", lambda m: m(_r(1, 2, 8, 8)), ValueError),
    ]),
    "QFormer": (lambda: QFormer(TINY_QF), [
        ("image_attention_mask", lambda m: m(_r(2, 3, 12), _r(2, 5, 10), torch.ones(2, 4, dtype=torch.bool)),
         ValueError),
        ("image_embeds", lambda m: m(_r(2, 3, 12), _r(2, 5, 9)), ValueError),
        ("image_embeds", lambda m: m(_r(2, 3, 12), torch.ones(2, 5, 10, dtype=torch.long)), TypeError),
        ("query_embeds", lambda m: m(_r(2, 3, 12).to("meta"), _r(2, 5, 10)), ValueError),
    ]),
    "PerceiverResampler": (lambda: PerceiverResampler(16, 1, dim_head=4, heads=2, num_latents=3, num_media_embeds=2), [
        ("x", lambda m: m(_r(2, 2, 5, 16).to(H)), TypeError),
        ("x", lambda m: m(_r(2, 2, 5, 16).to("meta")), ValueError),
        ("x", lambda m: m(_r(16)), ValueError),
        ("x", lambda m: m(_r(2, 2, 5, 15)), ValueError),
        ("num_media_embeds", lambda m: m(_r(2, 3, 5, 16)), ValueError),
    ]),
    "GatedCrossAttentionBlock": (lambda: GatedCrossAttentionBlock(16, dim_head=4, heads=2), [
        ("x", lambda m: m(_r(2, 5, 16).to(H), _r(2, 1, 3, 16)), TypeError),
        ("x", lambda m: m(_r(5, 16), _r(2, 1, 3, 16)), ValueError),
        ("media", lambda m: m(_r(2, 5, 16), _r(2, 1, 3, 16).to(H)), TypeError),
        ("media", lambda m: m(_r(2, 5, 16), _r(2, 3, 16)), ValueError),
        ("media_locations", lambda m: m(_r(2, 5, 16), _r(2, 1, 3, 16), torch.ones(2, 5)), TypeError),
        ("media_locations", lambda m: m(_r(2, 5, 16), _r(2, 1, 3, 16), torch.ones(2, 6, dtype=torch.bool)),
         ValueError),
    ]),
    "ScMoEDecoderLayer": (lambda: ScMoEDecoderLayer(ScMoEConfig.preset("tiny")), [
        ("hidden", lambda m: m(_r(1, 5, 32).to(H)), TypeError),
        ("hidden", lambda m: m(_r(5, 32)), ValueError),
    ]),
    "ScMoEDecoder": (lambda: ScMoEDecoder(ScMoEConfig.preset("tiny")), [
        ("input_ids", lambda m: m(torch.zeros(1, 5)), TypeError),
        ("input_ids", lambda m: m(torch.full((1, 5), 10**6)), ValueError),
        ("inputs_embeds", lambda m: m(inputs_embeds=_r(1, 5, 32).to(H)), TypeError),
    ]),
    "VisionLanguageModel": (lambda: VisionLanguageModel("tiny"), [
        ("input_ids", lambda m: m(_r(1, 3, 16, 16), torch.zeros(1, 4)), TypeError),
        ("pixel_values", lambda m: m(_r(3, 16, 16), torch.zeros(1, 4, dtype=torch.long)), ValueError),
        ("max_new_tokens", lambda m: m.generate(_r(1, 3, 16, 16), torch.zeros(1, 4, dtype=torch.long), -1),
         ValueError),
    ]),
}


def _module_name(key: str) -> str:
    return key.split("(")[0]


@pytest.mark.parametrize("key,arg,call,error", [(k, *c) for k, (_, cs) in MODULE_INPUTS.items() for c in cs],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_module_forward_errors_name_the_module_and_its_argument(key, arg, call, error):
    torch.manual_seed(0)
    m = MODULE_INPUTS[key][0]()
    with pytest.raises(error, match=rf"^{_module_name(key)}(\.\w+)?: .*\b{arg}\b"):
        call(m)


def test_every_exported_module_has_forward_cases():
    names = {_module_name(k) for k in MODULE_INPUTS}
    for pkg in (mmkernels.nn, mmkernels.models):
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
                assert name in names, f"add forward cases for {name}"


def test_half_input_to_a_float32_moe_names_the_module_argument():
    """The finding's example, word for word: not ``moe_experts: w_gate_up must be float16``."""
    with pytest.raises(TypeError, match=r"^ZeroComputeMoE: input x is float16 but the module's weights are float32"):
        ZeroComputeMoE(12, 4, 2, 2, 8)(_r(3, 12).to(H))


def test_autocast_still_takes_half_inputs():
    """The dtype check steps aside under autocast (the module casts per op, as nn.Linear does)."""
    m = ZeroComputeMoE(12, 4, 2, 2, 8)
    with torch.autocast("cpu", torch.bfloat16):
        y = m(_r(3, 12).to(torch.bfloat16))
    assert y.shape == (3, 12)


# Constructors: every keyword with a bad value of its kind names itself (the integer arguments are swept in
# tests/test_usage_sweeps.py; here floats, bools, strings and objects).
CONSTRUCTORS = [
    (ZeroComputeMoE, dict(hidden_size=12, num_ffn_experts=4, num_zero_experts=2, top_k=2, expert_intermediate_size=8),
     [("routed_scaling_factor", float("nan"), ValueError), ("routed_scaling_factor", "2", TypeError),
      ("target_ffn_per_token", 5.0, ValueError), ("target_ffn_per_token", float("inf"), ValueError),
      ("scoring", "relu", ValueError), ("renormalize", 1, TypeError), ("backend", "bogus", mmkernels.BackendError)]),
    (ExpertBiasController, dict(num_ffn_experts=8, num_zero_experts=4, top_k=4, target_ffn_per_token=3.0),
     [("kp", float("nan"), ValueError), ("ki", "0.1", TypeError), ("kd", 1e39, ValueError),
      ("max_abs", -1.0, ValueError), ("max_abs", 1e39, ValueError), ("mode", "integral", ValueError),
      ("target_ffn_per_token", -0.5, ValueError)]),
    (Attention, dict(dim=16, num_heads=4),
     [("softmax_scale", float("nan"), ValueError), ("dropout", 1.5, ValueError), ("backend", "bogus",
                                                                                  mmkernels.BackendError)]),
    (PatchEmbed, dict(image_size=8, patch_size=4, in_channels=3, embed_dim=16),
     [("backend", "bogus", mmkernels.BackendError)]),
    (ViT, dict(config=TINY_VIT), [("config", {}, TypeError), ("config", "vit_nonexistent", ValueError)]),
    (QFormer, dict(config=TINY_QF), [("config", {}, TypeError)]),
    (PerceiverResampler, dict(dim=16, depth=1), [("ff_mult", "4", TypeError), ("ff_mult", 0.01, ValueError),
                                                 ("ff_mult", float("inf"), ValueError),
                                                 ("backend", "bogus", mmkernels.BackendError)]),
    (GatedCrossAttentionBlock, dict(dim=16), [("ff_mult", float("nan"), ValueError),
                                              ("only_attend_immediate_media", 1, TypeError),
                                              ("backend", "bogus", mmkernels.BackendError)]),
    (ScMoEDecoder, dict(config=ScMoEConfig.preset("tiny")), [("config", {}, TypeError)]),
    (ScMoEDecoderLayer, dict(config=ScMoEConfig.preset("tiny")), [("config", {}, TypeError)]),
    (VisionLanguageModel, dict(config="tiny"), [("config", {}, TypeError), ("config", None, TypeError),
                                                ("config", "huge", ValueError)]),
    (VLMConfig, dict(VLMConfig.preset("tiny").__dict__),
     [("decoder", {}, TypeError), ("vision", {}, TypeError), ("qformer", None, TypeError),
      ("num_query_tokens", 0, ValueError)]),
]


@pytest.mark.parametrize("cls,good,arg,bad,error",
                         [(c, g, *b) for c, g, bads in CONSTRUCTORS for b in bads],
                         ids=lambda x: getattr(x, "__name__", None) or (x if isinstance(x, str) else ""))
def test_constructor_errors_name_the_parameter(cls, good, arg, bad, error):
    cls(**good)
    with pytest.raises(error, match=rf"\b{arg}\b|preset"):
        cls(**(good | {arg: bad}))


# ---- converters: VisionLanguageModel.from_hf_blip2 -----------------------------------------------------------------

def _blip2_parts():
    transformers = pytest.importorskip("transformers")
    vc = transformers.Blip2VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2)
    return transformers, vc


def test_from_hf_blip2_rejects_what_is_not_a_blip2_model():
    transformers, vc = _blip2_parts()
    op = "VisionLanguageModel.from_hf_blip2"
    with pytest.raises(TypeError, match=rf"^{op}: model must be a HF Blip2Model.*Blip2VisionModel"):
        VisionLanguageModel.from_hf_blip2(transformers.Blip2VisionModel(vc))
    with pytest.raises(TypeError, match=rf"^{op}: hf_config must be a Blip2Config.*dict"):
        VisionLanguageModel.from_hf_blip2({}, hf_config={})
    with pytest.raises(TypeError, match=rf"^{op}: hf_config must be a Blip2Config.*Blip2VisionConfig"):
        VisionLanguageModel.from_hf_blip2({}, hf_config=vc)
    with pytest.raises(TypeError, match=rf"^{op}: a state dict needs hf_config="):
        VisionLanguageModel.from_hf_blip2({})
    with pytest.raises(TypeError, match=rf"^{op}: model must be a HF BLIP-2 model or its state dict, got int"):
        VisionLanguageModel.from_hf_blip2(3)
    for bad in ({}, "tiny", 0):  # an empty dict is not "no decoder": it is an error, not the tiny preset
        with pytest.raises(TypeError, match=rf"^{op}: decoder must be a ScMoEConfig"):
            VisionLanguageModel.from_hf_blip2({}, decoder=bad)


# ---- values past what the tensors hold (a size that would size a grid or a buffer) ----------------------------------

@pytest.mark.parametrize("name,rows", [("max_seqlen_q", 9), ("max_seqlen_k", 11)])
@pytest.mark.parametrize("excess", [1, 2**31, 2**40])
def test_max_seqlen_past_the_rows_is_an_error_on_every_backend(name, rows, excess):
    """A sequence is never longer than its tensor's rows: one ValueError naming the argument on every backend (not a
    grid-limit error on one, an 8.8 TB allocation on another); the rows themselves are still accepted."""
    op = "attention[varlen]"
    for backend in [None, *registered_ops()["attention"].available(CPU)]:
        _call(op, _good_args(op) | {name: rows}, backend)
        with pytest.raises(ValueError, match=rf"^attention: {name} must be in \[0, {rows}\], got {rows + excess}"):
            _call(op, _good_args(op) | {name: rows + excess}, backend)


# ---- expert_bias_update_: counts whose int64 sum would wrap around --------------------------------------------------

_I64 = 2**63 - 1


@pytest.mark.parametrize("mode", ["pid", "sign"])
@pytest.mark.parametrize("counts", [[2**62] * 4 + [1], [_I64] * 2 + [0] * 3, [0, 0, 0, 0, _I64 // 5 + 1]],
                         ids=["sum-wraps", "two-max", "one-past-the-cap-on-a-zero-expert"])
def test_counts_whose_sum_wraps_are_an_error_on_every_backend(counts, mode):
    """Before: a bias of -4.6e17 (or silently unchanged) on every backend. Now the same RuntimeError naming counts
    everywhere (torch._assert_async: no host sync), and nothing is written."""
    for backend in [None, *registered_ops()["expert_bias_update_"].available(CPU)]:
        bias, state = torch.full((5,), 0.25), torch.full((2, 3), 0.5)
        with pytest.raises(RuntimeError, match=rf"^expert_bias_update_: counts must be <= {_I64 // 5} "):
            ops.expert_bias_update_(bias, torch.tensor(counts), state, num_ffn_experts=3, top_k=2,
                                    target_ffn_per_token=1.0, ki=0.1, kp=0.1, mode=mode, backend=backend)
        assert torch.equal(bias, torch.full((5,), 0.25)) and torch.equal(state, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("mode", ["pid", "sign"])
def test_counts_at_the_cap_still_update_alike_on_every_backend(mode):
    """The limit is exactly INT64_MAX // numel: at it the sum fits, and every backend gives the same bias."""
    results = []
    for backend in [None, *registered_ops()["expert_bias_update_"].available(CPU)]:
        bias, state = torch.zeros(5), torch.zeros(2, 3)
        counts = torch.tensor([_I64 // 5, 3, 0, 7, _I64 // 5])
        ops.expert_bias_update_(bias, counts, state, num_ffn_experts=3, top_k=2, target_ffn_per_token=1.0, ki=0.1,
                                mode=mode, backend=backend)
        results.append(bias)
    assert results[0].isfinite().all() and results[0][:3].abs().max() > 0
    for r in results[1:]:
        assert torch.equal(r, results[0])


# ---- Q-Former masks: values other than 0/1 ------------------------------------------------------------------------

_BAD_MASK_VALUES = [-1, 2, 0.5, float("nan"), float("inf"), -0.5]


@pytest.mark.parametrize("bad,dtype", [(b, d) for b in _BAD_MASK_VALUES
                                       for d in (torch.float32, torch.float16, torch.int64, torch.int32)
                                       if d.is_floating_point or (math.isfinite(b) and b == int(b))])  # what fits
@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled-path"])
def test_mask_values_other_than_0_1_are_rejected(bad, dtype, compiling, monkeypatch):
    """HF masks a -1 token (and treats 0.5 / 2 / NaN its own way); we never turn such a mask into lengths. Eagerly a
    ValueError naming the argument; on the torch.compile path (no host read) torch._assert_async's RuntimeError."""
    from mmkernels.ops.qformer_attention import kv_lens_from_mask

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=dtype)
    mask[0, 2] = bad
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError if compiling else ValueError,
                       match=r"^QFormer: image_attention_mask must be a prefix mask .*values 0/1 or bool"):
        kv_lens_from_mask(mask, op="QFormer", name="image_attention_mask")
    good = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=dtype)
    assert kv_lens_from_mask(good, op="QFormer", name="image_attention_mask").tolist() == [3, 5]


@pytest.mark.parametrize("bad", [-1, 0.5, 2, float("nan")])
def test_qformer_module_rejects_a_mask_with_values_other_than_0_1(bad):
    """The trial's repro: a -1 inside the prefix was attended (a prefix of length 3); now an error naming it."""
    torch.manual_seed(0)
    m = QFormer(TINY_QF)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask[0, 2] = bad
    with pytest.raises(ValueError, match=r"^QFormer: image_attention_mask .*not 0 or 1"):
        m(_r(2, 3, 12), _r(2, 5, 10), image_attention_mask=mask)
    m(_r(2, 3, 12), _r(2, 5, 10), image_attention_mask=mask.clamp(0, 1).nan_to_num(0.0).round().bool())


# ---- from_hf_blip2: the state dict's values ---------------------------------------------------------------------

def _blip2_state():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Blip2Config(
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32),
        num_query_tokens=4)
    torch.manual_seed(0)
    return transformers.Blip2Model(cfg).eval().state_dict(), cfg


_QFORMER_KEY = "qformer.encoder.layer.0.attention.attention.query.weight"
_VISION_KEY = "vision_model.embeddings.patch_embedding.weight"
BLIP2_VALUES = [
    ("query_tokens", lambda t: t[:, :2], r"must have shape \(1, 4, 32\), got \(1, 2, 32\)"),  # was: a 2-query model
    ("query_tokens", lambda t: t[..., :16], r"must have shape \(1, 4, 32\)"),
    ("query_tokens", lambda t: t[0], r"must have shape \(1, 4, 32\)"),
    ("query_tokens", lambda t: t.long(), "must be a floating-point tensor"),
    ("query_tokens", lambda t: t.numpy(), "must be a torch.Tensor, got ndarray"),
    ("query_tokens", lambda t: t.tolist(), "must be a torch.Tensor, got list"),
    (_QFORMER_KEY, lambda t: t.numpy(), "must be a torch.Tensor, got ndarray"),
    (_QFORMER_KEY, lambda t: t.int(), "must be a floating-point tensor"),
    (_VISION_KEY, lambda t: t.tolist(), "must be a torch.Tensor, got list"),
    (_VISION_KEY, lambda t: t.to(torch.int16), "must be a floating-point tensor"),
]


@pytest.mark.parametrize("key,change,message", BLIP2_VALUES, ids=lambda x: x if isinstance(x, str) else "")
def test_from_hf_blip2_checks_every_value_naming_its_key(key, change, message):
    from mmkernels.models.convert._common import ConversionError

    sd, cfg = _blip2_state()
    assert VisionLanguageModel.from_hf_blip2(dict(sd), hf_config=cfg).config.num_query_tokens == 4
    bad = dict(sd) | {key: change(sd[key])}
    with pytest.raises(ConversionError, match=rf"^VisionLanguageModel.from_hf_blip2: {re.escape(key)} {message}"):
        VisionLanguageModel.from_hf_blip2(bad, hf_config=cfg)


# ---- ScMoE position_ids: past what RoPE's fp32 angles hold -------------------------------------------------------

@pytest.mark.parametrize("shift,dtype", [(2**24 + 1, torch.int64), (2**31, torch.int64), (2**62, torch.int64),
                                         (-(2**24) - 6, torch.int64), (2**24 + 1, torch.int32),
                                         (-(2**24) - 6, torch.int32)])
def test_position_ids_past_fp32_rope_are_an_error(shift, dtype):
    """Before: silently different logits (0.085 at 2**24, 0.11 past 2**31). The decoder raises ValueError naming
    position_ids (one host read, as for input_ids); a layer alone raises torch._assert_async's RuntimeError."""
    m = ScMoEDecoder(ScMoEConfig.preset("tiny")).eval()
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    pos = (torch.arange(5) + shift).to(dtype)
    with pytest.raises(ValueError, match=r"^ScMoEDecoder: position_ids must lie in \[-16777216, 16777216\]"):
        m(ids, position_ids=pos)
    with pytest.raises(RuntimeError, match=r"^ScMoEDecoderLayer: position_ids must lie in"):
        m.layers[0](m.embed_tokens(ids), position_ids=pos)
    edge = (torch.arange(5) + 2**24 - 4).to(dtype)  # the largest positions still taken
    assert m(ids, position_ids=edge).isfinite().all()


# ---- ExpertBiasController: the gain schedule and the checkpoint's step counter ---------------------------------------

def _controller(**kw):
    return ExpertBiasController(8, 4, 4, 3.0, kp=0.1, ki=0.2, kd=0.05, reduce_counts=False, **kw)


_COUNTS = torch.tensor([9, 1, 0, 4, 7, 2, 2, 5, 3, 0, 1, 2])


@pytest.mark.parametrize("bad", [3, "linear", 0.5])
def test_gain_schedule_that_is_not_callable_is_rejected_at_construction(bad):
    with pytest.raises(TypeError, match=r"^ExpertBiasController: gain_schedule must be a callable"):
        _controller(gain_schedule=bad)


@pytest.mark.parametrize("value,error", [(None, TypeError), ("0.5", TypeError), (torch.tensor(0.5), TypeError),
                                         (float("nan"), ValueError), (float("inf"), ValueError),
                                         (1e40, ValueError)])
def test_gain_schedule_values_are_checked_naming_it(value, error):
    """Before: a raw float() TypeError for None, "kp must be finite" for NaN, a tensor taken silently. Nothing is
    updated when the schedule's value is rejected."""
    c = _controller(gain_schedule=lambda step: value)
    with pytest.raises(error, match=r"^ExpertBiasController: .*gain_schedule"):
        c.update(_COUNTS)
    assert c.steps == 0 and torch.equal(c.bias, torch.zeros(12))


def test_gain_schedule_scales_the_gains_with_numpy_numbers():
    np = pytest.importorskip("numpy")
    a = _controller(gain_schedule=lambda step: np.float32(0.5))
    b = ExpertBiasController(8, 4, 4, 3.0, kp=0.05, ki=0.1, kd=0.025, reduce_counts=False)
    assert a.gains() == pytest.approx((0.05, 0.1, 0.025))
    a.update(_COUNTS)
    b.update(_COUNTS)
    torch.testing.assert_close(a.bias, b.bias)


@pytest.mark.parametrize("steps", [2**63 - 1, 2**62 + 1, -1])
def test_checkpoint_step_counter_out_of_range_is_rejected_on_load(steps):
    """Before: tensor(2**63 - 1) loaded, then update_bias() raised "Overflow when unpacking long long"."""
    c = _controller()
    sd = c.state_dict() | {"_extra_state": torch.tensor(steps, dtype=torch.int64)}
    with pytest.raises(ValueError,
                       match=r"^ExpertBiasController: _extra_state .* must be in \[0, 4611686018427387904\]"):
        _controller().load_state_dict(sd)
    ok = _controller()
    ok.load_state_dict(c.state_dict() | {"_extra_state": torch.tensor(2**62)})
    ok.update(_COUNTS)
    assert ok.steps == 2**62 + 1 and ok.state_dict()["_extra_state"].item() == 2**62 + 1


# ---- every module with a backend argument takes `module.backend = ...` ----------------------------------------------

@pytest.mark.parametrize("key", sorted(k for k in MODULE_INPUTS if "(" not in k))
def test_backend_can_be_assigned_on_every_module(key):
    """docs/training.md: a module's backend is checked when it is built or when ``module.backend`` is assigned, and
    reaches every op inside it. Before: VisionLanguageModel had no setter (AttributeError)."""
    m = MODULE_INPUTS[key][0]()
    if "backend" not in inspect.signature(type(m).__init__).parameters:
        pytest.skip(f"{key} takes no backend")
    m.backend = "reference"
    assert m.backend == "reference"
    inner = [s._backends for s in m.modules() if "_backends" in s.__dict__]
    assert inner, f"{key}: no op backends inside"
    for backends in inner:
        assert set(backends.values()) == {"reference"}, backends
    plain = {s.__dict__["backend"] for s in m.modules() if "backend" in s.__dict__}  # inner layers' plain attribute
    assert plain <= {"reference"}, plain
    with pytest.raises(mmkernels.BackendError, match="bogus"):
        m.backend = "bogus"
    assert m.backend == "reference"
    m.backend = None
    assert all(set(s._backends.values()) == {None} for s in m.modules() if "_backends" in s.__dict__)


# ---- integer arguments take any numbers.Integral (NumPy ints), never a bool -----------------------------------------

def _int_args(op: str) -> list[str]:
    return [n for n, val in _good_args(op).items() if isinstance(val, int) and not isinstance(val, bool)]


@pytest.mark.parametrize("op", [op for op in CALLS if _int_args(op)])
def test_numpy_integers_are_taken_like_ints(op):
    """Before: moe_route(top_k=np.int64(2)) was "must be an int, got int64" while softmax_scale took NumPy reals. Every
    int argument of every op, with NumPy ints, gives the same result as with Python ints; a NumPy bool is rejected."""
    np = pytest.importorskip("numpy")
    names = _int_args(op)
    backend = "reference"
    for name in names:
        for kind in (np.int64, np.int32, np.uint8):
            results = []
            for value in (_good_args(op)[name], kind(_good_args(op)[name])):
                kwargs = _good_args(op) | {name: value}
                torch.manual_seed(0)
                out = _call(op, kwargs, backend)  # the result and the tensors updated in place
                leaves = torch.utils._pytree.tree_leaves((out, kwargs))
                results.append([x for x in leaves if isinstance(x, torch.Tensor)])
            assert len(results[0]) == len(results[1])
            for a, b in zip(*results):
                assert torch.equal(a, b), (op, name, kind)
        with pytest.raises(TypeError, match=rf"^{_op(op)}: {name} must be an int, got numpy\.bool_?$"):
            _call(op, _good_args(op) | {name: np.bool_(True)}, backend)


# ---- switches take Python and NumPy bools, nothing else -------------------------------------------------------------

def _flag_args(op: str) -> list[str]:
    return [n for n, val in _good_args(op).items() if isinstance(val, bool)]


@pytest.mark.parametrize("op", [op for op in CALLS if _flag_args(op)])
def test_numpy_bools_are_taken_like_bools(op):
    """Before: media_cross_attention(only_immediate=np.bool_(False)) was "must be a bool, got bool" (NumPy 2 names its
    bool type ``bool``). Every bool argument of every op, both values, with a NumPy bool gives the result of the
    Python bool; a wrong type is named with its module (``numpy.int64``, not ``int64``)."""
    np = pytest.importorskip("numpy")
    for name in _flag_args(op):
        for flag in (True, False):
            results = []
            for value in (flag, np.bool_(flag)):
                kwargs = _good_args(op) | {name: value}
                torch.manual_seed(0)
                out = _call(op, kwargs, "reference")
                results.append([x for x in torch.utils._pytree.tree_leaves((out, kwargs))
                                if isinstance(x, torch.Tensor)])
            for a, b in zip(*results, strict=True):
                assert torch.equal(a, b), (op, name, flag)
        with pytest.raises(TypeError, match=rf"^{_op(op)}: {name} must be a bool, got numpy\.int64$"):
            _call(op, _good_args(op) | {name: np.int64(1)}, "reference")


def test_numpy_bools_in_module_constructors_and_config():
    """The same rule for module and config switches and the library's global switches."""
    np = pytest.importorskip("numpy")
    from mmkernels.models import GatedCrossAttentionBlock

    block = GatedCrossAttentionBlock(16, dim_head=8, heads=2, only_attend_immediate_media=np.bool_(False))
    assert block.only_attend_immediate_media is False
    block.only_attend_immediate_media = np.bool_(True)
    assert block.only_attend_immediate_media is True
    with pytest.raises(TypeError, match=r"only_attend_immediate_media must be a bool, got str$"):
        block.only_attend_immediate_media = "False"
    with mmkernels.deterministic(np.bool_(True)):
        assert mmkernels.is_deterministic() is True
    with pytest.raises(TypeError, match=r"^set_debug_checks: enabled must be a bool or None, got numpy\.float64$"):
        mmkernels.set_debug_checks(np.float64(1.0))


def test_numpy_integers_in_module_constructors():
    np = pytest.importorskip("numpy")
    assert ZeroComputeMoE(np.int64(12), np.int32(4), np.int64(2), np.int64(2), np.int16(8))(_r(3, 12)).shape == (3, 12)
    assert PatchEmbed((np.int64(8), 8), np.int64(4), np.int32(3), 16)(_r(1, 3, 8, 8)).shape[-1] == 16
    with pytest.raises(TypeError, match="top_k"):
        ZeroComputeMoE(12, 4, 2, np.bool_(True), 8)


# ---- every module constructor's dtype ------------------------------------------------------------------------------

DTYPE_BUILDS = {
    ZeroComputeMoE: dict(hidden_size=12, num_ffn_experts=4, num_zero_experts=2, top_k=2, expert_intermediate_size=8),
    SwiGLUExperts: dict(num_experts=5, hidden_size=12, intermediate_size=6),
    Attention: dict(dim=16, num_heads=4),
    QFormerCrossAttention: dict(hidden_size=16, num_heads=2, kv_dim=12),
    PatchEmbed: dict(image_size=8, patch_size=4, in_channels=3, embed_dim=16),
    mmkernels.nn.MultiHeadLatentAttention: dict(hidden_size=16, num_heads=2, q_lora_rank=8, kv_lora_rank=6,
                                                qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4),
    ViT: dict(config=TINY_VIT),
    QFormer: dict(config=TINY_QF),
    ScMoEDecoder: dict(config=ScMoEConfig.preset("tiny")),
    ScMoEDecoderLayer: dict(config=ScMoEConfig.preset("tiny")),
    VisionLanguageModel: dict(config="tiny"),
    PerceiverResampler: dict(dim=16, depth=1, dim_head=4, heads=2, num_latents=3),
    GatedCrossAttentionBlock: dict(dim=16, dim_head=4, heads=2),
}


def test_every_module_with_a_dtype_is_in_the_dtype_sweep():
    for pkg in (mmkernels.nn, mmkernels.models):
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and \
                    "dtype" in inspect.signature(obj.__init__).parameters:
                assert obj in DTYPE_BUILDS, f"add {name} to DTYPE_BUILDS"


@pytest.mark.parametrize("cls", list(DTYPE_BUILDS), ids=lambda c: c.__name__)
def test_module_dtype_must_be_a_floating_dtype(cls):
    """Before: ZeroComputeMoE(..., dtype=torch.int64) gave PyTorch's "Only Tensors of floating point ... can require
    gradients". Now a TypeError naming the module and dtype, for every module; float dtypes still build."""
    kw = DTYPE_BUILDS[cls]
    for bad in (torch.int64, torch.int32, torch.bool, torch.complex64, "float32", torch.float32.is_floating_point):
        with pytest.raises(TypeError, match=rf"^{cls.__name__}: dtype must be a"):
            cls(**kw, dtype=bad)
    m = cls(**kw, dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} <= {torch.float64, torch.float32}  # fp32 where a part is kept in fp32
    assert any(p.dtype == torch.float64 for p in m.parameters())


# ---- in-place arguments that share memory --------------------------------------------------------------------------

def _shared_storage_cases():
    """(label, build) -> bias, counts, state for 12 experts, 8 FFN, where two of them overlap."""
    def bias_in_state():
        state = torch.zeros(2, 8)
        return state.view(-1)[:12], torch.ones(12, dtype=torch.int32), state

    def state_in_bias():
        bias = torch.zeros(28)
        return bias[:12], torch.ones(12, dtype=torch.int32), bias[10:26].view(2, 8)

    def counts_is_bias():
        bias = torch.zeros(12)
        return bias, bias.view(torch.int32), torch.zeros(2, 8)

    def counts_in_state():
        state = torch.zeros(2, 8)
        return torch.zeros(12), state.view(torch.int32).view(-1)[4:16], state

    return {"bias-in-state": bias_in_state, "state-overlaps-bias": state_in_bias, "counts-is-bias": counts_is_bias,
            "counts-in-state": counts_in_state}


@pytest.mark.parametrize("label", list(_shared_storage_cases()))
def test_overlapping_in_place_arguments_are_rejected_on_every_backend(label):
    build = _shared_storage_cases()[label]
    for backend in [None, *registered_ops()["expert_bias_update_"].available(CPU)]:
        bias, counts, state = build()
        with pytest.raises(ValueError, match=r"^expert_bias_update_: \w+ and \w+ share memory"):
            ops.expert_bias_update_(bias, counts, state, num_ffn_experts=8, top_k=3, target_ffn_per_token=2.0,
                                    ki=0.1, backend=backend)


def test_adjacent_views_of_one_buffer_are_not_an_overlap():
    buf = torch.zeros(12 + 16)
    bias, state = buf[:12], buf[12:].view(2, 8)
    ops.expert_bias_update_(bias, torch.tensor([9, 1, 0, 4, 7, 2, 2, 5, 3, 0, 1, 2]), state, num_ffn_experts=8, top_k=3,
                            target_ffn_per_token=2.0, ki=0.1)
    assert bias[:8].abs().sum() > 0 and torch.equal(buf[:12], bias)


# ---- every converter: each value it reads is a floating-point tensor, named by its key when it is not --------------

def _converter_cases():
    """(name, state dict, convert(state dict)) for each state-dict converter, on tiny random models."""
    transformers = pytest.importorskip("transformers")
    from mmkernels.models.convert import longcat as lconv
    from mmkernels.models.convert import qformer as qconv
    from mmkernels.models.convert import vit as vconv

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=40))
    blip = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(image_size=16, patch_size=8, hidden_size=32,
                                                                        num_hidden_layers=1, num_attention_heads=2,
                                                                        intermediate_size=40))
    q_hf = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=40, encoder_hidden_size=24)
    qformer = transformers.Blip2QFormerModel(q_hf)
    from transformers.models.longcat_flash.configuration_longcat_flash import LongcatFlashConfig
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    moe = LongcatFlashMoE(LongcatFlashConfig(hidden_size=16, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
                                             expert_ffn_hidden_size=8))
    cases = [("ViTModel", vit.state_dict(), vconv.hf_to_mmkernels),
             ("Blip2VisionModel", blip.state_dict(), vconv.hf_to_mmkernels),
             ("Blip2QFormerModel", qformer.state_dict(),
              lambda sd: qconv.hf_to_mmkernels(sd, QFormerConfig.from_hf(q_hf))),
             ("LongcatFlashMoE", moe.state_dict(), lambda sd: lconv.hf_to_mmkernels(sd, num_ffn_experts=4))]
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    timm = timm_vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                      num_classes=0)
    cases.append(("timm VisionTransformer", timm.state_dict(), vconv.timm_to_mmkernels))
    return cases


@pytest.mark.parametrize("change,message", [(lambda t: t.tolist(), "must be a torch.Tensor, got list"),
                                            (lambda t: t.numpy(), "must be a torch.Tensor, got ndarray"),
                                            (lambda t: t.to(torch.int32), "must be a floating-point tensor")],
                         ids=["list", "numpy", "int32"])
def test_every_converter_names_the_key_of_a_value_that_is_not_a_float_tensor(change, message):
    """Every key every converter reads, replaced in turn: a ConversionError naming that key (before: AttributeError or
    a raw ``requires_grad`` error from deep inside, or an integer weight taken silently)."""
    from mmkernels.models.convert._common import ConversionError

    for name, sd, convert in _converter_cases():
        convert(dict(sd))  # the untouched state dict converts
        for key, value in sd.items():
            if not value.is_floating_point() or value.dim() == 0:
                continue
            try:
                convert(dict(sd) | {key: change(value.detach())})
            except ConversionError as exc:
                assert re.search(rf"{re.escape(key)} {message}", str(exc)), (name, key, str(exc))
            else:  # only a part the encoder does not use may pass unread: HF ViT's pooler
                assert name == "ViTModel" and key.startswith("pooler."), (name, key)


# ---- every switch of the public API outside the ops takes a bool, nothing else ---------------------------------------

def _tiny_hf_vit():
    transformers = pytest.importorskip("transformers")
    return transformers.ViTModel(transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=16,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=16))


def _enter(context) -> None:
    with context:
        pass


_MLA = dict(hidden_size=32, num_heads=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8)
# "module.name" -> call(**overrides): a valid call of a public callable with a bool switch, the switch overridden
SWITCH_CALLS: dict[str, Callable] = {
    "mmkernels.batch_invariant": lambda **kw: _enter(mmkernels.batch_invariant(**kw)),
    "mmkernels.debug_checks": lambda **kw: _enter(mmkernels.debug_checks(**kw)),
    "mmkernels.deterministic": lambda **kw: _enter(mmkernels.deterministic(**kw)),
    "mmkernels.set_batch_invariant": lambda **kw: mmkernels.set_batch_invariant(**kw),
    "mmkernels.set_debug_checks": lambda **kw: mmkernels.set_debug_checks(**kw),
    "mmkernels.set_deterministic": lambda **kw: mmkernels.set_deterministic(**kw),
    "mmkernels.info": lambda **kw: mmkernels.info(**({"as_dict": True} | kw)),
    "mmkernels.nn.Attention": lambda **kw: Attention(16, 4, **kw),
    "mmkernels.nn.ExpertBiasController": lambda **kw: ExpertBiasController(
        num_ffn_experts=8, num_zero_experts=4, top_k=4, target_ffn_per_token=3.0, **kw),
    "mmkernels.nn.MultiHeadLatentAttention": lambda **kw: mmkernels.nn.MultiHeadLatentAttention(**_MLA, **kw),
    "mmkernels.nn.PatchEmbed": lambda **kw: PatchEmbed(8, 4, 3, 16, **kw),
    "mmkernels.nn.QFormerCrossAttention": lambda **kw: QFormerCrossAttention(16, 2, **kw),
    "mmkernels.nn.ZeroComputeMoE": lambda **kw: ZeroComputeMoE(12, 4, 2, 2, 8, **kw),
    "mmkernels.models.GatedCrossAttentionBlock": lambda **kw: GatedCrossAttentionBlock(16, **kw),
    "mmkernels.models.KVCache": lambda **kw: mmkernels.models.KVCache(2, **kw),
    "mmkernels.models.ScMoEConfig": lambda **kw: ScMoEConfig(**(ScMoEConfig.preset("tiny").__dict__ | kw)),
    "mmkernels.models.ScMoEDecoder": lambda **kw: ScMoEDecoder(ScMoEConfig.preset("tiny"), **kw),
    "mmkernels.models.ScMoEDecoderLayer": lambda **kw: ScMoEDecoderLayer(ScMoEConfig.preset("tiny"), **kw),
    "mmkernels.models.ViTConfig": lambda **kw: ViTConfig(**kw),
    "mmkernels.models.VisionLanguageModel": lambda **kw: VisionLanguageModel("tiny", **kw),
    "mmkernels.integrations.hf.patch": lambda **kw: mmkernels.integrations.hf.patch(_tiny_hf_vit(), **kw),
    "mmkernels.distributed.all_to_all": lambda **kw: mmkernels.distributed.all_to_all(
        torch.zeros(2, 3), [2], [2], **kw),  # checked before the process group is touched
    "mmkernels.bench.BenchConfig": lambda **kw: mmkernels.bench.BenchConfig(CPU, None, "quick", None, **kw),
    "mmkernels.bench.measure_ceilings": lambda **kw: mmkernels.bench.measure_ceilings(CPU, **kw),
}
# public callables with a bool parameter that this sweep leaves alone, and why
SWITCH_EXEMPT = {
    "mmkernels.integrations.hf.attention_forward": "transformers calls it with its own values (a tensor is_causal "
                                                   "while tracing)",
    "mmkernels.bench.Row": "a result record the runner fills",
    "mmkernels.bench.Timing": "a result record the runner fills",
    "mmkernels.bench.Suite": "a suite definition (our own suites; checked by tests/bench)",
}
# the ops' switches are swept above with their SAMPLES (test_bad_argument_is_an_error_naming_it)
SWITCH_MODULES = ("mmkernels", "mmkernels.nn", "mmkernels.models", "mmkernels.integrations.hf",
                  "mmkernels.distributed", "mmkernels.bench", "mmkernels.testing")


def _public_switches() -> list[tuple[str, str]]:
    """(``"module.name"``, parameter) for every bool parameter (a bool default, or annotated ``bool`` /
    ``bool | None``) of every public callable of :data:`SWITCH_MODULES`."""
    import importlib

    found = []
    for module_name in SWITCH_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj):
                continue
            try:
                params = inspect.signature(obj).parameters.values()
            except (TypeError, ValueError):
                continue
            for p in params:
                if isinstance(p.default, bool) or str(p.annotation) in ("bool", "bool | None"):
                    found.append((f"{module_name}.{name}", p.name))
    return sorted(set(found))


def test_every_public_switch_is_swept_or_exempt():
    missing = sorted({key for key, _ in _public_switches() if key not in SWITCH_CALLS and key not in SWITCH_EXEMPT})
    assert not missing, f"add a valid call to SWITCH_CALLS (or a reason to SWITCH_EXEMPT) for {missing}"


@pytest.mark.parametrize("key,param", [s for s in _public_switches() if s[0] in SWITCH_CALLS])
@pytest.mark.parametrize("bad", ["False", 0, 1.0])
def test_every_public_switch_rejects_what_is_not_a_bool(key, param, bad):
    """A switch read from a YAML or CLI config as a string would take ``"False"`` for True (found by the fresh-user
    trial: ``patch(model, attention="false")`` patched the attention; ``Attention(causal="no")``,
    ``ViTConfig(qkv_bias="no")`` and ``ScMoEDecoder(overlap="no")`` took it for True)."""
    with pytest.raises(TypeError, match=rf"{param} must be a bool"):
        SWITCH_CALLS[key](**{param: bad})
