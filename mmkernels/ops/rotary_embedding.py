"""Vision rotary embedding: HF's ``apply_rotary_pos_emb_vision`` (rotate-half RoPE) on q and k in one launch.

Layers:
- kernels: ``kernels/triton/rotary.py`` (triton: one kernel, forward and transposed), ``kernels/reference/rotary.py``
  (reference: HF's formula);
- registered op (``triton_op``, so ``torch.compile`` sees the kernel): ``torch.ops.mmkernels.rotary_embedding_fwd_triton
  (q, k, cos, sin, transpose)`` with a fake and autograd; its backward is the same op with ``transpose`` flipped (so it
  is differentiable again: double backward works), plus the cos/sin gradients in PyTorch when they are needed;
- the validated public function :func:`rotary_embedding` below.

No ``nn`` module: the op has no parameters, and the towers compute cos/sin once per forward for all their layers.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from ..kernels.reference.rotary import rotary_embedding_reference, rotate_half
from . import _validate as v

__all__ = ["rotary_embedding"]

OP = "rotary_embedding"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: reference backend only
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_HEAD_DIM = 256

ROTARY_BACKENDS = OpBackends(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("reference",)})
ROTARY_BACKENDS.register("reference", batch_invariant=True)(rotary_embedding_reference)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _kernel_supports(q, k, cos, sin) -> str | None:
    if q.dtype not in KERNEL_DTYPES:
        return (f"the kernel takes {', '.join(map(_dtype_name, KERNEL_DTYPES))}, got {_dtype_name(q.dtype)} "
                "(float64 runs on backend='reference')")
    if q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        return f"the kernel takes head dims up to {MAX_KERNEL_HEAD_DIM}, got D={q.shape[-1]} (use backend='reference')"
    return None


def _table_grads(gq, gk, q, k, cos, sin, transpose: bool, need_cos: bool, need_sin: bool):
    """Gradients of cos and sin (PyTorch, in float32 or float64; only when one is needed), summed over the heads of q
    and k: ``dcos = sum_h g * x``; ``dsin = sum_h g * rotate_half(x)`` (forward) or ``rotate_half(g) * x``
    (transposed map). A half-width table (``[T, D/2]``) gets the sum of both halves."""
    compute = torch.promote_types(q.dtype, torch.float32)
    dcos = dsin = None
    for g, x in ((gq, q), (gk, k)):
        g, x = g.to(compute), x.to(compute)
        if need_cos:
            part = (g * x).sum(1)
            dcos = part if dcos is None else dcos + part
        if need_sin:
            part = ((rotate_half(g) * x) if transpose else (g * rotate_half(x))).sum(1)
            dsin = part if dsin is None else dsin + part
    half = q.shape[-1] // 2
    if cos.shape[-1] == half:
        dcos = dcos[:, :half] + dcos[:, half:] if dcos is not None else None
        dsin = dsin[:, :half] + dsin[:, half:] if dsin is not None else None
    return (dcos.to(cos.dtype) if dcos is not None else None, dsin.to(sin.dtype) if dsin is not None else None)


if triton_available():
    from ..kernels.triton import rotary as _k
    from ._triton_op import triton_op

    def _fwd_fake(q, k, cos, sin, transpose):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    # The launcher is the op: its signature (without `launch`) is the schema.
    _fwd = triton_op("mmkernels::rotary_embedding_fwd_triton", _k.rotary_embedding_fwd, mutates_args=(),
                     fake=_fwd_fake)

    def _setup_context(ctx, inputs, output):
        q, k, cos, sin, transpose = inputs
        ctx.transpose = bool(transpose)
        need_table = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # q and k are kept only for the cos/sin gradients (usually not needed: the tables come from a buffer)
        ctx.save_for_backward(q if need_table else None, k if need_table else None, cos, sin)

    def _backward(ctx, gq, gk):
        q, k, cos, sin = ctx.saved_tensors
        need_q, need_k, need_cos, need_sin, _ = ctx.needs_input_grad
        dq = dk = dcos = dsin = None
        if need_q or need_k:
            # the transposed map of the output gradients; a tensor that needs none passes no heads (no work)
            dq, dk = torch.ops.mmkernels.rotary_embedding_fwd_triton(
                gq if need_q else gq[:, :0], gk if need_k else gk[:, :0], cos, sin, not ctx.transpose)
            dq, dk = (dq if need_q else None), (dk if need_k else None)
        if need_cos or need_sin:
            dcos, dsin = _table_grads(gq, gk, q, k, cos, sin, ctx.transpose, need_cos, need_sin)
        return dq, dk, dcos, dsin, None

    _fwd.register_autograd(_backward, setup_context=_setup_context)

    @ROTARY_BACKENDS.register("triton", supports=_kernel_supports, batch_invariant=True)
    def _triton(q, k, cos, sin):
        return torch.ops.mmkernels.rotary_embedding_fwd_triton(q, k, cos, sin, False)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotate-half rotary embedding of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers, on q and k at once.

    ``out = x * cos + rotate_half(x) * sin`` per head (``rotate_half([x1, x2]) = [-x2, x1]``, halves of the head
    dim), computed in float32 and cast back to the inputs' dtype: HF's ``apply_rotary_pos_emb_vision``
    (``transformers.models.qwen2_5_vl.modeling_qwen2_5_vl``), bit for bit in float32. The Triton kernel rotates q
    and k in one launch, reading each token's cos/sin row once for all heads, with no float32 copy of q, k, cos or sin.

    Args:
        q: ``[T, Hq, D]`` (T packed tokens, may be 0; D even, at most 256 on the Triton backend), any strides (e.g.
            a view of a packed qkv projection: ``qkv.reshape(T, 3, H, D).permute(1, 0, 2, 3).unbind(0)``; never
            copied).
        k: ``[T, Hk, D]``, q's dtype and device; ``Hk`` may differ from ``Hq``; any strides.
        cos: ``[T, D]`` (HF's layout: each half of the head dim with its own angles, used as given) or ``[T, D/2]``
            (flash-attn's ``apply_rotary_emb`` layout: both halves share the angles); float32 or q's dtype; any
            strides.
        sin: like ``cos`` (the same width).
        backend: ``None`` (auto: triton on CUDA, reference on CPU), ``"triton"`` or ``"reference"``.

    dtypes: float32, float16, bfloat16 (float64 on the reference backend). Differentiable in q and k, and in cos and
    sin when they require grad (their gradients are summed over tokens' heads in PyTorch, only when needed).

    Returns:
        ``(q_out, k_out)``: contiguous, shapes and dtypes of q and k.

    Raises:
        TypeError: a non-tensor argument, a dtype outside the above, k's dtype not q's, cos/sin neither float32 nor
            q's dtype.
        ValueError: wrong numbers of dimensions, an odd or zero head dim, k / cos / sin with another T, k with another
            D, cos/sin width not D or D/2 (or different from each other), tensors on different devices.
    """
    v.tensor("q", q, dtypes=DTYPES, dim=3, op=OP)
    v.tensor("k", k, dim=3, op=OP)
    v.tensor("cos", cos, dim=2, op=OP)
    v.tensor("sin", sin, dim=2, op=OP)
    if k.dtype != q.dtype:
        raise TypeError(f"{OP}: k must have the dtype of q ({_dtype_name(q.dtype)}), got {_dtype_name(k.dtype)}")
    tables = (torch.float32, q.dtype)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in tables:
            raise TypeError(f"{OP}: {name} must be float32 or q's dtype ({_dtype_name(q.dtype)}), "
                            f"got {_dtype_name(t.dtype)}")
    t, hq, d = q.shape
    if d < 2 or d % 2:
        raise ValueError(f"{OP}: q's head dim D (last dim) must be even and positive (rotate-half pairs its two "
                         f"halves), got shape {_shape(q)}")
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"{OP}: k must be [T, Hk, D] with q's T={t} and D={d}, got {_shape(k)} (q shape {_shape(q)})")
    if _shape(cos) not in ((t, d), (t, d // 2)):
        raise ValueError(f"{OP}: cos must be [T, D] = [{t}, {d}] (HF's layout) or [T, D/2] = [{t}, {d // 2}] "
                         f"(flash-attn's), got {_shape(cos)} (q shape {_shape(q)})")
    if _shape(sin) != _shape(cos):
        raise ValueError(f"{OP}: sin must have the shape of cos {_shape(cos)}, got {_shape(sin)}")
    device = v.same_device(OP, q=q, k=k, cos=cos, sin=sin)

    args = (q, k, cos, sin)
    _, impl = ROTARY_BACKENDS.select(device, backend, args)
    return impl(*args)
