"""``triton_op``: the one way a Triton launcher becomes a registered ``mmkernels::`` op.

Naming: ``mmkernels::<op>_fwd_triton`` for the forward and ``mmkernels::<op>_bwd_triton`` for its backward (an op
whose backward is several kernels: ``<op>_bwd_<piece>_triton``); an op that updates its inputs in place keeps
PyTorch's trailing underscore (``expert_bias_update_fwd_triton_``).

On GPUs this is ``torch.library.triton_op``: torch.compile traces into the body and sees each kernel (launched
through ``torch.library.wrap_triton``). Under ``TRITON_INTERPRET=1`` (CPU tests) ``wrap_triton`` returns the raw
interpreted kernel, which cannot be traced; there the function is registered as an opaque
``torch.library.custom_op`` with the given fake implementation instead, so opcheck and torch.compile still see
a correct op. GPU tests (``-m gpu``) cover the triton_op path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch

from .._env import triton_interpreting

__all__ = ["triton_op"]


def triton_op(name: str, launcher: Callable | None = None, *, mutates_args: Iterable[str] | str, fake: Callable):
    """Register ``name`` (``"mmkernels::<op>_fwd_triton"``) and return the op (a ``CustomOpDef``, for
    ``register_autograd``). ``fake`` gives the outputs' shapes and dtypes from the inputs (None for mutation-only ops).

    - ``triton_op(name, launcher, ...)``: the op *is* a launcher of ``kernels/triton/`` (a plain function with an
      annotated signature and a keyword-only ``launch`` argument that wraps each kernel). The op's schema is the
      launcher's signature without ``launch``; each call runs ``launcher(*args, launch=torch.library.wrap_triton)``.
    - ``@triton_op(name, ...)`` decorating a function: for an op whose body puts host logic between launches (the
      MoE experts); the body wraps its kernels with ``torch.library.wrap_triton`` itself.
    """
    if launcher is not None:
        return _register(name, _launching(launcher), mutates_args, fake)
    return lambda fn: _register(name, fn, mutates_args, fake)


def _register(name: str, fn: Callable, mutates_args, fake: Callable):
    if triton_interpreting():
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, fn, mutates_args=mutates_args)


def _launching(launcher: Callable) -> Callable:
    """``launcher`` with ``launch=torch.library.wrap_triton`` bound, and the signature of everything else: annotations
    evaluated (the schema does not depend on the launcher module's names) and defaults dropped (the launchers'
    defaults serve direct Python calls; the op's callers pass every argument, and its fake takes them all)."""
    sig = inspect.signature(launcher, eval_str=True)
    if "launch" not in sig.parameters:
        raise TypeError(f"{launcher.__qualname__} takes no `launch` argument: it cannot wrap its kernels")

    def op(*args, **kwargs):
        return launcher(*args, launch=torch.library.wrap_triton, **kwargs)

    params = [p.replace(default=inspect.Parameter.empty) for n, p in sig.parameters.items() if n != "launch"]
    op.__signature__ = sig.replace(parameters=params)
    op.__name__, op.__qualname__, op.__doc__ = launcher.__name__, launcher.__qualname__, launcher.__doc__
    op.__module__ = launcher.__module__
    return op
