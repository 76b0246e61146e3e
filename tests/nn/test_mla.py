"""``mmkernels.nn.MultiHeadLatentAttention`` against Hugging Face's ``LongcatFlashMLA`` (and DeepSeek-V3's attention
for ``q_lora_rank=None``): random-initialised HF modules, fp32 CPU, nothing downloaded.

Acceptance (issue 21 item 2): forward within 1e-5 relative of HF's eager attention and every parameter's gradient
within 1e-4 relative, on HF's tiny test config and on a wide one with LongCat-Flash's real head dims (qk 128 + 64,
v 128); with and without padding; default and YaRN RoPE; incremental decoding through the latent cache equals the
full run; the Triton backend (interpreter) equals the reference.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import mmkernels
from mmkernels.nn import MultiHeadLatentAttention
from mmkernels.nn.mla import MLACache, MLARotary, _attend
from mmkernels.testing import count_host_syncs, rel_error

transformers = pytest.importorskip("transformers")
from transformers.models.longcat_flash.modeling_longcat_flash import (  # noqa: E402
    LongcatFlashMLA,
    LongcatFlashRotaryEmbedding,
)

FWD_RTOL, GRAD_RTOL = 1e-5, 1e-4

# HF's tiny test config (tests/models/longcat_flash/test_modeling_longcat_flash.py) and the real head dims.
CONFIGS = {
    "tiny": dict(hidden_size=144, num_attention_heads=8, q_lora_rank=48, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, head_dim=4),
    "wide": dict(hidden_size=96, num_attention_heads=3, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, head_dim=64),
    # a value head wider than the query/key head (the op takes any D_v in [1, 256])
    "v-wider": dict(hidden_size=48, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=4,
                    qk_rope_head_dim=4, v_head_dim=12, head_dim=4),
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 24, "beta_slow": 2}


def _hf_config(name: str, *, rope=None, bias=False):
    cfg = transformers.LongcatFlashConfig(**CONFIGS[name], num_key_value_heads=CONFIGS[name]["num_attention_heads"],
                                          num_layers=1, vocab_size=50, max_position_embeddings=128,
                                          attention_bias=bias, rope_parameters=copy.deepcopy(rope))
    cfg._attn_implementation = "eager"
    return cfg


def _hf_mla(cfg, seed=0):
    torch.manual_seed(seed)
    hf = LongcatFlashMLA(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name or name.endswith("bias"):  # not ones / zeros: their use shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "layernorm" in name else 0.1 * torch.randn_like(p))
    return hf


def _hf_forward(hf, cfg, x, padding, positions):
    """HF's layer as its model calls it: eager attention, the additive causal + padding mask, its rotary."""
    b, n = x.shape[:2]
    cos, sin = LongcatFlashRotaryEmbedding(cfg)(x, positions)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None].expand(b, n, n)
    if padding is not None:
        allowed = allowed & ~padding[:, None, :]
    mask = torch.zeros(b, 1, n, n).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return hf(x, (cos, sin), mask)[0]


def _padding(kind: str, b: int, n: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    pad = torch.zeros(b, n, dtype=torch.bool)
    if kind == "left":  # generation batches: row 1 starts 3 tokens late
        pad[1, :3] = True
    else:  # "right"
        pad[0, n - 2:] = True
    return pad


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _check_against_hf(name, rope, padding_kind, *, bias=False, b=2, n=7, start=0):
    cfg = _hf_config(name, rope=rope, bias=bias)
    hf = _hf_mla(cfg)
    ours = MultiHeadLatentAttention.from_hf(hf, backend="reference")
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)
    torch.manual_seed(1)
    x = torch.randn(b, n, cfg.hidden_size)
    padding = _padding(padding_kind, b, n)
    positions = (torch.arange(n) + start)[None]
    valid = torch.ones(b, n, dtype=torch.bool) if padding is None else ~padding
    upstream = torch.randn(b, n, cfg.hidden_size) * valid[..., None]  # padded rows: no gradient (HF's are garbage)

    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = _hf_forward(hf, cfg, x_hf, padding, positions)
    y = ours(x_ours, position_ids=positions, padding_mask=padding)
    assert rel_error(y[valid].detach(), y_hf[valid].detach()) <= FWD_RTOL
    (y_hf * upstream).sum().backward()
    (y * upstream).sum().backward()
    theirs = _grads(hf)
    for pname, g in _grads(ours).items():
        assert rel_error(g, theirs[pname]) <= GRAD_RTOL, pname
    assert rel_error(x_ours.grad[valid], x_hf.grad[valid]) <= GRAD_RTOL
    return ours, hf, cfg


@pytest.mark.parametrize("padding_kind", ["none", "left", "right"])
@pytest.mark.parametrize("name", ["tiny", "wide", "v-wider"])
def test_matches_hf_longcat_mla(name, padding_kind):
    _check_against_hf(name, None, padding_kind)


@pytest.mark.parametrize("padding_kind", ["none", "left"])
@pytest.mark.parametrize("name", ["tiny", "wide"])
def test_matches_hf_with_yarn_rope(name, padding_kind):
    """YaRN: interpolated frequencies, the attention factor on cos/sin and mscale(mscale_all_dim)^2 on the softmax
    scale; positions past original_max_position_embeddings."""
    ours, _, _ = _check_against_hf(name, YARN, padding_kind, start=40)
    assert ours.rotary.softmax_mscale != 1.0 and ours.rotary.attention_scaling != 1.0


def test_matches_hf_with_attention_bias():
    _check_against_hf("tiny", None, "left", bias=True)


def test_hf_position_embeddings_are_taken_as_given():
    cfg = _hf_config("tiny", rope=YARN)
    hf = _hf_mla(cfg)
    ours = MultiHeadLatentAttention.from_hf(hf)
    x = torch.randn(2, 5, cfg.hidden_size)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    cos, sin = LongcatFlashRotaryEmbedding(cfg)(x, positions)
    ref_cos, ref_sin = ours.rotary.cos_sin(positions, x.dtype)
    torch.testing.assert_close(ref_cos, cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref_sin, sin, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(x, position_embeddings=(cos, sin)), ours(x, position_ids=positions),
                               rtol=1e-6, atol=1e-6)


def test_q_lora_rank_none_matches_deepseek_v3():
    """Without a query LoRA the module has one ``q_proj`` (query scale 1); with ``hidden_size == kv_lora_rank`` the
    latent scale is 1 too, and the module is DeepSeek-V3's attention with interleaved RoPE."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = transformers.DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                                        kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                                        rope_interleave=True, max_position_embeddings=64, vocab_size=50,
                                        num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = DeepseekV3Attention(cfg, layer_idx=0)
    with torch.no_grad():
        hf.kv_a_layernorm.weight.normal_(1.0, 0.2)
    ours = MultiHeadLatentAttention(32, 4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                    v_head_dim=6, rope_theta=cfg.rope_parameters["rope_theta"])
    assert not hasattr(ours, "q_a_proj") and ours.q_scale == 1.0 and ours.kv_scale == 1.0
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 6, 32)
    positions = torch.arange(6)[None]
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    cos, sin = DeepseekV3RotaryEmbedding(cfg)(x, positions)
    mask = torch.zeros(6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    y_hf = hf(x_hf, (cos, sin), mask[None, None])[0]
    y = ours(x_ours)
    assert rel_error(y.detach(), y_hf.detach()) <= FWD_RTOL
    upstream = torch.randn_like(y)
    (y_hf * upstream).sum().backward()
    (y * upstream).sum().backward()
    theirs = _grads(hf)
    for pname, g in _grads(ours).items():
        assert rel_error(g, theirs[pname]) <= GRAD_RTOL, pname


# ---- the latent cache -------------------------------------------------------------------------------------------

def _tiny(seed=0, **kwargs) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(144, 8, q_lora_rank=48, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                 v_head_dim=8, **kwargs)
    with torch.no_grad():
        m.q_a_layernorm.weight.normal_(1.0, 0.2)
        m.kv_a_layernorm.weight.normal_(1.0, 0.2)
    return m


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("padding_kind", ["none", "left", "right"])
def test_incremental_decode_matches_the_full_run(padding_kind, backend):
    """Prefill 3 tokens, then one at a time: every step appends [B, 1, kv_lora_rank + rope] to the cache and the
    outputs equal the full causal run's (padding given per call, kept by the cache)."""
    m = _tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4,
                            "mscale_all_dim": 1.0}, backend=backend)
    b, n = 2, 7
    x = torch.randn(b, n, 144)
    padding = _padding(padding_kind, b, n)
    full = m(x, padding_mask=padding)
    cache = MLACache()
    steps = [m(x[:, :3], cache=cache, padding_mask=None if padding is None else padding[:, :3])]
    assert cache.entries.shape == (b, 3, 16 + 4)
    for i in range(3, n):
        steps.append(m(x[:, i:i + 1], cache=cache, padding_mask=None if padding is None else padding[:, i:i + 1]))
        assert cache.entries.shape == (b, i + 1, 16 + 4) and len(cache) == i + 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=2e-5, atol=2e-6)
    if padding is not None:
        assert torch.equal(cache.padding, padding)
    else:
        assert cache.padding is None


def test_cache_holds_hf_latents():
    """The cache holds what HF's cache holds for LongcatFlashMLA: the normed, scaled latent and the rotated key."""
    cfg = _hf_config("tiny")
    hf = _hf_mla(cfg)
    ours = MultiHeadLatentAttention.from_hf(hf)
    x = torch.randn(2, 5, cfg.hidden_size)
    cache = MLACache()
    ours(x, cache=cache)
    hf_cache = transformers.DynamicCache(config=cfg)
    positions = torch.arange(5)[None]
    # the cache argument's name: past_key_values (transformers 5.17) or cache (5.25)
    name = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
    hf(x, LongcatFlashRotaryEmbedding(cfg)(x, positions), None, **{name: hf_cache})
    latent, rope_key = hf_cache.layers[0].keys, hf_cache.layers[0].values  # [B, 1, T, r], [B, 1, T, d_r]
    torch.testing.assert_close(cache.entries, torch.cat([latent[:, 0], rope_key[:, 0]], dim=-1), rtol=1e-6,
                               atol=1e-6)


def test_cache_rejects_mismatched_entries():
    m = _tiny()
    cache = MLACache()
    m(torch.randn(2, 3, 144), cache=cache)
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(3, 1, 144), cache=cache)
    cache.reset()
    assert len(cache) == 0
    m(torch.randn(3, 1, 144), cache=cache)


# ---- backends -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_kind", ["none", "left"])
@pytest.mark.parametrize("name", ["tiny", "wide", "v-wider"])
def test_triton_backend_matches_reference(name, padding_kind):
    """backend="triton" (the interpreter on CPU, fp32) equals the reference backend, forward and every gradient."""
    cfg = _hf_config(name)
    hf = _hf_mla(cfg)
    ref = MultiHeadLatentAttention.from_hf(hf, backend="reference")
    tri = MultiHeadLatentAttention.from_hf(hf, backend="triton")
    b, n = 2, 5
    x = torch.randn(b, n, cfg.hidden_size)
    padding = _padding(padding_kind, b, n)
    ys = []
    for m in (ref, tri):
        y = m(x, padding_mask=padding)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        ys.append(y)
    assert rel_error(ys[1].detach(), ys[0].detach()) <= FWD_RTOL
    for (pname, g), (_, g_ref) in zip(_grads(tri).items(), _grads(ref).items(), strict=True):
        assert rel_error(g, g_ref) <= GRAD_RTOL, pname


def test_backend_reaches_the_attention_op(monkeypatch):
    seen = []
    import mmkernels.nn.mla as mla

    def spy(q, k, v, **kwargs):
        seen.append((kwargs["backend"], q.shape[-1], v.shape[-1]))
        return torch.zeros(*q.shape[:-1], v.shape[-1])

    monkeypatch.setattr(mla, "attention", spy)
    m = _tiny(backend={"attention": "reference"})
    m(torch.randn(1, 3, 144))
    m.backend = "triton"
    m(torch.randn(1, 3, 144))
    assert seen == [("reference", 12, 8), ("triton", 12, 8)]  # V passed unpadded (issue 21 item 1)
    with pytest.raises(mmkernels.BackendError, match="attention"):
        m.backend = "cpp"


@pytest.mark.parametrize("shape", [(2, 5, 3, 12, 8), (1, 4, 2, 192, 128), (3, 1, 1, 6, 6)])
def test_attend_pads_only_v_and_is_exact(shape):
    """The helper's zero-padded V gives exactly the unpadded attention (float64 reference)."""
    b, n, h, dqk, dv = shape
    q, k = torch.randn(b, n, h, dqk, dtype=torch.float64), torch.randn(b, n, h, dqk, dtype=torch.float64)
    v = torch.randn(b, n, h, dv, dtype=torch.float64)
    out = _attend(q, k, v, causal=True, softmax_scale=0.3)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    assert out.shape == (b, n, h, dv)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ---- padding ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padding_values_reach_nothing(backend):
    m = _tiny(attention_bias=True, backend=backend)
    b, n = 2, 6
    padding = _padding("left", b, n) | _padding("right", b, n)
    x = torch.randn(b, n, 144)
    dirty = x.masked_fill(padding[..., None], float("nan")).requires_grad_()
    clean = x.masked_fill(padding[..., None], 0.0)
    y = m(dirty, padding_mask=padding)
    grads = torch.autograd.grad(y.sum(), [dirty, *m.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    assert not grads[0][padding].any()
    torch.testing.assert_close(y, m(clean, padding_mask=padding), rtol=0, atol=0)
    torch.testing.assert_close(y[padding], m.o_proj.bias.expand(int(padding.sum()), -1), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batches_and_fully_padded_rows(backend):
    m = _tiny(attention_bias=True, backend=backend)
    for b, n in ((0, 3), (2, 0)):
        for padding in (None, torch.zeros(b, n, dtype=torch.bool)):
            assert m(torch.randn(b, n, 144), padding_mask=padding).shape == (b, n, 144)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[0] = True
    x = torch.randn(2, 4, 144)
    y = m(x, padding_mask=padding)
    torch.testing.assert_close(y[0], m.o_proj.bias.expand(4, -1), rtol=0, atol=0)
    torch.testing.assert_close(y[1], m(x[1:])[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_fullgraph_with_padding_and_positions(dynamic):
    torch._dynamo.reset()
    m = _tiny()
    x, padding = torch.randn(2, 5, 144), _padding("left", 2, 5)
    positions = (padding.logical_not().cumsum(-1) - 1).clamp_min(0)
    want = m(x, padding_mask=padding, position_ids=positions)
    compiled = torch.compile(lambda *a: m(a[0], padding_mask=a[1], position_ids=a[2]), fullgraph=True,
                             dynamic=dynamic, backend="eager")
    torch.testing.assert_close(compiled(x, padding, positions), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_host_sync(backend):
    """Padding masks and the cache become packed indices on the device: no host sync, forward or backward."""
    m = _tiny(backend=backend)
    x = torch.randn(2, 5, 144, requires_grad=True)
    padding = _padding("left", 2, 5)
    with mmkernels.debug_checks(False), count_host_syncs(skip=("triton",)) as syncs:
        cache = MLACache()
        m(x, padding_mask=padding, cache=cache).sum().backward()
        m(torch.randn(2, 1, 144), cache=cache)
        m(x).sum().backward()
    assert syncs.count == 0, syncs.calls


def test_autocast_and_half():
    m = _tiny()
    x = torch.randn(2, 4, 144)
    want = m(x)
    with torch.autocast("cpu", torch.bfloat16):
        got = m(x)
    torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1)
    half = copy.deepcopy(m).half()
    torch.testing.assert_close(half(x.half()).float(), want, rtol=0.05, atol=0.05)


# ---- bad input ----------------------------------------------------------------------------------------------------

GOOD = dict(hidden_size=16, num_heads=2, q_lora_rank=8, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2,
            v_head_dim=4)


@pytest.mark.parametrize("arg,bad,error", [
    ("hidden_size", 0, ValueError), ("num_heads", 2.0, TypeError), ("q_lora_rank", 0, ValueError),
    ("kv_lora_rank", "6", TypeError), ("qk_nope_head_dim", -1, ValueError), ("qk_rope_head_dim", 3, ValueError),
    ("qk_nope_head_dim", 255, ValueError), ("v_head_dim", 257, ValueError), ("v_head_dim", 0, ValueError),
    ("rope_theta", 0.0, ValueError),
    ("rope_theta", float("nan"), ValueError), ("rope_scaling", "yarn", TypeError),
    ("rope_scaling", {"rope_type": "longrope"}, ValueError), ("rope_scaling", {"rope_type": "yarn"}, ValueError),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "low": 1},
     ValueError),
    ("attention_bias", 1, TypeError), ("rms_norm_eps", -1e-6, ValueError), ("dropout", 1.0, ValueError),
    ("backend", "bogus", mmkernels.BackendError), ("dtype", torch.int32, TypeError),
])
def test_constructor_errors_name_the_argument(arg, bad, error):
    MultiHeadLatentAttention(**GOOD)
    with pytest.raises(error, match=rf"^MultiHeadLatentAttention: .*{arg.split('_')[0]}"):
        MultiHeadLatentAttention(**(GOOD | {arg: bad}))


@pytest.mark.parametrize("arg,call,error", [
    ("hidden_states", lambda m: m(torch.randn(2, 3, 15)), ValueError),
    ("hidden_states", lambda m: m(torch.randn(6, 16)), ValueError),
    ("hidden_states", lambda m: m(torch.randn(2, 3, 16).half()), TypeError),
    ("hidden_states", lambda m: m(torch.randn(2, 3, 16, device="meta")), ValueError),
    ("hidden_states", lambda m: m([[0.0] * 16]), TypeError),
    ("padding_mask", lambda m: m(torch.randn(2, 3, 16), padding_mask=torch.zeros(2, 3)), TypeError),
    ("padding_mask", lambda m: m(torch.randn(2, 3, 16), padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError),
    ("position_ids", lambda m: m(torch.randn(2, 3, 16), position_ids=torch.zeros(2, 3)), TypeError),
    ("position_ids", lambda m: m(torch.randn(2, 3, 16), position_ids=torch.zeros(3, 3, dtype=torch.long)),
     ValueError),
    ("position_ids", lambda m: m(torch.randn(2, 3, 16), position_ids=torch.zeros(1, 3, dtype=torch.long),
                                 position_embeddings=(torch.zeros(1, 3, 2),) * 2), ValueError),
    ("position_embeddings", lambda m: m(torch.randn(2, 3, 16), position_embeddings=torch.zeros(1, 3, 2)), TypeError),
    ("position_embeddings", lambda m: m(torch.randn(2, 3, 16), position_embeddings=(torch.zeros(1, 3, 4),) * 2),
     ValueError),
    ("cache", lambda m: m(torch.randn(2, 3, 16), cache={}), TypeError),
])
def test_forward_errors_name_the_argument(arg, call, error):
    m = MultiHeadLatentAttention(**GOOD)
    with pytest.raises(error, match=rf"^MultiHeadLatentAttention: .*\b{arg}\b"):
        call(m)


def test_from_hf_rejects_what_is_not_an_mla():
    with pytest.raises(TypeError, match=r"^MultiHeadLatentAttention.from_hf: hf_mla must be"):
        MultiHeadLatentAttention.from_hf(torch.nn.Linear(3, 3))
    cfg = _hf_config("tiny")
    cfg.head_dim = 8  # HF's rotary would be 8 wide for 4 rope dims
    with pytest.raises(ValueError, match="head_dim"):
        MultiHeadLatentAttention.from_hf(LongcatFlashMLA(cfg, 0))


def test_rotary_default_matches_hf_frequencies():
    cfg = _hf_config("wide")
    hf_rot = LongcatFlashRotaryEmbedding(cfg)
    torch.testing.assert_close(MLARotary(64, cfg.rope_parameters["rope_theta"]).inv_freq(torch.device("cpu")),
                               hf_rot.inv_freq, rtol=0, atol=0)
    yarn_cfg = _hf_config("wide", rope=YARN)
    rot = MLARotary(64, 10000.0, YARN)
    hf_yarn = LongcatFlashRotaryEmbedding(yarn_cfg)
    torch.testing.assert_close(rot.inv_freq(torch.device("cpu")), hf_yarn.inv_freq, rtol=1e-7, atol=0)
    assert rot.attention_scaling == pytest.approx(hf_yarn.attention_scaling, rel=1e-12)

