"""HF IDEFICS (v1) patched (integrations/hf/idefics.py): the perceiver resampler's attention through
``ops.attention`` and the gated cross-attention layers through ``ops.media_cross_attention``, read off the image
attention masks HF builds. Patched vs unpatched logits (fp32, 1e-5 relative) and every parameter's gradient (1e-4)
with several images per sample, text before the first image, end-of-document resets, images used out of order and
all-previous masks; generation; unpatch bit for bit; state-dict keys; report kinds; counted fallbacks; one host
read per forward; NaN in an unused image slot never read; the Triton backends under the interpreter; compile,
gradient checkpointing, deepcopy/pickle and accelerate offload."""

from __future__ import annotations

import copy
import io
import pickle

import hf_tiny_models  # tests/hf_tiny_models.py
import pytest
import torch

import mmkernels
from mmkernels.integrations.hf import idefics as hf_idefics
from mmkernels.integrations.hf import patch, unpatch
from mmkernels.testing import count_host_syncs

transformers = pytest.importorskip("transformers")

if not hasattr(transformers, "IdeficsForVisionText2Text"):
    pytest.skip("this transformers has no IDEFICS", allow_module_level=True)

B, LT, M = 2, 11, 3  # 3 image slots per sample (conftest's IDEFICS_*); sample 0 uses fewer in most patterns
# Per-token image index rows as the processor builds them (-1: no image), or explicit [B, LT, M] keep patterns.
PATTERNS = {
    # text before the first image, two images; an end of document (-1) then a third image
    "processor": [[-1, -1, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, -1, -1, 1, 1, 2, 2, 2, 2]],
    # images skipped and used out of order (a gather of the images into the order the text uses them)
    "out-of-order": [[1, 1, 1, 0, 0, 2, 2, -1, -1, 0, 0], [-1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]],
    # the last image only (a decode step's row repeated): one medium per sample after the gather
    "last-image": [[-1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]],
}
PREVIOUS = [[-1, -1, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]  # sees images 0..m


def _immediate(rows) -> torch.Tensor:
    idx = torch.tensor(rows)
    mask = torch.nn.functional.one_hot(idx.clamp(min=0), M)
    return mask * (idx >= 0)[..., None]


def _previous(rows) -> torch.Tensor:
    idx = torch.tensor(rows)
    return (torch.arange(M)[None, None, :] <= idx[..., None]).long()




_M = hf_tiny_models.load()  # tests/integrations/conftest.py's builders
idefics, _config = _M.idefics, _M.idefics_config


def _inputs(mask: torch.Tensor, seed: int = 1) -> dict:
    return _M.idefics_inputs(mask, seed)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    logits = model(**x).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_matches(logits, grads: dict, ref_logits, ref_grads: dict):
    """The patched model's acceptance: logits within 1e-5 of the unpatched ones (relative to their largest), every
    gradient within 1e-4 of the unpatched one relative to its own size, and 1e-4 absolute for the ones that are zero
    in exact arithmetic (key biases before a softmax: rounding noise of 1e-10 there)."""
    assert _rel(logits, ref_logits) <= 1e-5
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, g in ref_grads.items():
        scale = float(g.abs().max())
        err = float((grads[name] - g).abs().max())
        assert err <= 1e-4 * max(scale, 1.0), (name, err, scale)


def _masks():
    out = {name: _immediate(rows) for name, rows in PATTERNS.items()}
    out["all-previous"] = _previous(PREVIOUS)
    return out


MODEL_VARIANTS = {
    "qk-norms, resampler, vector alphas": dict(qk=True, resampler=True, alpha_type="vector"),
    "no qk-norms, resampler, float alphas": dict(qk=False, resampler=True, alpha_type="float"),
    "no resampler (image tokens as latents)": dict(qk=True, resampler=False, alpha_type="vector"),
}


@pytest.mark.parametrize("pattern", sorted(_masks()))
@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_fp32_logits_and_every_gradient_match(variant, pattern, ops_run, no_backend_env):
    model = idefics(**MODEL_VARIANTS[variant])
    x = _inputs(_masks()[pattern])
    ref_logits, ref_grads = _loss_and_grads(model, x)
    report = patch(model)
    ops_run.clear()
    logits, grads = _loss_and_grads(model, x)
    assert not report.fallbacks, report.fallbacks
    ran = {op for op, _ in ops_run}
    assert {"media_cross_attention", "attention", "patch_embed"} <= ran  # the vision tower runs ours too
    perceiver = [r for r in report.replaced if r.path.startswith("model.perceiver_resampler")]
    assert bool(perceiver) == MODEL_VARIANTS[variant]["resampler"]
    _assert_matches(logits, grads, ref_logits, ref_grads)


def test_unpatch_bit_exact_state_dict_and_report_kinds(no_backend_env):
    model = idefics()
    x = _inputs(_masks()["processor"])
    keys = list(model.state_dict())
    tensors = [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        ref = model(**x).logits
    report = patch(model)
    kinds = report.kinds()
    # the resampler's depth (2 swapped forwards) + the vision tower's layers (switched through their configs)
    assert kinds.get("attention") == 2 + model.config.vision_config.num_hidden_layers
    assert kinds.get("patch_embed") == 1
    assert kinds.get("media_cross_attention") == 2 and kinds.get("gated_cross_attention") == 2
    paths = {r.path for r in report.replaced}
    assert {"model.perceiver_resampler.blocks.0.0", "model.gated_cross_attn_layers.1",
            "model.gated_cross_attn_layers.1.cross_attn"} <= paths
    assert list(model.state_dict()) == keys and [p.data_ptr() for p in model.parameters()] == tensors
    assert patch(model) is report  # patching twice changes nothing
    unpatch(model)
    assert not any(k.startswith("_mmkernels") for m in model.modules() for k in m.__dict__)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)


def _bare_layer_call(model, mask4, gate, *, keys=M * 5):
    """One gated cross-attention layer called directly with a 4-D mask and gate of our making."""
    g = torch.Generator().manual_seed(3)
    layer = model.model.gated_cross_attn_layers[0]
    hidden = torch.randn(B, LT, 24, generator=g)
    images = torch.randn(B, keys, 18, generator=g)
    return layer(hidden, None, images, image_attention_mask=mask4, cross_attention_gate=gate)


def _hf_4d(mask3: torch.Tensor, nl: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's expansion of a [B, Lt, M] mask (IdeficsModel.forward): additive [B, 1, Lt, M * Nl] and the gate."""
    m = mask3[..., None].expand(-1, -1, -1, nl).reshape(B, LT, -1)
    add = torch.where(m[:, None].bool(), torch.zeros(()), torch.finfo(torch.float32).min)
    return add, (add == 0).any(-1).squeeze(1).float()


def test_media_plans():
    """What each mask becomes: Nl read off the mask, the media order (a gather only when the text turns to the
    images out of their order), the locations where a new image starts, the mode."""
    plans = {name: hf_idefics._media_plan(*_hf_4d(_immediate(rows), nl=4), B, LT, M * 4)
             for name, rows in PATTERNS.items()}
    plans["all-previous"] = hf_idefics._media_plan(*_hf_4d(_previous(PREVIOUS), nl=4), B, LT, M * 4)
    assert {p.kind for p in plans.values()} == {"media"} and {p.latents for p in plans.values()} == {4}
    p = plans["processor"]
    assert p.only_immediate and p.index is None and p.media == M
    assert p.locations.nonzero().tolist() == [[0, 2], [0, 5], [1, 0], [1, 5], [1, 7]]
    p = plans["out-of-order"]
    assert p.only_immediate and p.media == 4 and p.index[0].tolist() == [1, 0, 2, 0] and p.index[1, 0].item() == 2
    assert p.locations.nonzero().tolist() == [[0, 0], [0, 3], [0, 5], [0, 9], [1, 1]]
    p = plans["last-image"]
    assert p.media == 1 and p.index.tolist() == [[1], [2]]
    p = plans["all-previous"]
    assert not p.only_immediate and p.index is None and p.media == M
    assert p.locations.nonzero().tolist() == [[0, 2], [0, 4], [0, 7], [1, 0], [1, 3]]


def _fallback_cases():
    two = _immediate(PATTERNS["processor"])
    two[0, 6, 2] = 1  # a token seeing images 1 and 2 at once, not a prefix 0..m: no media pattern
    add, gate = _hf_4d(two)
    yield "two images at once", add, gate, "not a per-token media pattern"
    add, gate = _hf_4d(_immediate(PATTERNS["processor"]))
    part = add.clone()
    part[1, 0, 2, 1] = torch.finfo(torch.float32).min  # one latent of an image hidden from a token
    yield "part of an image", part, gate, "not a per-token media pattern"
    bias = add.clone()
    bias[0, 0, 3, 0] = -2.0  # a finite bias
    yield "additive bias", bias, gate, "additive mask with values other than 0"
    open_gate = gate.clone()
    open_gate[0, 0] = 1.0  # a token with no image whose update the gate lets through
    yield "gate open on an empty row", add, open_gate, "cross_attention_gate is nonzero"
    # HF's SDPA path applies the module's is_causal to an unmasked call (eager does not): not ours to guess
    yield "no mask", None, torch.ones(B, LT), "no image_attention_mask"


@pytest.mark.parametrize("case", [c[0] for c in _fallback_cases()])
def test_fallbacks_are_counted_and_give_the_unpatched_result(case, no_backend_env):
    _, mask4, gate, reason = next(c for c in _fallback_cases() if c[0] == case)
    model = idefics()
    with torch.no_grad():
        ref = _bare_layer_call(model, mask4, gate)
        report = patch(model)
        got = _bare_layer_call(model, mask4, gate)
    assert torch.equal(got, ref)
    assert sum(report.fallbacks.values()) == 1 and reason in next(iter(report.fallbacks)), report.fallbacks


def test_layer_called_with_hf_masks_matches(no_backend_env):
    """Called directly with HF's own 4-D masks of each pattern."""
    model = idefics()
    cases = [_hf_4d(_immediate(rows)) for rows in PATTERNS.values()] + [_hf_4d(_previous(PREVIOUS))]
    with torch.no_grad():
        refs = [_bare_layer_call(model, m, g) for m, g in cases]
        report = patch(model)
        for (m, g), ref in zip(cases, refs):
            assert _rel(_bare_layer_call(model, m, g), ref) <= 1e-5
    assert not report.fallbacks


def test_attention_dropout_in_training_falls_back(no_backend_env):
    model = idefics(dropout=0.25)
    mask4, gate = _hf_4d(_immediate(PATTERNS["processor"]))
    layer = model.model.gated_cross_attn_layers[0]
    report = patch(model)
    with torch.no_grad():
        layer(torch.randn(B, LT, 24), None, torch.randn(B, M * 5, 18), image_attention_mask=mask4,
              cross_attention_gate=gate)
    assert not report.fallbacks  # eval: no dropout
    model.train()
    layer(torch.randn(B, LT, 24), None, torch.randn(B, M * 5, 18), image_attention_mask=mask4,
          cross_attention_gate=gate)
    assert list(report.fallbacks) == ["IdeficsGatedCrossAttentionLayer: attention dropout in training "
                                      "(ops.media_cross_attention has none)"]


def test_output_flags(no_backend_env):
    """output_attentions / output_hidden_states on the model: the decoder's self-attention weights and hidden states
    are the unpatched ones (HF records no cross-attention weights: the gated layers keep our path)."""
    model = idefics()
    x = _inputs(_masks()["processor"])
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        ref = model(**x, **flags)
        report = patch(model)
        got = model(**x, **flags)
    assert not report.fallbacks, report.fallbacks
    assert ref.attentions is not None and len(got.attentions) == len(ref.attentions)
    for a, b in zip((got.logits, *got.attentions, *got.hidden_states), (ref.logits, *ref.attentions,
                                                                          *ref.hidden_states)):
        assert _rel(a, b) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_host_read_per_forward(backend, monkeypatch, no_backend_env):
    """The mask and gate HF builds once per forward are read on the host once, by the first layer; the other layers
    reuse the verdict, the backward reads nothing (mmkernels' own calls counted, debug checks off: production)."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = idefics()
    patch(model, backend=backend)
    calls = []
    real = hf_idefics._media_plan
    monkeypatch.setattr(hf_idefics, "_media_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs(_masks()["out-of-order"])
    with mmkernels.debug_checks(False):
        for _ in range(2):  # a new forward builds new mask tensors: a read each
            with count_host_syncs(skip=("triton", "transformers", "torch")) as syncs:
                logits = model(**x).logits
            assert syncs.count == 1, syncs.calls
            with count_host_syncs(skip=("triton", "transformers", "torch")) as syncs:
                logits.sum().backward()
            assert syncs.count == 0, syncs.calls
    assert len(calls) == 2
    with torch.inference_mode():  # no version counter to see an in-place change: nothing cached, a read per layer
        ref = model(**x).logits
        assert len(calls) == 4
    with torch.no_grad():
        assert _rel(ref, model(**x).logits) <= 1e-6


def test_nan_in_an_unused_image_slot_is_never_read(no_backend_env):
    """Sample 0 of the processor pattern uses images 0 and 1: NaN pixels in its third slot reach nothing (the
    unpatched model's softmax over the masked keys takes them in, giving NaN everywhere)."""
    model = idefics()
    mask = _masks()["processor"]
    x = _inputs(mask)
    with torch.no_grad():
        ref = model(**x).logits
        patch(model)
        x["pixel_values"][0, 2] = float("nan")
        got = model(**x).logits
    assert torch.isfinite(got).all()
    assert _rel(got, ref) <= 1e-5


def test_perceiver_embeddings_of_another_length(no_backend_env):
    """Precomputed latents (``perceiver_embeddings``, 4 per image where the resampler makes 5): Nl comes from the
    mask."""
    model = idefics()
    x = _inputs(_masks()["processor"])
    del x["pixel_values"]
    x["perceiver_embeddings"] = torch.randn(B * M, 4, 18, generator=torch.Generator().manual_seed(2))
    try:
        ref_logits, ref_grads = _loss_and_grads(model, x)
    except ValueError:  # transformers < 5.2x takes them per sample and image, [B, M, Nl, D]
        x["perceiver_embeddings"] = x["perceiver_embeddings"].view(B, M, 4, 18)
        ref_logits, ref_grads = _loss_and_grads(model, x)
    report = patch(model)
    logits, grads = _loss_and_grads(model, x)
    assert not report.fallbacks
    _assert_matches(logits, grads, ref_logits, ref_grads)


def test_generate_matches(no_backend_env):
    """Greedy generation: each decode step's one-row mask names the last image (a gather to one medium)."""
    model = idefics()
    x = _inputs(_masks()["processor"])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**x, **kwargs)
        report = patch(model)
        got = model.generate(**x, **kwargs)
    assert torch.equal(got, ref)
    assert not report.fallbacks


def test_triton_backends_under_the_interpreter(ops_run, no_backend_env):
    pytest.importorskip("triton")
    model = idefics()
    x = _inputs(_masks()["out-of-order"])
    ref_logits, ref_grads = _loss_and_grads(model, x)
    report = patch(model, backend="triton")
    ops_run.clear()
    logits, grads = _loss_and_grads(model, x)
    assert ("media_cross_attention", "triton") in ops_run and ("attention", "triton") in ops_run
    assert not report.fallbacks
    _assert_matches(logits, grads, ref_logits, ref_grads)


def test_training_with_gradient_checkpointing(no_backend_env):
    model = idefics()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    x = _inputs(_masks()["all-previous"])
    ref_logits, ref_grads = _loss_and_grads(model, x)
    report = patch(model)
    logits, grads = _loss_and_grads(model, x)
    assert not report.fallbacks
    _assert_matches(logits, grads, ref_logits, ref_grads)


def test_compile(no_backend_env):
    """The patched model compiles (the mask verdict is a graph break: Nl and the media count are shapes) and
    trains."""
    model = idefics()
    x = _inputs(_masks()["processor"])
    with torch.no_grad():
        ref = model(**x).logits
    patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(**x).logits
    assert _rel(out.detach(), ref) <= 1e-5
    out.sum().backward()
    assert model.model.gated_cross_attn_layers[0].cross_attn.q_proj.weight.grad is not None


def test_deepcopy_and_pickle_stay_patched(no_backend_env):
    model = idefics()
    x = _inputs(_masks()["out-of-order"])
    with torch.no_grad():
        ref = model(**x).logits
    patch(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert _rel(twin(**x).logits, ref) <= 1e-5
        assert unpatch(twin) == 7  # 2 perceiver attentions, 2 layers, 2 cross_attn, the vision embeddings
        with torch.no_grad():
            assert torch.equal(twin(**x).logits, ref)


@pytest.mark.parametrize("order", ["hooks-then-patch", "patch-then-hooks"])
def test_cpu_offload(order, ops_run, no_backend_env):
    accelerate = pytest.importorskip("accelerate")
    model = idefics()
    x = _inputs(_masks()["processor"])
    with torch.no_grad():
        ref = model(**x).logits
    if order == "patch-then-hooks":
        report = patch(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    if order == "hooks-then-patch":
        report = patch(model)
    ops_run.clear()
    with torch.no_grad():
        got = model(**x).logits
    assert {"media_cross_attention", "attention"} <= {op for op, _ in ops_run}
    assert not report.fallbacks
    assert _rel(got, ref) <= 1e-5
