"""MoE adoption the way users do it, on every covered family: by name (``from_pretrained(...,
experts_implementation="mmkernels")``, transformers' ``ExpertsInterface``) and with PEFT adapters on a patched model
(LoRA on the expert parameters, the router, the shared experts; adapters added before or after ``patch``). Each
against the same model without mmkernels: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels.integrations.hf as hf  # noqa: E402
from mmkernels.integrations.hf import moe as hf_moe  # noqa: E402
from mmkernels.integrations.hf._patching import is_swapped  # noqa: E402

VOCAB = 61
ATOL, RTOL = 2e-5, 1e-5  # fp32: the k expert terms are summed in another order than HF's

# one tiny config per family (extra keys are ignored by the families that do not read them)
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts=6,
               num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=16,
               n_routed_experts=6, n_group=2, topk_group=1, first_k_dense_replace=0, n_shared_experts=1,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
    "olmoe": {},
    "glm4_moe": {},
    "minimax": {},
    "deepseek_v3": dict(q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                        head_dim=8),
    "longcat_flash": dict(num_layers=1, moe_topk=2, expert_ffn_hidden_size=16, zero_expert_num=2, ffn_hidden_size=24,
                          q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                          head_dim=8, routed_scaling_factor=2.0),
}


def _config(model_type: str):
    kwargs = {**_COMMON, **FAMILIES.get(model_type, {})}
    if model_type == "longcat_flash":
        del kwargs["num_hidden_layers"]  # LongCat counts num_layers (two sub-layers each)
    try:
        return transformers.AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError) as exc:
        pytest.skip(f"this transformers has no {model_type}: {exc}")


def _saved(tmp_path, model_type: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(model_type))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "classifier.weight")):
                p.mul_(20.0)  # decisive routers: a wrong choice would show in the logits
    model.save_pretrained(tmp_path)
    return tmp_path


def _experts_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]


def _uses_interface(experts) -> bool:
    """The experts class dispatches through ``ExpertsInterface`` (``@use_experts_implementation``)."""
    return getattr(type(experts).forward, "__wrapped__", None) is not None


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_experts_implementation_is_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert hf.EXPERTS_NAME == "mmkernels" and ALL_EXPERTS_FUNCTIONS["mmkernels"] is hf.experts_forward
    assert hf.register_experts() is True  # idempotent


def test_without_experts_interface_registration_degrades(monkeypatch):
    """A transformers without ``ExpertsInterface``: nothing registered, no error (``patch`` still works)."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers.integrations.moe", None)  # import fails
    assert hf_moe.register_experts() is False


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_from_pretrained_by_name_matches_and_trains(model_type, tmp_path, ops_run):
    """``from_pretrained(..., attn_implementation="mmkernels", experts_implementation="mmkernels")``: no ``patch``
    call, every experts module that uses the interface runs ``moe_experts``; logits and every gradient as HF's eager
    experts with SDPA attention."""
    path = _saved(tmp_path, model_type)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").train()
    ours = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="mmkernels",
                                                             attn_implementation="mmkernels").train()
    experts = _experts_modules(ours)
    assert experts, f"{model_type}: no fused experts module found"
    adopted = all(_uses_interface(e) for e in experts)
    if adopted:
        assert ours.config._experts_implementation == "mmkernels"
    ids = _ids()
    ref_logits, ref_grads = _loss_and_grads(ref, ids)
    before = sum(hf.EXPERTS_FALLBACKS.values())
    ops_run.clear()
    logits, grads = _loss_and_grads(ours, ids)
    ran = {op for op, _ in ops_run}
    # LongCat-Flash of transformers < 5.25 has experts without the interface: the name changes nothing, visibly
    assert ("moe_experts" in ran) == adopted
    assert sum(hf.EXPERTS_FALLBACKS.values()) == before
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)
    assert grads.keys() == ref_grads.keys()
    assert any("gate_up_proj" in n for n in grads) and any("down_proj" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_set_experts_implementation_switches_both_ways(tmp_path, ops_run):
    model = transformers.AutoModelForCausalLM.from_pretrained(_saved(tmp_path, "mixtral")).eval()
    ids = _ids()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
    model.set_experts_implementation("mmkernels")
    ops_run.clear()
    with torch.no_grad():
        out = model(ids).logits
    assert "moe_experts" in {op for op, _ in ops_run}
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    model.set_experts_implementation("eager")
    ops_run.clear()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert not ops_run


def test_layout_moe_experts_cannot_take_falls_back_counted(tmp_path, ops_run):
    """GPT-OSS experts have biases (and interleaved gate/up): every call runs HF's own eager experts code, counted in
    ``EXPERTS_FALLBACKS``; never a wrong answer."""
    cfg = _config("gpt_oss")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="mmkernels").eval()
    hf.EXPERTS_FALLBACKS.clear()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert hf.EXPERTS_FALLBACKS["experts have biases (moe_experts has none)"] == cfg.num_hidden_layers
    assert "moe_experts" not in {op for op, _ in ops_run}


# ---- PEFT on patched MoE models ------------------------------------------------------------------------------------

PEFT_FAMILIES = ("mixtral", "longcat_flash", "deepseek_v3")
# placement -> (target_modules, target_parameters) per family; None: the family has no such part
PLACEMENTS = {
    "experts": lambda f: ([], ["experts.gate_up_proj", "experts.down_proj"]),
    # HF's LongCat router reads classifier.weight without calling the Linear: no adapter there trains, patched or not
    "router": lambda f: None if f == "longcat_flash" else ([], ["gate.weight"]),
    "shared_experts": lambda f: (["gate_proj", "up_proj", "down_proj"], []) if f == "deepseek_v3" else None,
    "experts_and_attention": lambda f: (["o_proj"], ["experts.gate_up_proj"]),
}


def _peft_model(family: str, placement: str, order: str | None):
    peft = pytest.importorskip("peft")
    targets = PLACEMENTS[placement](family)
    if targets is None:
        pytest.skip(f"no adapter placement {placement!r} that trains on {family}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "classifier.weight")):
                p.mul_(20.0)
    if order == "patch_then_peft":
        hf.patch(model)
    modules, params = targets
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules or None, target_parameters=params or None,
                          init_lora_weights=False)  # random B: the adapter changes the outputs from the first step
    torch.manual_seed(1)
    model = peft.get_peft_model(model, cfg)
    if order == "peft_then_patch":
        hf.patch(model)
    return model


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_peft_adapters_train_on_patched_model(family, placement, order, ops_run):
    ref = _peft_model(family, placement, None)
    ours = _peft_model(family, placement, order)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and trainable == [n for n, p in ref.named_parameters() if p.requires_grad]
    # the MoE blocks are patched, whichever came first (the experts module under PEFT's wrappers is the one swapped)
    blocks = [m for m in ours.modules() if type(m).__name__ in ("MixtralSparseMoeBlock", "LongcatFlashMoE",
                                                                 "DeepseekV3MoE")]
    assert blocks and all(is_swapped(b) for b in blocks)
    ids = _ids()
    ref_logits, ref_grads = _loss_and_grads(ref, ids)
    ops_run.clear()
    logits, grads = _loss_and_grads(ours, ids)
    assert {"moe_route", "moe_experts"} <= {op for op, _ in ops_run}
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)
    lora = [n for n in grads if "lora_" in n]
    assert grads.keys() == ref_grads.keys()
    assert lora  # the adapters train
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # one optimiser step, then the same outputs again
    for model, g in ((ref, ref_grads), (ours, grads)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in g:
                    p.sub_(0.1 * g[n])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL, rtol=RTOL)
