"""accelerate placements on a patched model, on every covered family: weights offloaded to CPU or disk (meta weights
that each module's pre-forward hook materialises), hooks added before or after ``patch``, and a ``device_map="auto"``
load with an offload folder, give the unpatched result; our replacements run inside the modules' hooked calls (a
fused op that reads a child's weights without calling the child runs the child's hook around that read).
``unpatch`` and ``remove_hook_from_module`` undo cleanly in either order."""

from __future__ import annotations

import copy

import pytest
import torch

from mmkernels.integrations.hf import patch, unpatch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from accelerate import cpu_offload, disk_offload  # noqa: E402
from accelerate.hooks import remove_hook_from_module  # noqa: E402

ATOL, RTOL = 2e-5, 1e-5
CPU = torch.device("cpu")


def _offload(kind, model, folder):
    if kind == "cpu_offload":
        cpu_offload(model, execution_device=CPU)
    else:
        disk_offload(model, str(folder), execution_device=CPU)


def _meta(model) -> int:
    return sum(p.device.type == "meta" for p in model.parameters())


def _placement_cases():
    for order in ("hooks-then-patch", "patch-then-hooks"):
        for kind in ("cpu_offload", "disk_offload"):
            yield order, kind


@pytest.mark.parametrize("order, kind", list(_placement_cases()))
def test_offloaded_patched_model_matches(kind, order, hf_any_model, hf_models, tmp_path, ops_run, no_backend_env):
    build, inputs, output, _, ops = hf_models[hf_any_model]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    with torch.no_grad():
        ref = output(model(**x))
        # The unpatched model under the same hooks fails for some models (SigLIP's pooling head is an
        # nn.MultiheadAttention, which reads its out_proj's offloaded weight): then the patched one fails the same way.
        # Where it runs it may be wrong (HF's LongCat-Flash router reads its classifier's offloaded weight without
        # calling it): the truth is the model without hooks.
        twin = copy.deepcopy(model)
        _offload(kind, twin, tmp_path / "twin")
        try:
            twin(**x)
        except Exception as exc:  # noqa: BLE001
            unpatched_error = exc
        else:
            unpatched_error = None
        if order == "hooks-then-patch":
            _offload(kind, model, tmp_path)
            report = patch(model)
        else:
            report = patch(model)
            _offload(kind, model, tmp_path)
        if unpatched_error is not None:
            with pytest.raises(type(unpatched_error)):
                model(**x)
            return
        assert _meta(model) > 0  # the weights really live off the module
        out = output(model(**x))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        assert {op for op, _ in ops_run} == ops, ops_run
        assert not report.fallbacks, report.fallbacks
        assert _meta(model) > 0  # and went back after the call

        # undo in either order: the unpatched, unhooked model is the original again
        if order == "hooks-then-patch":
            unpatch(model)
            remove_hook_from_module(model, recurse=True)
        else:
            remove_hook_from_module(model, recurse=True)
            unpatch(model)
        assert not any(k.startswith("_mmkernels") or k in ("_hf_hook", "_old_forward")
                       for m in model.modules() for k in m.__dict__)
        # accelerate leaves each module's own forward, bound, as an instance attribute (patched or not)
        assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in model.modules())
        ops_run.clear()
        assert torch.equal(output(model(**x)), ref) and not ops_run
        report = patch(model)  # patching again after accelerate left: every kernel runs, nothing falls back
        torch.testing.assert_close(output(model(**x)), ref, atol=ATOL, rtol=RTOL)
        assert {op for op, _ in ops_run} == ops and not report.fallbacks, report.fallbacks


def test_unpatch_under_hooks_keeps_the_hooks(hf_models, tmp_path, ops_run, no_backend_env):
    """``unpatch`` while accelerate hooks stay: the hooks keep working around the model's own forwards."""
    build, inputs, output, _, _ = hf_models["Blip2ForConditionalGeneration"]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    with torch.no_grad():
        ref = output(model(**x))
        patch(model)
        disk_offload(model, str(tmp_path), execution_device=CPU)
        unpatch(model)
        ops_run.clear()
        torch.testing.assert_close(output(model(**x)), ref, atol=0, rtol=0)
        assert not ops_run and _meta(model) > 0


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "Blip2ForConditionalGeneration",
                                  "MixtralForCausalLM"])
def test_device_map_auto_with_offload_folder(name, hf_models, tmp_path, ops_run, no_backend_env):
    """``from_pretrained(device_map="auto", max_memory=..., offload_folder=...)``: most weights on disk, patched after
    loading."""
    build, inputs, output, _, ops = hf_models[name]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    extra = dict(add_pooling_layer=False, use_mask_token=True) if name == "ViTModel" else {}
    with torch.no_grad():
        ref = output(model(**x))
        model.save_pretrained(tmp_path / "ckpt")
        loaded = type(model).from_pretrained(tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "4KB"},
                                             offload_folder=str(tmp_path / "offload"), **extra).eval()
        assert _meta(loaded) > 0
        report = patch(loaded)
        out = output(loaded(**x))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert {op for op, _ in ops_run} == ops and not report.fallbacks


def test_hooks_removed_while_patched(hf_models, tmp_path, ops_run, no_backend_env):
    """Hooks added before ``patch`` and removed while patched: accelerate puts our dispatcher back in ``forward``;
    the model stays patched (its weights back on the module) and ``unpatch`` then restores the class forwards."""
    build, inputs, output, _, ops = hf_models["ViTModel"]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    with torch.no_grad():
        ref = output(model(**x))
        cpu_offload(model, execution_device=CPU)
        report = patch(model)
        remove_hook_from_module(model, recurse=True)
        assert _meta(model) == 0
        torch.testing.assert_close(output(model(**x)), ref, atol=ATOL, rtol=RTOL)
        assert {op for op, _ in ops_run} == ops and not report.fallbacks
        assert unpatch(model) == 1
        ops_run.clear()
        assert torch.equal(output(model(**x)), ref) and not ops_run
        assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in model.modules())
