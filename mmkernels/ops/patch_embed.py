"""ViT patch embedding: ``conv2d(stride=P) -> flatten -> transpose -> cat cls -> add pos`` as one fused op.

Layers:
- kernels: ``kernels/triton/patch_embed.py`` (triton), ``kernels/reference/patch_embed.py`` (reference);
- registered ops (``triton_op``, so ``torch.compile`` sees the kernels): ``torch.ops.mmkernels.patch_embed_fwd_triton``
  (differentiable through ``register_autograd``) and its backward pieces ``patch_embed_bwd_input_triton``,
  ``patch_embed_bwd_weight_triton``, ``patch_embed_bwd_tokens_triton``, each with a fake;
- the validated public function :func:`patch_embed` below;
- the module ``mmkernels.nn.PatchEmbed``.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from ..kernels.reference.patch_embed import patch_embed_reference
from . import _validate as v

__all__ = ["patch_embed"]

OP = "patch_embed"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: reference backend only
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

PATCH_EMBED_BACKENDS = OpBackends(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("reference",)})
PATCH_EMBED_BACKENDS.register("reference", batch_invariant=True)(patch_embed_reference)


if triton_available():
    from ..kernels.triton import patch_embed as _k
    from ._triton_op import triton_op

    # -- forward ------------------------------------------------------------------------------------------------

    def _fwd_fake(pixels, weight, bias, pos_embed, cls_token):
        b, _, h, w = pixels.shape
        d, _, p, _ = weight.shape
        seq = (1 if cls_token is not None else 0) + (h // p) * (w // p)
        return pixels.new_empty((b, seq, d))

    # The launchers are the ops: their signatures (without `launch`) are the schemas.
    _fwd = triton_op("mmkernels::patch_embed_fwd_triton", _k.patch_embed_fwd, mutates_args=(), fake=_fwd_fake)

    # -- backward pieces (not differentiable themselves) ---------------------------------------------------------

    def _bwd_input_fake(grad_out, weight, pixels, has_cls):
        return torch.empty_like(pixels)

    triton_op("mmkernels::patch_embed_bwd_input_triton", _k.patch_embed_bwd_input, mutates_args=(),
              fake=_bwd_input_fake)

    def _bwd_weight_fake(grad_out, pixels, patch_size, has_cls):
        return grad_out.new_empty((grad_out.shape[2], pixels.shape[1], patch_size, patch_size))

    triton_op("mmkernels::patch_embed_bwd_weight_triton", _k.patch_embed_bwd_weight, mutates_args=(),
              fake=_bwd_weight_fake)

    def _bwd_tokens_fake(grad_out, sum_rows, has_cls, bias_grad):
        d = grad_out.shape[2]
        return (grad_out.new_empty((sum_rows, d), dtype=torch.float32),
                grad_out.new_empty((d if bias_grad else 0,), dtype=torch.float32))

    triton_op("mmkernels::patch_embed_bwd_tokens_triton", _k.patch_embed_bwd_tokens, mutates_args=(),
              fake=_bwd_tokens_fake)

    # -- autograd ------------------------------------------------------------------------------------------------

    def _setup_context(ctx, inputs, output):
        pixels, weight, bias, pos_embed, cls_token = inputs
        ctx.has_cls = cls_token is not None
        ctx.seq = output.shape[1]
        ctx.param_dtype = weight.dtype
        ctx.save_for_backward(pixels, weight)

    def _backward(ctx, grad):
        v.no_double_backward(OP)
        pixels, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_pos, need_cls = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_pos = grad_cls = None
        if need_x:
            grad_x = torch.ops.mmkernels.patch_embed_bwd_input_triton(grad, weight, pixels, ctx.has_cls)
        if need_w:
            grad_w = torch.ops.mmkernels.patch_embed_bwd_weight_triton(grad, pixels, weight.shape[-1], ctx.has_cls)
        sum_rows = ctx.seq if need_pos else (1 if need_cls else 0)
        if need_b or sum_rows:
            sums, bias_sum = torch.ops.mmkernels.patch_embed_bwd_tokens_triton(grad, sum_rows, ctx.has_cls,
                                                                                bool(need_b))
            if need_b:
                grad_b = bias_sum.to(ctx.param_dtype)
            if need_pos:
                grad_pos = sums.to(ctx.param_dtype)
            if need_cls:
                grad_cls = sums[0].to(ctx.param_dtype)
        return grad_x, grad_w, grad_b, grad_pos, grad_cls

    _fwd.register_autograd(_backward, setup_context=_setup_context)

    @PATCH_EMBED_BACKENDS.register("triton", supports=v.first_arg_dtype_in(KERNEL_DTYPES), batch_invariant=True)
    def _triton(pixels, weight, bias=None, pos_embed=None, cls_token=None):
        return torch.ops.mmkernels.patch_embed_fwd_triton(pixels, weight, bias, pos_embed, cls_token)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def patch_embed(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embedding of a ViT: a ``P x P`` stride-``P`` convolution, patches as tokens, cls token, positions.

    ``out[b, T + i*Wp + j] = sum_{c,y,x} weight[:, c, y, x] * pixels[b, c, i*P + y, j*P + x] + bias
    + pos_embed[T + i*Wp + j]`` and, with a cls token (``T = 1``), ``out[b, 0] = cls_token + pos_embed[0]``.

    Args:
        pixels: ``[B, C, H, W]``, any strides (contiguous and channels-last are the fast paths); ``H`` and ``W``
            must be positive multiples of ``P``.
        weight: ``[D, C, P, P]``: an ``nn.Conv2d(C, D, P, stride=P)`` weight.
        bias: optional ``[D]``.
        pos_embed: optional ``[L, D]`` or ``[1, L, D]`` with ``L = (1 if cls_token is not None else 0) + N``,
            ``N = (H/P) * (W/P)``: added to every output token. Resize it first for other image sizes
            (:meth:`mmkernels.nn.PatchEmbed.interpolate_pos_embed`).
        cls_token: optional ``[D]`` or ``[1, 1, D]``: prepended as token 0.
        backend: ``None`` (auto: triton on CUDA, reference on CPU), ``"triton"`` or ``"reference"``.

    Every tensor must have the dtype of ``pixels`` (float32, float16 or bfloat16; float64 on the reference backend)
    and be on its device. Differentiable in every tensor argument.

    Returns:
        ``[B, L, D]`` (contiguous), dtype of ``pixels``.
    """
    v.tensor("pixels", pixels, dtypes=DTYPES, dim=4, op=OP)
    v.tensor("weight", weight, dim=4, op=OP)
    b, c, h, w = pixels.shape
    d, wc, p, p2 = weight.shape
    if p != p2 or p < 1:
        raise ValueError(f"{OP}: weight must be [D, C, P, P] with a square patch, got shape {_shape(weight)}")
    if wc != c:
        raise ValueError(f"{OP}: weight has {wc} input channels but pixels have C={c} (pixels shape {_shape(pixels)}, "
                         f"weight shape {_shape(weight)})")
    if h < p or w < p or h % p or w % p:
        raise ValueError(f"{OP}: image size H x W = {h} x {w} must be positive multiples of the patch size P={p}; "
                         f"crop, pad or resize the pixels (e.g. to {max(p, h // p * p)} x {max(p, w // p * p)})")
    seq = (1 if cls_token is not None else 0) + (h // p) * (w // p)
    tensors = {"pixels": pixels, "weight": weight}
    if bias is not None:
        v.tensor("bias", bias, op=OP)
        if _shape(bias) != (d,):
            raise ValueError(f"{OP}: bias must have shape [D] = [{d}], got {_shape(bias)}")
        tensors["bias"] = bias
    if pos_embed is not None:
        v.tensor("pos_embed", pos_embed, op=OP)
        if _shape(pos_embed) not in ((seq, d), (1, seq, d)):
            raise ValueError(
                f"{OP}: pos_embed must have shape [L, D] or [1, L, D] with L = {seq} "
                f"({'1 cls + ' if cls_token is not None else ''}{h // p}*{w // p} patches) and D = {d}, got "
                f"{_shape(pos_embed)}; interpolate it for this image size (PatchEmbed.interpolate_pos_embed)"
            )
        tensors["pos_embed"] = pos_embed
    if cls_token is not None:
        v.tensor("cls_token", cls_token, op=OP)
        if _shape(cls_token) not in ((d,), (1, 1, d)):
            raise ValueError(f"{OP}: cls_token must have shape [D] or [1, 1, D] with D = {d}, got {_shape(cls_token)}")
        tensors["cls_token"] = cls_token
    for name, t in tensors.items():
        if t.dtype != pixels.dtype:
            raise TypeError(f"{OP}: {name} must have the dtype of pixels ({str(pixels.dtype).replace('torch.', '')}), "
                            f"got {str(t.dtype).replace('torch.', '')}")
    device = v.same_device(OP, **tensors)

    if pos_embed is not None:
        pos_embed = pos_embed.reshape(seq, d)
    if cls_token is not None:
        cls_token = cls_token.reshape(d)
    args = (pixels, weight, bias, pos_embed, cls_token)
    _, impl = PATCH_EMBED_BACKENDS.select(device, backend, args)
    return impl(*args)
