"""Issue 20 in the vision models: configs in modules the model and its converter both import (no circle), thin
``from_hf`` / ``from_timm``, and one backend mechanism (``ModuleBackend``) in every composite model: the whole choice
is checked before any part changes, then every op-running part gets its share."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

import mmkernels.models as models
from mmkernels import BackendError
from mmkernels._backends import ModuleBackend
from mmkernels.models import qformer as qformer_mod
from mmkernels.models import qformer_config, vit_config
from mmkernels.models import vit as vit_mod
from mmkernels.models import vlm as vlm_mod

MODELS = Path(models.__file__).parent
TINY_VIT = vit_config.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
TINY_QFORMER = qformer_config.QFormerConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                            intermediate_size=32, encoder_hidden_size=24, cross_attention_frequency=2,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

COMPOSITES = {
    "ViT": lambda: models.ViT(TINY_VIT),
    "QFormer": lambda: models.QFormer(TINY_QFORMER),
    "VisionLanguageModel": lambda: models.VisionLanguageModel("tiny"),
}


def _carriers(module):
    """Every submodule (and the module) whose class carries a ModuleBackend, with its declared ops."""
    for name, m in module.named_modules():
        found = getattr(type(m), "backend", None)
        if isinstance(found, ModuleBackend):
            yield name, m, found.ops


def _state(module):
    return {name: dict(m._backends) for name, m, _ in _carriers(module)}


@pytest.mark.parametrize("name", COMPOSITES)
def test_composite_declares_the_union_of_its_parts_ops_and_has_no_setter(name):
    model = COMPOSITES[name]()
    declared = type(model).__dict__.get("backend")
    assert isinstance(declared, ModuleBackend), f"{name}.backend is a ModuleBackend, not a hand-written property"
    parts = {op for part_name, _, ops in _carriers(model) if part_name for op in ops}
    assert set(declared.ops) == parts, "declares exactly the ops its parts run"


@pytest.mark.parametrize("name", COMPOSITES)
def test_a_name_reaches_every_part_and_a_mapping_its_ops(name):
    model = COMPOSITES[name]()
    model.backend = "reference"
    assert all(set(b.values()) == {"reference"} for b in _state(model).values()), _state(model)
    ops = type(model).backend.ops
    for op in ops:  # one op at a time: only the parts running it change, and only for it
        model.backend = {op: "reference"}
        for part_name, part, part_ops in _carriers(model):
            want = {o: ("reference" if o == op else None) for o in part_ops}
            assert part._backends == want, (name, op, part_name)


@pytest.mark.parametrize("name", COMPOSITES)
def test_a_bad_choice_changes_nothing(name):
    model = COMPOSITES[name]()
    model.backend = "reference"
    before = _state(model)
    last = type(model).backend.ops[-1]
    with pytest.raises(BackendError, match=last):
        model.backend = {last: "no-such-backend"}
    with pytest.raises(BackendError, match="cpp"):
        model.backend = "cpp"  # attention / qformer_cross_attention have no cpp backend
    assert _state(model) == before and model.backend == "reference"


def test_composite_forward_follows_the_backend_it_was_given():
    """Values: a model switched to the reference backend after construction computes what one built with it does."""
    torch.manual_seed(0)
    vit = models.ViT(TINY_VIT).eval()
    pixels = torch.randn(2, 3, 8, 8)
    auto = vit(pixels)
    vit.backend = "reference"
    built = models.ViT(TINY_VIT, backend="reference").eval()
    built.load_state_dict(vit.state_dict())
    torch.testing.assert_close(vit(pixels), built(pixels), rtol=0, atol=0)
    torch.testing.assert_close(vit(pixels), auto, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_mod, convert_mod, config_mod, names", [
    ("vit", "convert/vit", "vit_config", ("ViTConfig", "PRESETS", "ACTIVATIONS")),
    ("qformer", "convert/qformer", "qformer_config", ("QFormerConfig", "PRESETS", "NUM_QUERY_TOKENS")),
    ("vlm", "convert/blip2", "vlm_config", ("VLMConfig", "VLM_PRESETS")),
])
def test_no_circle_between_a_model_and_its_converter(model_mod, convert_mod, config_mod, names):
    def imports(rel):
        tree = ast.parse((MODELS / f"{rel}.py").read_text())
        return {(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}, tree

    conv, _ = imports(convert_mod)
    assert (2, model_mod) not in conv and (2, config_mod) in conv, "the converter imports the config, not the model"
    _, tree = imports(model_mod)
    nested = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not nested, "no function-level imports left in the model"
    cfg = __import__(f"mmkernels.models.{config_mod}", fromlist=["_"])
    mod = __import__(f"mmkernels.models.{model_mod}", fromlist=["_"])
    for attr in names:  # re-exported: user code importing from the model module keeps working
        assert getattr(mod, attr) is getattr(cfg, attr)


@pytest.mark.parametrize("method", [vit_mod.ViT.from_hf, vit_mod.ViT.from_timm, qformer_mod.QFormer.from_hf,
                                    vlm_mod.VisionLanguageModel.from_hf_blip2])
def test_from_hf_class_methods_are_thin(method):
    body = ast.parse(textwrap.dedent(inspect.getsource(method))).body[0].body
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    assert len(body) <= 4, "a call into the converter and the build, nothing more"
    assert "_convert." in inspect.getsource(method)
