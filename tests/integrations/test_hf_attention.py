"""The "mmkernels" attention implementation: registration with transformers, from_pretrained /
set_attn_implementation, every mask pattern it maps onto our kernels (checked against SDPA with the same mask, values
and gradients), and the masks it hands back to the model's own implementation (counted, and still right)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkernels.integrations.hf import FALLBACKS, attention_forward, patch, unpatch

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

ATOL, RTOL = 2e-5, 1e-5


class _Attn(torch.nn.Module):
    def __init__(self, causal: bool, groups: int = 1):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def _sdpa(q, k, v, keep=None, causal=False, scale=None):
    """The truth: SDPA in fp64 on [B, H, L, D] with GQA expanded, output [B, Lq, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if causal:  # bottom-right, as flash-attn and a KV cache
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep, scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def _qkv(b, hq, hkv, lq, lk, d=6, bq=None):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(bq or b, hq, lq, d, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, generator=g, requires_grad=True)
    return q, k, v


def _padding(lens, lk, left=False):
    j = torch.arange(lk)[None, :]
    lens = torch.tensor(lens)[:, None]
    return j >= lk - lens if left else j < lens


def test_registered():
    assert ALL_ATTENTION_FUNCTIONS["mmkernels"] is attention_forward
    assert "mmkernels" in ALL_MASK_ATTENTION_FUNCTIONS  # masks reach us as SDPA's boolean keep-masks


def _mask_cases():
    lq, lk = 3, 7
    causal_br = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    right = _padding([7, 4, 1], lk)[:, None, None, :].expand(3, 1, lq, lk)
    holes = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    left_causal = causal_br & _padding([7, 5, 6], lk, left=True)[:, None, :]
    n = 6
    rp = _padding([6, 3, 1], n)
    right_causal = torch.ones(n, n, dtype=torch.bool).tril()[None] & rp[:, None, :]
    right_causal = right_causal | (~rp[:, :, None] & rp[:, None, :])  # padding queries see every valid key (HF)
    return {
        # name: (q/k/v shape args, mask (keep) or None, module causal, expected kernel call)
        "dense-gqa": ((3, 4, 2, 5, 5), None, False),
        "causal-gqa": ((3, 4, 2, 5, 5), None, True),
        "decode-one-query": ((3, 4, 1, 1, 7), None, True),
        "cross": ((3, 2, 2, lq, lk), None, False),
        "broadcast-queries": ((3, 2, 2, lq, lk, 6, 1), None, False),
        "right-padding": ((3, 2, 2, lq, lk), right, False),
        "key-holes": ((3, 2, 2, lq, lk), holes[:, None, None, :].expand(3, 1, lq, lk), False),
        "additive-padding": ((3, 2, 2, lq, lk), right, False),
        "causal-bool": ((3, 2, 1, lq, lk), causal_br[None, None].expand(3, 1, lq, lk), True),
        "causal-left-padding": ((3, 2, 1, lq, lk), left_causal[:, None], True),
        "causal-right-padding": ((3, 2, 2, n, n), right_causal[:, None], True),
    }


@pytest.mark.parametrize("case", sorted(_mask_cases()))
def test_masks_run_our_kernel(case, ops_run, no_backend_env):
    shape, keep, causal = _mask_cases()[case]
    q, k, v = _qkv(*shape)
    mask = keep
    if case == "additive-padding":
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    before = sum(FALLBACKS.values())
    out, weights = attention_forward(_Attn(causal, q.shape[1] // k.shape[1]), q, k, v, mask, scaling=0.4)
    assert weights is None and sum(FALLBACKS.values()) == before
    assert ops_run and {op for op, _ in ops_run} == {"attention"}
    b = max(q.shape[0], k.shape[0])
    qe = q.expand(b, -1, -1, -1)
    ref = _sdpa(qe, k, v, keep, causal=causal and keep is None and q.shape[2] > 1, scale=0.4)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("case", ["arbitrary-additive", "fully-masked-row", "per-head", "output-attentions"])
def test_masks_we_cannot_express_fall_back(case, ops_run, no_backend_env):
    q, k, v = _qkv(2, 2, 2, 4, 5)
    keep = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    kwargs = {}
    if case == "arbitrary-additive":
        mask = torch.randn(2, 1, 4, 5)  # e.g. ALiBi-like biases
    elif case == "fully-masked-row":
        keep[1, 0, 2] = False
        mask = keep
    elif case == "per-head":
        keep = keep.repeat(1, 2, 1, 1)
        keep[0, 1, :, 0] = False
        mask = keep
    else:
        mask, kwargs = None, {"output_attentions": True}
    before = FALLBACKS.copy()
    out, _ = attention_forward(_Attn(False), q, k, v, mask, scaling=0.5, **kwargs)
    assert sum(FALLBACKS.values()) == sum(before.values()) + 1
    assert not ops_run  # SDPA ran, not our kernel
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def _vit():
    cfg = transformers.ViTConfig(hidden_size=18, intermediate_size=20, num_hidden_layers=2, num_attention_heads=3,
                                 image_size=8, patch_size=4)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def test_from_pretrained_and_set_attn_implementation(tmp_path, ops_run, no_backend_env):
    _vit().save_pretrained(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    sdpa = transformers.ViTModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours = transformers.ViTModel.from_pretrained(tmp_path, attn_implementation="mmkernels").eval()
    assert ours.config._attn_implementation == "mmkernels"
    with torch.no_grad():
        ref = sdpa(pixel_values=x).last_hidden_state
        assert not ops_run
        out = ours(pixel_values=x).last_hidden_state
        assert {op for op, _ in ops_run} == {"attention"}
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        ops_run.clear()
        sdpa.set_attn_implementation("mmkernels")
        torch.testing.assert_close(sdpa(pixel_values=x).last_hidden_state, out, atol=0, rtol=0)
        assert ops_run
        sdpa.set_attn_implementation("sdpa")
        ops_run.clear()
        assert torch.equal(sdpa(pixel_values=x).last_hidden_state, ref) and not ops_run


def _llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).eval().to(torch.float32), impl


@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_causal_lm_with_padding(padding, ops_run, no_backend_env):
    """A GQA causal LM loaded with attn_implementation="mmkernels": padded batches are right at every position; left
    padding leaves padding queries with no key (fully masked rows), which we hand back to SDPA and count."""
    model, _ = _llama("sdpa")
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    if padding == "right":
        mask[1, 4:] = 0
        mask[2, 1:] = 0
    elif padding == "left":
        mask[1, :2] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("mmkernels")
        before = sum(FALLBACKS.values())
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    fell_back = sum(FALLBACKS.values()) - before
    if padding == "left":
        assert fell_back == 2 and not ops_run  # both layers
    else:
        assert fell_back == 0 and {op for op, _ in ops_run} == {"attention"}


def test_patched_model_falls_back_to_its_eager_code(ops_run, no_backend_env):
    """A Q-Former built with eager attention, given an arbitrary 4-D additive mask: the call runs its eager code and
    the patch report counts it; a boolean padding mask runs our kernel."""
    cfg = transformers.Blip2QFormerConfig(hidden_size=18, num_hidden_layers=1, num_attention_heads=3,
                                          intermediate_size=20, encoder_hidden_size=18, attn_implementation="eager")
    model = transformers.Blip2QFormerModel(cfg).eval()
    x, enc = torch.randn(2, 5, 18), torch.randn(2, 7, 18)
    bias = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        ref = model(query_embeds=x, attention_mask=bias, encoder_hidden_states=enc).last_hidden_state
        report = patch(model, qformer=False)
        assert model.config._attn_implementation == "eager"  # the model's config is not touched
        assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"eager",
                                                                                                    "mmkernels"}
        out = model(query_embeds=x, attention_mask=bias, encoder_hidden_states=enc).last_hidden_state
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        assert sum(report.fallbacks.values()) == 1 and "arbitrary 4-D bias" in str(report)
        assert {op for op, _ in ops_run} == {"attention"}  # the cross-attention (no mask) still ran ours
        unpatch(model)
        assert model.config._attn_implementation == "eager"


def _gemma2():
    cfg = transformers.Gemma2Config(vocab_size=50, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                                    max_position_embeddings=32, attn_logit_softcapping=30.0, sliding_window=4)
    torch.manual_seed(0)
    return transformers.Gemma2Model(cfg).eval()


def test_softcap_falls_back_to_eager_when_switched_outside_patch(ops_run, no_backend_env):
    """Gemma2's softcap is eager-only (HF's SDPA path refuses it): a model switched to "mmkernels" with
    set_attn_implementation has no recorded previous implementation, and must fall back to its eager code, not SDPA."""
    pytest.importorskip("transformers.models.gemma2")
    model = _gemma2()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        model.set_attn_implementation("mmkernels")
        before = FALLBACKS["softcap"]
        out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert FALLBACKS["softcap"] == before + 2 and not ops_run  # both layers, eager code


@pytest.mark.parametrize("case", ["right-padding", "key-holes", "causal-left-padding", "causal-right-padding",
                                  "causal-bool", "additive-padding"])
def test_mask_plan_is_read_once_per_mask_and_follows_in_place_changes(case, no_backend_env):
    """The plan of a mask is worked out with one host read and reused by every later call with the same mask tensor
    (the layers of one forward): no host sync there. An in-place change of the mask (its version) makes a new plan,
    so the answer follows the new mask; a new mask tensor with equal values is read again."""
    import mmkernels
    from mmkernels.testing import count_host_syncs

    shape, keep, causal = _mask_cases()[case]
    q, k, v = _qkv(*shape)
    keep = keep.clone()
    mask = keep
    if case == "additive-padding":
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = _Attn(causal, q.shape[1] // k.shape[1])
    with mmkernels.debug_checks(False), torch.no_grad():
        with count_host_syncs() as first:
            attention_forward(module, q, k, v, mask, scaling=0.4)
        with count_host_syncs() as again:
            out, _ = attention_forward(module, q, k, v, mask, scaling=0.4)
        with count_host_syncs() as copy:
            attention_forward(module, q, k, v, mask.clone(), scaling=0.4)
        assert (first.count, again.count, copy.count) == (1, 0, 1), (first.calls, again.calls, copy.calls)
        torch.testing.assert_close(out, _sdpa(q, k, v, keep, scale=0.4), atol=ATOL, rtol=RTOL)
        # sample 0 loses its last key (still some key for every query: its first key is never causal-hidden)
        keep[0, ..., -1] = False
        if case == "additive-padding":
            mask[0, ..., -1] = torch.finfo(torch.float32).min
        out, _ = attention_forward(module, q, k, v, mask, scaling=0.4)
    torch.testing.assert_close(out, _sdpa(q, k, v, keep, scale=0.4), atol=ATOL, rtol=RTOL)
