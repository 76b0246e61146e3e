"""The batch-invariant mode's element-wise CPU kernels (mmkernels.batch_invariance_elementwise), swept over their
whole kind: EVERY ``pointwise``-tagged ATen op (and the activations without the tag), in fp32, fp64, fp16 and bf16,
on two input ranges, gives an element the same bits at any position and length of the tensor (the scalar tail of
ATen's vectorised loop rounds differently), for its forward, its gradients and its in-place variant; and at several
thread counts (each thread's chunk has its own tail). An op missing from ELEMENTWISE that depends on the position
on the machine running the tests fails here by name."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.batch_invariance_elementwise import ELEMENTWISE, PAD_ELEMENTS, PIECE_ELEMENTS, _overload

N = 600  # elements of the full tensor
LENGTHS = (*range(1, 34), 63, 64, 65, 97, 255, 511)  # every tail length of a 16- or 32-lane loop, and some more
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
RANGES = ((0.05, 0.95), (-3.0, 3.0))  # inside every domain (log, acos, atanh, logit); and both signs (elu, softplus)
EXTRA = ("hardswish", "log_sigmoid_forward")  # activations without the pointwise tag


pytestmark = pytest.mark.usefixtures("batch_invariant_mode")  # every test inside the mode (tests/conftest.py)


SCALAR = 0.7  # for a Scalar argument without a default (pow's exponent, lerp's weight, add's other)


def _slots(op) -> list[str] | None:
    """The arguments to pass, in order, before the first one with a default: ``"tensor"`` or ``"scalar"``; None
    when the op needs another kind of argument (a bool mask, a dtype, an int list)."""
    slots = []
    for arg in op._schema.arguments:
        if arg.has_default_value():
            break
        kind = {"Tensor": "tensor", "number": "scalar"}.get(str(arg.type))
        if kind is None or arg.kwarg_only:
            return None
        slots.append(kind)
    if "tensor" not in slots or any(not a.has_default_value() for a in op._schema.arguments[len(slots):]):
        return None
    return slots


def _caller(op):
    """``op`` as a function of its tensor arguments alone (scalars filled in with :data:`SCALAR`)."""
    slots = _slots(op)

    def call(*tensors):
        it = iter(tensors)
        return op(*(next(it) if slot == "tensor" else SCALAR for slot in slots))

    return call


def _tensor_count(op) -> int:
    return _slots(op).count("tensor")


def _pointwise_ops() -> list[str]:
    """Every functional ``pointwise``-tagged ATen overload callable with tensors and scalars alone, and
    :data:`EXTRA`."""
    names = []
    for packet_name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, packet_name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            schema = op._schema
            if torch.Tag.pointwise not in op.tags or schema.is_mutable or any(a.is_out for a in schema.arguments):
                continue
            if _slots(op) is not None:
                names.append(f"{packet_name}.{overload}")
    return sorted(names) + list(EXTRA)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.nan_to_num(a, 0.0, 0.0, 0.0), torch.nan_to_num(b, 0.0, 0.0, 0.0))


def _outside_the_mode(fn, inputs: list[torch.Tensor]):
    """ATen's own result and input gradients (the mode off; a cotangent of ones), or None where ``fn`` does not take
    these inputs (or gives no floating result) / is not differentiable in them: what fails there is the op's own
    limit; inside the mode nothing may fail."""
    with mmkernels.batch_invariant(False):
        try:
            full = fn(*inputs)
        except (RuntimeError, NotImplementedError, TypeError):
            return None, None
        if not isinstance(full, torch.Tensor) or not full.is_floating_point():
            return None, None
        leaves = [x.clone().requires_grad_() for x in inputs]
        try:
            grads = torch.autograd.grad(fn(*leaves), leaves, torch.ones_like(full), allow_unused=True)
        except (RuntimeError, NotImplementedError):
            return full, None
        return full, grads


def _close_to_aten(got, want, what: str) -> None:
    """The mode changes an element's rounding, not its value: close to ATen's own result (4 ulps in fp16, 8 in bf16:
    a gradient formula can turn the 1-ulp difference of a tail element into several, rsqrt's in bf16)."""
    if want is None:
        return
    tol = {torch.float16: 4e-3, torch.bfloat16: 3.2e-2, torch.float32: 4e-6, torch.float64: 1e-12}[want.dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _position_dependent(fn, inputs: list[torch.Tensor]) -> str | None:
    """How ``fn``'s element results (forward, then gradients) depend on the length of the tensor they are in, or
    None: each prefix ``x[:n]`` must give the first ``n`` elements of the full result."""
    aten, aten_grads = _outside_the_mode(fn, inputs)
    if aten is None:
        return None
    full = fn(*inputs)
    _close_to_aten(full, aten, "forward")
    for n in LENGTHS:
        if not _same(fn(*(x[:n] for x in inputs)), full[:n]):
            return f"forward at length {n}"
    if aten_grads is None:
        return None
    leaves = [x.clone().requires_grad_() for x in inputs]
    ones = torch.autograd.grad(fn(*leaves), leaves, torch.ones_like(full), allow_unused=True)
    for i, (g, want) in enumerate(zip(ones, aten_grads)):
        _close_to_aten(g, want, f"gradient of input {i}")
    cotangent = torch.randn(full.shape, generator=torch.Generator().manual_seed(7)).to(full.dtype)
    grads = torch.autograd.grad(fn(*leaves), leaves, cotangent, allow_unused=True)
    for n in LENGTHS:
        part = [x[:n].clone().requires_grad_() for x in inputs]
        got = torch.autograd.grad(fn(*part), part, cotangent[:n], allow_unused=True)
        for i, (g, ref) in enumerate(zip(got, grads)):
            if g is not None and not _same(g, ref[:n]):
                return f"gradient of input {i} at length {n}"
    return None


def _inputs(count: int, dtype, lo: float, hi: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.empty(N).uniform_(lo, hi, generator=gen).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("name", _pointwise_ops())
def test_pointwise_op_gives_an_element_the_same_bits_at_any_length(name):
    op = _overload(name)
    fn = (lambda x: op(x)[0]) if name == "log_sigmoid_forward" else _caller(op)
    failures, ran = [], 0
    for dtype in DTYPES:
        for seed, (lo, hi) in enumerate(RANGES):
            inputs = _inputs(_tensor_count(op), dtype, lo, hi, seed)
            if _outside_the_mode(fn, inputs)[0] is None:  # not for this dtype on CPU (or not for tensors alone)
                continue
            why = _position_dependent(fn, inputs)
            ran += 1
            if why is not None:
                failures.append(f"{dtype} on [{lo}, {hi}]: {why}")
    if not ran:
        pytest.skip(f"{name} cannot be called with floating tensors alone on CPU")
    assert failures == [], f"{name} depends on the element's position in the mode: {failures}"


def _inplace_variants() -> list[tuple[str, str]]:
    """(op, its in-place overload) for every op of ELEMENTWISE that has one: the same arguments after ``self``."""
    pairs = []
    for name in ELEMENTWISE:
        packet = getattr(torch.ops.aten, name.partition(".")[0] + "_", None)
        if str(_overload(name)._schema.arguments[0].type) != "Tensor":
            continue
        args = [str(a.type) for a in _overload(name)._schema.arguments[1:]]
        for overload in packet.overloads() if packet is not None else ():
            if [str(a.type) for a in getattr(packet, overload)._schema.arguments[1:]] == args:
                pairs.append((name, f"{packet._qualified_op_name.split('::')[1]}.{overload}"))
    return pairs


@pytest.mark.parametrize("name,inplace_name", _inplace_variants())
def test_inplace_variant_gives_an_element_the_same_bits_at_any_length(name, inplace_name):
    """``nn.SiLU(inplace=True)``, ``x.sigmoid_()``: the in-place kernels are padded too (or, as composites, call
    padded ones)."""
    inplace = _overload(inplace_name)
    out_of_place = _overload(name)
    inplace, out_of_place = _caller(inplace), _caller(out_of_place)
    for dtype in (torch.float32, torch.float64):
        inputs = _inputs(_tensor_count(_overload(name)), dtype, 0.05, 0.95, 0)
        full = inplace(inputs[0].clone(), *inputs[1:])
        assert _same(full, out_of_place(*inputs)), name
        for n in LENGTHS:
            part = inplace(inputs[0][:n].clone(), *(x[:n] for x in inputs[1:]))
            assert _same(part, full[:n]), f"{inplace_name} in {dtype} at length {n}"


def test_the_sweep_flags_a_kernel_that_rounds_its_tail_differently():
    """The checker's teeth: a function whose last (numel % 16) elements take another rounding, as ATen's scalar
    tail does, is flagged in the forward and in the gradient."""

    def tail_rounded(x):
        tail = torch.zeros(x.shape, dtype=torch.bool)
        tail[x.numel() - x.numel() % 16:] = True
        return torch.where(tail, (x * 3).to(torch.float16).to(x.dtype), x * 3)

    inputs = _inputs(1, torch.float32, 0.05, 0.95, 0)
    assert _position_dependent(tail_rounded, inputs).startswith("forward")
    assert _position_dependent(lambda x: torch.exp(x) * x, inputs) is None
    assert _position_dependent(lambda x: x.detach().requires_grad_(x.requires_grad) * 3 + tail_rounded(x).detach(),
                               inputs).startswith("forward")


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_rows_at_any_thread_count(threads, cpu_threads):
    """ATen splits a large element-wise op across threads, each chunk with its own scalar tail, at boundaries that
    move with the batch: the mode's pieces stay below the parallel grain (found by the fresh-user trial: silu rows
    16 of 17 differed at 4 threads)."""
    gelu_tanh = lambda t: torch.nn.functional.gelu(t, approximate="tanh")  # noqa: E731
    fns = (torch.nn.functional.silu, torch.sigmoid, gelu_tanh, torch.nn.functional.softplus, torch.exp2,
           lambda t: torch.pow(t.abs(), t), lambda t: torch.lerp(t, t.flip(-1), 0.3))
    cpu_threads(threads)
    for n in (17, 33):
        x = torch.randn(n, 4096, generator=torch.Generator().manual_seed(n))
        for i, fn in enumerate(fns):
            y = fn(x)
            assert [p for p in range(n) if not torch.equal(fn(x[p:p + 1])[0], y[p])] == [], f"function {i}"


def test_padded_kernels_keep_atens_results_layout_and_errors():
    """Broadcasting, type promotion (int -> float), 0-dim scalars, empty and non-contiguous inputs: the padded
    kernels give what ATen gives, within its ulp difference; an in-place result that cannot be cast raises."""
    x = torch.randn(3, 5, 7)
    cases = [
        (torch.pow, (x.abs(), torch.rand(5, 1) + 0.5)),  # broadcast
        (torch.pow, (x.abs(), torch.tensor(2.5))),  # a 0-dim exponent stays a scalar
        (torch.exp, (torch.arange(10),)),  # int -> float
        (torch.exp, (torch.tensor(1.5),)),  # 0-dim
        (torch.sigmoid, (torch.empty(0, 4),)),
        (torch.sigmoid, (x.transpose(0, 2),)),  # ATen keeps the layout (found by the fresh-user trial: .view)
        (torch.nn.functional.silu, (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),)),
        (torch.exp, (torch.randn(6, 10).t(),)),
        (torch.atan2, (x, x.flip(0))),
    ]
    results = [fn(*args) for fn, args in cases]
    with mmkernels.batch_invariant(False):
        expected = [fn(*args) for fn, args in cases]
    for (fn, _), got, ref in zip(cases, results, expected):
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.stride() == ref.stride(), fn.__name__
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="can't be cast"):
        torch.arange(4).exp_()
    assert PIECE_ELEMENTS % PAD_ELEMENTS == 0


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("name", ["glu", "logsigmoid", "glu dim 0"])
def test_fused_activations_that_are_not_pointwise(name, threads, cpu_threads):
    """GLU's and log-sigmoid's fused CPU kernels have the same scalar tails (found by the fresh-user trial: GLU of a
    70001-wide row at 3 threads moved with the batch): their decompositions run (DECOMPOSED); forward and input
    gradient of a row alone and inside batches of 2 and 7."""
    fn = {"glu": lambda t: torch.nn.functional.glu(t, -1), "logsigmoid": torch.nn.functional.logsigmoid,
          "glu dim 0": lambda t: torch.nn.functional.glu(t.t(), 0).t()}[name]
    cpu_threads(threads)
    x = torch.randn(7, 70002, generator=torch.Generator().manual_seed(1))
    results = []
    for batch, row in ((x[3:4], 0), (x[2:4], 1), (x, 3)):
        leaf = batch.clone().requires_grad_()
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        results.append((out[row].detach(), grad[row]))
    for i, (out, grad) in enumerate(results[1:], 1):
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1]), f"batch {i}"
