"""The shortcut-connected MoE (ScMoE) decoder layer of LongCat-Flash, with its multi-head latent attention
(``ScMoEConfig(attention="mla")``: the layer of Hugging Face's ``LongcatFlashDecoderLayer``, which
``ScMoEDecoder.from_hf`` takes over) or a GQA stand-in (``attention="gqa"``, the default).

```
h1  = x  + Attn_0(Norm_in0(x))
u   = Norm_post0(h1)                 shared by the dense FFN_0 and the MoE
m   = MoE(u)                         router + FFN experts + zero experts (x s)
h2  = h1 + FFN_0(u)
h3  = h2 + Attn_1(Norm_in1(h2))
out = h3 + FFN_1(Norm_post1(h3)) + m
```

Nothing on the dense path reads ``m``, so under expert parallelism the MoE's dispatch all-to-all runs while FFN_0 and
Attn_1's projections compute, and its combine all-to-all while the rest of Attn_1 and FFN_1 compute
(docs/models/scmoe.md, docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..nn.mla import MLACache, MLARotary, MultiHeadLatentAttention, _RMSNorm
from ..nn.moe import ZeroComputeMoE
from ..nn.moe_dispatch import RoutedTokens, expert_parallel, expert_parallel_group, phase
from ..nn.moe_losses import device_balance_loss
from ..ops import _validate as v
from ..ops.attention import MAX_HEAD_DIM, attention

__all__ = ["SCMOE_PRESETS", "KVCache", "RotaryAttention", "ScMoEConfig", "ScMoEDecoder", "ScMoEDecoderLayer",
           "SwiGLUMLP", "apply_rotary"]

_LAYER_OPS = ("attention", "moe_route", "moe_experts", "moe_permute", "moe_grouped_swiglu", "moe_unpermute",
              "expert_bias_update_")


@dataclass(frozen=True)
class ScMoEConfig:
    """Shape of a ScMoE decoder (``ScMoEConfig.preset(name)``, ``config.replace(...)``).

    ``head_dim`` defaults to ``hidden_size // num_heads``; it must be even (rotary embedding). ``target_ffn_per_token``
    (K_e) turns the expert-bias balancer on; ``None`` keeps the bias fixed. ``tie_word_embeddings`` ties the
    decoder's LM head to its embedding; ``initializer_range`` is their init std. ``bias_ki`` (the balancer's PID
    integral gain) and ``balance_loss_coef`` (LongCat-Flash's device-level balance loss; 0 = off) are the recipe for a
    router trained jointly (docs/balancer_training.md): defaults 0.3 and 0.1.

    ``attention``: ``"gqa"`` (default: :class:`RotaryAttention`, rotate-half RoPE, ``torch.nn.RMSNorm``) or ``"mla"``
    (LongCat-Flash: :class:`mmkernels.nn.MultiHeadLatentAttention` with ``q_lora_rank`` (None: one ``q_proj``),
    ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim`` (even), ``v_head_dim``, ``rope_scaling`` (None or HF's
    YaRN dict), ``attention_bias``, ``attention_dropout`` and ``mla_rms_norm_eps`` (the MLA's own norms; HF: 1e-6), all
    required or defaulted as HF's ``LongcatFlashConfig`` names them; every RMSNorm is then HF's ``LongcatFlashRMSNorm``
    and ``head_dim`` is ``qk_nope_head_dim + qk_rope_head_dim``; ``num_kv_heads`` must equal ``num_heads``). The MLA
    fields are an error with ``"gqa"``. ``pad_token_id``: the embedding's ``padding_idx`` (zero at init, no gradient).

    Raises (at construction): TypeError / ValueError naming the field that is out of range.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    dense_intermediate_size: int
    num_ffn_experts: int
    num_zero_experts: int
    top_k: int
    expert_intermediate_size: int
    routed_scaling_factor: float = 1.0
    target_ffn_per_token: float | None = None
    vocab_size: int = 32000
    num_layers: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # The balancer recipe for a router trained jointly (docs/balancer_training.md): the expert bias's PID integral
    # gain and LongCat-Flash's device-level balance loss coefficient (0: off; the layer then computes nothing).
    bias_ki: float = 0.3
    balance_loss_coef: float = 0.1
    # Attention: "gqa" (RotaryAttention, the stand-in) or "mla" (LongCat-Flash's multi-head latent attention,
    # mmkernels.nn.MultiHeadLatentAttention, with the dims below; HF LongcatFlashConfig's names).
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mla_rms_norm_eps: float = 1e-6
    # The embedding row that gets no gradient (nn.Embedding's padding_idx; HF's pad_token_id), zero at init.
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        name = "ScMoEConfig"
        for switch in ("tie_word_embeddings", "attention_bias"):  # the type first: "False" is not a given value
            object.__setattr__(self, switch, v.flag(switch, getattr(self, switch), op=name))
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"{name}: attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.pad_token_id is not None:
            v.integer("pad_token_id", self.pad_token_id, op=name, low=0, high=self.vocab_size - 1)
        if self.attention == "mla":
            self._check_mla()
        else:
            given = [f for f in _MLA_FIELDS if getattr(self, f) != _MLA_FIELD_DEFAULTS[f]]
            if given:
                raise ValueError(f"{name}: {', '.join(given)} only apply with attention='mla' (got attention='gqa')")
        for f, low in (("hidden_size", 1), ("num_heads", 1), ("num_kv_heads", 1), ("dense_intermediate_size", 1),
                       ("num_ffn_experts", 1), ("num_zero_experts", 0), ("expert_intermediate_size", 1),
                       ("vocab_size", 1), ("num_layers", 1)):
            v.integer(f, getattr(self, f), op=name, low=low)
        v.integer("top_k", self.top_k, op=name, low=1, high=self.num_ffn_experts + self.num_zero_experts)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{name}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        v.real("routed_scaling_factor", self.routed_scaling_factor, op=name)
        if self.target_ffn_per_token is not None:
            v.real("target_ffn_per_token", self.target_ffn_per_token, op=name, low=0.0, high=float(self.top_k))
        v.real("rms_norm_eps", self.rms_norm_eps, op=name, low=0.0)
        v.real("rope_theta", self.rope_theta, op=name, low=1.0)
        v.real("initializer_range", self.initializer_range, op=name, low=0.0)
        v.real("bias_ki", self.bias_ki, op=name, low=0.0)
        v.real("balance_loss_coef", self.balance_loss_coef, op=name, low=0.0)
        if self.attention == "mla":
            return  # head_dim was set by _check_mla
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"{name}: hidden_size ({self.hidden_size}) is not divisible by num_heads "
                                 f"({self.num_heads}); give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        v.integer("head_dim", self.head_dim, op=name, low=2, high=MAX_HEAD_DIM)
        if self.head_dim % 2:
            raise ValueError(f"{name}: head_dim must be even for the rotary embedding, got {self.head_dim}")

    def _check_mla(self) -> None:
        name = "ScMoEConfig"
        if self.q_lora_rank is not None:
            v.integer("q_lora_rank", self.q_lora_rank, op=name, low=1)
        for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, f) is None:
                raise ValueError(f"{name}: attention='mla' needs {f}")
            v.integer(f, getattr(self, f), op=name, low=1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{name}: qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if qk > MAX_HEAD_DIM:
            raise ValueError(f"{name}: qk_nope_head_dim + qk_rope_head_dim must be <= {MAX_HEAD_DIM}, got {qk}")
        v.integer("v_head_dim", self.v_head_dim, op=name, low=1, high=MAX_HEAD_DIM)
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{name}: with attention='mla' every head has its own keys and values (from the latent): "
                             f"num_kv_heads ({self.num_kv_heads}) must equal num_heads ({self.num_heads})")
        if self.head_dim is not None and self.head_dim != qk:
            raise ValueError(f"{name}: with attention='mla' head_dim is qk_nope_head_dim + qk_rope_head_dim = {qk}, "
                             f"got {self.head_dim}")
        object.__setattr__(self, "head_dim", qk)
        v.probability("attention_dropout", self.attention_dropout, op=name)
        v.real("mla_rms_norm_eps", self.mla_rms_norm_eps, op=name, low=0.0)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise TypeError(f"{name}: rope_scaling must be None or a dict of HF rope parameters, got "
                            f"{type(self.rope_scaling).__name__}")
        MLARotary(self.qk_rope_head_dim, self.rope_theta, self.rope_scaling, owner=name)  # validates rope_scaling

    @classmethod
    def preset(cls, name: str) -> ScMoEConfig:
        """``"tiny"`` (tests: N = 8, divisible by 1, 2, 4, 8), ``"small"`` (CPU benchmarks), ``"longcat-flash-lite"``
        (the MoE shape of docs/design/longcat_moe.md#presets; attention and dense FFN sizes are our stand-ins) or
        ``"longcat-flash"`` (the real model, MLA, HF ``LongcatFlashConfig``'s defaults)."""
        if name not in SCMOE_PRESETS:
            raise ValueError(f"ScMoEConfig: unknown preset {name!r}; presets: {sorted(SCMOE_PRESETS)}")
        return SCMOE_PRESETS[name]

    def replace(self, **changes) -> ScMoEConfig:
        """A copy with ``changes`` applied (validated again). ``head_dim`` is re-derived unless given."""
        mla = changes.get("attention", self.attention) == "mla"
        derived_from = {"qk_nope_head_dim", "qk_rope_head_dim", "attention"} if mla else {"hidden_size", "num_heads"}
        switched = changes.get("attention", self.attention) != self.attention
        if "head_dim" not in changes and (derived_from & set(changes) or switched):
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)


_MLA_FIELD_DEFAULTS = {"q_lora_rank": None, "kv_lora_rank": None, "qk_nope_head_dim": None, "qk_rope_head_dim": None,
                       "v_head_dim": None, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
                       "mla_rms_norm_eps": 1e-6}
_MLA_FIELDS = tuple(_MLA_FIELD_DEFAULTS)

SCMOE_PRESETS: dict[str, ScMoEConfig] = {
    "tiny": ScMoEConfig(hidden_size=32, num_heads=4, num_kv_heads=2, dense_intermediate_size=48, num_ffn_experts=8,
                        num_zero_experts=4, top_k=3, expert_intermediate_size=24, routed_scaling_factor=2.0,
                        target_ffn_per_token=2.0, vocab_size=128, num_layers=2),
    "small": ScMoEConfig(hidden_size=256, num_heads=8, num_kv_heads=2, dense_intermediate_size=768,
                         num_ffn_experts=16, num_zero_experts=8, top_k=6, expert_intermediate_size=256,
                         routed_scaling_factor=6.0, target_ffn_per_token=4.0, vocab_size=4096, num_layers=4),
    # MoE block as LongCat-Flash-Lite (MOE_PRESETS); GQA 32/8 x 128 and a 2x dense FFN stand in for MLA and the
    # unpublished dense width; LongCat-Flash's rope_theta and vocabulary.
    "longcat-flash-lite": ScMoEConfig(hidden_size=3072, num_heads=32, num_kv_heads=8, dense_intermediate_size=6144,
                                      num_ffn_experts=256, num_zero_experts=128, top_k=12,
                                      expert_intermediate_size=1024, routed_scaling_factor=6.0,
                                      target_ffn_per_token=8.0, vocab_size=131072, num_layers=14,
                                      rope_theta=10_000_000.0, head_dim=128),
    # LongCat-Flash itself (HF LongcatFlashConfig's defaults; MLA, 560 B parameters: not built here), with the balancer
    # target of MOE_PRESETS["longcat-flash"].
    "longcat-flash": ScMoEConfig(hidden_size=6144, num_heads=64, num_kv_heads=64, dense_intermediate_size=12288,
                                 num_ffn_experts=512, num_zero_experts=256, top_k=12, expert_intermediate_size=2048,
                                 routed_scaling_factor=6.0, target_ffn_per_token=8.0, vocab_size=131072,
                                 num_layers=28, rope_theta=10_000_000.0, attention="mla", q_lora_rank=1536,
                                 kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}


# ---- building blocks ----------------------------------------------------------------------------------------------


MAX_POSITION = 2**24  # RoPE angles are fp32: positions past 2**24 are not even exact integers there


def check_positions(name: str, position_ids: torch.Tensor, *, eager: bool) -> None:
    """``position_ids`` must lie in ``[-2**24, 2**24]``: RoPE computes ``position * inv_freq`` in fp32, whose rounding
    grows with the position (a shift by 2**20 already moves logits by ~1e-4, by 2**24 by ~0.1), and past 2**24 the
    positions themselves are no longer exact. ``eager``: one host read and a ``ValueError``; otherwise (a layer, or
    inside ``torch.compile``) ``torch._assert_async`` (no host sync: ``RuntimeError`` on CPU at once, a device-side
    assertion on CUDA)."""
    if not position_ids.numel() or position_ids.is_meta:
        return
    message = f"{name}: position_ids must lie in [-{MAX_POSITION}, {MAX_POSITION}] (RoPE's fp32 angles)"
    if eager and not torch.compiler.is_compiling():
        lo, hi = (int(x) for x in torch.aminmax(position_ids))
        if lo < -MAX_POSITION or hi > MAX_POSITION:
            raise ValueError(f"{message}, got values in [{lo}, {hi}]")
        return
    torch._assert_async(position_ids.abs().max() <= MAX_POSITION, message)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (RoFormer; the "rotate half" layout of HF Llama) of ``x`` [B, L, H, D] at integer
    ``positions`` [B, L] or [1, L]. Angles and products in fp32, result in ``x``'s dtype."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [B, L, 1, D]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)


class RotaryAttention(nn.Module):
    """Causal GQA self-attention with rotary embeddings on q and k (the stand-in for LongCat's MLA).

    ``qkv``: ``Linear(D, (Hq + 2 Hkv) * hd, bias=False)`` (rows ``[q | k | v]``, as :class:`mmkernels.nn.Attention`),
    ``o_proj``: ``Linear(Hq * hd, D, bias=False)``. Split in two steps so the layer can schedule work around them:
    :meth:`project` (projections + RoPE) and :meth:`attend` (:func:`mmkernels.ops.attention`, causal, + ``o_proj``).
    ``backend``: ``None``, a name or ``{"attention": name}`` (checked when set).
    """

    backend = ModuleBackend("attention")

    def __init__(self, config: ScMoEConfig, *, backend: BackendChoice = None, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, width, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False, device=device,
                                dtype=dtype)
        self.backend = backend

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, L, Hq, hd], k and v [B, L, Hkv, hd], RoPE applied to q and k."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, val = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rotary(q.unflatten(-1, (hq, d)), positions, self.rope_theta)
        k = apply_rotary(k.unflatten(-1, (hkv, d)), positions, self.rope_theta)
        return q, k, val.unflatten(-1, (hkv, d))

    def attend(self, q: torch.Tensor, k: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        out = attention(q, k, val, causal=True, backend=self._backends["attention"])
        return self.o_proj(out.flatten(-2))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project(x, positions))


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU FFN without biases, HF names: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rms_norm(config: ScMoEConfig, *, device=None, dtype=None) -> nn.Module:
    """The layer's RMSNorm over ``hidden_size``: ``torch.nn.RMSNorm`` with GQA attention (unchanged), Hugging Face's
    ``LongcatFlashRMSNorm`` with MLA (normalise in fp32, cast back to the input dtype, then multiply by the weight;
    ``torch.nn.RMSNorm`` multiplies before the cast, which differs in bf16/fp16). Both hold one ``weight``."""
    if config.attention == "mla":
        return _RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
    return nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, device=device, dtype=dtype)


def mla_attention(config: ScMoEConfig, *, device=None, dtype=None) -> MultiHeadLatentAttention:
    """One :class:`mmkernels.nn.MultiHeadLatentAttention` of ``config`` (attention='mla')."""
    c = config
    return MultiHeadLatentAttention(c.hidden_size, c.num_heads, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                                    qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                                    v_head_dim=c.v_head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                                    attention_bias=c.attention_bias, rms_norm_eps=c.mla_rms_norm_eps,
                                    dropout=c.attention_dropout, device=device, dtype=dtype)


class _Fork(torch.autograd.Function):
    """``u`` feeds two branches whose autograd nodes are created in a different order by the two schedules: the two
    gradients are added here in one fixed order (dense + MoE), so the bitwise equality of the overlapped and the
    sequential schedules' gradients does not hang on the order in which autograd's engine finishes the branches."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, g_dense, g_moe):
        return g_dense + g_moe


class ScMoEDecoderLayer(nn.Module):
    """One LongCat-Flash shortcut-connected MoE layer (two attention blocks, two dense SwiGLU FFNs, one MoE).

    Module names follow HF's ``LongcatFlashDecoderLayer``: ``input_layernorm[0|1]``, ``self_attn[0|1]``,
    ``post_attention_layernorm[0|1]``, ``mlps[0|1]`` (:class:`SwiGLUMLP`), ``mlp`` (the MoE). With
    ``config.attention == "mla"`` the attention blocks are :class:`mmkernels.nn.MultiHeadLatentAttention` (HF's
    ``LongcatFlashMLA``, same parameter names) and the norms HF's ``LongcatFlashRMSNorm`` (fp32, cast back, then the
    weight): HF's layer exactly. With ``"gqa"``: causal GQA with RoPE (:class:`RotaryAttention`) and
    ``torch.nn.RMSNorm``.

    Args:
        config: a :class:`ScMoEConfig`.
        overlap: under expert parallelism, issue the MoE's count exchange before FFN_0, its rows after FFN_0 (the
            one host sync) and wait for them after Attn_1, issue the combine before FFN_1 and wait for it at the
            final add. ``False``
            waits for each right after issuing it. Both give bitwise-identical outputs and gradients. Ignored in a
            world of one. A plain attribute: may be changed later.
        ep_group: the expert-parallel group (ProcessGroup or 1-D DeviceMesh). ``None``: the default group when
            torch.distributed is initialised with more than one rank, else a world of one (``mlp`` is a plain
            :class:`mmkernels.nn.ZeroComputeMoE`). A group of one rank also gives the plain path. The full MoE is
            built on every rank and then sharded (:meth:`ExpertParallelMoE.from_moe`), so a seed gives the same
            weights whatever the world size.
        backend: a backend name or ``{op: name}`` over ``attention``, ``moe_route``, ``moe_experts``, ``moe_permute``,
            ``moe_grouped_swiglu``, ``moe_unpermute``, ``expert_bias_update_``; reaches every op of the layer.

    ``forward(hidden [B, L, D], *, padding_mask=None, position_ids=None, kv_cache=None) -> [B, L, D]``:
    ``padding_mask`` bool [B, L] (True = padding) keeps padding out of the MoE and its balancer counts; attention is
    causal, so right padding never reaches a real token. ``position_ids`` int [B, L] or [L] (default
    ``C..C+L-1`` with C the tokens already in ``kv_cache``, 0 without one) for the rotary embedding. ``kv_cache``
    (a :class:`KVCache`): this layer's slot ``layer_index`` receives the new keys and values of both attention
    blocks (MLA: the compressed latents, slots ``2 l`` and ``2 l + 1``), and the L new queries attend to every
    cached key plus the new ones, bottom-right causal (the same ``ops.attention`` call with ``Lq != Lk``; no separate
    decode path).
    Under expert parallelism every rank of the group calls forward (and backward) together.

    With ``config.balance_loss_coef > 0`` (and a ``target_ffn_per_token``) every training forward also computes the
    device-level balance loss of its routing; :meth:`balance_loss` returns it (times the coefficient) once.

    Raises:
        TypeError / ValueError: bad config, backend or input shapes.
    """

    backend = ModuleBackend(*_LAYER_OPS)

    def __init__(self, config: ScMoEConfig, *, overlap: bool = True, ep_group=None, backend: BackendChoice = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        v.module_dtype("ScMoEDecoderLayer", dtype)
        if not isinstance(config, ScMoEConfig):
            raise TypeError(f"ScMoEDecoderLayer: config must be a ScMoEConfig, got {type(config).__name__}")
        self.config = config
        self.overlap = v.flag("overlap", overlap, op="ScMoEDecoderLayer")
        c, factory = config, {"device": device, "dtype": dtype}
        self.input_layernorm = nn.ModuleList(rms_norm(c, **factory) for _ in range(2))
        if c.attention == "mla":
            self.self_attn = nn.ModuleList(mla_attention(c, **factory) for _ in range(2))
        else:
            self.self_attn = nn.ModuleList(RotaryAttention(c, **factory) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(rms_norm(c, **factory) for _ in range(2))
        self.mlps = nn.ModuleList(SwiGLUMLP(c.hidden_size, c.dense_intermediate_size, **factory) for _ in range(2))
        moe = ZeroComputeMoE(c.hidden_size, c.num_ffn_experts, c.num_zero_experts, c.top_k,
                             c.expert_intermediate_size, routed_scaling_factor=c.routed_scaling_factor,
                             target_ffn_per_token=c.target_ffn_per_token, balancer_kwargs={"ki": c.bias_ki},
                             **factory)
        # Expert parallelism plugs in through nn.moe_dispatch (filled in by mmkernels.distributed on import): the
        # same MoE step protocol either way, so forward has one schedule.
        group = expert_parallel_group(ep_group, owner="ScMoEDecoderLayer")
        self.mlp = moe if group is None else expert_parallel(moe, group, owner="ScMoEDecoderLayer")
        self.expert_parallel = group is not None
        self.ep_world_size = 1 if group is None else torch.distributed.get_world_size(group)
        # The device-level balance loss of the last training forward (None when off); see balance_loss().
        self._balance_loss: torch.Tensor | None = None
        # This layer's slot in a KVCache; ScMoEDecoder numbers its layers 0..num_layers-1.
        self.layer_index = 0
        self.backend = backend  # last: checks the choice and hands every part (attention, MoE) its share

    def extra_repr(self) -> str:
        return f"overlap={self.overlap}, expert_parallel={self.expert_parallel}"

    def update_bias(self) -> None:
        """The MoE's :meth:`update_bias` (once per optimizer step; on every rank under expert parallelism)."""
        self.mlp.update_bias()

    def forward(self, hidden: torch.Tensor, *, padding_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        name = "ScMoEDecoderLayer"
        v.tensor("hidden", hidden, dim=3, op=name)
        b, length, d = hidden.shape
        if d != self.config.hidden_size:
            raise ValueError(f"{name}: hidden must be [B, L, {self.config.hidden_size}], got {tuple(hidden.shape)}")
        v.module_input(name, "hidden", hidden, self.self_attn[0].o_proj.weight)
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"{name}: kv_cache must be a KVCache, got {type(kv_cache).__name__}")
            if kv_cache.is_latent != (self.config.attention == "mla"):
                raise ValueError(f"{name}: kv_cache holds {'MLA latents' if kv_cache.is_latent else 'GQA keys'} but "
                                 f"the layer's attention is {self.config.attention!r}; use the decoder's new_cache()")
        offset = 0 if kv_cache is None else kv_cache.cached_length(self.layer_index)
        if position_ids is None:
            positions = torch.arange(offset, offset + length, device=hidden.device)[None]
        else:
            v.tensor("position_ids", position_ids, dtypes=(torch.int32, torch.int64), op=name)
            positions = position_ids if position_ids.dim() == 2 else position_ids[None]
            if positions.dim() != 2 or positions.shape[-1] != length or positions.shape[0] not in (1, b):
                raise ValueError(f"{name}: position_ids must be [B, L] or [L] with L = {length}, got "
                                 f"{tuple(position_ids.shape)}")
            check_positions(name, positions, eager=False)
        with phase("mmkernels.scmoe.layer"):
            return self._schedule(hidden, positions, padding_mask, kv_cache)

    def _schedule(self, hidden: torch.Tensor, positions: torch.Tensor, padding_mask: torch.Tensor | None,
                  kv_cache: KVCache | None) -> torch.Tensor:
        """The one schedule, whatever the MoE's dispatcher: with the local one every handle is already complete
        (the experts run where the combine is issued); with the all-to-all one the count exchange hides behind
        FFN_0, the rows behind Attn_1 and the combine behind FFN_1 (``overlap=False``: each waited for at once)."""
        mlp, overlap = self.mlp, self.overlap
        with phase("mmkernels.scmoe.attn0"):
            h1 = hidden + self._attention(0, self.input_layernorm[0](hidden), positions, kv_cache)
            u = self.post_attention_layernorm[0](h1)
            u_dense, u_moe = _Fork.apply(u)
        with phase("mmkernels.scmoe.moe_dispatch"):
            dispatch = mlp.dispatch(u_moe, padding_mask=padding_mask)  # route, permute; counts in flight
        if not overlap:
            with phase("mmkernels.scmoe.wait_dispatch"):
                dispatch.wait()
        if self.training and self.config.balance_loss_coef > 0 and self.config.target_ffn_per_token is not None:
            self._balance_loss = self._device_balance_loss(dispatch.routed, padding_mask)
        with phase("mmkernels.scmoe.ffn0"):
            h2 = h1 + self.mlps[0](u_dense)  # FFN_0 || count exchange
        if overlap:
            with phase("mmkernels.scmoe.send_rows"):
                dispatch.send()  # the layer's one host sync (split sizes), then the rows go out
        if self.config.attention == "mla":
            with phase("mmkernels.scmoe.attn1"):
                h3 = h2 + self._attention(1, self.input_layernorm[1](h2), positions, kv_cache)  # || rows
        else:
            with phase("mmkernels.scmoe.attn1_proj"):
                q, k, val = self.self_attn[1].project(self.input_layernorm[1](h2), positions)  # || rows
                if kv_cache is not None:
                    k, val = kv_cache.update(self.layer_index, 1, k, val)
            with phase("mmkernels.scmoe.attn1"):
                h3 = h2 + self.self_attn[1].attend(q, k, val)  # rest of Attn_1 || rows
        with phase("mmkernels.scmoe.wait_dispatch" if overlap else "mmkernels.scmoe.dispatched"):
            dispatched = dispatch.wait()
        with phase("mmkernels.scmoe.moe_experts"):
            combine = mlp.combine(mlp.run_experts(dispatched), dispatched)  # expert GEMMs: exposed
        if not overlap:
            with phase("mmkernels.scmoe.wait_combine"):
                combine.wait()
        with phase("mmkernels.scmoe.ffn1"):
            f1 = self.mlps[1](self.post_attention_layernorm[1](h3))  # FFN_1 || combine
        with phase("mmkernels.scmoe.wait_combine" if overlap else "mmkernels.scmoe.combined"):
            m = combine.wait()
        return h3 + f1 + m

    def _attention(self, block: int, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None
                   ) -> torch.Tensor:
        """Attention block ``block`` (0 or 1) on normalised ``x``, its keys and values joining ``kv_cache``'s slot
        (GQA: keys and values after RoPE; MLA: the compressed latent and rotated rope key, slot ``2 l + block``)."""
        attn = self.self_attn[block]
        if self.config.attention == "mla":
            cache = None if kv_cache is None else kv_cache.latent(self.layer_index, block)
            return attn(x, position_ids=positions, cache=cache)
        q, k, val = attn.project(x, positions)
        if kv_cache is not None:
            # the new keys join the cached ones; attention is bottom-right causal (query i of the L new ones sees
            # every cached key and the new keys up to itself)
            k, val = kv_cache.update(self.layer_index, block, k, val)
        return attn.attend(q, k, val)

    def __getstate__(self):
        # The pending loss holds autograd history, which deepcopy and pickle cannot copy; it is per-forward state.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_balance_loss"] = None
        return state

    def _device_balance_loss(self, routed: RoutedTokens, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """LongCat-Flash's device-level balance loss of this forward's routing (one FFN group per expert-parallel
        rank, plus the zero experts), from the MoE's own fp32 router logits (on the graph, so the loss reaches the
        router: one router GEMM per step) and its own picks (the current bias; padding slots left out)."""
        c = self.config
        pad = None if padding_mask is None else padding_mask.reshape(-1)
        return device_balance_loss(routed.router_logits, routed.routing.topk_ids, num_ffn_experts=c.num_ffn_experts,
                                   num_groups=self.ep_world_size, top_k=c.top_k,
                                   target_ffn_per_token=c.target_ffn_per_token, padding_mask=pad)

    def balance_loss(self) -> torch.Tensor | None:
        """``balance_loss_coef`` x the device-level balance loss of the last training forward, then forgotten
        (``None`` if there was none): add it to the training loss once per forward."""
        loss, self._balance_loss = self._balance_loss, None
        return None if loss is None else self.config.balance_loss_coef * loss


# ---- the decoder --------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every attention block of a :class:`ScMoEDecoder`, for incremental decoding.

    A growing cache: each forward appends its new keys and values (``[B, L_new, Hkv, head_dim]``, after RoPE) to a
    layer's cached ones with ``torch.cat`` along the sequence axis. Nothing is preallocated and no length mask is
    needed (the attention op sees exactly the cached keys); the cost is one copy of the cache per step, which is
    small next to the model at the lengths this is meant for. Positions continue from the cached length, so a
    prompt can be fed whole (prefill) and then one token at a time.

    With ``latent=True`` (a decoder with ``attention="mla"``) the cache holds, instead, one
    :class:`mmkernels.nn.mla.MLACache` per MLA block, as Hugging Face's cache for LongCat-Flash: slot ``2 l + b``
    for block ``b`` of layer ``l`` (``latents``, or :meth:`latent`), each keeping the compressed latent and the
    rotated rope key (``kv_lora_rank + qk_rope_head_dim`` numbers per token), expanded to keys and values at
    attention time.

    ``KVCache(num_layers, latent=False)`` or ``decoder.new_cache()``. ``seq_len``: tokens cached (layer 0).
    ``reset()`` empties it. Padding is not supported with a cache (the decoder raises): feed prompts of one length.
    """

    def __init__(self, num_layers: int, *, latent: bool = False) -> None:
        self.num_layers = v.integer("num_layers", num_layers, op="KVCache", low=1)
        self.is_latent = v.flag("latent", latent, op="KVCache")
        self.reset()

    def reset(self) -> None:
        self.keys: list[list[torch.Tensor | None]] = [[None, None] for _ in range(self.num_layers)]
        self.values: list[list[torch.Tensor | None]] = [[None, None] for _ in range(self.num_layers)]
        self.latents: list[MLACache] = [MLACache() for _ in range(2 * self.num_layers)] if self.is_latent else []

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"KVCache: layer {layer} out of range for a cache of {self.num_layers} layers")

    def latent(self, layer: int, block: int) -> MLACache:
        """The :class:`MLACache` of MLA block ``block`` (0 or 1) of ``layer``: slot ``2 * layer + block``."""
        if not self.is_latent:
            raise ValueError("KVCache: this cache holds GQA keys and values, not MLA latents; use the decoder's "
                             "new_cache()")
        self._check_layer(layer)
        return self.latents[2 * layer + block]

    def cached_length(self, layer: int = 0) -> int:
        """Tokens cached in ``layer`` (0 when empty)."""
        if self.is_latent:
            return len(self.latents[2 * layer])
        k = self.keys[layer][0]
        return 0 if k is None else k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.cached_length(0)

    def update(self, layer: int, block: int, k: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``val`` [B, L_new, Hkv, hd] to attention block ``block`` (0 or 1) of ``layer``; returns the
        whole cached keys and values [B, C + L_new, Hkv, hd]. GQA caches only (``latent=False``)."""
        if self.is_latent:
            raise ValueError("KVCache: this cache holds MLA latents (latent=True); use latent(layer, block)")
        self._check_layer(layer)
        old_k, old_v = self.keys[layer][block], self.values[layer][block]
        if old_k is not None:
            if old_k.shape[0] != k.shape[0] or old_k.shape[2:] != k.shape[2:]:
                raise ValueError(f"KVCache: new keys {tuple(k.shape)} do not fit the cached {tuple(old_k.shape)} "
                                 "(batch, heads and head dim must match)")
            k, val = torch.cat([old_k, k], dim=1), torch.cat([old_v, val], dim=1)
        self.keys[layer][block], self.values[layer][block] = k, val
        return k, val


class ScMoEDecoder(nn.Module):
    """A LongCat-Flash-style language model: token embedding, ``num_layers`` :class:`ScMoEDecoderLayer`, a final
    RMSNorm and an LM head (tied to the embedding when ``config.tie_word_embeddings``).

    Args:
        config: a :class:`ScMoEConfig` (``vocab_size``, ``num_layers``, ...).
        overlap, ep_group: passed to every layer (expert parallelism; see :class:`ScMoEDecoderLayer`).
        backend: ``None``, a name or ``{op: name}`` over the layer's ops; reaches every op of every layer.

    ``forward(input_ids [B, L] | None = None, *, inputs_embeds [B, L, D] | None = None, padding_mask=None,
    position_ids=None, kv_cache=None) -> logits [B, L, V]`` (the dtype of the model), causal: position i sees
    positions ``<= i``. Give exactly one of ``input_ids`` (int64/int32 in ``[0, V)``) and ``inputs_embeds``.

    - ``padding_mask``: bool [B, L], True = padding, which must be **right** padding (each row: its tokens, then
      padding). Padding reaches no real token: attention is causal, so real queries never see the keys after
      them, and the MoE routes padding nowhere and leaves it out of the balancer's counts. Padding rows of
      ``inputs_embeds`` may hold anything (NaN included): they are zeroed on entry, so they reach no gradient.
      Their logits are meaningless: leave them out of the loss. Left padding raises ``ValueError`` (checked on the
      host in eager mode; under ``torch.compile`` the check is skipped).
    - ``kv_cache``: a :class:`KVCache` (``new_cache()``); the new tokens' keys and values are appended and the new
      queries attend to everything cached (``ops.attention`` with ``Lq != Lk``, bottom-right causal); positions
      continue from the cached length. Not combinable with ``padding_mask``.

    ``hidden_states(...)`` (same arguments) returns the final normalised hidden states [B, L, D] without the LM head.
    ``from_hf(model)`` takes over a Hugging Face ``LongcatFlashForCausalLM`` (``attention="mla"``).
    ``update_bias()`` runs every layer's balancer step (once per optimizer step).

    Raises:
        TypeError / ValueError: bad config, backend, ids or shapes.
    """

    backend = ModuleBackend(*_LAYER_OPS)

    def __init__(self, config: ScMoEConfig, *, overlap: bool = True, ep_group=None, backend: BackendChoice = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        v.module_dtype("ScMoEDecoder", dtype)
        overlap = v.flag("overlap", overlap, op="ScMoEDecoder")
        if not isinstance(config, ScMoEConfig):
            raise TypeError(f"ScMoEDecoder: config must be a ScMoEConfig, got {type(config).__name__}")
        self.config = config
        c, factory = config, {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id, **factory)
        self.layers = nn.ModuleList(ScMoEDecoderLayer(c, overlap=overlap, ep_group=ep_group, **factory)
                                    for _ in range(c.num_layers))
        for i, layer in enumerate(self.layers):
            layer.layer_index = i
        self.norm = rms_norm(c, **factory)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, **factory)
        self.reset_parameters()
        self.backend = backend  # last: checks the choice and hands every layer its share

    @classmethod
    def from_hf(cls, model: nn.Module, *, backend: BackendChoice = None, overlap: bool = True,
                ep_group=None) -> ScMoEDecoder:
        """Take over a Hugging Face ``LongcatFlashForCausalLM`` (or a bare ``LongcatFlashModel``): a decoder with
        ``attention="mla"`` and every weight of ``model`` (embedding, both MLAs, the norms, the dense MLPs, the MoE with
        its zero experts and correction bias, the final norm, the LM head, tied or not), on the model's device and
        dtype, in its train/eval mode. ``forward(input_ids)`` then gives HF's logits (``hidden_states`` HF's
        ``last_hidden_state``). The balancer is off (``target_ffn_per_token=None``: the correction bias stays as
        loaded); set a target with ``config.replace`` and a new decoder to train it. A bare ``LongcatFlashModel``
        has no LM head: ours is tied to the embedding when the HF config ties them, else left at its
        initialisation. Nothing is downloaded; transformers need not be importable (the model object is read).

        Raises:
            TypeError: ``model`` is not a LongCat-Flash model.
            ConversionError: sizes that cannot be found or disagree, unsupported activations, weights that do not
                load (see :mod:`mmkernels.models.convert.longcat_decoder`).
        """
        from .convert import longcat_decoder as conv

        config = ScMoEConfig(**conv.decoder_config_fields(model))
        weight = conv.split_hf_model(model)[0].embed_tokens.weight
        decoder = cls(config, overlap=overlap, ep_group=ep_group, backend=backend, device=weight.device,
                      dtype=weight.dtype)
        state = conv.decoder_state_from_hf(model, num_ffn_experts=config.num_ffn_experts)
        if decoder.layers[0].expert_parallel:
            raise ValueError("ScMoEDecoder.from_hf: build with ep_group=None (a world of one), then shard the MoE "
                             "blocks with ExpertParallelMoE.from_moe")
        conv.load_decoder_state(decoder, model, state)
        return decoder.train(model.training)

    def reset_parameters(self) -> None:
        """Embedding and (untied) LM head ~ N(0, initializer_range) as HF decoders; the layers keep their own init."""
        if self.embed_tokens.weight.is_meta:
            self._tie()
            return
        nn.init.normal_(self.embed_tokens.weight, std=self.config.initializer_range)
        if self.config.pad_token_id is not None:
            with torch.no_grad():
                self.embed_tokens.weight[self.config.pad_token_id].zero_()
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.config.initializer_range)
        self._tie()

    def _tie(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _apply(self, fn, recurse: bool = True):
        # .to_empty() / some dtype moves create new Parameters per module: tie them again afterwards.
        out = super()._apply(fn, recurse)
        self._tie()
        return out

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for this decoder."""
        return KVCache(self.config.num_layers, latent=self.config.attention == "mla")

    def update_bias(self) -> None:
        """Every layer's expert-bias balancer step (once per optimizer step)."""
        for layer in self.layers:
            layer.update_bias()

    def balance_loss(self) -> torch.Tensor | None:
        """The mean over layers of each layer's :meth:`ScMoEDecoderLayer.balance_loss` (coefficient included) from
        the last training forward, or ``None`` (eval mode, or ``balance_loss_coef == 0``). Add it to the loss."""
        losses = [loss for layer in self.layers if (loss := layer.balance_loss()) is not None]
        return torch.stack(losses).mean() if losses else None

    def hidden_states(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                      padding_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final RMSNorm's output [B, L, D]; see the class docstring for the arguments."""
        name = "ScMoEDecoder"
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{name}: give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            v.tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32), dim=2, op=name)
            if input_ids.numel() and not input_ids.is_meta and not torch.compiler.is_compiling():
                lo, hi = torch.aminmax(input_ids)
                if int(lo) < 0 or int(hi) >= self.config.vocab_size:  # one host read, eager only
                    raise ValueError(f"{name}: input_ids must lie in [0, {self.config.vocab_size}), got values in "
                                     f"[{int(lo)}, {int(hi)}]")
            x = self.embed_tokens(input_ids)
        else:
            v.tensor("inputs_embeds", inputs_embeds, dim=3, op=name)
            if inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"{name}: inputs_embeds must be [B, L, {self.config.hidden_size}], got "
                                 f"{tuple(inputs_embeds.shape)}")
            if inputs_embeds.dtype != self.embed_tokens.weight.dtype:
                raise TypeError(f"{name}: inputs_embeds must have the model's dtype "
                                f"({str(self.embed_tokens.weight.dtype).replace('torch.', '')}), got "
                                f"{str(inputs_embeds.dtype).replace('torch.', '')}")
            x = inputs_embeds
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"{name}: kv_cache must be a KVCache (decoder.new_cache()), got "
                                f"{type(kv_cache).__name__}")
            if kv_cache.num_layers != len(self.layers):
                raise ValueError(f"{name}: kv_cache has {kv_cache.num_layers} layers, the decoder has "
                                 f"{len(self.layers)}; use decoder.new_cache()")
        b, length = x.shape[:2]
        if padding_mask is not None:
            v.tensor("padding_mask", padding_mask, dtypes=(torch.bool,), op=name)
            if tuple(padding_mask.shape) != (b, length):
                raise ValueError(f"{name}: padding_mask must be [B, L] = [{b}, {length}], got "
                                 f"{tuple(padding_mask.shape)}")
            if kv_cache is not None:
                raise ValueError(f"{name}: padding_mask cannot be combined with kv_cache (cached padding keys would "
                                 "be attended by later tokens); decode prompts of one length")
            if length > 1 and not torch.compiler.is_compiling() and bool((padding_mask[:, 1:] < padding_mask[:, :-1])
                                                                         .any()):
                raise ValueError(f"{name}: padding_mask must be right padding (each row: tokens, then padding)")
            x = torch.where(padding_mask[..., None], 0.0, x)  # padding may hold NaN: keep it out of every product
        if isinstance(position_ids, torch.Tensor) and position_ids.dtype in (torch.int32, torch.int64):
            check_positions(name, position_ids, eager=True)  # one host read, like input_ids (layers check again)
        for layer in self.layers:
            x = layer(x, padding_mask=padding_mask, position_ids=position_ids, kv_cache=kv_cache)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds=inputs_embeds, padding_mask=padding_mask,
                                               position_ids=position_ids, kv_cache=kv_cache))
