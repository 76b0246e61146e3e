"""``QFormerCrossAttention``: multi-head attention from a few learned queries to image tokens, on
:func:`mmkernels.ops.qformer_cross_attention`.

Same parameters and names as Hugging Face's ``Blip2QFormerMultiHeadAttention`` (``query``, ``key``, ``value``
linears; ``key``/``value`` read the image features, ``encoder_hidden_size`` wide), so a BLIP-2 checkpoint's
cross-attention loads as is; like HF's module it returns the attention context (the output projection and
residual norm belong to the layer). Keys and values may also be passed in precomputed (``key=``, ``value=``):
``mmkernels.models.QFormer`` projects the image features once for all of its cross-attention layers and gives
each layer its slice; built with ``project_kv=False`` the module then owns only the query projection.
"""

from __future__ import annotations

import torch
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as check
from ..ops.qformer_attention import MAX_HEAD_DIM, qformer_cross_attention

__all__ = ["QFormerCrossAttention"]

_NAME = "QFormerCrossAttention"


class QFormerCrossAttention(nn.Module):
    """Cross-attention of ``Lq <= 128`` queries over ``Lk`` image tokens.

    Args:
        hidden_size: width of the queries and of the output (``num_heads * head_dim``).
        num_heads: attention heads; ``hidden_size // num_heads <= 128``.
        kv_dim: width of the image features (BLIP-2: 1408, ViT-g); default ``hidden_size``.
        bias: biases on the projections (BLIP-2: yes).
        project_kv: own ``key``/``value`` projections (default); False when keys/values always come precomputed.
        softmax_scale: default ``head_dim ** -0.5``.
        backend: backend of the attention op: ``None`` (auto), a name or ``{"qformer_cross_attention": name}``;
            checked here (``mmkernels.BackendError``).
        dropout: attention-probability dropout in ``[0, 1)``, applied in training mode only (HF's
            ``attention_probs_dropout_prob``); the attribute ``dropout`` may be changed later.

    ``forward(hidden_states [B, Lq, hidden_size], encoder_hidden_states [B, Lk, kv_dim], *, kv_lens=None,
    validate_kv_lens=True)`` or ``forward(hidden_states, key=k, value=v, kv_lens=None, validate_kv_lens=True)``
    with ``k``/``v`` ``[B, Lk, num_heads, head_dim]`` (any strides with a unit stride on the last dim) or
    ``[B, Lk, hidden_size]``. ``kv_lens`` int32 ``[B]`` masks padded image tokens ``>= kv_lens[b]``;
    ``validate_kv_lens=False`` skips the per-call host read of its values, made only under
    :func:`mmkernels.debug_checks` (for owners that checked them once per forward; unchecked values are clamped to
    ``[0, Lk]``). Returns ``[B, Lq, hidden_size]``.
    """

    backend = ModuleBackend("qformer_cross_attention")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_dim: int | None = None,
        *,
        bias: bool = True,
        project_kv: bool = True,
        softmax_scale: float | None = None,
        backend: BackendChoice = None,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check.module_dtype("QFormerCrossAttention", dtype)
        self.dropout = check.probability("dropout", dropout, op=_NAME)
        check.integer("hidden_size", hidden_size, op=_NAME, low=1)
        check.integer("num_heads", num_heads, op=_NAME, low=1)
        if kv_dim is not None:
            check.integer("kv_dim", kv_dim, op=_NAME, low=1)
        if softmax_scale is not None:
            softmax_scale = check.real("softmax_scale", softmax_scale, op=_NAME)
        if hidden_size % num_heads:
            raise ValueError(f"{_NAME}: hidden_size ({hidden_size}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        head_dim = hidden_size // num_heads
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{_NAME}: head_dim = hidden_size / num_heads = {head_dim} exceeds {MAX_HEAD_DIM}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kv_dim = hidden_size if kv_dim is None else kv_dim
        self.softmax_scale = softmax_scale
        self.backend = backend
        kw = dict(bias=check.flag("bias", bias, op=_NAME), device=device, dtype=dtype)
        self.query = nn.Linear(hidden_size, hidden_size, **kw)
        if check.flag("project_kv", project_kv, op=_NAME):
            self.key = nn.Linear(self.kv_dim, hidden_size, **kw)
            self.value = nn.Linear(self.kv_dim, hidden_size, **kw)
        else:
            self.key = self.value = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, kv_dim={self.kv_dim}, "
                f"project_kv={self.key is not None}, dropout={self.dropout}, backend={self.backend!r}")

    @classmethod
    def from_hf(cls, module: nn.Module, *, backend: str | None = None) -> QFormerCrossAttention:
        """Copy a Hugging Face ``Blip2QFormerMultiHeadAttention`` (or any module with ``query``/``key``/``value``
        linears and ``num_attention_heads``). The attention dropout comes from its ``attention_dropout`` (a float,
        recent transformers) or ``dropout`` (an ``nn.Dropout``, older releases); 0 when it has neither."""
        q, k = module.query, module.key
        drop = getattr(module, "attention_dropout", None)
        if drop is None:
            drop = getattr(getattr(module, "dropout", None), "p", 0.0)
        out = cls(q.out_features, module.num_attention_heads, k.in_features, bias=q.bias is not None,
                  backend=backend, dropout=float(drop), device=q.weight.device, dtype=q.weight.dtype)
        out.load_state_dict({f"{n}.{p}": t for n in ("query", "key", "value")
                             for p, t in getattr(module, n).state_dict().items()})
        return out.train(module.training)  # same mode as the source: its dropout is active exactly when HF's is

    def _heads(self, name: str, t: torch.Tensor, B: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
        H, D = self.num_heads, self.head_dim
        if t.dim() == 3 and t.shape[0] == B and t.shape[2] == H * D:
            return t.unflatten(2, (H, D))
        if t.dim() == 4 and t.shape[0] == B and tuple(t.shape[2:]) == (H, D):
            return t
        raise ValueError(f"{_NAME}: {name} must be [B, Lk, {H}, {D}] or [B, Lk, {H * D}] with B = {B}, "
                         f"got {tuple(t.shape)}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        kv_lens: torch.Tensor | None = None,
        validate_kv_lens: bool = True,
    ) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"{_NAME}: hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"{_NAME}: hidden_states must be [B, Lq, {self.hidden_size}], got "
                             f"{tuple(hidden_states.shape)}")
        check.module_input(_NAME, "hidden_states", hidden_states, self.query.weight)
        B, Lq, _ = hidden_states.shape
        precomputed = key is not None or value is not None
        if precomputed == (encoder_hidden_states is not None):
            raise ValueError(f"{_NAME}: pass either encoder_hidden_states or both key= and value=, not both/neither")
        if precomputed:
            if key is None or value is None:
                raise ValueError(f"{_NAME}: key= and value= must be given together")
            check.module_input(_NAME, "key", key, self.query.weight)
            check.module_input(_NAME, "value", value, self.query.weight)
            k, v = self._heads("key", key, B), self._heads("value", value, B)
        else:
            if self.key is None:
                raise ValueError(f"{_NAME}: built with project_kv=False; pass key= and value=")
            if not isinstance(encoder_hidden_states, torch.Tensor):
                raise TypeError(f"{_NAME}: encoder_hidden_states must be a torch.Tensor, got "
                                f"{type(encoder_hidden_states).__name__}")
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != B or \
                    encoder_hidden_states.shape[-1] != self.kv_dim:
                raise ValueError(f"{_NAME}: encoder_hidden_states must be [B, Lk, {self.kv_dim}] with B = {B}, got "
                                 f"{tuple(encoder_hidden_states.shape)}")
            check.module_input(_NAME, "encoder_hidden_states", encoder_hidden_states, self.key.weight)
            k = self.key(encoder_hidden_states).unflatten(2, (self.num_heads, self.head_dim))
            v = self.value(encoder_hidden_states).unflatten(2, (self.num_heads, self.head_dim))
        q = self.query(hidden_states).unflatten(2, (self.num_heads, self.head_dim))
        ctx = qformer_cross_attention(q, k, v, kv_lens=kv_lens, softmax_scale=self.softmax_scale,
                                      backend=self._backends["qformer_cross_attention"],
                                      validate_kv_lens=validate_kv_lens,
                                      dropout_p=self.dropout if self.training else 0.0)
        return ctx.flatten(2)
