"""A patched Hugging Face model survives everything users save and copy it with, on every covered family (vision
towers, Q-Formers, LLaVA, BLIP-2, InstructBLIP and the MoE families): ``pickle``, ``torch.save``/``torch.load``,
``copy.deepcopy`` give a patched model with the same outputs whose ``unpatch`` gives back the unpatched model bit for
bit; ``save_pretrained``/``from_pretrained``, safetensors and a tensor-only state dict hold the plain HF checkpoint
(loadable by an unpatched model, and by a patched one)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from mmkernels.integrations.hf import patch, unpatch

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 2e-5, 1e-5


def _build(hf_models, name):
    build, inputs, output, kinds, ops = hf_models[name]
    torch.manual_seed(0)
    model = build().eval()
    torch.manual_seed(1)
    return model, inputs(), output, kinds, ops


def _ours(model) -> bool:
    return any(k.startswith("_mmkernels") for m in model.modules() for k in m.__dict__)


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"pickle": _pickle, "torch.save": _torch_save, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_of_a_patched_model_is_patched_and_unpatches(how, hf_any_model, hf_models, ops_run, no_backend_env):
    model, inputs, output, kinds, ops = _build(hf_models, hf_any_model)
    with torch.no_grad():
        ref = output(model(**inputs))
        try:
            COPIES[how](model)
        except Exception as exc:  # noqa: BLE001 - HF's own limit (e.g. LLaVA's output-capturing hooks are closures)
            unpatched_error = exc
        else:
            unpatched_error = None
        report = patch(model)
        assert report.kinds().items() >= kinds.items(), str(report)
        patched = output(model(**inputs))
        torch.testing.assert_close(patched, ref, atol=ATOL, rtol=RTOL)

        if unpatched_error is not None:  # the patched model fails exactly as the unpatched one
            with pytest.raises(type(unpatched_error), match="output_capturing_hook"):
                COPIES[how](model)
            return
        twin = COPIES[how](model)
        ops_run.clear()
        torch.testing.assert_close(output(twin(**inputs)), patched, atol=0, rtol=0)  # the same ops, same order
        assert {op for op, _ in ops_run} >= ops, ops_run
        assert patch(twin).kinds() == report.kinds()  # the copy's own report, already patched: a no-op
        assert list(twin.state_dict()) == list(model.state_dict())

        assert unpatch(twin) == unpatch(copy.deepcopy(model)) > 0
        assert not _ours(twin)
        assert "mmkernels" not in {m.config._attn_implementation for m in twin.modules()
                                   if hasattr(getattr(m, "config", None), "_attn_implementation")}
        ops_run.clear()
        assert torch.equal(output(twin(**inputs)), ref) and not ops_run
        # The original is still patched and unaffected by the copy's unpatch.
        torch.testing.assert_close(output(model(**inputs)), patched, atol=0, rtol=0)
        assert ops_run


def test_copy_counts_fallbacks_in_its_own_report(hf_models, ops_run, no_backend_env):
    """The report travels with the model: a loaded copy counts its fallbacks in its report, not the original's."""
    model, inputs, output, _, _ = _build(hf_models, "ViTModel")
    mask = torch.tensor([[True, False, False, True]] * 3)
    with torch.no_grad():
        report = patch(model)
        twin = _torch_save(model)
        twin(**inputs, bool_masked_pos=mask)
    assert patch(twin).fallbacks == {"ViTEmbeddings: bool_masked_pos (mask tokens)": 1}
    assert report.fallbacks == {}


_BUILD_KWARGS = {"ViTModel": dict(add_pooling_layer=False, use_mask_token=True)}  # as conftest.vit() builds it


def test_save_pretrained_and_safetensors_hold_the_plain_checkpoint(hf_any_model, hf_models, tmp_path, ops_run,
                                                                   no_backend_env):
    from safetensors.torch import load_model, save_model

    model, inputs, output, _, _ = _build(hf_models, hf_any_model)
    build = hf_models[hf_any_model][0]
    with torch.no_grad():
        ref = output(model(**inputs))
        patch(model)
        patched = output(model(**inputs))
        plain_keys = list(model.state_dict())

        model.save_pretrained(tmp_path / "hf")
        loaded = type(model).from_pretrained(tmp_path / "hf", **_BUILD_KWARGS.get(hf_any_model, {})).eval()
        assert not _ours(loaded) and "mmkernels" not in (tmp_path / "hf" / "config.json").read_text()
        assert list(loaded.state_dict()) == plain_keys
        ops_run.clear()
        assert torch.equal(output(loaded(**inputs)), ref) and not ops_run
        patch(loaded)
        torch.testing.assert_close(output(loaded(**inputs)), patched, atol=0, rtol=0)

        save_model(model, str(tmp_path / "model.safetensors"))
        fresh = build().eval()
        load_model(fresh, str(tmp_path / "model.safetensors"))
        assert torch.equal(output(fresh(**inputs)), ref)

        torch.save(model.state_dict(), tmp_path / "sd.pt")
        state = torch.load(tmp_path / "sd.pt", weights_only=True)  # tensors only: nothing of ours in it
        fresh = build().eval()
        patch(fresh)
        fresh.load_state_dict(state)
        torch.testing.assert_close(output(fresh(**inputs)), patched, atol=0, rtol=0)
        unpatch(fresh)
        assert torch.equal(output(fresh(**inputs)), ref)


def test_unpicklable_replacement_is_refused_at_swap_time(no_backend_env):
    """A replacement that cannot be pickled (a closure) is refused when it is installed, so no patched model ever
    holds a piece that cannot be saved; the module is left untouched."""
    from mmkernels.integrations.hf._patching import is_swapped, swap_forward

    lin = torch.nn.Linear(3, 3)
    scale = 2.0
    with pytest.raises(TypeError, match="module-level function"):
        swap_forward(lin, lambda self, x: torch.nn.functional.linear(x, self.weight, self.bias) * scale, "test-kind")
    assert not is_swapped(lin) and "forward" not in lin.__dict__
    x = torch.randn(2, 3)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_torch_load_in_a_fresh_process(hf_models, tmp_path, no_backend_env):
    """``torch.load`` in a new Python process that never imported mmkernels: the pickle brings it in; the loaded
    Mixtral runs patched, and ``unpatch`` gives the unpatched logits."""
    import os
    import subprocess
    import sys

    model, inputs, output, _, _ = _build(hf_models, "MixtralForCausalLM")
    with torch.no_grad():
        ref = output(model(**inputs))
        patch(model)
        patched = output(model(**inputs))
    torch.save({"model": model, "inputs": inputs, "ref": ref, "patched": patched}, tmp_path / "m.pt")
    script = f"""
import sys
import torch
d = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
model = d["model"]
assert "mmkernels" in sys.modules
import mmkernels.integrations.hf as hf
assert torch.equal(model(**d["inputs"]).logits, d["patched"])
assert hf.unpatch(model) > 0
assert torch.equal(model(**d["inputs"]).logits, d["ref"])
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "MMKERNELS_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
