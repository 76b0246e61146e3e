"""``patch(LongcatFlashForCausalLM)`` routes LongCat-Flash's multi-head latent attention through ``ops.attention``
(queries/keys ``qk_nope + qk_rope`` wide, values ``v_head_dim`` wide: one call, unpadded) as well as its MoE blocks,
with the same parity, report and reversibility rules as the vision families (issue 21 item 4)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LongcatFlashForCausalLM"):
    pytest.skip("this transformers has no LongCat-Flash", allow_module_level=True)

import mmkernels  # noqa: E402
from mmkernels.integrations import hf  # noqa: E402
from mmkernels.integrations.hf import attention as hf_attention  # noqa: E402
from mmkernels.testing import count_host_syncs  # noqa: E402

VOCAB = 50
# qk (nope + rope) / v head dims: HF's tiny test shape (8 + 4 / 8), and one with V wider than Q/K
HEADS = {"tiny-12/8": dict(qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
         "v-wider-8/12": dict(qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=12)}


def _model(heads, **kw):
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=3, ffn_hidden_size=20,
               q_lora_rank=12, kv_lora_rank=10, head_dim=heads["qk_rope_head_dim"], moe_topk=2, n_routed_experts=4,
               zero_expert_num=2, expert_ffn_hidden_size=12, routed_scaling_factor=2.0, **heads)
    model = LongcatFlashForCausalLM(LongcatFlashConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # HF initialises norms to ones and the correction bias to zeros: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _batch(padded: bool):
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 6:] = 0  # right padding, a training batch
    return ids, mask


@pytest.mark.parametrize("backend", ["reference", {"attention": "triton", "moe_experts": "triton"}],
                         ids=["reference", "triton"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_patched_mla_matches_hf_and_unpatch_restores(heads, padded, backend):
    model = _model(HEADS[heads])
    ids, mask = _batch(padded)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    before = dict(hf_attention.FALLBACKS)
    report = hf.patch(model, backend=backend)
    mla = [p for p, m in model.named_modules() if type(m).__name__ == "LongcatFlashMLA"]
    assert report.kinds().get("attention") == len(mla) == 4, str(report)
    assert report.kinds().get("moe") == 2
    assert model.config._attn_implementation != "mmkernels"  # the model's config is not touched
    calls = []
    real = hf_attention.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real(q, k, v, **kw)

    hf_attention.attention = spy
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits
    finally:
        hf_attention.attention = real
    assert dict(hf_attention.FALLBACKS) == before and not report.fallbacks
    d_qk = HEADS[heads]["qk_nope_head_dim"] + HEADS[heads]["qk_rope_head_dim"]
    assert calls and set(calls) == {(d_qk, d_qk, HEADS[heads]["v_head_dim"])}  # unpadded V, every call ours
    valid = mask.bool()
    err = (out - ref)[valid].norm() / ref[valid].norm()
    assert err < 1e-5, err
    hf.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_patched_mla_gradients_match_hf():
    heads = HEADS["tiny-12/8"]
    ids, mask = _batch(True)
    grads = []
    for patched in (False, True):
        model = _model(heads).train()
        model.config.attention_dropout = 0.0
        if patched:
            hf.patch(model, backend="reference")
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        err = (grads[1][name] - g).norm() / g.norm().clamp_min(1e-30)
        assert err < 1e-4, (name, err)


def test_one_host_sync_per_padded_forward():
    model = _model(HEADS["tiny-12/8"])
    ids, mask = _batch(True)
    hf.patch(model, backend={"attention": "triton"}, moe=False)
    ours_only = ("triton", "transformers", "torch")  # HF builds its mask with host reads of its own
    with torch.no_grad(), mmkernels.debug_checks(False), count_host_syncs(skip=ours_only) as syncs:
        model(ids, attention_mask=mask)
    assert syncs.count == 1, syncs.calls  # the mask plan, read once for the four MLA calls


def test_mla_with_head_dims_we_cannot_take_falls_back_and_is_counted():
    heads = dict(qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=260)  # V wider than the kernels' 256
    model = _model(heads)
    ids, mask = _batch(False)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    report = hf.patch(model, backend="reference", moe=False)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert any("head dim 260" in reason for reason in report.fallbacks), report.fallbacks
