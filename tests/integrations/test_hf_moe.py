"""Hugging Face MoE blocks (Mixtral, LongCat-Flash, DeepSeek-V3) through mmkernels, the way users adopt it: a tiny
random-initialised ``*ForCausalLM`` built offline, patched in place, compared with itself unpatched.

Routers are made decisive on purpose (larger router weights, a random fp32 ``e_score_correction_bias``) so that the
choice, the selection bias and the group limit all matter; expert choices are compared with HF's own router, not
only the outputs.
"""

from __future__ import annotations

import re

import pytest
import torch

import mmkernels

transformers = pytest.importorskip("transformers")

from mmkernels.integrations.hf import moe as hf_moe  # noqa: E402
from mmkernels.integrations.hf._patching import PatchReport, is_swapped, original_forward, restore_all  # noqa: E402
from mmkernels.integrations.hf.moe import patch_moe  # noqa: E402
from mmkernels.models.convert._hf_moe import moe_layout  # noqa: E402

ATOL, RTOL = 2e-5, 1e-5  # fp32: summation order of the k expert terms differs from HF's loop
VOCAB = 61


def _mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2)
    return MixtralForCausalLM(MixtralConfig(**{**cfg, **kw}))


def _longcat(**kw):
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=24, num_layers=1, num_attention_heads=2, ffn_hidden_size=20,
               q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, head_dim=4, v_head_dim=4,
               moe_topk=3, n_routed_experts=5, zero_expert_num=3, expert_ffn_hidden_size=12,
               routed_scaling_factor=2.0)
    return LongcatFlashForCausalLM(LongcatFlashConfig(**{**cfg, **kw}))


def _deepseek(**kw):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=20, moe_intermediate_size=12, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=12, n_group=4,
               topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
               qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, routed_scaling_factor=2.5)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**{**cfg, **kw}))


MODELS = {
    "mixtral": _mixtral,
    "longcat_flash": _longcat,
    "deepseek_v3": _deepseek,
    "deepseek_v3_ungrouped_unnormalised": lambda: _deepseek(n_group=1, topk_group=1, norm_topk_prob=False),
}
ROUTER_ATTR = {"MixtralSparseMoeBlock": "gate", "LongcatFlashMoE": "router", "DeepseekV3MoE": "gate"}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("gate.weight", "router.classifier.weight")):
                p.mul_(40.0)  # decisive routers: top-k picks well apart, so a wrong choice shows in the logits
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    return model.eval()


def _blocks(model):
    return [(p, m) for p, m in model.named_modules() if type(m).__name__ in ROUTER_ATTR]


def _routed(out):
    """(logits or None, weights, ids) from a router's output: HF 5's (logits, weights, ids), or (weights, ids) as
    transformers 5.17's LongCat router returns."""
    return (None, *out) if len(out) == 2 else tuple(out)


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))  # T = 14 tokens


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_model_matches_hf_and_restores_bit_for_bit(name, ops_run):
    model = _build(name)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    inputs: dict[str, torch.Tensor] = {}  # each block's input, for comparing the routers one to one
    hooks = [m.register_forward_pre_hook(lambda mod, args, p=p: inputs.__setitem__(p, args[0].detach()))
             for p, m in _blocks(model)]
    report = PatchReport()
    assert patch_moe(model, report) == len(_blocks(model)) > 0
    n = len(_blocks(model))
    assert report.kinds() == {"moe": n, "moe_router": n, "moe_experts": n}
    assert not report.skipped
    with torch.no_grad():
        out = model(ids).logits
    for h in hooks:
        h.remove()
    assert {"moe_route", "moe_experts"} <= {op for op, _ in ops_run}
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)

    for path, block in _blocks(model):
        router = getattr(block, ROUTER_ATTR[type(block).__name__])
        x = inputs[path]
        with torch.no_grad():
            hf_logits, hf_w, hf_ids = _routed(original_forward(router)(x))
            our_logits, our_w, our_ids = _routed(router(x))
        assert (our_logits is None) == (hf_logits is None)
        assert hf_logits is None or torch.equal(our_logits, hf_logits)  # same lines as HF: bit-identical logits
        assert our_ids.dtype == hf_ids.dtype and our_w.dtype == hf_w.dtype
        hf_sorted, hf_order = hf_ids.sort(-1)
        our_sorted, our_order = our_ids.sort(-1)
        assert torch.equal(our_sorted, hf_sorted), f"{path}: expert choices differ from HF's router"
        torch.testing.assert_close(our_w.gather(1, our_order), hf_w.gather(1, hf_order), atol=1e-7, rtol=1e-6)

    ops_run.clear()
    assert restore_all(model) == 3 * len(_blocks(model))
    with torch.no_grad():
        again = model(ids).logits
    assert torch.equal(again, ref)
    assert not ops_run


def test_choices_exercise_bias_groups_and_zero_experts():
    """The configurations above really test what they claim: DeepSeek-V3's group limit and selection bias change
    choices, and LongCat picks zero experts (ids >= N) for some tokens."""
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    ds = _blocks(_build("deepseek_v3"))[0][1].gate
    with torch.no_grad():
        _, _, ids = _routed(ds(x))
        scores = torch.sigmoid(torch.nn.functional.linear(x, ds.weight))
        plain = (scores + ds.e_score_correction_bias).topk(ds.top_k, dim=-1).indices
        unbiased = scores.topk(ds.top_k, dim=-1).indices
    assert not torch.equal(ids.sort(-1).values, plain.sort(-1).values)  # group limit bites
    assert not torch.equal(plain.sort(-1).values, unbiased.sort(-1).values)  # bias bites
    lc = _blocks(_build("longcat_flash"))[0][1]
    with torch.no_grad():
        _, _, ids = _routed(lc.router(x))
    n_ffn = moe_layout(lc, "longcat_flash").num_ffn_experts
    assert (ids >= n_ffn).any() and (ids < n_ffn).any()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_step_gradients_match(name):
    model = _build(name).train()
    ids = _ids()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict().keys())
    tensors = [p for _, p in model.named_parameters()]

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step()
    assert patch_moe(model, PatchReport()) == len(_blocks(model)) > 0
    out, grads = step()
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict().keys()) == keys
    assert all(a is b for a, b in zip(tensors, (p for _, p in model.named_parameters()), strict=True))
    torch.testing.assert_close(out.loss, ref_out.loss, atol=ATOL, rtol=RTOL)
    # the router logits HF records (output_router_logits, the aux loss) are still collected from the router, where
    # this release records them (transformers 5.17's DeepSeek-V3 and LongCat outputs have no router_logits)
    ref_logits, our_logits = getattr(ref_out, "router_logits", None), getattr(out, "router_logits", None)
    assert (our_logits is None) == (ref_logits is None)
    assert ref_logits is not None or name != "mixtral"
    assert ref_logits is None or len(our_logits) == len(ref_logits) == len(_blocks(model))
    for a, b in zip(our_logits or (), ref_logits or (), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert grads.keys() == ref_grads.keys()
    routers = [n for n in grads if n.endswith(("gate.weight", "router.classifier.weight"))]
    experts = [n for n in grads if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert routers and experts  # router and expert weights are trained through our ops
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # e_score_correction_bias is a buffer in HF (updated outside autograd, as the balancer does): never a gradient
    assert not any("e_score_correction_bias" in n for n in names)


def test_patch_twice_is_a_no_op_and_keeps_state_dict():
    model = _build("deepseek_v3")
    keys = list(model.state_dict().keys())
    assert patch_moe(model, PatchReport()) == 1
    block = _blocks(model)[0][1]
    fwd, gate_fwd = block.forward, block.gate.forward
    report = PatchReport()
    assert patch_moe(model, report) == 0
    assert not report and [s.reason for s in report.skipped] == ["already patched"]
    assert block.forward is fwd and block.gate.forward is gate_fwd
    assert list(model.state_dict().keys()) == keys
    assert restore_all(model) == 3 and restore_all(model) == 0
    assert not is_swapped(block) and not is_swapped(block.gate) and not is_swapped(block.experts)


def test_missing_class_is_skipped_not_a_crash(monkeypatch):
    fams = tuple(f if f.name != "mixtral" else hf_moe.MoEFamily(f.name, f.model_type, f.module, "NoSuchMoeBlock",
                                                                  f.router, f.router_attr) for f in hf_moe.FAMILIES)
    monkeypatch.setattr(hf_moe, "FAMILIES", fams)
    model = _build("mixtral")
    report = PatchReport()
    assert patch_moe(model, report) == 0
    assert not report and len(report.skipped) == 1
    assert report.skipped[0].kind == "moe" and "NoSuchMoeBlock" in report.skipped[0].reason
    assert "skipped" in str(report)
    assert not any(is_swapped(m) for m in model.modules())


def test_layout_our_ops_cannot_take_is_skipped():
    """An activation other than SiLU: the block is left to HF, visibly."""
    model = _build("mixtral")
    for _, block in _blocks(model):
        block.experts.act_fn = torch.nn.GELU()
    report = PatchReport()
    assert patch_moe(model, report) == 0
    assert len(report.skipped) == 2 and all("GELU" in s.reason for s in report.skipped)
    assert not any(is_swapped(m) for m in model.modules())


def test_backend_choice_is_checked_before_swapping():
    model = _build("mixtral")
    with pytest.raises(mmkernels.BackendError, match="moe_route"):
        patch_moe(model, PatchReport(), backend="triton")  # moe_route has no Triton backend
    assert not any(is_swapped(m) for m in model.modules())
    # a mapping may name other ops of the model (patch passes one choice for everything)
    assert patch_moe(model, PatchReport(), backend={"attention": "triton", "moe_route": "reference"}) == 2


def test_triton_experts_backend(ops_run, monkeypatch):
    """The Triton grouped-GEMM path (under the interpreter on CPU) on the HF parameters."""
    model = _build("longcat_flash")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    patch_moe(model, PatchReport(), backend={"moe_experts": "triton", "moe_route": "reference"})
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert ("moe_experts", "triton") in ops_run and ("moe_route", "reference") in ops_run


def test_compiled_patched_block_matches_eager():
    model = _build("deepseek_v3")
    patch_moe(model, PatchReport())
    block = _blocks(model)[0][1]
    x = torch.randn(2, 5, 24, requires_grad=True)
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=RTOL)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_comp,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(g_comp, g_eager, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["mixtral", "longcat_flash", "deepseek_v3"])
def test_bf16_autocast_runs_and_stays_close(name, ops_run):
    model = _build(name)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    patch_moe(model, PatchReport())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids).logits
    assert ("moe_experts", "reference") in ops_run and torch.isfinite(out).all()
    # bf16 Linears inside the whole model (attention too): a loose check against the fp32 logits
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_router_returning_logits_only_is_routed_in_the_block(monkeypatch):
    """transformers releases whose router returns only the logits (and whose block returns (hidden, router_logits)),
    simulated on the installed classes: the router is left alone, the block routes its logits with moe_route."""
    from transformers.models.mixtral import modeling_mixtral as mm

    block = _blocks(_build("mixtral"))[0][1]
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = block(x)
    monkeypatch.setattr(mm.MixtralTopKRouter, "forward", lambda self, h: torch.nn.functional.linear(h, self.weight))
    monkeypatch.setattr(mm.MixtralSparseMoeBlock, "forward",
                        lambda self, h: (h, self.gate(h.reshape(-1, h.shape[-1]))))  # only its return layout counts
    report = PatchReport()
    assert patch_moe(block, report) == 1
    assert report.kinds() == {"moe": 1, "moe_experts": 1} and not is_swapped(block.gate)
    with torch.no_grad():
        out, logits = block(x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert torch.equal(logits, torch.nn.functional.linear(x.reshape(-1, 24), block.gate.weight))


def test_public_patch_and_unpatch(ops_run):
    hf = pytest.importorskip("mmkernels.integrations.hf")
    model = _build("longcat_flash")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    report = hf.patch(model)
    assert report.kinds().get("moe") == 1 and "LongcatFlashMoE" in str(report)
    assert hf.patch(model) is report  # patching twice is a no-op
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert {"moe_route", "moe_experts"} <= {op for op, _ in ops_run}
    assert hf.unpatch(model) >= 2 and hf.unpatch(model) == 0
    ops_run.clear()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert not ops_run


@pytest.mark.parametrize("name", ["mixtral", "longcat_flash", "deepseek_v3"])
def test_bf16_model_choices_match_hf(name):
    """A model cast to bf16 (e_score_correction_bias becomes bf16 too): the fp32 router details still match HF's
    exactly (same picks, same fp32 weights); the outputs within bf16 rounding."""
    model = _build(name).to(torch.bfloat16)
    model.config._experts_implementation = "eager"  # HF's grouped_mm wants 16-byte strides (hidden 24 in bf16 is not)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    patch_moe(model, PatchReport())
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    for _, block in _blocks(model):
        router = getattr(block, ROUTER_ATTR[type(block).__name__])
        with torch.no_grad():
            _, hf_w, hf_ids = _routed(original_forward(router)(x))
            _, our_w, our_ids = _routed(router(x))
        hf_sorted, hf_order = hf_ids.sort(-1)
        our_sorted, our_order = our_ids.sort(-1)
        assert torch.equal(our_sorted, hf_sorted) and our_w.dtype == hf_w.dtype == torch.float32
        torch.testing.assert_close(our_w.gather(1, our_order), hf_w.gather(1, hf_order), atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_mixed_dtypes_fall_back_to_hf_visibly():
    """Expert weights in bf16, hidden states in fp32, no autocast: HF's grouped_mm path casts, our op would not; the
    call goes to HF's own forward (counted in the report), with the router run once, not twice."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1,
                           num_experts_per_tok=2)
    cfg._experts_implementation = "grouped_mm"
    block = DeepseekV3MoE(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    block.experts.to(torch.bfloat16)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        ref = block(x)
    report = PatchReport()
    assert patch_moe(block, report) == 1
    calls = []
    block.gate.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out, ref) and len(calls) == 1
    assert list(report.fallbacks.values()) == [1] and "fell back" in str(report)


def test_public_patch_is_all_or_nothing_on_a_bad_backend():
    """A backend the MoE ops lack raises, and leaves the model exactly as it was: nothing swapped, no patch state,
    so a later ``patch`` with a good choice really patches (not a stale no-op)."""
    hf = pytest.importorskip("mmkernels.integrations.hf")
    model = _build("mixtral")
    with pytest.raises(mmkernels.BackendError, match="moe_route"):
        hf.patch(model, backend="triton")
    assert not any(is_swapped(m) for m in model.modules())
    assert not any(k.startswith("_mmkernels") for m in model.modules() for k in m.__dict__)
    assert hf.patch(model).kinds().get("moe") == 2
    assert hf.unpatch(model) >= 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_func_transforms_run_as_unpatched(name):
    """``torch.func.vmap`` and per-sample gradients (``vmap(grad(functional_call))``) give what the unpatched model
    gives: our MoE ops have data-dependent shapes and no batching rules, so inside a transform the block, router and
    experts run HF's own code, counted as a fallback (before: ``RuntimeError`` on every family)."""
    from torch.func import functional_call, grad, vmap

    model = _build(name)
    ids = _ids()

    def logits(m):
        return vmap(lambda row: m(input_ids=row[None]).logits, randomness="same")(ids)

    params = {n: p.detach() for n, p in model.named_parameters()}

    def per_sample(m):
        def loss(p, row):
            return functional_call(m, p, (row[None],)).logits.float().square().mean()

        return vmap(grad(loss), in_dims=(None, 0))(params, ids)

    report = PatchReport()
    try:
        with torch.no_grad():
            ref_logits = logits(model)
        ref_grads = per_sample(model)
    except RuntimeError as exc:  # e.g. transformers 5.17's LongCat experts call nonzero: vmap fails unpatched too
        assert patch_moe(model, report) == len(_blocks(model)) > 0
        with pytest.raises(RuntimeError, match=re.escape(str(exc).splitlines()[0][:60])), torch.no_grad():
            logits(model)
        return
    assert patch_moe(model, report) == len(_blocks(model)) > 0
    with torch.no_grad():
        torch.testing.assert_close(logits(model), ref_logits, atol=0, rtol=0)
    for n, g in per_sample(model).items():
        torch.testing.assert_close(g, ref_grads[n], atol=0, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert report.fallbacks.get(hf_moe._FUNCTORCH_FALLBACK, 0) > 0
    with torch.no_grad():  # outside a transform our ops run again
        before = report.fallbacks.get(hf_moe._FUNCTORCH_FALLBACK, 0)
        model(input_ids=ids)
        assert report.fallbacks.get(hf_moe._FUNCTORCH_FALLBACK, 0) == before


def test_torch_func_transforms_with_experts_implementation_by_name():
    """The same through transformers' ``ExpertsInterface`` (``experts_implementation="mmkernels"``, no ``patch``)."""
    from torch.func import vmap

    model = _build("mixtral")
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("this transformers has no ExpertsInterface")
    ids = _ids()
    with torch.no_grad():
        ref = vmap(lambda row: model(input_ids=row[None]).logits, randomness="same")(ids)
        model.set_experts_implementation(hf_moe.EXPERTS_NAME)
        before = hf_moe.EXPERTS_FALLBACKS[hf_moe._FUNCTORCH_FALLBACK]
        got = vmap(lambda row: model(input_ids=row[None]).logits, randomness="same")(ids)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert hf_moe.EXPERTS_FALLBACKS[hf_moe._FUNCTORCH_FALLBACK] > before


def test_report_of_a_model_with_nothing_covered_says_what_to_do():
    """A model ``patch`` covers nothing of (here a Llama) gets a report that says so and names the by-name route for
    MoE families that use transformers' ExpertsInterface (before: "0 modules replaced" and nothing else)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    report = mmkernels.integrations.hf.patch(model)
    assert not report.replaced and "experts_implementation=\"mmkernels\"" in str(report)
    mmkernels.integrations.hf.unpatch(model)
