"""The representative problems ``mmkernels-bench tune`` sweeps, per Triton kernel, gathered from the benchmark
suites: each family's suite (``bench/suites/<family>.py``) declares its kernels' problems in ``Suite.tune_cases``,
next to the shapes it is timed at. The kernels' search spaces, defaults and input makers live next to the kernels
(``tuning.register`` in each ``kernels/triton/<family>.py``); only the choice of problems is the benchmark side's.

``CASES``: kernel name -> a function returning its shapes (computed on call: the kernels' block helpers decide some
fields), in the order of ``tuning.SPACES`` where the kernel has a space. :func:`cases` looks one kernel up with a
clear error.
"""

from __future__ import annotations

from collections.abc import Callable

from .suite import registered_suites

__all__ = ["CASES", "cases"]


def _gather() -> dict[str, Callable[[], list[dict]]]:
    found: dict[str, Callable[[], list[dict]]] = {}
    owner: dict[str, str] = {}
    for suite in registered_suites().values():
        for kernel, make in suite.tune_cases.items():
            if kernel in found:
                raise ValueError(f"tune cases of kernel {kernel!r} declared by two suites: {owner[kernel]!r} and "
                                 f"{suite.name!r}")
            found[kernel], owner[kernel] = make, suite.name
    try:
        from ..kernels.triton.tuning import SPACES  # the tuning order, where triton is installed
    except ImportError:
        return found
    order = {k: i for i, k in enumerate(SPACES)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


CASES: dict[str, Callable[[], list[dict]]] = _gather()


def cases(kernel: str) -> list[dict]:
    """The tune problems of ``kernel``; ``KeyError`` naming the kernels that have cases for an unknown one."""
    if kernel not in CASES:
        raise KeyError(f"no tune cases for kernel {kernel!r}; kernels with cases: {', '.join(CASES)}")
    return CASES[kernel]()
