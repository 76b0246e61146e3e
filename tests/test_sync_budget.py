"""The host-sync budget of the attention-like ops, their modules and the patched Hugging Face models (issue 20 item 4).

Counted with :func:`mmkernels.testing.count_host_syncs` (item/tolist/bool/int/nonzero/cpu/boolean-mask index calls,
at the Python level, so the count on CPU under Triton's interpreter is the count on a GPU), with the host-side value
checks off (``mmkernels.debug_checks(False)``: production; the rest of the suite runs with them on), on the Triton
path and on the reference path. Exact counts:

- ops and modules: 0 per call (forward and backward) when the caller gives the sizes (``max_seqlen_*``); varlen
  attention without them: exactly 1 (both ``cu_seqlens`` read in one transfer, which also checks them); with debug
  checks on: exactly 1 (that same read);
- a patched HF model: 0 per forward without a padding mask, exactly 1 with one (the mask is turned into packed
  indices / ``kv_lens`` once per forward, not per layer) and in a packed Qwen-VL tower (the maximum sequence and
  window lengths, once per forward), counting only mmkernels' own calls (transformers' mask
  helpers read the mask themselves; the unpatched model's count under the same filter is 0).
"""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import nn as mnn
from mmkernels.ops import attention, patch_embed, qformer_cross_attention
from mmkernels.testing import count_host_syncs

BACKENDS = ["triton", "reference"]
# HF models: count our calls only (transformers' own mask helpers read masks; torch's helpers they call as well).
OURS_ONLY = ("triton", "transformers", "torch")


@pytest.fixture(autouse=True)
def production():
    """The budget is for production: debug checks off (tests/conftest.py turns them on for the rest of the suite)."""
    with mmkernels.debug_checks(False):
        yield


def _syncs(fn, *, backward: bool = True, skip=("triton",)) -> list[str]:
    """Host syncs of one call of ``fn`` (and of the backward of its output's sum)."""
    with count_host_syncs(skip=skip) as syncs:
        out = fn()
        if backward and out.requires_grad:
            out.float().sum().backward()
    return syncs.calls


def _varlen(padded: bool, heads=(2, 2), d=8):
    """Two sequences (3 and 4 rows), plus two padding rows past cu_seqlens[-1] when ``padded``."""
    total = 9 if padded else 7
    q = torch.randn(total, heads[0], d, requires_grad=True)
    k = torch.randn(total, heads[1], d, requires_grad=True)
    v = torch.randn(total, heads[1], d, requires_grad=True)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    return q, k, v, cu


# ---- ops ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case, expected", [
    ("dense", 0), ("varlen", 0), ("varlen-padded", 0), ("varlen-no-max", 1), ("varlen-debug-checks", 1),
])
def test_attention_op(case, expected, causal, backend):
    if case == "dense":
        q = torch.randn(2, 5, 4, 8, requires_grad=True)
        k, v = (torch.randn(2, 6, 2, 8, requires_grad=True) for _ in range(2))

        def call():
            return attention(q, k, v, causal=causal, backend=backend)
    else:
        q, k, v, cu = _varlen(case == "varlen-padded", heads=(4, 2))
        sizes = {} if case == "varlen-no-max" else dict(max_seqlen_q=4, max_seqlen_k=4)

        def call():
            return attention(q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend, **sizes)
    if case == "varlen-debug-checks":
        with mmkernels.debug_checks():
            calls = _syncs(call)
    else:
        calls = _syncs(call)
    assert len(calls) == expected, calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, expected", [("no-mask", 0), ("padded", 0), ("padded-debug-checks", 1)])
def test_qformer_op(case, expected, backend):
    q = torch.randn(3, 5, 2, 8, requires_grad=True)
    k, v = (torch.randn(3, 7, 2, 8, requires_grad=True) for _ in range(2))
    lens = None if case == "no-mask" else torch.tensor([7, 4, 1], dtype=torch.int32)

    def call():
        return qformer_cross_attention(q, k, v, kv_lens=lens, backend=backend)
    if case.endswith("debug-checks"):
        with mmkernels.debug_checks():
            calls = _syncs(call)
    else:
        calls = _syncs(call)
    assert len(calls) == expected, calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extras", [False, True])
def test_patch_embed_op(extras, backend):
    pixels = torch.randn(2, 3, 8, 12, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4, requires_grad=True)
    more = dict(pos_embed=torch.randn(7, 5, requires_grad=True), cls_token=torch.randn(5, requires_grad=True))
    bias = torch.randn(5, requires_grad=True) if extras else None
    calls = _syncs(lambda: patch_embed(pixels, weight, bias, backend=backend, **(more if extras else {})))
    assert calls == []


# ---- modules -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dense", "causal", "cross", "varlen", "varlen-padded", "varlen-cross"])
def test_attention_module(case, backend):
    cross = case in ("cross", "varlen-cross")
    m = mnn.Attention(16, 4, num_kv_heads=2, cross=cross, kv_dim=12 if cross else None, causal=case == "causal",
                      backend=backend)
    if case in ("dense", "causal", "cross"):
        x = torch.randn(2, 5, 16)
        ctx = torch.randn(2, 6, 12) if cross else None
        calls = _syncs(lambda: m(x, ctx))
    else:
        total = 9 if case == "varlen-padded" else 7
        x = torch.randn(total, 16)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        if cross:
            ctx, cu_k = torch.randn(5, 12), torch.tensor([0, 1, 5], dtype=torch.int32)
            calls = _syncs(lambda: m(x, ctx, cu_seqlens_q=cu, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4))
        else:
            calls = _syncs(lambda: m(x, cu_seqlens_q=cu, max_seqlen_q=4))
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_qformer_module(padded, backend):
    m = mnn.QFormerCrossAttention(16, 2, kv_dim=12, backend=backend)
    x, img = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    lens = torch.tensor([7, 4, 1], dtype=torch.int32) if padded else None
    assert _syncs(lambda: m(x, img, kv_lens=lens)) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])  # the trained size, and an interpolated position embedding
def test_patch_embed_module(size, backend):
    m = mnn.PatchEmbed(8, 4, 3, 16, cls_token=True, pos_embed=True, backend=backend)
    pixels = torch.randn(2, 3, *size)
    assert _syncs(lambda: m(pixels)) == []


# ---- patched Hugging Face models ---------------------------------------------------------------------------------


def _hf():
    transformers = pytest.importorskip("transformers")
    import mmkernels.integrations.hf  # noqa: F401  (registers attn_implementation="mmkernels", as a user does)

    return transformers


def _tiny_models() -> dict:
    """tests/integrations/conftest.py's MODELS (the tiny vision / Q-Former models of the integration tests); empty
    without transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {}
    import hf_tiny_models  # tests/hf_tiny_models.py

    return hf_tiny_models.load().MODELS


HF_MODELS = _tiny_models()


def _model_syncs(model, inputs: dict, forwards: int = 1) -> list[str]:
    with torch.no_grad(), count_host_syncs(skip=OURS_ONLY) as syncs:
        for _ in range(forwards):
            model(**inputs)
    return syncs.calls


# The models whose inputs carry a padding mask that reaches a patched module (the others, vision towers and BLIP-2 /
# LLaVA from pixels, pass none): the Q-Former's image mask (kv_lens), InstructBLIP's instruction mask (the Q-Former's
# self-attention). Each takes exactly one host sync per forward with it, none without.
PADDED = ("Blip2QFormerModel", "InstructBlipForConditionalGeneration")


# Exactly one host read per forward, none in any layer: the packed native-resolution towers (Qwen2-VL, Qwen2.5-VL,
# Qwen3-VL, alone or in their VLM: the tower reads grid_thw once) and IDEFICS (its image attention mask and gate are
# read once, by the first gated cross-attention layer, and the plan is shared by the others).
PACKED = tuple(n for n in HF_MODELS if n.startswith(("Qwen", "Idefics")))


def _unpadded(name: str, inputs: dict) -> dict:
    inputs = dict(inputs)
    if name == "Blip2QFormerModel":
        inputs["encoder_attention_mask"] = torch.ones_like(inputs["encoder_attention_mask"])
    if name == "InstructBlipForConditionalGeneration":
        inputs["qformer_attention_mask"] = torch.ones_like(inputs["qformer_attention_mask"])
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, padded", [(n, False) for n in sorted(HF_MODELS)] + [(n, True) for n in PADDED])
def test_patched_hf_model(name, padded, backend):
    """At most one host sync per forward of a patched model, exactly: 1 with a padding mask, in a packed Qwen-VL
    tower or in IDEFICS, 0 otherwise; two forwards take two (a new mask per forward); the unpatched model makes none
    of these calls."""
    from mmkernels.integrations.hf import patch

    build, make_inputs, _, _, _ = HF_MODELS[name]
    model = build().eval()
    inputs = make_inputs()
    inputs, expected = (inputs, 1) if padded or name in PACKED else (_unpadded(name, inputs), 0)
    assert _model_syncs(model, inputs) == []  # the filter leaves none of the unpatched model's own
    patch(model, backend=backend)
    calls = _model_syncs(model, inputs)
    assert len(calls) == expected, calls
    calls = _model_syncs(model, inputs, forwards=2)
    assert len(calls) == 2 * expected, calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding, expected", [("none", 0), ("right", 1)])
def test_decoder_with_mmkernels_attention(padding, expected, backend, monkeypatch):
    """A causal LM on attn_implementation="mmkernels" (the decoder path of integrations/hf/attention.py): a right-
    padded batch is analysed once per forward (every layer reuses the plan), an unpadded one not at all; the
    result is the SDPA model's."""
    transformers = _hf()
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=20, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    if padding == "right":
        mask[1, 5:] = 0
        mask[2, 2:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("mmkernels")
    monkeypatch.setenv("MMKERNELS_BACKEND", backend)  # the attention function's backend (no patch() entry here)
    calls = _model_syncs(model, dict(input_ids=ids, attention_mask=mask))
    assert len(calls) == expected, calls
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
