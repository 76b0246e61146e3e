"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers patched (integrations/hf/qwen_vl.py): packed native-resolution
batches of 1-4 images and a 2-frame video give the unpatched tower's outputs and gradients, attention runs once per
block whatever the number of images, window and full layers both run packed, the Conv3d projection becomes one GEMM,
fallbacks are counted, torch.compile works. (The shared sweeps over every covered model, in test_hf_vision.py,
test_hf_output_flags.py, test_hf_accelerate.py, test_hf_peft.py, test_hf_serialization.py and test_sync_budget.py,
cover these towers and their VLMs too: unpatch bit for bit, state dicts, flags, offload, LoRA, pickling, one host
read per forward.)"""

from __future__ import annotations

import importlib

import hf_tiny_models  # tests/hf_tiny_models.py
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmkernels
from mmkernels.integrations.hf import patch, unpatch
from mmkernels.integrations.hf import qwen_vl as qv
from mmkernels.testing import assert_within_ref_error

transformers = pytest.importorskip("transformers")

_M = hf_tiny_models.load()  # tests/integrations/conftest.py's builders
qwen_patches, qwen_tower = _M.qwen_patches, _M.qwen_tower

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
DEPTH = {"qwen2_vl": 2, "qwen2_5_vl": 4, "qwen3_vl": 3}
# one image; four entries: three images of different sizes (one not square) and a 2-frame video
GRIDS = {"1 image": ((1, 6, 4),), "3 images + video": ((1, 4, 6), (1, 8, 4), (2, 4, 4), (1, 2, 2))}
ATOL, RTOL = 2e-5, 1e-5


def _out(o) -> torch.Tensor:
    return torch.cat([o.last_hidden_state.flatten(), o.pooler_output.flatten()])


def _tower(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    return qwen_tower(family).to(dtype).eval()


def _skip_missing(family: str):
    if not hasattr(transformers, {"qwen2_vl": "Qwen2VLVisionConfig", "qwen2_5_vl": "Qwen2_5_VLVisionConfig",
                                  "qwen3_vl": "Qwen3VLVisionConfig"}[family]):
        pytest.skip(f"this transformers has no {family}")


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_outputs_and_every_gradient_match(family, grid, ops_run, no_backend_env):
    _skip_missing(family)
    model = _tower(family)
    hidden, grid_thw = qwen_patches(GRIDS[grid])
    ref = _out(model(hidden_states=hidden, grid_thw=grid_thw))
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (ref * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    report = patch(model)
    out = _out(model(hidden_states=hidden, grid_thw=grid_thw))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads
    for n, g in ref_grads.items():  # every parameter within 1e-4 of its own largest entry
        torch.testing.assert_close(grads[n], g, atol=1e-4 * float(g.abs().max()) + 1e-6, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")
    assert {op for op, _ in ops_run} == {"attention", "rotary_embedding", "patch_embed"}
    assert not report.fallbacks, report.fallbacks


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_within_twice_the_unpatched_error(family, no_backend_env):
    """fp16 against the fp64 tower: our error at most 2x the unpatched fp16 tower's (flash-attn's rule)."""
    _skip_missing(family)
    hidden, grid_thw = qwen_patches(GRIDS["3 images + video"])
    truth = _out(_tower(family, torch.float64)(hidden_states=hidden.double(), grid_thw=grid_thw))
    model = _tower(family, torch.float16)
    with torch.no_grad():
        ref = _out(model(hidden_states=hidden.half(), grid_thw=grid_thw))
        patch(model)
        out = _out(model(hidden_states=hidden.half(), grid_thw=grid_thw))
    assert out.dtype == torch.float16
    assert_within_ref_error(out, ref, truth, name=family)


class _RegisteredOps(TorchDispatchMode):
    """A dispatch-mode spy: every ``torch.ops.mmkernels.*`` call that reaches the dispatcher, by name."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mmkernels":
            self.calls.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_attention_once_per_block_whatever_the_images(family, ops_run, no_backend_env):
    """Under backend="triton" (the interpreter), each forward runs attention and the rotary once per block and the
    patch embedding once: the same counts for one image as for four entries (no per-image loop). Seen twice: in the
    backend registry (which backend each public op chose) and in the dispatcher (the registered Triton ops ran)."""
    _skip_missing(family)
    model = _tower(family)
    patch(model, backend="triton")
    for grid in GRIDS.values():
        hidden, grid_thw = qwen_patches(grid)
        ops_run.clear()
        with torch.no_grad(), _RegisteredOps() as spy:
            model(hidden_states=hidden, grid_thw=grid_thw)
        counts = {op: sum(1 for o, _ in ops_run if o == op) for op in {o for o, _ in ops_run}}
        assert counts == {"attention": DEPTH[family], "rotary_embedding": DEPTH[family], "patch_embed": 1}, counts
        assert {b for _, b in ops_run} == {"triton"}
        ran = {op: spy.calls.count(op) for op in set(spy.calls)}
        assert ran == {"attention_fwd_triton": DEPTH[family], "rotary_embedding_fwd_triton": DEPTH[family],
                       "patch_embed_fwd_triton": 1}, ran
    unpatch(model)
    hidden, grid_thw = qwen_patches(GRIDS["3 images + video"])
    with torch.no_grad():
        ref = _out(model(hidden_states=hidden, grid_thw=grid_thw))
        patch(model, backend="triton")
        torch.testing.assert_close(_out(model(hidden_states=hidden, grid_thw=grid_thw)), ref, atol=ATOL, rtol=RTOL)


def test_window_and_full_layers_both_run_packed(monkeypatch, no_backend_env):
    """Qwen2.5-VL: the window layers get the windows (more segments than frames, the window maximum), the full
    layers the frames, each as one call with its maximum length given (no host read in a layer)."""
    _skip_missing("qwen2_5_vl")
    seen = []
    real = qv.attention

    def spy(q, k, v, **kw):
        seen.append((kw["cu_seqlens_q"].numel() - 1, kw["max_seqlen_q"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(qv, "attention", spy)
    model = _tower("qwen2_5_vl")
    patch(model)
    hidden, grid_thw = qwen_patches(GRIDS["3 images + video"])
    with torch.no_grad():
        model(hidden_states=hidden, grid_thw=grid_thw)
    frames = int(grid_thw[:, 0].sum())
    longest_frame = int((grid_thw[:, 1] * grid_thw[:, 2]).max())
    full = [1, 3]  # the tower's fullatt_block_indexes
    assert [seen[i] for i in full] == [(frames, longest_frame)] * 2
    windows = [seen[i] for i in range(4) if i not in full]
    assert all(n > frames and m == 16 for n, m in windows), windows  # 2x2 merged tokens of 2x2 patches


def test_projection_changed_after_patch_falls_back(no_backend_env):
    """A hook on the Conv3d (an adapter, another library): the model's own forward runs it, counted."""
    model = _tower("qwen2_vl")
    hidden, grid_thw = qwen_patches(GRIDS["1 image"])
    with torch.no_grad():
        ref = _out(model(hidden_states=hidden, grid_thw=grid_thw))
        report = patch(model)
        model.patch_embed.proj.register_forward_hook(lambda m, a, o: o * 2)
        out = _out(model(hidden_states=hidden, grid_thw=grid_thw))
    assert any("proj is not a plain Conv3d" in r for r in report.fallbacks), report.fallbacks
    assert not torch.allclose(out, ref)  # the hook ran (the doubled embedding changes everything)


def test_compile(ops_run, no_backend_env):
    """The patched tower compiles (transformers' own grid helpers read grid_thw: graph breaks there) and trains."""
    model = _tower("qwen2_5_vl")
    hidden, grid_thw = qwen_patches(GRIDS["3 images + video"])
    with torch.no_grad():
        ref = _out(model(hidden_states=hidden, grid_thw=grid_thw))
    patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out = _out(compiled(hidden_states=hidden, grid_thw=grid_thw))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert {op for op, _ in ops_run} >= {"attention", "rotary_embedding", "patch_embed"}
    out.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_callers_own_lengths_are_checked_not_trusted(family, no_backend_env):
    """A caller's precomputed segments are kept; its max_seqlen, too small or larger than the packed length (which
    the unpatched SDPA tower ignores), changes nothing: the maxima are read from the segments (one more read)."""
    from mmkernels.testing import count_host_syncs

    _skip_missing(family)
    model = _tower(family)
    hidden, grid_thw = qwen_patches(GRIDS["3 images + video"])
    with torch.no_grad():
        ref = _out(model(hidden_states=hidden, grid_thw=grid_thw))
        patch(model)
        cu = importlib.import_module("transformers.vision_utils").get_vision_cu_seqlens(grid_thw)
        for given in ({"max_seqlen": 4}, {"max_seqlen": 10_000}, {"max_window_seqlen": 1}, {"cu_seqlens": cu}):
            with mmkernels.debug_checks(False), count_host_syncs(skip=("triton", "transformers", "torch")) as syncs:
                out = _out(model(hidden_states=hidden, grid_thw=grid_thw, **given))
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=lambda m, g=given: f"{g}: {m}")
            assert syncs.count == 2, (given, syncs.calls)  # grid_thw, then the caller's segments' maxima


def test_repatch_after_a_part_was_unpatched(no_backend_env):
    """``unpatch(model.visual)`` then ``patch(model)``: the whole model is patched afresh (a new, true report)."""
    _skip_missing("qwen2_5_vl")
    model = _M.qwen_vlm("qwen2_5_vl").eval()
    first = patch(model)
    assert unpatch(model.model.visual) > 0
    again = patch(model)
    assert again is not first and again.kinds() == first.kinds()
    assert unpatch(model) == first.kinds()["tower"] + first.kinds()["rotary"] + first.kinds()["patch_embed"]


def test_a_part_patched_first_keeps_its_report(no_backend_env):
    """``patch(model.visual)`` then ``patch(model)``: the tower's fallbacks go to the report of the first patch; the
    whole's report lists the tower's modules too (under their full paths, noting the earlier patch)."""
    _skip_missing("qwen2_vl")
    model = _M.qwen_vlm("qwen2_vl").eval()
    first = patch(model.model.visual)
    second = patch(model)
    listed = [r for r in second.replaced if r.path.startswith("model.visual")]
    assert sorted((r.path, r.kind) for r in listed) == sorted(
        (f"model.visual.{r.path}" if r.path else "model.visual", r.kind) for r in first.replaced)
    assert all("patched before by patch() of 'model.visual'" in r.detail for r in listed)
    model.model.visual.patch_embed.proj.register_forward_hook(lambda m, a, o: o)
    inputs = _M._qwen_vlm_inputs()
    with torch.no_grad():
        model(**inputs)
    assert any("proj is not a plain Conv3d" in r for r in first.fallbacks), first.fallbacks
    assert not second.fallbacks, second.fallbacks


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_raise_the_models_own_error(family, no_backend_env):
    """Patches that disagree with grid_thw, or no image at all: the patched tower raises what the unpatched one
    raises (same type, same message)."""
    _skip_missing(family)
    model = _tower(family)
    hidden, grid_thw = qwen_patches(GRIDS["1 image"])
    cases = [dict(hidden_states=hidden[:-1], grid_thw=grid_thw),
             dict(hidden_states=hidden[:0], grid_thw=grid_thw[:0])]
    for case in cases:
        errors = []
        for patched in (False, True):
            if patched:
                patch(model)
            try:
                with torch.no_grad():
                    model(**case)
                errors.append(None)
            except Exception as exc:  # noqa: BLE001 - the exact error is what is compared
                errors.append((type(exc), str(exc)))
        unpatch(model)
        assert errors[0] == errors[1], errors
