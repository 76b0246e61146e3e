"""Every output flag HF supports (``output_attentions``, ``output_hidden_states``, ``return_dict``), set on the config
or given at call time, gives on a patched model exactly what the unpatched model gives (the same structure, the same
values, or the same error), for every covered family and for models built with eager and with SDPA attention.

transformers 5 collects attention weights with output recorders that do not always pass the flag to the attention
function (SigLIP's never sees it): a call whose weights are recorded runs the model's own implementation, counted."""

from __future__ import annotations

import pytest
import torch

from mmkernels.integrations.hf import patch, unpatch

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 2e-5, 1e-5
WEIGHTS = "output_attentions=True needs the attention weights"
TOWERS = {"ViTModel", "CLIPVisionModel", "SiglipVisionModel", "Blip2VisionModel", "Blip2QFormerModel",
          "InternVLVisionModel", "Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",
          "Qwen3VLVisionModel"}

# name: (where the flag is set, flags)
CASES = {
    "call-attentions": ("call", dict(output_attentions=True)),
    "call-hidden-states": ("call", dict(output_hidden_states=True)),
    "call-tuple": ("call", dict(return_dict=False)),
    "call-all": ("call", dict(output_attentions=True, output_hidden_states=True, return_dict=False)),
    "config-attentions": ("config", dict(output_attentions=True)),
    "config-hidden-states": ("config", dict(output_hidden_states=True)),
    "config-tuple": ("config", dict(return_dict=False)),
    "config-all": ("config", dict(output_attentions=True, output_hidden_states=True, return_dict=False)),
}


def _leaves(out, path="out"):
    """(path, tensor | type name | value) for every leaf of a model output (ModelOutput, tuple, nested)."""
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of the fields that are set
        return [(path, type(out).__name__)] + [x for k, v in out.items() for x in _leaves(v, f"{path}.{k}")]
    if isinstance(out, (tuple, list)):
        return [(path, f"{type(out).__name__}[{len(out)}]")] + [x for i, v in enumerate(out)
                                                                 for x in _leaves(v, f"{path}[{i}]")]
    return [(path, out if out is None or isinstance(out, (bool, int, float, str)) else type(out).__name__)]


def _assert_same(got, ref):
    got, ref = _leaves(got), _leaves(ref)
    assert [p for p, _ in got] == [p for p, _ in ref]
    for (path, g), (_, r) in zip(got, ref):
        if isinstance(r, torch.Tensor):
            torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL, msg=lambda m, path=path: f"{path}: {m}")
        else:
            assert g == r, path


def _set(config, flags):
    for name, value in flags.items():
        setattr(config, name, value)


def _run(model, inputs, where, flags):
    """The output, or the exception (type and message) the flags give."""
    try:
        with torch.no_grad():
            if where == "config":
                _set(model.config, flags)
                return model(**inputs)
            return model(**inputs, **flags)
    except Exception as exc:  # noqa: BLE001 - HF's own error for some flags: the patched model must give the same
        return exc


def _cases():
    """Every flag case on eager models; on SDPA models the cases that ask for attention weights (the only flag SDPA
    treats differently)."""
    for case, (_, flags) in sorted(CASES.items()):
        yield case, "eager"
        if flags.get("output_attentions"):
            yield case, "sdpa"


@pytest.mark.parametrize("case, impl", list(_cases()))
def test_output_flags_as_unpatched(case, impl, hf_any_model, hf_models, ops_run, no_backend_env):
    where, flags = CASES[case]
    build, inputs, _, _, ops = hf_models[hf_any_model]
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation(impl)
    x = inputs()
    ref = _run(model, x, where, flags)
    unpatched_config = model.config.to_dict()

    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation(impl)
    report = patch(model)
    got = _run(model, x, where, flags)  # config flags set while patched: accepted or refused as unpatched
    assert model.config.to_dict() == unpatched_config

    if isinstance(ref, Exception):
        assert type(got) is type(ref) and str(got) == str(ref), (got, ref)
        return
    assert not isinstance(got, Exception), got
    _assert_same(got, ref)
    # The ops of an attention module (a Qwen-VL tower's rotary is part of its attention forward) may hand back.
    assert {op for op, _ in ops_run} >= ops - {"attention", "qformer_cross_attention", "rotary_embedding"}
    if flags.get("output_attentions"):  # weights recorded or passed: the model's own attention ran, counted
        # the attention function's own fallback, or a swapped forward's (named by its class)
        assert all(r == WEIGHTS or r.endswith(f"Attention: {WEIGHTS}") for r in report.fallbacks), report.fallbacks
        weights = ref.get("attentions") if isinstance(ref, dict) else None
        if weights and hf_any_model in TOWERS:  # weights of our modules (composites: the language model's)
            assert sum(report.fallbacks.values()) >= len(weights), report.fallbacks
    else:
        assert not report.fallbacks, report.fallbacks
        assert {op for op, _ in ops_run} == ops  # every kernel ran: nothing fell back
    unpatch(model)


@pytest.mark.parametrize("name", ["ViTModel", "SiglipVisionModel", "Blip2QFormerModel"])
def test_weights_on_the_config_of_an_eager_model(name, hf_models, ops_run, no_backend_env):
    """The finding: ``config.output_attentions = True`` on a patched eager model is accepted and gives the weights
    (SigLIP's attention never sees the flag; the Q-Former's cross-attention weights too)."""
    build, inputs, output, _, _ = hf_models[name]
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation("eager")
    x = inputs()
    with torch.no_grad():
        plain = model(**x)
        report = patch(model)
        assert not report.fallbacks
        model.config.output_attentions = True
        got = model(**x)
        unpatch(model)
        ref = model(**x)
    assert plain.attentions is None and len(ref.attentions) >= 2
    _assert_same(got, ref)
    assert report.fallbacks[WEIGHTS] == len(ref.attentions)  # one per attention call that gave weights
