"""Q-Former cross-attention (few learned queries over many image tokens): one op through every layer.

Layers:
- kernels: ``kernels/triton/qformer_attention.py`` (triton), ``kernels/reference/qformer_attention.py``
  (reference);
- registered ops (``triton_op`` + ``wrap_triton`` on GPUs; an opaque ``custom_op`` with the same fake under
  ``TRITON_INTERPRET=1``): ``torch.ops.mmkernels.qformer_attention_fwd_triton`` -> ``(out, lse)`` with autograd
  registered, and ``torch.ops.mmkernels.qformer_attention_bwd_triton`` -> ``(dq, dk, dv)``;
- the validated public function :func:`qformer_cross_attention` below;
- the module ``mmkernels.nn.QFormerCrossAttention``.

The forward saves only ``out`` and the fp32 log-sum-exp; the backward recomputes the probabilities. Both ops take
``num_splits`` (0 = auto): the number of key chunks per (batch, head), i.e. the flash-decoding split used when
B*H programs cannot fill the GPU. The backward is deterministic (no atomics) whatever the split. Dropout: one int64
seed per call (as in :mod:`mmkernels.ops.attention`), saved for the backward, which regenerates the same mask.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from .._config import debug_checks_enabled
from ..kernels.reference.qformer_attention import qformer_attention_reference
from . import _validate as check
from .attention import check_dropout, draw_seed

__all__ = ["DTYPES", "MAX_HEAD_DIM", "MAX_QUERIES", "kv_lens_from_mask", "qformer_cross_attention"]

OP = "qformer_cross_attention"
MAX_QUERIES = 128
MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs on the reference only

QFORMER_BACKENDS = OpBackends(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("reference",)})


@QFORMER_BACKENDS.register("reference", batch_invariant=True)
def _reference(q, k, v, kv_lens, softmax_scale, dropout_p=0.0):
    return qformer_attention_reference(q, k, v, kv_lens, softmax_scale, dropout_p=dropout_p)


def _fwd_fake(q, k, v, kv_lens, softmax_scale, num_splits, dropout_p, seed):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, kv_lens, softmax_scale, num_splits, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if triton_available():
    from ..kernels.triton.qformer_attention import qformer_attention_bwd_triton, qformer_attention_fwd_triton
    from ._triton_op import triton_op

    # The launchers are the ops: their signatures (without `launch`) are the schemas.
    _fwd_op = triton_op("mmkernels::qformer_attention_fwd_triton", qformer_attention_fwd_triton, mutates_args=(),
                        fake=_fwd_fake)
    triton_op("mmkernels::qformer_attention_bwd_triton", qformer_attention_bwd_triton, mutates_args=(),
              fake=_bwd_fake)

    def _setup_context(ctx, inputs, output):
        q, k, v, kv_lens, softmax_scale, num_splits, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kv_lens, seed)
        ctx.softmax_scale = softmax_scale
        ctx.num_splits = num_splits
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, dout, dlse):
        check.no_double_backward(OP)
        q, k, v, out, lse, kv_lens, seed = ctx.saved_tensors
        dq, dk, dv = torch.ops.mmkernels.qformer_attention_bwd_triton(
            dout, q, k, v, out, lse, kv_lens, ctx.softmax_scale, ctx.num_splits, ctx.dropout_p, seed
        )
        return dq, dk, dv, None, None, None, None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    @QFORMER_BACKENDS.register("triton", supports=check.first_arg_dtype_in(KERNEL_DTYPES), batch_invariant=True)
    def _triton(q, k, v, kv_lens, softmax_scale, dropout_p=0.0, num_splits: int = 0):
        seed = draw_seed(q.device) if dropout_p > 0.0 else None
        out, _ = torch.ops.mmkernels.qformer_attention_fwd_triton(q, k, v, kv_lens, softmax_scale, num_splits,
                                                                  dropout_p, seed)
        return out


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except on the head dim."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_kv_lens(kv_lens, B: int, Lk: int, device: torch.device, *, check_range: bool = True) -> torch.Tensor:
    check.tensor("kv_lens", kv_lens, dtypes=(torch.int32,), dim=1, op=OP)
    if kv_lens.shape[0] != B:
        raise ValueError(f"{OP}: kv_lens must have shape [B] = [{B}], got {tuple(kv_lens.shape)}")
    if kv_lens.device != device:
        raise ValueError(f"{OP}: kv_lens must be on {device} like q, got {kv_lens.device}")
    if check_range and B and not kv_lens.is_meta and not torch.compiler.is_compiling() and debug_checks_enabled():
        # One small device->host read, under mmkernels.debug_checks only (the tests run with it); otherwise, inside
        # torch.compile graphs and with validate_kv_lens=False every backend clamps the values to [0, Lk] instead (a
        # sample with no key gets zeros): no host sync on the hot path.
        lo, hi = torch.stack(torch.aminmax(kv_lens)).tolist()  # one transfer for both
        if lo < 1 or hi > Lk:
            raise ValueError(f"{OP}: kv_lens values must be in [1, Lk] = [1, {Lk}], got min {lo}, max {hi}")
    return kv_lens.contiguous()


def kv_lens_from_mask(mask: torch.Tensor, *, op: str = OP, name: str = "mask",
                      none_if_full: bool = False) -> torch.Tensor | None:
    """int32 ``[B]`` key counts (``kv_lens``) of a right-padding key mask ``[B, Lk]`` (1 / True = attend,
    0 / False = padding; any other value, e.g. -1, 0.5 or NaN, is an error).

    Every row must be a prefix (ones, then zeros: the valid image tokens first) with at least one attended key. A
    mask with holes is never turned into lengths, on every path:

    - eagerly: one small device-to-host read, then ``ValueError`` naming ``op`` and ``name``;
    - inside ``torch.compile`` (no host read in a graph): ``torch._assert_async``, which raises ``RuntimeError`` with
      the same message on CPU and is a device-side assertion on CUDA (it stops the program: the CUDA context is
      unusable afterwards, as after PyTorch's own device-side index checks).

    ``none_if_full``: return ``None`` when no key is masked (eagerly only; read in the same host transfer), so the
    caller skips the masking work. Raises ``TypeError``/``ValueError`` for a mask that is not a 2-D tensor.
    """
    check.tensor(name, mask, dim=2, op=op)
    keep = mask != 0
    lens = keep.sum(1, dtype=torch.int32)
    batch, lk = keep.shape
    if batch == 0:
        return lens
    prefix = torch.arange(lk, device=keep.device)[None, :] < lens[:, None]
    is_prefix = (keep == prefix).all()
    # Only 0/1 (or bool): HF masks anything else (-1, 0.5, 2, NaN) in its own way, so such a mask is an error here.
    binary = keep.new_ones(()) if mask.dtype == torch.bool else ((mask == 0) | (mask == 1)).all()
    lo = lens.min()
    message = (f"{op}: {name} must be a prefix mask per row (ones, then zeros for the padded tokens) with at least one "
               "attended token, with values 0/1 or bool; arbitrary masks are not supported")
    if torch.compiler.is_compiling():
        torch._assert_async(binary & is_prefix & (lo > 0), message)
        return lens
    is_binary, good, lo = torch.stack([binary.to(torch.int32), is_prefix.to(torch.int32), lo]).tolist()
    if not is_binary:
        raise ValueError(message + " (a value is not 0 or 1)")
    if not good or lo < 1:
        raise ValueError(message + (f" (a row has {lo} attended tokens)" if good else " (a row has holes)"))
    return None if none_if_full and lo == lk else lens


def qformer_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str | None = None,
    validate_kv_lens: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per (batch, head), for a few queries over many keys (Q-Former, Perceiver).

    Args:
        q: ``[B, Lq, H, D]`` queries, ``1 <= Lq <= 128`` (BLIP-2: 32 learned queries).
        k, v: ``[B, Lk, H, D]`` image-token keys and values, ``Lk >= 1``. Any strides with a unit stride on the
            head dim (e.g. per-layer slices of one hoisted K/V projection) are read in place.
        kv_lens: optional int32 ``[B]`` on q's device: keys ``j >= kv_lens[b]`` are masked (padded image tokens of
            smaller images in a mixed-resolution batch); their values, even NaN or inf, never reach a result, and
            they get zero gradients. Values must be in ``[1, Lk]``; they are checked eagerly (one small
            device-to-host read) only under :func:`mmkernels.debug_checks` (``MMKERNELS_DEBUG_CHECKS=1``; the tests
            run with it) when ``validate_kv_lens`` is true. Otherwise no host sync: out-of-range values are clamped
            to ``[0, Lk]`` on every backend (a sample left with no key gets zeros and zero gradients).
        softmax_scale: default ``D ** -0.5`` (any real number: Python or NumPy scalar).
        backend: ``None`` (auto: triton on CUDA, reference on CPU), ``"triton"`` or ``"reference"``.
        validate_kv_lens: check the ``kv_lens`` values when debug checks are on (default). ``False`` skips that
            host read even then, for callers that validated the lengths once for many calls
            (``mmkernels.models.QFormer``: once per forward, not once per layer); it is skipped under
            ``torch.compile`` anyway. Unchecked values are clamped to ``[0, Lk]`` on every backend, and a sample
            left with no key gets zeros (and zero gradients).
        dropout_p: attention dropout in ``[0, 1)`` on the probabilities (inverted: kept with probability
            ``1 - p``, scaled by ``1 / (1 - p)``), from torch's generator; applied whenever > 0 (pass 0 in eval
            mode; ``mmkernels.nn.QFormerCrossAttention`` does). ``0.0`` is exactly no dropout.

    q, k, v share one dtype (fp16, bf16 or fp32; float64 on the reference backend, which auto picks for it) and one
    device; ``1 <= D <= 128`` (any, not only powers of two). Returns ``[B, Lq, H, D]`` (contiguous) in q's dtype,
    differentiable in q, k and v (keys past ``kv_lens`` get zero gradients).

    Raises ``TypeError``/``ValueError`` naming the argument; :class:`mmkernels.BackendError` when an explicit
    backend cannot run these tensors (e.g. ``"triton"`` with float64).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dtypes=DTYPES, dim=4, op=OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    device = check.same_device(OP, q=q, k=k, v=v)
    B, Lq, H, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{OP}: k and v must have the same shape [B, Lk, H, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    Lk = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"{OP}: k and v must be [B, Lk, H, D] = [{B}, Lk, {H}, {D}] to match q "
                         f"[B, Lq, H, D] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if not 1 <= Lq <= MAX_QUERIES:
        raise ValueError(f"{OP}: q must have 1 <= Lq <= {MAX_QUERIES} queries (dim 1 of [B, Lq, H, D]), got {Lq}; "
                         "use mmkernels.ops.attention for long query sequences")
    if Lk < 1:
        raise ValueError(f"{OP}: k and v need at least one key (Lk >= 1), got Lk = {Lk}")
    if H < 1:
        raise ValueError(f"{OP}: q must have at least one head, got shape {tuple(q.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    validate_kv_lens = check.flag("validate_kv_lens", validate_kv_lens, op=OP)
    if kv_lens is not None:
        kv_lens = _check_kv_lens(kv_lens, B, Lk, device, check_range=validate_kv_lens)
    scale = D**-0.5 if softmax_scale is None else check.real("softmax_scale", softmax_scale, op=OP)
    dropout_p = check_dropout(dropout_p, op=OP)
    name, impl = QFORMER_BACKENDS.select(device, backend, (q, k, v, kv_lens, scale, dropout_p))
    if B == 0:  # nothing to launch; the reference keeps the autograd graph for an empty batch
        return _reference(q, k, v, kv_lens, scale)
    if name != "reference":
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    return impl(q, k, v, kv_lens, scale, dropout_p)
