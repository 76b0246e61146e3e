"""ScMoEConfig and ScMoEDecoderLayer: the layer formula against plain PyTorch, causality, configs, backends, module
API, and (2 gloo processes) expert parallelism with the overlapped and sequential schedules."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from mmkernels import BackendError
from mmkernels.models import ScMoEConfig, ScMoEDecoderLayer
from mmkernels.nn import ZeroComputeMoE

TINY = ScMoEConfig.preset("tiny")


# ---- config ---------------------------------------------------------------------------------------------------------


def test_presets():
    tiny = ScMoEConfig.preset("tiny")
    assert tiny.num_ffn_experts % 4 == 0 and tiny.head_dim == tiny.hidden_size // tiny.num_heads
    lite = ScMoEConfig.preset("longcat-flash-lite")
    assert (lite.hidden_size, lite.num_ffn_experts, lite.num_zero_experts, lite.top_k,
            lite.expert_intermediate_size, lite.routed_scaling_factor) == (3072, 256, 128, 12, 1024, 6.0)
    assert ScMoEConfig.preset("small").num_ffn_experts % 8 == 0
    with pytest.raises(ValueError, match="unknown preset"):
        ScMoEConfig.preset("huge")


def test_replace_revalidates_and_rederives_head_dim():
    c = TINY.replace(hidden_size=64)
    assert c.head_dim == 16 and TINY.head_dim == 8
    assert TINY.replace(head_dim=6).head_dim == 6


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(top_k=13), "top_k"),
    (dict(head_dim=7), "head_dim"),
    (dict(hidden_size=30), "head_dim"),  # 30 / 4 heads: not divisible, no head_dim given
    (dict(target_ffn_per_token=4.0), "target_ffn_per_token"),
    (dict(num_zero_experts=-1), "num_zero_experts"),
    (dict(rope_theta=0.5), "rope_theta"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises((ValueError, TypeError), match=field):
        TINY.replace(**changes)


# ---- the layer, world of one ----------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    """Rotary embedding as complex rotation of the pairs (i, i + d/2): independent of apply_rotary's formula."""
    b, length, h, d = x.shape
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freqs  # [L, d/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angle),
                                                                                         angle)[None, :, None]
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def _attn(block, x, cfg):
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = (x @ block.qkv.weight.t()).split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2).flatten(-2) @ block.o_proj.weight.t()


def _mlp(m, x):
    return (F.silu(x @ m.gate_proj.weight.t()) * (x @ m.up_proj.weight.t())) @ m.down_proj.weight.t()


def reference_layer(layer, x):
    """The ScMoE formula of docs/models/scmoe.md in plain PyTorch (the MoE block is the layer's own)."""
    c = layer.config
    n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
    h1 = x + _attn(layer.self_attn[0], _rms(x, n_in[0].weight, c.rms_norm_eps), c)
    u = _rms(h1, n_post[0].weight, c.rms_norm_eps)
    m = layer.mlp(u)
    h2 = h1 + _mlp(layer.mlps[0], u)
    h3 = h2 + _attn(layer.self_attn[1], _rms(h2, n_in[1].weight, c.rms_norm_eps), c)
    return h3 + _mlp(layer.mlps[1], _rms(h3, n_post[1].weight, c.rms_norm_eps)) + m


def _randomise_norms(layer):
    with torch.no_grad():
        for norm in (*layer.input_layernorm, *layer.post_attention_layernorm):
            norm.weight.uniform_(0.5, 1.5)
        layer.mlp.router.weight.normal_(0.0, 1.0)


@pytest.mark.parametrize("batch, length", [(2, 7), (1, 1), (3, 13)])
def test_layer_matches_the_formula(batch, length):
    layer = ScMoEDecoderLayer(TINY)
    _randomise_norms(layer)
    assert isinstance(layer.mlp, ZeroComputeMoE) and not layer.expert_parallel
    x = torch.randn(batch, length, TINY.hidden_size, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    want = reference_layer(layer, x_ref)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(want, x_ref, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_causal_and_position_ids():
    layer = ScMoEDecoderLayer(TINY)
    _randomise_norms(layer)
    x = torch.randn(2, 9, TINY.hidden_size)
    y = layer(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 3, TINY.hidden_size) * 10
    torch.testing.assert_close(layer(x2)[:, :6], y[:, :6], rtol=1e-6, atol=1e-6)
    # Explicit default positions change nothing; RoPE is relative: shifting every position changes nothing either,
    # spreading them out does.
    assert torch.equal(layer(x, position_ids=torch.arange(9)), y)
    torch.testing.assert_close(layer(x, position_ids=torch.arange(9)[None].expand(2, 9) + 5), y, rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(layer(x, position_ids=torch.arange(9) * 3), y, atol=1e-3)
    with pytest.raises(ValueError, match="position_ids"):
        layer(x, position_ids=torch.arange(8))


def test_overlap_flag_is_a_no_op_in_a_world_of_one():
    torch.manual_seed(3)
    a = ScMoEDecoderLayer(TINY, overlap=True)
    torch.manual_seed(3)
    b = ScMoEDecoderLayer(TINY, overlap=False)
    x = torch.randn(2, 5, TINY.hidden_size)
    assert torch.equal(a(x), b(x))


def test_padding_mask_reaches_the_moe():
    layer = ScMoEDecoderLayer(TINY).train()
    x = torch.randn(2, 6, TINY.hidden_size)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    y = layer(x, padding_mask=pad)
    assert int(layer.mlp.pending_counts.sum()) == (12 - 2) * TINY.top_k  # padding tokens are not counted
    torch.testing.assert_close(y[~pad], layer(x)[~pad], rtol=1e-6, atol=1e-6)  # right padding reaches no real token


def test_backend_reaches_every_op():
    layer = ScMoEDecoderLayer(TINY, backend="reference")
    assert all(a.backend == "reference" for a in layer.self_attn)
    assert layer.mlp._backends == dict.fromkeys(("moe_route", "moe_experts", "expert_bias_update_"), "reference")
    x = torch.randn(1, 4, TINY.hidden_size)
    auto = ScMoEDecoderLayer(TINY)
    auto.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), auto(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(BackendError):
        ScMoEDecoderLayer(TINY, backend="cuda")  # attention has no 'cuda' backend
    mixed = ScMoEDecoderLayer(TINY, backend={"moe_route": "reference"})
    assert mixed.mlp._backends["moe_route"] == "reference" and mixed.self_attn[0].backend is None
    mixed.backend = "reference"  # assignment reaches every op too
    assert mixed.backend == "reference" and mixed.self_attn[1].backend == "reference"
    assert mixed.mlp._backends["moe_experts"] == "reference"
    with pytest.raises(BackendError):
        mixed.backend = "cpp"


def test_bad_input():
    layer = ScMoEDecoderLayer(TINY)
    with pytest.raises(ValueError, match="hidden"):
        layer(torch.randn(2, 3, TINY.hidden_size + 1))
    with pytest.raises(ValueError, match="hidden"):
        layer(torch.randn(3, TINY.hidden_size))
    with pytest.raises(TypeError, match="config"):
        ScMoEDecoderLayer(dict(hidden_size=32))


def test_module_api_round_trips():
    layer = ScMoEDecoderLayer(TINY)
    _randomise_norms(layer)
    x = torch.randn(2, 5, TINY.hidden_size)
    y = layer(x)
    other = ScMoEDecoderLayer(TINY)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)
    assert torch.equal(copy.deepcopy(layer)(x), y)
    names = set(layer.state_dict())
    assert {"input_layernorm.1.weight", "self_attn.0.qkv.weight", "mlps.1.down_proj.weight",
            "mlp.experts.w_gate_up", "mlp.router.weight", "mlp.balancer.bias"} <= names
    y.sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


def test_update_bias_moves_the_balancer():
    layer = ScMoEDecoderLayer(TINY).train()
    _randomise_norms(layer)
    layer(torch.randn(2, 8, TINY.hidden_size))
    layer.update_bias()
    assert layer.mlp.balancer.steps == 1 and layer.mlp.balancer.bias[: TINY.num_ffn_experts].abs().sum() > 0


# ---- expert parallelism (2 gloo processes) ------------------------------------------------------------------------


@pytest.mark.distributed
def test_expert_parallel_layer_overlapped_equals_sequential_and_world_of_one(tmp_path):
    """Ranks check overlapped == sequential bitwise (forward, input and every parameter gradient); here each rank's
    output and gradients are compared with the world-of-one layer holding the gathered weights."""
    from mmkernels.distributed.launch import run_local_world

    worker = os.path.join(os.path.dirname(__file__), "..", "distributed", "_ep_worker.py")
    results = run_local_world([sys.executable, worker, str(tmp_path), "scmoe"], 2, timeout=240)

    for r in results:
        path = tmp_path / f"rank{r.rank}.json"
        assert r.returncode == 0 and path.exists(), r.output[-4000:]
        status = json.loads(path.read_text())["scmoe"]
        assert status == "ok", f"rank {r.rank}:\n{status}"
    saved = [torch.load(tmp_path / f"scmoe_rank{r}.pt") for r in range(2)]
    for key, value in saved[0]["state"].items():
        assert not isinstance(value, torch.Tensor) or torch.equal(value, saved[1]["state"][key]), key
    single = ScMoEDecoderLayer(TINY)
    single.load_state_dict(saved[0]["state"])
    for r, s in enumerate(saved):
        x = s["x"].clone().requires_grad_(True)
        y = single(x)
        (y * s["gy"]).sum().backward()
        torch.testing.assert_close(s["y"], y, rtol=2e-5, atol=2e-5, msg=f"rank {r} output")
        torch.testing.assert_close(s["x_grad"], x.grad, rtol=1e-4, atol=2e-5, msg=f"rank {r} input gradient")
    for name, p in single.named_parameters():
        if name.startswith("mlp.experts."):  # sharded: the ranks' shards side by side
            got = torch.cat([s["grads"][name] for s in saved])
        else:  # replicated: each rank's gradient covers its own tokens
            got = sum(s["grads"][name] for s in saved)
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=5e-5, msg=name)
