"""Q-Former cross-attention (BLIP-2, InstructBLIP) through :func:`mmkernels.ops.qformer_cross_attention`.

The forward of each cross-attention ``*QFormerMultiHeadAttention`` (the ``crossattention.attention`` child of the
layers with ``has_cross_attention``) is swapped: its own ``query``/``key``/``value`` Linears project the learned
queries and the image tokens, and one kernel per (batch, head) holds all the queries. ``encoder_attention_mask``
(HF turns the 2-D image mask into a 4-D one) maps onto ``kv_lens`` when it is right padding (each sample's valid
image tokens are a prefix); any other mask, more than 128 queries or a head dim above 128 runs the model's own
forward for that call (counted in the report), and so does a call whose attention weights are asked for
(``output_attentions`` given, or recorded by transformers 5's output recorder: see ``_patching.weights_recorded``),
so the cross-attention weights are the unpatched model's. Self-attention of the Q-Former is the
``"mmkernels"`` attention implementation's job (``attention=True``).

Host syncs: the mask is turned into ``kv_lens`` with one host read per mask tensor (cached on its identity and
version, so the cross-attention layers of one forward share it), and the op then runs without one. Inside
``torch.compile`` there is no host read at all (see :func:`_kv_lens`), so the patched Q-Former compiles as one graph.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ...ops.qformer_attention import MAX_HEAD_DIM, MAX_QUERIES, qformer_cross_attention
from ._patching import PatchReport, op_backend, original_forward, swap_forward, weights_recorded
from .attention import _keep_mask, cached_mask_plan

__all__ = ["QFORMER_LAYERS", "patch_qformer"]

QFORMER_LAYERS = ("Blip2QFormerLayer", "InstructBlipQFormerLayer")
_STATE = "_mmkernels_qformer"  # (report, backend)


_NOT_RIGHT_PADDING = "encoder_attention_mask is not right padding of the image tokens"


def _kv_lens(mask: torch.Tensor, batch: int, lq: int, lk: int) -> torch.Tensor | str:
    """int32 ``[B]`` valid-key counts equal to the 4-D mask, or the reason it is not right padding.

    One host read (every verdict in one transfer), cached per mask tensor by the caller. Inside ``torch.compile`` no
    host read: the verdict is a ``torch._assert_async`` (``RuntimeError`` on CPU, a device-side assertion on CUDA)
    instead of a fallback, so a compiled Q-Former takes right-padded image masks only (others run eagerly)."""
    found = _keep_mask(mask)
    if found is None:
        return "encoder_attention_mask is an arbitrary additive mask"
    keep, binary = found
    if keep.dim() != 4 or keep.shape[-1] != lk or keep.shape[0] not in (1, batch) or keep.shape[-2] not in (1, lq):
        if not bool(binary):
            return "encoder_attention_mask is an arbitrary additive mask"
        return "encoder_attention_mask shape is not [B, 1, Lq, Lk]"
    keep = keep.expand(batch, keep.shape[1], lq, lk)
    kp = keep[:, 0, 0, :]
    lens = kp.sum(1, dtype=torch.int32)
    prefix = torch.arange(lk, device=kp.device)[None, :] < lens[:, None]
    padding = (keep == kp[:, None, None, :]).all() & (kp == prefix).all() & (lens > 0).all()
    if torch.compiler.is_compiling():
        torch._assert_async(binary & padding, f"{_NOT_RIGHT_PADDING} (under torch.compile: run such masks eagerly)")
        return lens
    is_binary, is_padding = torch.stack([binary, padding]).tolist()  # the one host read
    if not is_binary:
        return "encoder_attention_mask is an arbitrary additive mask"
    if not is_padding:
        return _NOT_RIGHT_PADDING
    return lens


def _forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
             **kwargs):
    report, backend = self.__dict__[_STATE]

    def own():
        return original_forward(self)(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                      **kwargs)

    def fallback(reason: str):
        report.fallback(f"{type(self).__name__}: {reason}")
        return own()

    if encoder_hidden_states is None:  # used as self-attention: not ours
        return own()
    if weights_recorded(self, kwargs):
        return fallback("output_attentions=True needs the attention weights")
    heads, dim = self.num_attention_heads, self.attention_head_size
    B, lq = hidden_states.shape[:2]
    Bk, lk = encoder_hidden_states.shape[:2]
    if lq > MAX_QUERIES or dim > MAX_HEAD_DIM:
        return fallback(f"{lq} queries of head dim {dim} (the kernel takes <= {MAX_QUERIES} and <= {MAX_HEAD_DIM})")
    if Bk != B and 1 not in (B, Bk):
        return fallback("query and image batch sizes differ")
    batch = max(B, Bk)
    kv_lens = None
    if encoder_attention_mask is not None:
        kv_lens = cached_mask_plan(encoder_attention_mask, ("qformer", batch, lq, lk),
                                   functools.partial(_kv_lens, encoder_attention_mask, batch, lq, lk))
        if isinstance(kv_lens, str):
            return fallback(kv_lens)
    q = self.query(hidden_states).view(B, lq, heads, dim)
    k = self.key(encoder_hidden_states).view(Bk, lk, heads, dim)
    v = self.value(encoder_hidden_states).view(Bk, lk, heads, dim)
    if batch != B:
        q = q.expand(batch, -1, -1, -1)
    if Bk != batch:
        k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
    if not (q.dtype == k.dtype == v.dtype):  # e.g. a half image tower feeding an fp32 Q-Former outside autocast
        k, v = k.to(q.dtype), v.to(q.dtype)
    dropout = self.attention_dropout if self.training else 0.0
    out = qformer_cross_attention(q, k, v, kv_lens=kv_lens, softmax_scale=self.scaling,
                                  backend=op_backend(backend, "qformer_cross_attention"),
                                  dropout_p=dropout, validate_kv_lens=False)  # checked above, once per mask
    return out.reshape(batch, lq, heads * dim), None


def patch_qformer(model: nn.Module, report: PatchReport, classes: dict[str, type], *,
                  backend: str | None = None) -> None:
    """Swap the cross-attention forward of every covered Q-Former layer in ``model``."""
    for path, layer in model.named_modules():
        name = type(layer).__name__
        if name not in QFORMER_LAYERS or classes.get(name) is not type(layer):
            continue
        if not getattr(layer, "has_cross_attention", False):
            continue
        attn = getattr(getattr(layer, "crossattention", None), "attention", None)
        needed = ("query", "key", "value", "num_attention_heads", "attention_head_size", "scaling",
                  "attention_dropout")
        missing = [a for a in needed if not hasattr(attn, a)] if attn is not None else ["crossattention.attention"]
        if missing:
            report.skip(path, "qformer", f"{name} has no {', '.join(missing)} in this transformers version")
            continue
        if swap_forward(attn, _forward, "qformer", state=(_STATE, (report, backend))):
            report.add(f"{path}.crossattention.attention", "qformer", attn,
                       "ops.qformer_cross_attention (encoder_attention_mask -> kv_lens)")
