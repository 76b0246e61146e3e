"""Fused attention (FlashAttention-2 style): one op through every layer.

Layers:
- kernels: ``kernels/triton/attention.py`` (triton), ``kernels/reference/attention.py`` (reference);
- registered ops (``ops._triton_op.triton_op``: ``triton_op`` + ``wrap_triton`` on GPUs, so ``torch.compile`` sees
  the kernels; an opaque ``custom_op`` with the same fake under ``TRITON_INTERPRET=1``):
  ``torch.ops.mmkernels.attention_fwd_triton`` -> ``(out, lse)`` with autograd registered, and
  ``torch.ops.mmkernels.attention_bwd_triton`` -> ``(dq, dk, dv)``;
- the validated public function :func:`attention` below;
- the module ``mmkernels.nn.Attention``.

The forward saves only ``out`` and the log-sum-exp; the backward recomputes the probabilities, so memory is linear
in the sequence length. The backward reads :func:`mmkernels.is_deterministic` when it runs: on, dQ comes from its
own kernel (bitwise reproducible); off, dQ is accumulated with fp32 atomics. Attention dropout draws one int64 seed
per call (``torch.randint`` on q's device: no host synchronisation, reproducible under ``torch.manual_seed``); the
kernels derive the keep mask from it with Philox, and the backward regenerates the same mask from the saved seed.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from .._config import debug_checks_enabled, is_batch_invariant, is_deterministic
from ..kernels.reference.attention import attention_reference
from . import _validate as check

__all__ = ["MAX_HEAD_DIM", "attention"]

OP = "attention"
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 runs on the reference only

ATTENTION_BACKENDS = OpBackends(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("reference",)})


@ATTENTION_BACKENDS.register("reference", batch_invariant=True)
def _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
               dropout_p=0.0):
    return attention_reference(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, dropout_p=dropout_p)


def draw_seed(device: torch.device) -> torch.Tensor:
    """One int64 Philox seed ``[1]`` from torch's generator of ``device`` (no host sync; ``torch.manual_seed``
    reproduces it). Shared with the Q-Former kernels."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p,
              seed):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # the value head dim may differ from q's
    return out, q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
              softmax_scale, deterministic, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if triton_available():
    from ..kernels.triton.attention_varlen import attention_bwd_triton, attention_fwd_triton, lse_shape
    from ._triton_op import triton_op

    # The launchers are the ops: their signatures (without `launch`) are the schemas.
    _fwd_op = triton_op("mmkernels::attention_fwd_triton", attention_fwd_triton, mutates_args=(), fake=_fwd_fake)
    triton_op("mmkernels::attention_bwd_triton", attention_bwd_triton, mutates_args=(), fake=_bwd_fake)

    def _setup_context(ctx, inputs, output) -> None:
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
        ctx.causal, ctx.softmax_scale, ctx.dropout_p = causal, softmax_scale, dropout_p
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, dout, dlse):
        check.no_double_backward(OP)
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
            dout = dout.contiguous()
        dq, dk, dv = torch.ops.mmkernels.attention_bwd_triton(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.causal,
            ctx.softmax_scale, is_deterministic(), ctx.dropout_p, seed,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    @ATTENTION_BACKENDS.register("triton", supports=check.first_arg_dtype_in(KERNEL_DTYPES), batch_invariant=True)
    def _triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                dropout_p=0.0):
        seed = draw_seed(q.device) if dropout_p > 0.0 else None
        out, _ = torch.ops.mmkernels.attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                          max_seqlen_k, causal, softmax_scale, dropout_p, seed)
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_cu_seqlens(name: str, values: list[int], total: int, max_name: str, max_seqlen: int | None) -> int:
    """Host-side checks of a cu_seqlens tensor's values (read by :func:`_read_cu_seqlens`); returns the max length."""
    if values[0] != 0:
        raise ValueError(f"{OP}: {name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if any(n < 0 for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{OP}: {name} must be non-decreasing, but {name}[{i + 1}] = {values[i + 1]} < "
                         f"{name}[{i}] = {values[i]}")
    if values[-1] > total:
        raise ValueError(f"{OP}: {name}[-1] = {values[-1]} exceeds the number of rows ({total})")
    longest = max(lengths, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{OP}: {max_name}={max_seqlen} is shorter than the longest sequence in {name} ({longest})")
    return longest if max_seqlen is None else max_seqlen


def _read_cu_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_seqlen_q: int | None,
                     max_seqlen_k: int | None) -> tuple[int, int]:
    """One device-to-host read of both ``cu_seqlens`` (the only host sync of a varlen call): their values are
    checked and the missing ``max_seqlen_*`` are the longest sequences."""
    values = torch.cat([cu_q, cu_k]).tolist()
    n = cu_q.shape[0]
    return (_check_cu_seqlens("cu_seqlens_q", values[:n], total_q, "max_seqlen_q", max_seqlen_q),
            _check_cu_seqlens("cu_seqlens_k", values[n:], total_k, "max_seqlen_k", max_seqlen_k))


def _guard_cu_seqlens(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Unchecked ``cu_seqlens`` made safe on the device, without a host read: clamped into ``[0, total]`` and made
    non-decreasing (a running maximum), so no kernel can address a row outside the tensor. Valid values pass
    unchanged; bad ones give unspecified results instead of an out-of-bounds read or a crash."""
    return torch.cummax(cu.clamp(0, total), 0).values


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention, ``softmax(q k^T * softmax_scale) v``, fused (FlashAttention-2 style).

    Dense: q ``[B, Lq, Hq, D]``, k ``[B, Lk, Hkv, D]``, v ``[B, Lk, Hkv, D_v]`` (flash-attn's layout), output
    ``[B, Lq, Hq, D_v]``. Varlen: q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, D_v]``, with
    int32 ``cu_seqlens_q`` / ``cu_seqlens_k`` of length ``B + 1`` (cumulative sequence lengths from 0; zero-length
    sequences allowed; ``B = 0`` allowed).
    ``cu_seqlens_*[-1]`` may be smaller than ``total_*``: the rows after it are padding (e.g. a fixed-size buffer
    for ``torch.compile``); padding rows of the output and of every gradient are zeros, and their values (even NaN
    or inf) never reach any result.

    - ``Hq`` a multiple of ``Hkv`` (GQA/MQA): query head ``h`` attends with key/value head ``h // (Hq // Hkv)``.
    - ``Lq != Lk`` is allowed (cross-attention). ``causal`` masks are bottom-right aligned: query ``i`` sees keys
      ``j <= i + Lk - Lq`` (flash-attn >= 2.1); a query that sees no key gets zeros and zero gradients, and its q
      values (even NaN) reach nothing.
    - ``D_v`` (v's head dim, the output's) may differ from ``D`` (q's and k's; multi-head latent attention: 192 / 128):
      any ``D, D_v`` in ``[1, 256]``; the Triton kernels split Q/K into power-of-two chunks and size V on its own
      (no padding to 256), and varlen calls with ``D_v != D`` run the per-sequence kernels (never packed).
    - fp16, bf16 or fp32 (all three tensors alike); any head dim ``D <= 256``; fp32 accumulation, output in the
      input dtype. float64 runs on the reference backend (auto picks it; an explicit other backend raises
      :class:`mmkernels.BackendError`). Differentiable in q, k and v (once; the reference also twice).
    - ``softmax_scale`` (any real number: Python or NumPy scalar) defaults to ``D ** -0.5`` (q's head dim).
    - ``max_seqlen_q/k`` (varlen only, ints in ``[0, total_q]`` / ``[0, total_k]``: a sequence is never longer
      than its tensor's rows; checked from the shapes, also under ``torch.compile``) default to the longest
      sequence. Host syncs: with both given, none (the hot path); the ``cu_seqlens`` values are then checked only
      under :func:`mmkernels.debug_checks` (``MMKERNELS_DEBUG_CHECKS=1``; the tests run with it) and otherwise
      clamped on the device into ``[0, total]`` and made non-decreasing, so bad values give unspecified results
      but never an out-of-bounds read. Without them, one host read of both ``cu_seqlens`` derives them and checks
      every value. Under ``torch.compile`` ``max_seqlen_q/k`` must be given (no host read in a graph).
    - ``dropout_p`` in ``[0, 1)``: attention dropout on the probabilities (inverted: kept with probability
      ``1 - dropout_p`` and scaled by ``1 / (1 - dropout_p)``, as ``scaled_dot_product_attention`` and flash-attn).
      Applied whenever it is > 0, also in eval mode: pass 0 there (``mmkernels.nn.Attention`` does). The mask is
      drawn from torch's generator (reproducible under ``torch.manual_seed``); the backends draw different masks.
      ``0.0`` (default) is exactly no dropout.
    - ``backend``: ``None`` (auto: ``"triton"`` on CUDA, ``"reference"`` on CPU), ``"triton"`` or ``"reference"``.

    Raises ``TypeError``/``ValueError`` naming the argument for bad dtypes, shapes, scalars and (when read, see
    above) ``cu_seqlens`` values; :class:`mmkernels.BackendError` for a backend that cannot run these tensors.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dtypes=DTYPES, op=OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k and v must have the same dtype, got q {_dtype_name(q.dtype)}, "
                        f"k {_dtype_name(k.dtype)}, v {_dtype_name(v.dtype)}")
    causal = check.flag("causal", causal, op=OP)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError(f"{OP}: pass both cu_seqlens_q and cu_seqlens_k (varlen) or neither (dense)")
    varlen = cu_seqlens_q is not None
    tensors = {"q": q, "k": k, "v": v}
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check.tensor(name, cu, op=OP)  # a list names itself here, before the device comparison reads .device
        tensors.update(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    device = check.same_device(OP, **tensors)

    layout = "[total, H, D]" if varlen else "[B, L, H, D]"
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{OP}: {name} must be {layout} ({ndim} dims{' with cu_seqlens' if varlen else ''}), "
                             f"got shape {tuple(t.shape)}")
    if tuple(k.shape[:-1]) != tuple(v.shape[:-1]):
        v_layout = "[total_k, Hkv, D_v]" if varlen else "[B, Lk, Hkv, D_v]"
        raise ValueError(f"{OP}: v must have the same shape as k but for the head dim ({v_layout}), got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"{OP}: q and k/v must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    head_dim, head_dv, hq, hkv = q.shape[-1], v.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{OP}: q and k must have the same head dim, got q {head_dim} and k {k.shape[-1]} (only "
                         "v's head dim may differ)")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: q/k head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if not 1 <= head_dv <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: v head dim must be in [1, {MAX_HEAD_DIM}], got {head_dv}")
    if hq < 1 or hkv < 1 or hq % hkv != 0:
        raise ValueError(f"{OP}: the number of query heads ({hq}) must be a positive multiple of the number of "
                         f"key/value heads ({hkv})")

    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check.tensor(name, cu, dtypes=(torch.int32,), dim=1, op=OP)
            if cu.numel() < 1:
                raise ValueError(f"{OP}: {name} must have B + 1 >= 1 entries, got none")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"{OP}: cu_seqlens_q and cu_seqlens_k must both have B + 1 entries, got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        # A sequence is never longer than its tensor's rows: the bound keeps every backend from sizing a grid or
        # a buffer by an absurd max_seqlen (no host read: the rows are q's and k's shapes).
        for name, m, rows in (("max_seqlen_q", max_seqlen_q, q.shape[0]), ("max_seqlen_k", max_seqlen_k, k.shape[0])):
            if m is not None:
                check.integer(name, m, op=OP, low=0, high=rows)
        cu_seqlens_q = cu_seqlens_q.contiguous()
        cu_seqlens_k = cu_seqlens_k.contiguous()
        sizes_given = max_seqlen_q is not None and max_seqlen_k is not None
        if torch.compiler.is_compiling():
            if not sizes_given:
                raise ValueError(f"{OP}: under torch.compile, pass max_seqlen_q and max_seqlen_k with cu_seqlens")
            read = False
        else:
            read = not sizes_given or debug_checks_enabled()
        if read:  # one host sync: derive the missing sizes, and check every value while they are on the host
            max_seqlen_q, max_seqlen_k = _read_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                                          max_seqlen_q, max_seqlen_k)
        else:  # the hot path: no host sync; bad values cannot reach memory outside q, k and v
            cu_seqlens_q = _guard_cu_seqlens(cu_seqlens_q, q.shape[0])
            cu_seqlens_k = _guard_cu_seqlens(cu_seqlens_k, k.shape[0])
    else:
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if m is not None:
                raise ValueError(f"{OP}: {name} is only used with cu_seqlens (varlen); dense lengths come from the "
                                 "shapes")
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]

    scale = head_dim**-0.5 if softmax_scale is None else check.real("softmax_scale", softmax_scale, op=OP)
    dropout_p = check_dropout(dropout_p, op=OP)
    # The kernels take any strides but a unit stride on the head dim.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p)
    _, impl = ATTENTION_BACKENDS.select(device, backend, args)
    return impl(*args)


def check_dropout(dropout_p, *, op: str) -> float:
    """``dropout_p`` as a float in ``[0, 1)`` (shared with the Q-Former op)."""
    value = check.real("dropout_p", dropout_p, op=op)
    if not isinstance(value, float):  # symbolic under torch.compile(dynamic=True): checked when traced eagerly
        return value
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {value}")
    if value > 0.0 and is_batch_invariant():
        raise ValueError(f"{op}: dropout is not batch-invariant (its random stream is indexed by the sequence's "
                         "position in the batch); use dropout_p=0 in the batch-invariant mode (eval / rollout)")
    return value
