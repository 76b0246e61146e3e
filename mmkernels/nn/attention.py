"""``Attention``: multi-head self- or cross-attention (GQA/MQA) on :func:`mmkernels.ops.attention`."""

from __future__ import annotations

import torch
from torch import nn

from .._backends import BackendChoice, ModuleBackend
from ..ops import _validate as check
from ..ops.attention import MAX_HEAD_DIM, attention

__all__ = ["Attention"]

_NAME = "Attention"


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, the projections around the fused kernel.

    Self-attention (``cross=False``): one fused ``qkv`` projection ``dim -> (Hq + 2 Hkv) * head_dim`` whose output
    rows are ``[q | k | v]`` (timm's ``qkv`` layout when ``Hkv == Hq``). Cross-attention (``cross=True``): ``q``
    projects ``dim -> Hq * head_dim`` from the queries, ``kv`` projects ``kv_dim -> 2 Hkv * head_dim`` (rows
    ``[k | v]``) from the context. Then :func:`mmkernels.ops.attention` and the output projection
    ``proj: Hq * head_dim -> dim``.

    Args:
        dim: model width of the queries (and of the output).
        num_heads: Hq, query heads.
        num_kv_heads: Hkv (default Hq); Hq must be a multiple of it (1 = multi-query attention).
        head_dim: per-head width (default ``dim // num_heads``); any value up to 256.
        cross: cross-attention over a separate context (``forward(x, context)``).
        kv_dim: width of the context (cross-attention only; default ``dim``).
        qkv_bias: biases on the q/k/v projections.
        out_bias: bias on the output projection.
        causal: causal mask (bottom-right aligned when the query and key lengths differ).
        softmax_scale: default ``head_dim ** -0.5``.
        backend: attention backend: ``None`` (auto), a name or ``{"attention": name}``; checked here
            (``mmkernels.BackendError``).
        dropout: attention-probability dropout in ``[0, 1)`` (``dropout_p`` of :func:`mmkernels.ops.attention`),
            applied in training mode only; the attribute ``dropout`` may be changed later.

    ``forward(x, context=None, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None)``:
    ``x`` ``[B, Lq, dim]`` (or ``[total_q, dim]`` with ``cu_seqlens_q``), ``context`` ``[B, Lk, kv_dim]`` (or
    ``[total_k, kv_dim]``); returns the shape of ``x``. Self-attention with ``cu_seqlens_q`` uses it for the keys
    too.
    """

    backend = ModuleBackend("attention")

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        cross: bool = False,
        kv_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        causal: bool = False,
        softmax_scale: float | None = None,
        backend: BackendChoice = None,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check.module_dtype("Attention", dtype)
        self.dropout = check.probability("dropout", dropout, op=_NAME)
        self.dim = check.integer("dim", dim, op=_NAME, low=1)
        self.num_heads = check.integer("num_heads", num_heads, op=_NAME, low=1)
        self.num_kv_heads = check.integer("num_kv_heads", num_kv_heads if num_kv_heads is not None else num_heads,
                                          op=_NAME, low=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{_NAME}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{_NAME}: dim ({dim}) is not divisible by num_heads ({num_heads}); pass head_dim")
            head_dim = dim // num_heads
        self.head_dim = check.integer("head_dim", head_dim, op=_NAME, low=1, high=MAX_HEAD_DIM)
        cross = check.flag("cross", cross, op=_NAME)
        qkv_bias = check.flag("qkv_bias", qkv_bias, op=_NAME)
        out_bias = check.flag("out_bias", out_bias, op=_NAME)
        if kv_dim is not None and not cross:
            raise ValueError(f"{_NAME}: kv_dim is only used with cross=True")
        self.cross = cross
        self.kv_dim = check.integer("kv_dim", kv_dim if kv_dim is not None else dim, op=_NAME, low=1)
        self.causal = check.flag("causal", causal, op=_NAME)
        self.softmax_scale = None if softmax_scale is None else check.real("softmax_scale", softmax_scale, op=_NAME)
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        if self.cross:
            self.q = nn.Linear(dim, q_width, bias=qkv_bias, **factory)
            self.kv = nn.Linear(self.kv_dim, 2 * kv_width, bias=qkv_bias, **factory)
        else:
            self.qkv = nn.Linear(dim, q_width + 2 * kv_width, bias=qkv_bias, **factory)
        self.proj = nn.Linear(q_width, dim, bias=out_bias, **factory)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, cross={self.cross}, causal={self.causal}, dropout={self.dropout}")

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_k: torch.Tensor | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
    ) -> torch.Tensor:
        varlen = cu_seqlens_q is not None
        check.tensor("x", x, dim=2 if varlen else 3, op=_NAME)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{_NAME}: x must have {self.dim} features in its last dim, got shape {tuple(x.shape)}")
        check.module_input(_NAME, "x", x, self.proj.weight)
        rows = x.shape[:-1]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.cross:
            if context is None:
                raise ValueError(f"{_NAME}: cross-attention needs a context tensor")
            check.tensor("context", context, dim=2 if varlen else 3, op=_NAME)
            if context.shape[-1] != self.kv_dim:
                raise ValueError(f"{_NAME}: context must have {self.kv_dim} features in its last dim, got shape "
                                 f"{tuple(context.shape)}")
            check.module_input(_NAME, "context", context, self.kv.weight)
            if varlen and cu_seqlens_k is None:
                raise ValueError(f"{_NAME}: varlen cross-attention needs cu_seqlens_k for the context")
            q = self.q(x).unflatten(-1, (hq, d))
            k, v = self.kv(context).unflatten(-1, (2, hkv, d)).unbind(-3)
        else:
            if context is not None:
                raise ValueError(f"{_NAME}: self-attention takes no context (build it with cross=True)")
            if varlen and cu_seqlens_k is None:
                cu_seqlens_k, max_seqlen_k = cu_seqlens_q, max_seqlen_q
            q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
            q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
        out = attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                        backend=self._backends["attention"], dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.reshape(*rows, hq * d))
