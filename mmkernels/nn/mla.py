"""``MultiHeadLatentAttention``: LongCat-Flash / DeepSeek-V2 multi-head latent attention (MLA) on
:func:`mmkernels.ops.attention`, with Hugging Face ``LongcatFlashMLA``'s parameter names (docs/ops/mla.md).

Per token ``x`` (``[B, L, hidden]``), ``H`` heads, ``r_q = q_lora_rank``, ``r_kv = kv_lora_rank``, ``d_n``/``d_r``
the query/key head dims without/with rotary embedding, ``d_v`` the value head dim:

- ``q = q_b_proj(q_a_layernorm(q_a_proj(x))) * sqrt(hidden / r_q)`` (``q_proj(x)``, scale 1, without ``r_q``),
  per head ``[q_nope (d_n) | q_rope (d_r)]``;
- ``[c | k_rope] = kv_a_proj_with_mqa(x)``, ``c = kv_a_layernorm(c) * sqrt(hidden / r_kv)`` (the latent), one
  ``k_rope`` (``d_r``) shared by all heads;
- interleaved (DeepSeek pair) RoPE on ``q_rope`` and ``k_rope`` only; the cache keeps ``[c | rope(k_rope)]``,
  ``r_kv + d_r`` numbers per token;
- per head ``[k_nope (d_n) | v (d_v)] = kv_b_proj(c)``, ``k = [k_nope | rope(k_rope)]``;
- causal ``softmax(q k^T * scale) v`` with ``scale = (d_n + d_r) ** -0.5`` (times YaRN's ``mscale(mscale_all_dim)^2``),
  then ``o_proj``.

This is the formula of transformers' ``models/longcat_flash/modeling_longcat_flash.py`` (``LongcatFlashMLA``, with its
``LongcatFlashRMSNorm``, ``apply_rotary_pos_emb_interleave`` and the default / YaRN rotary parameters of
``modeling_rope_utils``); with ``q_lora_rank=None`` and ``hidden_size == kv_lora_rank`` (both scales 1) it is
DeepSeek-V3's ``DeepseekV3Attention`` with ``rope_interleave=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as check
from ..ops.attention import MAX_HEAD_DIM, attention

__all__ = ["MLACache", "MLARotary", "MultiHeadLatentAttention"]

_NAME = "MultiHeadLatentAttention"
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "attention_factor",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`mmkernels.ops.attention` with a value head dim that may be smaller than the query/key head dim: the op
    takes ``v.shape[-1] != q.shape[-1]`` itself (Q/K split into power-of-two chunks, V sized on its own; no padding)."""
    return attention(q, k, v, **kwargs)


class _RMSNorm(nn.Module):
    """Hugging Face's ``LongcatFlashRMSNorm`` (= T5/Llama RMSNorm): normalise in fp32, cast back to the input dtype,
    then multiply by the weight (``torch.nn.RMSNorm`` multiplies before casting back)."""

    def __init__(self, dim: int, eps: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class MLARotary:
    """The rotary embedding of MLA's rope dims: Hugging Face's default and YaRN parameters (``modeling_rope_utils``),
    nothing stored on the device (the frequencies are recomputed per call from Python numbers, so module casts never
    round them).

    ``rope_scaling``: ``None`` (or ``{"rope_type": "default"}``) or HF's YaRN dict: ``rope_type="yarn"`` (or
    ``type``), ``factor``, ``original_max_position_embeddings`` and optionally ``attention_factor``, ``beta_fast``
    (32), ``beta_slow`` (1), ``mscale``, ``mscale_all_dim``, ``truncate`` (True); a ``rope_theta`` entry must equal
    ``theta``. ``attention_scaling`` multiplies cos and sin (YaRN's attention factor); ``softmax_mscale`` is the
    factor YaRN's ``mscale_all_dim`` puts on the softmax scale (``mscale^2``, HF's ``yarn_apply_mscale``).
    """

    def __init__(self, dim: int, theta: float, rope_scaling: Mapping | None = None, *, owner: str = _NAME) -> None:
        self.dim = dim
        self.theta = check.real("rope_theta", theta, op=owner)
        if not self.theta > 0:
            raise ValueError(f"{owner}: rope_theta must be > 0, got {theta}")
        self.kind = "default"
        self.attention_scaling = 1.0
        self.softmax_mscale = 1.0
        self.factor, self.low, self.high = 1.0, 0.0, 0.0
        if rope_scaling is None:
            return
        if not isinstance(rope_scaling, Mapping):
            raise TypeError(f"{owner}: rope_scaling must be None or a dict of HF rope parameters, got "
                            f"{type(rope_scaling).__name__}")
        unknown = sorted(set(rope_scaling) - _ROPE_KEYS)
        if unknown:
            raise ValueError(f"{owner}: rope_scaling has keys this module does not implement: {unknown} (it takes "
                             f"{sorted(_ROPE_KEYS)})")
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind not in ("default", "yarn"):
            raise ValueError(f"{owner}: rope_scaling rope_type must be 'default' or 'yarn', got {kind!r}")
        if "rope_theta" in rope_scaling and float(rope_scaling["rope_theta"]) != self.theta:
            raise ValueError(f"{owner}: rope_scaling['rope_theta'] ({rope_scaling['rope_theta']}) differs from "
                             f"rope_theta ({theta})")
        self.kind = kind
        if kind == "default":
            return
        for key in ("factor", "original_max_position_embeddings"):
            if rope_scaling.get(key) is None:
                raise ValueError(f"{owner}: rope_scaling of type 'yarn' needs {key!r}")
        self.factor = check.real("rope_scaling['factor']", rope_scaling["factor"], op=owner, low=1.0)
        original = check.integer("rope_scaling['original_max_position_embeddings']",
                                 rope_scaling["original_max_position_embeddings"], op=owner, low=1)
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        attention_factor = rope_scaling.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(self.factor, mscale) / _yarn_mscale(self.factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(self.factor)
        self.attention_scaling = float(attention_factor)
        if mscale_all_dim:
            self.softmax_mscale = _yarn_mscale(self.factor, mscale_all_dim) ** 2
        beta_fast = rope_scaling.get("beta_fast") or 32
        beta_slow = rope_scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(self.theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope_scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        self.low, self.high = max(low, 0), min(high, dim - 1)
        if self.low == self.high:
            self.high += 0.001  # HF's guard against a zero-width ramp

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """fp32 ``[dim / 2]`` inverse frequencies, computed as HF does."""
        pos_freqs = self.theta ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)
        if self.kind == "default":
            return 1.0 / pos_freqs
        ramp = ((torch.arange(self.dim // 2, device=device, dtype=torch.float32) - self.low)
                / (self.high - self.low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's ``position_embeddings`` for ``position_ids`` ``[B, L]``: cos and sin ``[B, L, dim]`` (the pair
        angles twice, ``cat(freqs, freqs)``), fp32 math, in ``dtype``."""
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (DeepSeek pair) RoPE, HF's ``apply_rotary_pos_emb_interleave``: pairs ``(x0, x1), (x2, x3), ...``
    rotate by one angle each; the result is laid out ``[rotated evens | rotated odds]`` (the same permutation for q
    and k, so the products are those of the interleaved rotation). ``cos``/``sin`` hold the pair angles
    (``[..., dim / 2]``), broadcast against ``x``'s leading dims."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLACache:
    """The KV cache of one :class:`MultiHeadLatentAttention`: the compressed latent, not per-head keys and values.

    ``entries`` ``[B, T, kv_lora_rank + qk_rope_head_dim]`` holds, per cached token, the normalised and scaled latent
    ``c`` and the shared, already rotated rope key (what Hugging Face's cache holds for ``LongcatFlashMLA``, in one
    tensor); ``padding`` bool ``[B, T]`` (True = padding) or None while no call passed a ``padding_mask``. Each
    forward with ``cache=`` appends its tokens (``[B, L, kv_lora_rank + qk_rope_head_dim]``) and attends over all of
    them; keys and values are expanded through ``kv_b_proj`` at attention time. Start with ``MLACache()``; one cache
    per layer and per sequence batch; :meth:`reset` empties it.
    """

    def __init__(self) -> None:
        self.entries: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.entries is None else self.entries.shape[1]

    def reset(self) -> None:
        self.entries, self.padding = None, None

    def update(self, new: torch.Tensor, padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``new`` ``[B, L, E]`` (and its ``padding`` ``[B, L]`` or None = none) and return all entries and
        the padding of all of them (None when no token was ever padding)."""
        old, old_padding = self.entries, self.padding
        if old is not None:
            if old.shape[0] != new.shape[0] or old.shape[2] != new.shape[2]:
                raise ValueError(f"{_NAME}: cache holds entries of shape {tuple(old.shape)}, which do not fit new "
                                 f"entries of shape {tuple(new.shape)} (batch size and width must match; one cache "
                                 "per layer and batch)")
            if old.device != new.device or old.dtype != new.dtype:
                raise ValueError(f"{_NAME}: cache holds {old.dtype} entries on {old.device}, the new ones are "
                                 f"{new.dtype} on {new.device}; reset() it after moving or casting the module")
        entries = new if old is None else torch.cat([old, new], dim=1)
        if padding is None and old_padding is None:
            merged = None
        else:
            past = len(self)
            if old_padding is None:
                old_padding = torch.zeros(new.shape[0], past, dtype=torch.bool, device=new.device)
            if padding is None:
                padding = torch.zeros(new.shape[:2], dtype=torch.bool, device=new.device)
            merged = torch.cat([old_padding, padding], dim=1)
        self.entries, self.padding = entries, merged
        return entries, merged


def _pack_order(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``valid`` bool ``[B, N]``: ``dest`` int64 ``[B*N]`` (row ``i`` of the flattened batch goes to packed row
    ``dest[i]``: each sequence's valid tokens, in order, one sequence after the other, then every padding token),
    its inverse ``src`` (packed row ``j`` comes from ``src[j]``) and int32 ``cu_seqlens`` ``[B + 1]``. Device
    arithmetic only: no host synchronisation."""
    b, n = valid.shape
    counts = valid.to(torch.int64)
    cu = F.pad(counts.sum(1).cumsum(0), (1, 0))
    rank_valid = counts.cumsum(1) - 1 + cu[:-1, None]
    rank_pad = (1 - counts).flatten().cumsum(0) - 1 + cu[-1]
    dest = torch.where(valid.flatten(), rank_valid.flatten(), rank_pad)
    src = torch.empty_like(dest).scatter_(0, dest, torch.arange(b * n, device=dest.device))
    return dest, src, cu.to(torch.int32)


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (LongCat-Flash / DeepSeek-V2), causal self-attention, with Hugging Face
    ``LongcatFlashMLA``'s parameter names so its state dict loads one to one (:meth:`from_hf`).

    Parameters: ``q_a_proj`` (hidden -> q_lora_rank), ``q_a_layernorm``, ``q_b_proj`` (q_lora_rank -> H * (d_n +
    d_r)), or ``q_proj`` (hidden -> H * (d_n + d_r)) when ``q_lora_rank`` is None; ``kv_a_proj_with_mqa`` (hidden ->
    kv_lora_rank + d_r), ``kv_a_layernorm``, ``kv_b_proj`` (kv_lora_rank -> H * (d_n + d_v)), ``o_proj`` (H * d_v ->
    hidden). The formula is in this module's docstring and docs/ops/mla.md.

    Args:
        hidden_size, num_heads: model width and H.
        q_lora_rank: rank of the query compression (None: one ``q_proj``, query scale 1).
        kv_lora_rank: width of the latent (what the cache keeps per token, with the rope key).
        qk_nope_head_dim, qk_rope_head_dim: d_n and d_r (even); d_n + d_r <= 256.
        v_head_dim: d_v in [1, 256] (``ops.attention``'s limit; independent of d_n + d_r).
        rope_theta: RoPE base (default LongCat-Flash's 1e7).
        rope_scaling: None or HF's rope parameters (``"default"`` or ``"yarn"``; see :class:`MLARotary`).
        attention_bias: biases on ``q_a_proj`` (``q_proj``), ``kv_a_proj_with_mqa`` and ``o_proj``, as HF.
        rms_norm_eps: epsilon of both RMSNorms (HF builds them with 1e-6 whatever the config says).
        dropout: attention-probability dropout, training mode only (HF's ``attention_dropout``).
        backend: the attention backend (None, a name or ``{"attention": name}``).

    ``forward(hidden_states, *, position_ids=None, position_embeddings=None, padding_mask=None, cache=None)``:
    ``hidden_states`` ``[B, L, hidden]`` -> ``[B, L, hidden]``.

    - ``position_ids`` integer ``[B, L]`` or ``[1, L]``; default ``len(cache) + arange(L)``. Or
      ``position_embeddings=(cos, sin)``, HF's ``[B or 1, L, d_r]`` tensors from its rotary embedding (either one
      of the two, not both).
    - ``padding_mask`` bool ``[B, L]``, True = padding (left or right or anywhere): padding tokens are neither keys
      nor queries; their output rows are ``o_proj``'s bias (zeros without bias) and their values, even NaN, reach no
      result or gradient. With a cache, the mask covers this call's tokens and the cache keeps it for later calls.
      (The inverse of HF's 2D ``attention_mask``: ``padding_mask = attention_mask == 0``.)
    - ``cache``: an :class:`MLACache`; this call's latents are appended and attention runs over all cached tokens
      (queries bottom-right aligned: decoding one token at a time equals the full causal run).
    """

    backend = ModuleBackend("attention")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope_theta: float = 10_000_000.0,
        rope_scaling: Mapping | None = None,
        attention_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        backend: BackendChoice = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check.module_dtype(_NAME, dtype)
        self.hidden_size = check.integer("hidden_size", hidden_size, op=_NAME, low=1)
        self.num_heads = check.integer("num_heads", num_heads, op=_NAME, low=1)
        self.q_lora_rank = None if q_lora_rank is None else check.integer("q_lora_rank", q_lora_rank, op=_NAME,
                                                                          low=1)
        self.kv_lora_rank = check.integer("kv_lora_rank", kv_lora_rank, op=_NAME, low=1)
        self.qk_nope_head_dim = check.integer("qk_nope_head_dim", qk_nope_head_dim, op=_NAME, low=1)
        self.qk_rope_head_dim = check.integer("qk_rope_head_dim", qk_rope_head_dim, op=_NAME, low=1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{_NAME}: qk_rope_head_dim must be even (RoPE rotates pairs), got {qk_rope_head_dim}")
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.qk_head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{_NAME}: qk_nope_head_dim + qk_rope_head_dim must be <= {MAX_HEAD_DIM}, got "
                             f"{self.qk_head_dim}")
        self.v_head_dim = check.integer("v_head_dim", v_head_dim, op=_NAME, low=1, high=MAX_HEAD_DIM)
        attention_bias = check.flag("attention_bias", attention_bias, op=_NAME)
        self.rms_norm_eps = check.real("rms_norm_eps", rms_norm_eps, op=_NAME, low=0.0)
        self.dropout = check.probability("dropout", dropout, op=_NAME)
        self.rotary = MLARotary(self.qk_rope_head_dim, rope_theta, rope_scaling)
        self.rope_theta = self.rotary.theta
        self.rope_scaling = None if rope_scaling is None else dict(rope_scaling)
        self.softmax_scale = self.qk_head_dim ** -0.5 * self.rotary.softmax_mscale
        self.q_scale = 1.0 if self.q_lora_rank is None else (self.hidden_size / self.q_lora_rank) ** 0.5
        self.kv_scale = (self.hidden_size / self.kv_lora_rank) ** 0.5

        factory = {"device": device, "dtype": dtype}
        h, qk = self.num_heads, self.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, h * qk, bias=attention_bias, **factory)
        else:
            self.q_a_proj = nn.Linear(hidden_size, self.q_lora_rank, bias=attention_bias, **factory)
            self.q_a_layernorm = _RMSNorm(self.q_lora_rank, self.rms_norm_eps, **factory)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * qk, bias=False, **factory)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, self.kv_lora_rank + self.qk_rope_head_dim,
                                            bias=attention_bias, **factory)
        self.kv_a_layernorm = _RMSNorm(self.kv_lora_rank, self.rms_norm_eps, **factory)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False,
                                   **factory)
        self.o_proj = nn.Linear(h * self.v_head_dim, hidden_size, bias=attention_bias, **factory)
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, "
                f"kv_lora_rank={self.kv_lora_rank}, qk_head_dim={self.qk_nope_head_dim}+{self.qk_rope_head_dim}, "
                f"v_head_dim={self.v_head_dim}, rope={self.rotary.kind}, softmax_scale={self.softmax_scale:.6g}")

    # ---- Hugging Face -----------------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_mla: nn.Module, *, backend: BackendChoice = None) -> MultiHeadLatentAttention:
        """Build from a Hugging Face ``LongcatFlashMLA`` (its config, then ``load_state_dict(strict=True)`` of its
        state dict: same parameter names; same device and dtype). Nothing is downloaded."""
        op = f"{_NAME}.from_hf"
        config = getattr(hf_mla, "config", None)
        needed = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "mla_scale_kv_lora")
        if not isinstance(hf_mla, nn.Module) or config is None or any(not hasattr(hf_mla, n) for n in needed):
            raise TypeError(f"{op}: hf_mla must be a Hugging Face LongcatFlashMLA (a module with a config, "
                            f"{', '.join(needed)}), got {type(hf_mla).__name__}")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError(f"{op}: the config names no rope_theta")
        rope_dim = hf_mla.qk_rope_head_dim
        hf_rope_dim = getattr(config, "head_dim", None) or rope_dim
        if hf_rope_dim != rope_dim:
            raise ValueError(f"{op}: the HF model's rotary embedding is config.head_dim = {hf_rope_dim} wide but its "
                             f"MLA rotates qk_rope_head_dim = {rope_dim} dims (HF itself cannot run this config)")
        q_lora = getattr(hf_mla, "q_lora_rank", None)
        norms = [hf_mla.kv_a_layernorm] + ([hf_mla.q_a_layernorm] if q_lora is not None else [])
        eps = {float(n.variance_epsilon) for n in norms}
        if len(eps) != 1:
            raise ValueError(f"{op}: the two RMSNorms use different epsilons {sorted(eps)}; this module has one")
        weight = hf_mla.o_proj.weight
        module = cls(
            hf_mla.hidden_size, hf_mla.num_heads, q_lora_rank=q_lora, kv_lora_rank=hf_mla.kv_lora_rank,
            qk_nope_head_dim=hf_mla.qk_nope_head_dim, qk_rope_head_dim=rope_dim, v_head_dim=hf_mla.v_head_dim,
            rope_theta=float(theta), rope_scaling=rope or None, attention_bias=hf_mla.o_proj.bias is not None,
            rms_norm_eps=eps.pop(), dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0), backend=backend,
            device=weight.device, dtype=weight.dtype)
        for ours, theirs in (("softmax_scale", "scaling"), ("q_scale", "mla_scale_q_lora"),
                             ("kv_scale", "mla_scale_kv_lora")):
            if hasattr(hf_mla, theirs) and not math.isclose(getattr(module, ours), getattr(hf_mla, theirs),
                                                            rel_tol=1e-12):
                raise ValueError(f"{op}: HF's {theirs} = {getattr(hf_mla, theirs)} but this module computes "
                                 f"{ours} = {getattr(module, ours)} from the config")
        module.load_state_dict(hf_mla.state_dict(), strict=True)
        return module.train(hf_mla.training)

    # ---- forward ----------------------------------------------------------------------------------------------------

    def _check(self, x, position_ids, position_embeddings, padding_mask, cache) -> None:
        check.tensor("hidden_states", x, dim=3, op=_NAME)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"{_NAME}: hidden_states must have {self.hidden_size} features in its last dim, got "
                             f"shape {tuple(x.shape)}")
        check.module_input(_NAME, "hidden_states", x, self.o_proj.weight)
        b, n = x.shape[:2]
        if padding_mask is not None:
            check.tensor("padding_mask", padding_mask, dtypes=(torch.bool,), op=_NAME)
            if tuple(padding_mask.shape) != (b, n):
                raise ValueError(f"{_NAME}: padding_mask must have shape [B, L] = {(b, n)} (True = padding), got "
                                 f"{tuple(padding_mask.shape)}")
            check.same_device(_NAME, hidden_states=x, padding_mask=padding_mask)
        if position_ids is not None and position_embeddings is not None:
            raise ValueError(f"{_NAME}: pass position_ids or position_embeddings, not both")
        if position_ids is not None:
            check.tensor("position_ids", position_ids, op=_NAME)
            if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
                raise TypeError(f"{_NAME}: position_ids must be an integer tensor, got {position_ids.dtype}")
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != n:
                raise ValueError(f"{_NAME}: position_ids must have shape [B, L] or [1, L] with B={b}, L={n}, got "
                                 f"{tuple(position_ids.shape)}")
            check.same_device(_NAME, hidden_states=x, position_ids=position_ids)
        if position_embeddings is not None:
            if not isinstance(position_embeddings, tuple | list) or len(position_embeddings) != 2:
                raise TypeError(f"{_NAME}: position_embeddings must be a (cos, sin) pair, got "
                                f"{type(position_embeddings).__name__}")
            for name, t in zip(("cos", "sin"), position_embeddings, strict=True):
                check.tensor(f"position_embeddings {name}", t, dim=3, op=_NAME)
                if t.shape[0] not in (1, b) or t.shape[1] != n or t.shape[2] != self.qk_rope_head_dim:
                    raise ValueError(f"{_NAME}: position_embeddings {name} must have shape [B or 1, L, "
                                     f"qk_rope_head_dim] = [{b} or 1, {n}, {self.qk_rope_head_dim}], got "
                                     f"{tuple(t.shape)}")
                if not t.is_floating_point():
                    raise TypeError(f"{_NAME}: position_embeddings {name} must be floating point, got {t.dtype}")
            check.same_device(_NAME, hidden_states=x, position_embeddings_cos=position_embeddings[0],
                              position_embeddings_sin=position_embeddings[1])
        if cache is not None and not isinstance(cache, MLACache):
            raise TypeError(f"{_NAME}: cache must be an MLACache (mmkernels.nn.mla.MLACache), got "
                            f"{type(cache).__name__}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: MLACache | None = None,
    ) -> torch.Tensor:
        self._check(hidden_states, position_ids, position_embeddings, padding_mask, cache)
        x = hidden_states
        if padding_mask is not None:  # padding rows (even NaN) reach nothing, not even the weights' gradients
            x = x.masked_fill(padding_mask[..., None], 0)
        b, n = x.shape[:2]
        h, d_n, d_r, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank

        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (h, self.qk_head_dim))
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q_nope, q_rope = q.split([d_n, d_r], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([r, d_r], dim=-1)
        latent = self.kv_a_layernorm(latent)
        if self.kv_scale != 1.0:
            latent = latent * self.kv_scale

        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(len(cache) if cache is not None else 0,
                                            (len(cache) if cache is not None else 0) + n, device=x.device)[None]
            cos, sin = self.rotary.cos_sin(position_ids, x.dtype)
        else:
            cos, sin = position_embeddings
        cos, sin = cos[..., : d_r // 2], sin[..., : d_r // 2]
        q_rope = _rotate_pairs(q_rope, cos[:, :, None], sin[:, :, None])
        k_rope = _rotate_pairs(k_rope, cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)

        entries = torch.cat([latent, k_rope.to(latent.dtype)], dim=-1)  # [B, L, r + d_r]: what the cache keeps
        key_padding = padding_mask
        if cache is not None:
            entries, key_padding = cache.update(entries, padding_mask)
        t = entries.shape[1]
        kv = self.kv_b_proj(entries[..., :r]).unflatten(-1, (h, d_n + self.v_head_dim))
        k_nope, v = kv.split([d_n, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, entries[..., None, r:].to(k_nope.dtype).expand(b, t, h, d_r)], dim=-1)
        q = q.to(k.dtype)

        options = {"causal": True, "softmax_scale": self.softmax_scale, "backend": self._backends["attention"],
                   "dropout_p": self.dropout if self.training else 0.0}
        if padding_mask is None and key_padding is None:
            out = _attend(q, k, v, **options)
        else:
            query_padding = padding_mask if padding_mask is not None else torch.zeros(
                b, n, dtype=torch.bool, device=x.device)
            dest_q, src_q, cu_q = _pack_order(~query_padding)
            _, src_k, cu_k = _pack_order(~key_padding)
            out = _attend(q.flatten(0, 1).index_select(0, src_q), k.flatten(0, 1).index_select(0, src_k),
                          v.flatten(0, 1).index_select(0, src_k), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=n if b else 0, max_seqlen_k=t if b else 0, **options)
            out = out.index_select(0, dest_q).unflatten(0, (b, n))
        return self.o_proj(out.reshape(b, n, h * self.v_head_dim))
