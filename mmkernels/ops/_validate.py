"""Input checks shared by the public functions: clear ``TypeError``/``ValueError`` naming the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch


def tensor(name: str, value, *, dtypes: Iterable[torch.dtype] | None = None, dim: int | None = None,
           contiguous: bool = False, op: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must be {expected}, got {str(value.dtype).replace('torch.', '')}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimension(s), got shape {tuple(value.shape)}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (it is updated in place); call .contiguous() first")
    return value


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    values = iter(tensors.values())
    first = next(values).device
    for t in values:  # a plain loop: this runs on every op call
        if t.device != first:
            raise ValueError(_device_message(op, tensors))
    return first


def _device_message(op: str, tensors: dict[str, torch.Tensor]) -> str:
    """Names the tensors off the most common device first (the odd one out is the argument to fix)."""
    devices = [x.device for x in tensors.values()]
    common = max(devices, key=devices.count)
    if devices.count(common) == 1 or sum(devices.count(d) == devices.count(common) for d in set(devices)) > 1:
        listing = ", ".join(f"{n} is on {x.device}" for n, x in tensors.items())  # no majority: list them all
        return f"{op}: all tensors must be on one device: {listing}"
    odd = ", ".join(f"{n} is on {x.device}" for n, x in tensors.items() if x.device != common)
    rest = ", ".join(n for n, x in tensors.items() if x.device == common)
    verb = "is" if "," not in rest else "are"
    return f"{op}: all tensors must be on one device: {odd}, while {rest} {verb} on {common}"


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes of ``t``'s storage that it can touch (conservative for strided views)."""
    if t.numel() == 0:
        return (0, 0)
    size = t.element_size()
    start = t.storage_offset() * size
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 1) * size + size
    return (start, start + extent)


def no_overlap(op: str, written: Iterable[str], **tensors: torch.Tensor) -> None:
    """``ValueError`` naming both arguments when a tensor the op writes in place (a name in ``written``) shares memory
    with another argument: the kernels read one while writing the other, so the result would depend on the
    backend's order. Compares storages and byte ranges (no device read); skipped inside ``torch.compile``."""
    if torch.compiler.is_compiling():
        return
    written = tuple(written)
    names = list(tensors)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a not in written and b not in written:
                continue
            x, y = tensors[a], tensors[b]
            if x.is_meta or y.is_meta or x.numel() == 0 or y.numel() == 0:
                continue
            if x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
                continue
            (x0, x1), (y0, y1) = _byte_range(x), _byte_range(y)
            if x0 < y1 and y0 < x1:
                raise ValueError(f"{op}: {a} and {b} share memory ({a} is updated in place); pass separate tensors "
                                 f"(e.g. {b}.clone())")


def type_name(value) -> str:
    """``value``'s type for an error message, qualified outside the builtins: a NumPy bool is ``numpy.bool``, not
    ``bool`` (which would read "must be a bool, got bool")."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def flag(name: str, value, *, op: str, none: bool = False) -> bool | None:
    """A switch as a Python bool: ``bool`` or a NumPy bool (``numpy.bool_(True)``, e.g. read from an array);
    anything else (``0``, ``"yes"``, ``None``, a tensor) is a ``TypeError``: a truthiness rule would silently take
    ``"False"`` for True. ``none=True``: None is accepted too (and returned)."""
    if type(value) is bool or (none and value is None):  # the common case passes straight through
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{op}: {name} must be a bool{' or None' if none else ''}, got {type_name(value)}")


def integer(name: str, value, *, op: str, low: int | None = None, high: int | None = None) -> int:
    """An integer as a Python int: ``int`` or any ``numbers.Integral`` (``numpy.int64(2)``), never a bool (nor a
    NumPy bool) or a float, even an integral one (``2.0``)."""
    if type(value) is not int:  # the common case passes straight through
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{op}: {name} must be an int, got {type_name(value)}")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bounds = f">= {low}"
        elif low is None:
            bounds = f"<= {high}"
        else:
            bounds = f"in [{low}, {high}]"
        raise ValueError(f"{op}: {name} must be {bounds}, got {value}")
    return value


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def real(name: str, value, *, op: str, low: float | None = None, high: float | None = None,
         float32: bool = False) -> float:
    """A finite real number as a Python float. Accepts Python and NumPy scalars (``numpy.float32(0.125)``).

    ``float32=True``: the kernels take the value as a float32 (C++ ``static_cast<float>``, a Triton ``fp32``
    argument, a PyTorch scalar operand of a float32 tensor), so it must be finite *as a float32*:
    ``|value| <= 3.4028234663852886e38``. Beyond that one backend would read inf and another raise; it is an error
    here, naming the argument, for all of them.

    Under ``torch.compile(dynamic=True)`` a float argument can arrive as a symbolic float (``torch.SymFloat``):
    its value is unknown while tracing, so inside ``torch.compile`` it is returned as is after the type check (a
    module checks its float options eagerly, at construction).
    """
    compiling = torch.compiler.is_compiling()
    if (type(value) is float or type(value) is int) and not compiling:  # the common case first: every op call
        return _real_range(name, float(value), op, low, high, float32)
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Python number, not a tensor (reading a device tensor would "
                        "synchronise with the host)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real | torch.SymFloat | torch.SymInt):
        raise TypeError(f"{op}: {name} must be a number, got {type_name(value)}")
    if compiling or isinstance(value, torch.SymFloat | torch.SymInt):
        return value  # possibly symbolic (dynamic=True): no concrete value to check while tracing
    return _real_range(name, float(value), op, low, high, float32)


def _real_range(name: str, value: float, op: str, low: float | None, high: float | None, float32: bool) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if float32 and abs(value) > FLOAT32_MAX:
        raise ValueError(f"{op}: {name} must be finite as a float32 (|{name}| <= {FLOAT32_MAX:.8g}: the kernels "
                         f"compute in float32), got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return value


def choice(name: str, value, options: Iterable[str], *, op: str) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value


def no_double_backward(op: str) -> None:
    """Call at the top of a registered op's backward: the kernels' backward is not itself differentiable.

    With ``create_graph=True`` (double backward, e.g. a gradient penalty) autograd runs the backward with grad
    mode on; raise a clear error there instead of PyTorch's message at the second backward.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (torch.autograd.grad(..., create_graph=True) through this op) is not supported by "
            "its fused kernels; use backend='reference' for higher-order gradients"
        )


def first_arg_dtype_in(dtypes: Iterable[torch.dtype], *, note: str = "float64 runs on backend='reference'"):
    """A backend's ``supports`` declaration (``OpBackends.register(..., supports=...)``): the op's first tensor
    argument must have one of ``dtypes``."""
    dtypes = tuple(dtypes)
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)

    def supports(first, *_) -> str | None:
        if first.dtype in dtypes:
            return None
        return f"the kernels take {names}, got {str(first.dtype).replace('torch.', '')} ({note})"

    return supports


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def module_input(module: str, name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A module's input tensor ``x`` (argument ``name``) against the module's ``weight``: same device, and same dtype
    unless autocast is on for that device (autocast casts per op, as for ``nn.Linear``). The error names the module
    and its argument, not an op inside it (``"ZeroComputeMoE: input x is float16 but the module's weights are
    float32"``)."""
    if x.device != weight.device:
        raise ValueError(f"{module}: input {name} is on {x.device} but the module's weights are on {weight.device}; "
                         f"move one of them (x.to(device) or module.to(device))")
    if not x.is_floating_point():
        raise TypeError(f"{module}: input {name} must be a floating-point tensor, got {_dtype_name(x.dtype)}")
    if x.dtype != weight.dtype:
        kind = x.device.type
        if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
            return
        raise TypeError(f"{module}: input {name} is {_dtype_name(x.dtype)} but the module's weights are "
                        f"{_dtype_name(weight.dtype)}; cast the input ({name}.to({weight.dtype})) or the module "
                        f"(module.to({x.dtype})), or run under torch.autocast")


def module_dtype(module: str, dtype, name: str = "dtype") -> torch.dtype | None:
    """A module constructor's ``dtype``: ``None`` or a floating-point ``torch.dtype`` (its parameters are trained;
    an integer or bool dtype would fail later inside ``nn.Parameter`` with PyTorch's own message)."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{module}: {name} must be a torch.dtype (e.g. torch.float32) or None, got "
                        f"{type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"{module}: {name} must be a floating-point dtype (the parameters are trained), got "
                        f"{_dtype_name(dtype)}")
    return dtype


def probability(name: str, value, *, op: str) -> float:
    """A dropout-like probability in [0, 1), named as the caller's parameter (a module's ``dropout``, an op's
    ``dropout_p``)."""
    p = real(name, value, op=op, low=0.0)
    if isinstance(p, float) and not p < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {p}")
    return p
