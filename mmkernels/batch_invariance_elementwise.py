"""Element-wise CPU kernels without scalar tails, for the batch-invariant mode (:func:`mmkernels.set_batch_invariant`).

ATen's vectorised CPU loop computes a tensor's last ``numel % (2 x vector width)`` elements with the scalar function
(``std::exp``, a plain ``a * b + c``) and the others with the SIMD one (Sleef, fused multiply-adds), which round
differently; so a token's ``silu``, ``softplus``, ``pow`` or ``atan2`` depends on whether it is the last row of the
batch. With several threads, each thread's chunk has such a tail, at boundaries that move with the batch. Under the
mode the CPU kernels of :data:`ELEMENTWISE` (and their in-place variants) run on copies padded to a multiple of
:data:`PAD_ELEMENTS`, in pieces of :data:`PIECE_ELEMENTS` (below ATen's parallel grain: one thread per piece), so
every element takes the SIMD path at any thread count.

Which ops: every ``pointwise``-tagged ATen op that is not correctly rounded by IEEE 754 (transcendental and special
functions, activations, ``pow``, and the fused-multiply-add candidates ``lerp``/``addcmul``/``addcdiv``), and the
activations' backward kernels. ``+ - * /``, ``sqrt``, comparisons, rounding, ``clamp``, ``where`` and the like give
the correctly rounded value on either path and are left alone. ``tests/test_batch_invariance.py`` sweeps every
``pointwise``-tagged op (forward, gradient and in-place) at awkward lengths and thread counts, so an op this list
misses on the test machine fails there by name. GPU kernels use one function for every element: CPU only.

GLU and ``log_sigmoid_forward`` (fused kernels, not pointwise) run torch's decomposition (:data:`DECOMPOSED`). Not
covered: the ``out=`` overloads (``torch.exp(x, out=y)``; they are the kernels the padded ones call).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["DECOMPOSED", "ELEMENTWISE", "PAD_ELEMENTS", "PIECE_ELEMENTS", "register"]

PAD_ELEMENTS = 64  # >= 2 x the widest SIMD vector (AVX-512: 16 floats): no scalar tail
# Pieces below ATen's parallel grain (32768 elements): a piece runs on one thread, so the threads' own chunk
# boundaries (each with a scalar tail) never cut it; a multiple of PAD_ELEMENTS.
PIECE_ELEMENTS = 16384

# Functional overloads ("name" is "name.default"). Found on a 2-core x86 CPU with torch 2.14 to depend on the
# position (forward or gradient, some dtype): silu, gelu, sigmoid, softplus, mish, elu, celu, selu, exp2, pow,
# atan2, atanh, cosh, sinh, logaddexp(2), ldexp, igamma, rsqrt (fp16/bf16), special_i0e and the activations'
# backward kernels; the others are in the same kind (not correctly rounded) and are padded so that a wider or
# narrower SIMD unit does not surprise. Only ops with a CPU kernel of their own: the composites (selu, celu, ldexp,
# mvlgamma, the Scalar overloads of xlogy / xlog1py) reach these kernels.
ELEMENTWISE = (
    # trigonometric and hyperbolic
    "acos", "acosh", "asin", "asinh", "atan", "atanh", "atan2", "cos", "cosh", "sin", "sinc", "sinh", "tan", "tanh",
    # exponentials and logarithms
    "exp", "exp2", "expm1", "log", "log10", "log1p", "log2", "logaddexp", "logaddexp2", "logit", "xlogy.Tensor",
    "special_xlog1py", "special_entr",
    # powers
    "pow.Tensor_Tensor", "pow.Tensor_Scalar", "pow.Scalar", "rsqrt", "hypot",
    # error, gamma and Bessel functions
    "erf", "erfc", "erfinv", "special_erfcx", "special_ndtri", "special_log_ndtr", "lgamma", "digamma", "polygamma",
    "igamma", "igammac", "i0", "special_i0e", "special_i1", "special_i1e", "special_zeta",
    # activations
    "sigmoid", "silu", "gelu", "mish", "elu", "softplus", "hardswish", "hardsigmoid",
    # fused multiply-add candidates (a SIMD fma rounds once, the scalar a * b + c twice)
    "lerp.Scalar", "lerp.Tensor", "addcmul", "addcdiv",
    # backward kernels of the activations (the others' gradients are compositions of the ops above)
    "sigmoid_backward", "tanh_backward", "silu_backward", "gelu_backward", "elu_backward", "softplus_backward",
    "hardswish_backward", "hardsigmoid_backward", "logit_backward", "log_sigmoid_backward", "mish_backward",
)
# Fused CPU kernels of element-wise activations that are not pointwise (two halves of a dim, two outputs), with the
# same scalar tails: torch's decomposition runs instead (its exp / sigmoid / log1p are padded, its mul / sub exact).
# GLU found moving with the batch by the second fresh-user trial (a 70001-wide row at 3 threads).
DECOMPOSED = ("glu", "glu_backward", "log_sigmoid_forward")


def _overload(name: str) -> torch._ops.OpOverload:
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _out_overload(op: torch._ops.OpOverload) -> tuple[torch._ops.OpOverload, str]:
    """The ``out=`` overload of a functional overload (the one with its arguments and one out tensor) and the name
    of its out argument (``out``, ``grad_input``): ATen's own kernel, which the padded kernel calls. Only one with a
    CPU kernel of its own: a composite ``out=`` (``hardswish_backward.out``) calls the functional kernel, which is
    the padded one (a recursion)."""
    args = [(a.name, str(a.type)) for a in op._schema.arguments]
    packet = getattr(torch.ops.aten, op._schema.name.split("::")[1])
    for name in packet.overloads():
        candidate = getattr(packet, name)
        outs = [a for a in candidate._schema.arguments if a.is_out]
        if (len(outs) == 1 and [(a.name, str(a.type)) for a in candidate._schema.arguments if not a.is_out] == args
                and torch._C._dispatch_has_kernel_for_dispatch_key(candidate.name(), "CPU")):
            return candidate, outs[0].name
    raise LookupError(f"{op} has no single-output out= overload with a CPU kernel")


def _padded_kernel(op: torch._ops.OpOverload):
    """The CPU kernel of ``op`` on copies of its tensor arguments padded to a multiple of :data:`PAD_ELEMENTS`
    (broadcast first; 0-dim tensors stay scalars, as ATen treats them), in pieces of :data:`PIECE_ELEMENTS`. An op
    without an ``out=`` kernel runs its definition in other ATen ops, whose transcendental parts are padded: its
    composite (``mish_backward``) or torch's decomposition (``hardswish_backward``: exact ``where``/``mul``/``div``/
    ``add``, one rounding each on either path)."""
    try:
        out_op, out_name = _out_overload(op)
    except LookupError:
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
            return op.decompose
        from torch._decomp import decomposition_table

        if op in decomposition_table:
            return decomposition_table[op]
        raise
    dtypes: dict[tuple, torch.dtype] = {}

    def result_dtype(args, kwargs) -> torch.dtype:
        """The result's dtype (type promotion, int -> float) as ATen computes it: from a call on meta tensors (slow:
        Python meta functions), once per signature (the arguments' dtypes, 0-dim-ness and scalar types, and the
        default dtype)."""
        key = (tuple((a.dtype, a.dim() == 0) if isinstance(a, torch.Tensor) else type(a) for a in args),
               tuple(sorted((k, repr(value)) for k, value in kwargs.items())), torch.get_default_dtype())
        dtype = dtypes.get(key)
        if dtype is None:
            meta = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
            dtype = dtypes.setdefault(key, meta.dtype)
        return dtype

    tensor_slots = [i for i, a in enumerate(op._schema.arguments) if str(a.type) == "Tensor" and not a.kwarg_only]

    def run(*args, **kwargs):
        original = _rewrap_numbers(args, tensor_slots)
        args = list(original)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        where = [i for i in tensors if args[i].dim() > 0] or tensors
        shape = torch.broadcast_shapes(*(args[i].shape for i in where))
        dtype = result_dtype(args, kwargs)
        n = math.prod(shape)
        size = n + (-n) % PAD_ELEMENTS
        for i in where:
            buf = args[i].new_zeros(size)
            buf[:n] = args[i].expand(shape).reshape(-1)
            args[i] = buf
        out = torch.empty(size, dtype=dtype, device=args[where[0]].device)
        for start in range(0, size, PIECE_ELEMENTS):  # one thread per piece, no tail in any piece
            piece = slice(start, start + PIECE_ELEMENTS)
            piece_args = [a[piece] if i in where else a for i, a in enumerate(args)]
            out_op(*piece_args, **kwargs, **{out_name: out[piece]})
        result = out[:n].view(shape)
        # ATen's result takes the memory layout of its inputs (a transposed or channels-last input gives one):
        # keep it, so that a caller's ``.view`` works or fails as outside the mode
        template = next((a for a in original if isinstance(a, torch.Tensor) and a.shape == shape), None)
        if template is not None and not template.is_contiguous():
            result = torch.empty_like(template, dtype=dtype).copy_(result)
        return result

    return run


def _rewrap_numbers(args: tuple, tensor_slots: list[int]) -> list:
    """``args`` with a Python number in a Tensor slot made a 0-dim tensor again. A composite wraps a scalar into a
    "wrapped number" tensor (``xlogy(0.7, x)`` -> ``xlogy.Tensor``), which reaches a Python kernel as a number;
    ATen casts it to the common dtype of the call, so the 0-dim tensor gets that dtype (the same value)."""
    args = list(args)
    numbers = [i for i in tensor_slots if i < len(args) and not isinstance(args[i], torch.Tensor)]
    if numbers:
        other = next(a for a in args if isinstance(a, torch.Tensor))
        for i in numbers:
            args[i] = torch.tensor(args[i], dtype=torch.result_type(args[i], other), device=other.device)
    return args


def _inplace_kernel(functional):
    """``self.op_(...)`` as ``self.copy_(padded op(self, ...))``, with ATen's casting rule for in-place results."""

    def run(self, *args, **kwargs):
        result = functional(self, *args, **kwargs)
        if not torch.can_cast(result.dtype, self.dtype):
            raise RuntimeError(f"result type {result.dtype} can't be cast to the desired output type {self.dtype}")
        return self.copy_(result)

    return run


def _inplace_name(name: str) -> str | None:
    """The in-place overload of ``name`` (``pow.Tensor_Tensor`` -> ``pow_.Tensor``: the one taking the same
    arguments after ``self``) where ATen has it with a CPU kernel of its own (a composite in-place op calls the
    functional or ``out=`` kernel)."""
    packet = name.partition(".")[0]
    inplace = getattr(torch.ops.aten, packet + "_", None)
    arguments = _overload(name)._schema.arguments
    if inplace is None or str(arguments[0].type) != "Tensor":
        return None
    args = [str(a.type) for a in arguments[1:]]
    for overload in inplace.overloads():
        op = getattr(inplace, overload)
        if [str(a.type) for a in op._schema.arguments[1:]] == args:
            found = packet + "_" + ("" if overload == "default" else "." + overload)
            return found if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU") else None
    return None


@functools.cache
def _kernels() -> tuple[tuple[str, object], ...]:
    """(op name, CPU kernel): the decompositions of :data:`DECOMPOSED`, the padded kernels of :data:`ELEMENTWISE` and
    their in-place variants; built once (the mode may be entered and left around every call of a rollout)."""
    from torch._decomp import decomposition_table

    kernels = [(name, decomposition_table[_overload(name)]) for name in DECOMPOSED]
    for name in ELEMENTWISE:
        functional = _padded_kernel(_overload(name))
        kernels.append((name, functional))
        inplace = _inplace_name(name)
        if inplace is not None:
            kernels.append((inplace, _inplace_kernel(functional)))
    return tuple(kernels)


def register(lib: torch.library.Library) -> None:
    """Register the padded CPU kernels of :data:`ELEMENTWISE` and their in-place variants on ``lib`` (an ``aten``
    ``IMPL`` library: destroying it restores ATen's kernels)."""
    for name, kernel in _kernels():
        lib.impl(name, kernel, "CPU")
