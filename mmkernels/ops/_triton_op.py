"""``triton_op``: register a Python function that launches Triton kernels as a ``mmkernels::`` op.

On GPUs this is ``torch.library.triton_op``: torch.compile traces into the body and sees each kernel (launched
through ``torch.library.wrap_triton``). Under ``TRITON_INTERPRET=1`` (CPU tests) ``wrap_triton`` returns the raw
interpreted kernel, which cannot be traced; there the function is registered as an opaque
``torch.library.custom_op`` with the given fake implementation instead, so opcheck and torch.compile still see
a correct op. GPU tests (``-m gpu``) cover the triton_op path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

__all__ = ["interpreting", "triton_op"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_op(name: str, *, mutates_args: Iterable[str] | str, fake: Callable) -> Callable:
    """Decorator. ``fake`` gives the outputs' shapes and dtypes from the inputs (None for mutation-only ops)."""

    def register(fn: Callable):
        if interpreting():
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)

    return register
