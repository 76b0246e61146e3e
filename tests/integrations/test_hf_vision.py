"""mmkernels.integrations.hf on vision towers and Q-Formers: patched == unpatched, our ops run, unpatch is bit-exact,
training gradients match, parameters and state-dict keys untouched, patching twice is a no-op, the forced Triton
backend, interpolate_pos_encoding, the Q-Former's encoder_attention_mask, fallbacks, a missing class, autocast,
torch.compile and the `mmkernels-bench hf` CLI."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.integrations.hf import patch, unpatch
from mmkernels.integrations.hf._patching import is_swapped

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 2e-5, 1e-5  # fp32: same math, a different summation order (fused GEMM, online softmax)


def _build(hf_models, name):
    build, inputs, output, kinds, ops = hf_models[name]
    torch.manual_seed(0)
    return build().eval(), inputs(), output, kinds, ops


def _attn_impls(model):
    return {id(m.config): m.config.__dict__.get("_attn_implementation_internal")
            for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}


def test_patch_matches_and_unpatch_is_exact(hf_vision_model, hf_models, ops_run, no_backend_env):
    model, inputs, output, kinds, ops = _build(hf_models, hf_vision_model)
    keys = list(model.state_dict())
    params = [(n, p) for n, p in model.named_parameters()]
    impls = _attn_impls(model)
    with torch.no_grad():
        ref = output(model(**inputs))
        assert not ops_run

        report = patch(model)
        assert report.kinds() == kinds, str(report)
        assert str(report).startswith("mmkernels patch report")
        out = output(model(**inputs))
        assert {op for op, _ in ops_run} == ops
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        assert not report.fallbacks, report.fallbacks

        assert patch(model) is report  # twice: a no-op
        torch.testing.assert_close(output(model(**inputs)), out, atol=0, rtol=0)
        assert list(model.state_dict()) == keys
        assert [(n, p) for n, p in model.named_parameters()] == params  # same tensors, same order

        # Every swapped forward is restored (attention switched through configs is not a swapped forward).
        swapped = sum(1 for m in model.modules() if is_swapped(m))
        assert swapped >= kinds.get("patch_embed", 0) + kinds.get("qformer", 0)
        assert unpatch(model) == swapped
        ops_run.clear()
        again = output(model(**inputs))
        assert not ops_run, ops_run
        assert torch.equal(again, ref)
        assert _attn_impls(model) == impls
        assert not any(k.startswith("_mmkernels") for m in model.modules() for k in m.__dict__)
        assert unpatch(model) == 0  # unpatching an unpatched model: a no-op


def _grads(model, inputs, output):
    model.zero_grad(set_to_none=True)
    out = output(model(**inputs))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # a linear loss: O(1) gradients
    (out.float() * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, ref):
    """fp32 through a whole model: every gradient within 1e-4 of its own largest entry (a few ulps per layer)."""
    assert ref.keys() == got.keys() and ref
    for n in ref:
        scale = float(ref[n].abs().max())
        torch.testing.assert_close(got[n], ref[n], atol=1e-4 * scale + 1e-6, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_training_gradients_match(hf_vision_model, hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, hf_vision_model)
    model.train()
    ref = _grads(model, inputs, output)
    patch(model)
    got = _grads(model, inputs, output)
    assert ops_run
    _assert_grads_close(got, ref)


@pytest.mark.parametrize("name, expected", [
    ("ViTModel", {"attention", "patch_embed"}),
    ("Blip2QFormerModel", {"attention", "qformer_cross_attention"}),
])
def test_forced_triton_backend(name, expected, hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, name)
    ref = _grads(model, inputs, output)
    patch(model, backend="triton")
    got = _grads(model, inputs, output)
    assert {op for op, _ in ops_run} == expected
    assert {b for _, b in ops_run} == {"triton"}
    _assert_grads_close(got, ref)


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "SiglipVisionModel", "Blip2VisionModel"])
def test_interpolate_pos_encoding(name, hf_models, ops_run, no_backend_env):
    model, _, output, _, _ = _build(hf_models, name)
    pixels = torch.randn(2, 3, 12, 16)  # a 3x4 grid from a model trained on 2x2
    with torch.no_grad():
        ref = output(model(pixel_values=pixels, interpolate_pos_encoding=True))
        patch(model)
        out = output(model(pixel_values=pixels, interpolate_pos_encoding=True))
    assert ("patch_embed", "reference") in ops_run
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_vit_wrong_size_raises_the_models_error(hf_models, no_backend_env):
    model, _, _, _, _ = _build(hf_models, "ViTModel")
    patch(model)
    with pytest.raises(ValueError, match="doesn't match model"):
        model(pixel_values=torch.randn(1, 3, 12, 8))


def test_vit_mask_tokens_fall_back(hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "ViTModel")
    mask = torch.tensor([[True, False, False, True]] * 3)
    with torch.no_grad():
        ref = output(model(**inputs, bool_masked_pos=mask))
        report = patch(model)
        out = output(model(**inputs, bool_masked_pos=mask))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert report.fallbacks == {"ViTEmbeddings: bool_masked_pos (mask tokens)": 1}
    assert "fell back" in str(report)
    assert {op for op, _ in ops_run} == {"attention"}


@pytest.mark.parametrize("lens, expect_fallback", [((7, 3, 1), False), (None, False), ("left", True)])
def test_qformer_encoder_attention_mask(lens, expect_fallback, hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "Blip2QFormerModel")
    enc = inputs["encoder_hidden_states"]
    if lens is None:
        mask = None
    elif lens == "left":  # valid tokens at the end: not expressible as kv_lens
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, :2] = 0
    else:
        mask = (torch.arange(7)[None, :] < torch.tensor(lens)[:, None]).long()
    inputs.update(encoder_attention_mask=mask)
    with torch.no_grad():
        ref = output(model(**inputs))
        report = patch(model)
        if mask is not None and not expect_fallback:
            # Padded image tokens never reach a result in our kernel, even NaN (HF's own math would spread it).
            inputs.update(encoder_hidden_states=enc.masked_fill(~mask.bool()[..., None], float("nan")))
        out = output(model(**inputs))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert out.isfinite().all()
    if expect_fallback:
        assert report.fallbacks == {
            "Blip2QFormerMultiHeadAttention: encoder_attention_mask is not right padding of the image tokens": 1}
    else:
        assert not report.fallbacks
        assert ("qformer_cross_attention", "reference") in ops_run


def test_qformer_cross_attention_through_attention_when_qformer_off(hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "Blip2QFormerModel")
    with torch.no_grad():
        ref = output(model(**inputs))
        report = patch(model, qformer=False)
        out = output(model(**inputs))
    assert report.kinds() == {"attention": 3}
    assert {op for op, _ in ops_run} == {"attention"}  # the padded image tokens went varlen
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_kinds_switched_off(hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "Blip2ForConditionalGeneration")
    report = patch(model, attention=False, qformer=False, moe=False)
    assert report.kinds() == {"patch_embed": 1}
    with torch.no_grad():
        model(**inputs)
    assert {op for op, _ in ops_run} == {"patch_embed"}
    assert model.config.vision_config._attn_implementation != "mmkernels"


def test_missing_class_is_skipped_and_reported(hf_models, monkeypatch, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "ViTModel")
    monkeypatch.delattr(transformers.models.vit.modeling_vit, "ViTEmbeddings")
    with torch.no_grad():
        ref = output(model(**inputs))
        report = patch(model)
        out = output(model(**inputs))
    assert report.kinds() == {"attention": 2}
    assert any(s.kind == "patch_embed" and "ViTEmbeddings does not exist" in s.reason for s in report.skipped)
    assert "skipped" in str(report)
    assert {op for op, _ in ops_run} == {"attention"}
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_projection_wrapped_after_patch_falls_back(hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "CLIPVisionModel")
    report = patch(model)
    conv = next(m for n, m in model.named_modules() if n.endswith("embeddings.patch_embedding"))
    conv.register_forward_hook(lambda mod, args, out: out * 2)  # e.g. an adapter: our fused op must not skip it
    with torch.no_grad():
        out = output(model(**inputs))
        unpatch(model)
        ref = output(model(**inputs))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert sum(report.fallbacks.values()) == 1


def test_autocast_bf16(hf_models, ops_run, no_backend_env):
    model, inputs, output, _, _ = _build(hf_models, "Blip2ForConditionalGeneration")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = output(model(**inputs)).float()
        patch(model)
        out = output(model(**inputs)).float()
    assert {op for op, _ in ops_run} == {"attention", "patch_embed", "qformer_cross_attention"}
    assert out.isfinite().all()
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)  # bf16 products on both sides, different orders


@pytest.mark.parametrize("name, fullgraph", [("CLIPVisionModel", True), ("Blip2QFormerModel", False)])
def test_compile(name, fullgraph, hf_models, ops_run, no_backend_env):
    """A vision tower (no mask) compiles as one graph; the Q-Former's image-mask check is a graph break."""
    model, inputs, output, _, _ = _build(hf_models, name)
    with torch.no_grad():
        ref = output(model(**inputs))
    patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    out = output(compiled(**inputs))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert {op for op, _ in ops_run} >= (hf_models[name][4] - {"qformer_cross_attention"})
    out.sum().backward()  # the compiled graph trains
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("patch_embedding" in n or "crossattention.attention.key" in n for n in grads)
    assert any(n.endswith(("q_proj.weight", "attention.attention.query.weight")) for n in grads)


def test_qformer_with_a_padded_image_mask_compiles_as_one_graph(hf_models, ops_run, no_backend_env):
    """The Q-Former patch turns the image mask into kv_lens without a host read inside torch.compile (a device-side
    assertion instead of a bool()), so the patched Q-Former with a padded image mask compiles with fullgraph=True,
    matches the eager unpatched model and trains. On transformers < 5.25 (5.17 tested) the mask reaches our
    attention-mask check under compile, a graph break (docs/integrations/hf.md): there it compiles with breaks and
    must still match and train."""
    from packaging.version import Version

    fullgraph = Version(transformers.__version__) >= Version("5.25")
    model, inputs, output, _, _ = _build(hf_models, "Blip2QFormerModel")
    assert not inputs["encoder_attention_mask"].all()  # padded image tokens
    with torch.no_grad():
        ref = output(model(**inputs))
    patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    out = output(compiled(**inputs))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert "qformer_cross_attention" in {op for op, _ in ops_run}
    out.sum().backward()
    assert any("crossattention.attention.key" in n for n, p in model.named_parameters() if p.grad is not None)


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("model")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        unpatch(None)


def test_bench_cli(capsys):
    from mmkernels.bench.cli import main

    assert main(["hf", "--model", "vit", "--warmup-ms", "0", "--rep-ms", "0"]) == 0
    text = capsys.readouterr().out
    assert "patched" in text and "unpatched" in text and "ratio" in text
    assert main(["hf", "--model", "nope"]) == 2


def test_package_exports():
    assert mmkernels.integrations.hf.patch is patch
    from mmkernels.integrations.hf import PATCH_OPS  # the keys a backend mapping may use (docs/integrations/hf.md)

    assert "rotary_embedding" in PATCH_OPS and "media_cross_attention" in PATCH_OPS


def test_deepcopy_and_save_pretrained_of_a_patched_model(hf_models, tmp_path, ops_run, no_backend_env):
    import copy

    model, inputs, output, _, _ = _build(hf_models, "Blip2QFormerModel")
    with torch.no_grad():
        ref = output(model(**inputs))
        patch(model)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(output(twin(**inputs)), ref, atol=ATOL, rtol=RTOL)
        assert ops_run
        unpatch(twin)  # restores the copy's own attention configs and forwards, not the original's
        impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
        assert impls == {"sdpa", "mmkernels"}  # the model's config keeps its own; its attention modules read ours
        assert {m.config._attn_implementation for m in twin.modules() if hasattr(m, "config")} == {"sdpa"}
        assert all(m.config is twin.config for m in twin.modules() if hasattr(m, "config"))
        ops_run.clear()
        assert torch.equal(output(twin(**inputs)), ref) and not ops_run
        model.save_pretrained(tmp_path)  # the checkpoint is the plain HF one
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert loaded.config._attn_implementation != "mmkernels"
        assert list(loaded.state_dict()) == list(model.state_dict())
        assert torch.equal(output(loaded(**inputs)), ref)


def test_qformer_only_reads_the_eager_additive_image_mask(ops_run, no_backend_env):
    """attention=False keeps an eager Q-Former's masks additive (0 / finfo.min): they still map onto kv_lens."""
    cfg = transformers.Blip2QFormerConfig(hidden_size=18, num_hidden_layers=2, num_attention_heads=3,
                                          intermediate_size=20, encoder_hidden_size=12, attn_implementation="eager")
    model = transformers.Blip2QFormerModel(cfg).eval()
    x, enc = torch.randn(2, 4, 18), torch.randn(2, 9, 12)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        ref = model(query_embeds=x, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
        report = patch(model, attention=False)
        out = model(query_embeds=x, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
    assert report.kinds() == {"qformer": 1} and not report.fallbacks
    assert {op for op, _ in ops_run} == {"qformer_cross_attention"}
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend, error", [
    ("tritonn", mmkernels.BackendError), (3, TypeError), ({"atention": "triton"}, mmkernels.BackendError),
    ("cpp", mmkernels.BackendError), ({"attention": "cpp"}, mmkernels.BackendError),
    ({"moe_route": "nope"}, mmkernels.BackendError)])
def test_bad_backend_raises_at_patch_time_and_leaves_the_model_alone(backend, error, hf_models, no_backend_env):
    """Misspelt names, wrong types and backends an op lacks (attention has no C++ one) fail in ``patch`` itself,
    before the first forward, and the model is exactly as before."""
    model = hf_models["CLIPVisionModel"][0]()
    forwards = {n: dict(m.__dict__) for n, m in model.named_modules()}
    impl = model.config._attn_implementation
    with pytest.raises(error):
        patch(model, backend=backend)
    assert model.config._attn_implementation == impl
    assert {n: dict(m.__dict__) for n, m in model.named_modules()} == forwards
    assert bool(patch(model, backend={"attention": "reference", "moe_route": "cpp"}))  # valid names still patch
    unpatch(model)


def test_unpatch_of_the_model_undoes_a_patch_of_a_part(hf_models, ops_run, no_backend_env):
    """``patch(model.vision_model)`` then ``unpatch(model)``: the part's forwards and configs are restored too."""
    build, inputs, output, _, _ = hf_models["Blip2ForConditionalGeneration"]
    model, x = build().eval(), inputs()
    impl = model.vision_model.config._attn_implementation
    with torch.no_grad():
        ref = output(model(**x))
        report = patch(model.vision_model)
        assert report.kinds() == {"attention": 2, "patch_embed": 1}
        model(**x)
        assert ops_run
        assert unpatch(model) == 1  # the patch embedding's forward (attention is switched through the config)
        ops_run.clear()
        assert torch.equal(output(model(**x)), ref) and not ops_run
    assert model.vision_model.config._attn_implementation == impl
    assert not [k for m in model.modules() for k in m.__dict__ if k.startswith("_mmkernels_")]


def _running_ours(model) -> set[str]:
    """Paths of the modules that run our code: a swapped forward or a switched attention."""
    from mmkernels.integrations.hf import attention as hf_attention

    return {path for path, m in model.named_modules() if is_swapped(m) or hf_attention.ENTRY_ATTR in m.__dict__}


PARTS = ("embeddings", "layers.0")  # a patch embedding, a transformer block (its attention)
STEPS = [(verb, part) for verb in ("patch", "unpatch") for part in ("", *PARTS)]


@pytest.mark.parametrize("history", [(a, b, c) for a in STEPS for b in STEPS for c in STEPS],
                         ids=lambda h: "-".join(f"{v}({p or 'model'})" for v, p in h))
def test_patch_of_the_model_after_any_history_of_parts_patches_all_of_it(hf_models, no_backend_env, history):
    """Any three patch / unpatch calls on the model and its parts, then ``patch(model)``: every module a fresh
    ``patch(model)`` covers runs our code, and the model's report lists exactly the modules that do (found by the
    fresh-user trial: ``patch(part)``, ``patch(model)``, ``unpatch(part)``, ``patch(model)`` left the part unpatched
    and returned the old report)."""
    build = hf_models["ViTModel"][0]
    fresh = build().eval()
    patch(fresh)
    expected = _running_ours(fresh)
    model = build().eval()
    for verb, part in history:
        (patch if verb == "patch" else unpatch)(model.get_submodule(part))
    report = patch(model)
    assert _running_ours(model) == expected
    assert {r.path for r in report.replaced} == expected
    unpatch(model)
    assert _running_ours(model) == set()


def _change(model, how):
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    if how == "forward_hook":
        conv.register_forward_hook(lambda mod, args, out: out * 2)
    elif how == "forward_pre_hook":
        conv.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    else:
        plain = conv.forward
        conv.forward = lambda x: plain(x) * 2


@pytest.mark.parametrize("order", ["change-then-patch", "patch-then-change"])
@pytest.mark.parametrize("how", ["forward_hook", "forward_pre_hook", "instance_forward"])
@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "SiglipVisionModel", "Blip2VisionModel"])
def test_changed_projection_is_never_skipped(name, how, order, hf_models, ops_run, no_backend_env):
    """Whatever changes what calling the patch projection does (a hook, another library's forward on it), the fused op
    (which reads its weight without calling it) never skips it: changed before ``patch``, the embedding is left alone
    (reported); changed after, that call runs the model's own forward (counted)."""
    twin, inputs, output, _, _ = _build(hf_models, name)
    _change(twin, how)
    model, _, _, _, _ = _build(hf_models, name)
    with torch.no_grad():
        ref = output(twin(**inputs))
        if order == "change-then-patch":
            _change(model, how)
            report = patch(model)
        else:
            report = patch(model)
            _change(model, how)
        out = output(model(**inputs))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert "patch_embed" not in {op for op, _ in ops_run}
    if order == "change-then-patch":
        assert "patch_embed" not in report.kinds() and not report.fallbacks
        assert any(s.kind == "patch_embed" and "not a plain stride-P Conv2d" in s.reason for s in report.skipped)
    else:
        assert sum(report.fallbacks.values()) == 1 and "not a plain stride-P Conv2d" in str(report)
