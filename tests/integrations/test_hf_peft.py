"""PEFT adapters on a patched model, on every covered vision / Q-Former family: LoRA on the attention projections, on
the patch-embedding conv, on the Q-Former's cross-attention, on every Linear and conv, added before or after
``patch``, trains with the same outputs and the same gradients as on the unpatched model. An adapter is never
silently dropped: a LoRA conv put in place of the patch projection after ``patch`` runs the model's own forward
(counted in ``report.fallbacks``); one already there at ``patch`` time leaves the embedding unpatched (reported)."""

from __future__ import annotations

import copy

import pytest
import torch

from mmkernels.integrations.hf import patch, unpatch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv", "query", "key", "value"]
PATCH_CONV = ["patch_embedding", "projection"]  # ViT's conv is ``projection`` (BLIP-2's attention output too)
PLACEMENTS = {
    "attention": ATTENTION,
    "patch_embed": PATCH_CONV,
    "qformer_cross": r".*crossattention\.attention\.(query|key|value)",
    "everything": ATTENTION + PATCH_CONV + ["fc1", "fc2", "dense"],
}


def _targets(model, targets) -> bool:
    import re

    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n.split(".")[-1] in targets for n in names)


def _lora(model, targets):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)  # B != 0: it shows
    torch.manual_seed(7)
    return peft.get_peft_model(model, cfg)


def _grads(model, inputs, output):
    model.zero_grad(set_to_none=True)
    out = output(model(**inputs))
    (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _conv_adapted(model) -> bool:
    return any(n.split(".")[-1] in PATCH_CONV and isinstance(m, peft.tuners.lora.LoraLayer)
               and isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d) for n, m in model.named_modules())


# conftest.MODELS (the tests/ folder is not importable): a renamed entry fails in the hf_models lookup
VISION_MODELS = ("Blip2ForConditionalGeneration", "Blip2QFormerModel", "Blip2VisionModel", "CLIPVisionModel",
                 "InstructBlipForConditionalGeneration", "LlavaForConditionalGeneration", "SiglipVisionModel",
                 "ViTModel")
_QFORMERS = {"Blip2QFormerModel", "Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"}


def _cases():
    """(model, placement) pairs where the placement has modules: every tower but the bare Q-Former has a patch conv,
    only the Q-Former models have cross-attention."""
    for name in VISION_MODELS:
        for placement in sorted(PLACEMENTS):
            if (placement == "patch_embed" and name == "Blip2QFormerModel") or (
                    placement == "qformer_cross" and name not in _QFORMERS):
                continue
            yield name, placement


@pytest.mark.parametrize("order", ["lora-then-patch", "patch-then-lora"])
@pytest.mark.parametrize("name, placement", list(_cases()))
def test_lora_trains_as_unpatched(name, placement, order, hf_models, ops_run, no_backend_env):
    build, inputs, output, _, _ = hf_models[name]
    targets = PLACEMENTS[placement]
    torch.manual_seed(0)
    base = build()
    assert _targets(base, targets), f"{name} has no {placement} module"
    x = inputs()
    if order == "lora-then-patch":
        model = _lora(base, targets).train()
        ref_model = copy.deepcopy(model)
        report = patch(model)
    else:
        report = patch(base)
        model = _lora(base, targets).train()
        ref_model = copy.deepcopy(model)
        unpatch(ref_model)
    ref_out, ref = _grads(ref_model, x, output)
    ops_run.clear()
    out, got = _grads(model, x, output)

    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    assert got.keys() == ref.keys() and any("lora_" in n for n in got)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # PEFT froze the rest
    for n in ref:
        scale = float(ref[n].abs().max())
        torch.testing.assert_close(got[n], ref[n], atol=1e-4 * scale + 1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert ops_run  # our kernels ran where the adapters allow

    conv = _conv_adapted(model)
    projection_fallbacks = {k: v for k, v in report.fallbacks.items() if "not a plain stride-P Conv2d" in k}
    if conv and order == "patch-then-lora":  # the embedding is patched, its conv is a LoRA layer now: own forward
        assert sum(projection_fallbacks.values()) == 1, report.fallbacks
    elif conv:  # the adapter was there at patch time: the embedding is left alone, and the report says why
        assert "patch_embed" not in report.kinds()
        assert any(s.kind == "patch_embed" and "not a plain stride-P Conv2d" in s.reason for s in report.skipped)
    else:
        assert not report.fallbacks, report.fallbacks
        assert ("patch_embed" in report.kinds()) == any(op == "patch_embed" for op, _ in ops_run)

    # The adapters folded in (the plain conv again): the same answer as unpatched, within the 2x-reference rule (the
    # random adapters sharpen the attention, so fp32 summation order shows more than in a trained model).
    merged, ref_merged = model.merge_and_unload().eval(), ref_model.merge_and_unload().eval()
    with torch.no_grad():
        got, want = output(merged(**x)), output(ref_merged(**x))
        x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
        truth = output(copy.deepcopy(ref_merged).double()(**x64))
    assert float((got - truth).abs().max()) <= 2 * float((want - truth).abs().max()) + 1e-5
