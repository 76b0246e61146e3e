"""What the Triton kernel modules share: launch helpers (host side) and ``@triton.jit`` helpers.

Host side, for the launchers:
- :func:`interpreted`: does a launch on a tensor run in Triton's CPU interpreter? Shorthand for
  ``tuning.target_of(t).interpreted``: launchers ask ``tuning.target_of`` once per launch for the whole
  :class:`~.tuning.Target` (interpreted or not, SM count, limits) and pass it to their config functions, so
  ``tuning.assume_target`` (how ``tests/triton_launches.py`` records GPU configurations from CPU tensors) reaches
  every choice.
- :func:`input_precision`: the ``tl.dot`` input precision of a dtype, passed to the kernels as ``PRECISION``.
- :func:`head_dim_chunks`: a head dim as one or two power-of-two chunks (the packed attention kernels, and the
  Q/K side of the per-sequence ones when the value head dim differs).
- :func:`check_grid`: CUDA's limits on the grid axes, with one error message.
- :func:`wrapped`: a kernel wrapped by the launcher's ``launch`` argument (``torch.library.wrap_triton`` inside a
  registered op, see ``ops/_triton_op.py``), or the kernel itself.
- :func:`dropout_args`: the dropout arguments of the attention and Q-Former kernels.
- ``LOG2E`` / ``LN2``: the kernels run the softmax in base 2; ``LOG2E_JIT`` / ``LN2_JIT`` are the same numbers for
  ``@triton.jit`` code (Triton lets kernels read only ``constexpr`` globals).

Device side: :func:`dropout_seed` and :func:`dropout_keep`, the Philox dropout that the attention and Q-Former
kernels share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning

__all__ = [
    "LN2",
    "LN2_JIT",
    "LOG2E",
    "LOG2E_JIT",
    "MAX_PROGRAMS",
    "check_grid",
    "dropout_args",
    "dropout_keep",
    "dropout_seed",
    "head_dim_chunks",
    "input_precision",
    "interpreted",
    "wrapped",
]

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E), folded into the softmax scale on the host
LN2 = 0.6931471805599453  # ln(2): a base-2 log-sum-exp times LN2 is the natural one the ops return
LOG2E_JIT = tl.constexpr(LOG2E)
LN2_JIT = tl.constexpr(LN2)

MAX_PROGRAMS = 2**31 - 1  # CUDA grid axis 0
MAX_GRID = (MAX_PROGRAMS, 65535, 65535)  # CUDA grid axes 0, 1, 2


def interpreted(t: torch.Tensor) -> bool:
    """True when a launch on ``t`` runs in Triton's interpreter (``tuning.target_of(t).interpreted``: ``t`` is not a
    CUDA tensor, or ``TRITON_INTERPRET=1``, unless ``tuning.assume_target`` says otherwise). The launchers then pick
    interpreter-sized configurations (few large NumPy steps), which never change a result's meaning, only its
    summation order."""
    return tuning.target_of(t).interpreted


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: fp32 inputs get exact fp32 products ("ieee", not
    TF32: the fp32 path is the accuracy path); for fp16/bf16 operands the setting does not apply, and "tf32" is
    Triton's default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D0, BLOCK_D1)``: a head dim as a power-of-two chunk (>= 16, ``tl.dot``'s smallest K) plus a second
    power-of-two chunk (0 = none) when that computes fewer padded columns than one chunk of the next power of two:
    72 -> (64, 16), 80 -> (64, 16), 88 -> (64, 32), 96 -> (64, 32), 40 -> (32, 16), 64 -> (64, 0),
    112 -> (128, 0) (64 + 64 gains nothing), 160 -> (128, 32), 192 -> (128, 64).

    The packed kernels cut every head dim this way; the per-sequence kernels cut the Q/K head dim this way when the
    value head dim differs (``attention.py``)."""
    whole = max(16, triton.next_power_of_2(head_dim))
    if head_dim == whole or whole == 16:
        return whole, 0
    low = whole // 2  # the largest power of two below head_dim (integer ops only: head_dim may be a SymInt)
    rest = max(16, triton.next_power_of_2(head_dim - low))
    if low + rest >= whole:
        return whole, 0
    return low, rest


def check_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``grid`` when every axis fits CUDA's limits (axis 0: 2**31 - 1 programs, axes 1 and 2: 65535), else
    ``ValueError("<what> exceed the CUDA grid limit (...); split the batch")``. ``what`` names the op and the
    programs (e.g. ``"attention (triton): 70000 sequences x ... = N programs"``)."""
    if any(n > limit for n, limit in zip(grid, MAX_GRID)):
        limits = " x ".join(str(limit) for limit in MAX_GRID[: len(grid)])
        raise ValueError(f"{what} exceed the CUDA grid limit ({limits}); split the batch")
    return grid


def wrapped(kernel, launch):
    """``launch(kernel)`` (``torch.library.wrap_triton`` inside a registered op, so torch.compile sees the kernel), or
    the kernel itself when a launcher is called directly (``launch=None``: tests, the launch recorder)."""
    return launch(kernel) if launch is not None else kernel


def dropout_args(dropout_p: float, seed: torch.Tensor | None, dummy: torch.Tensor):
    """(seed pointer, dropout_p, 1 / (1 - dropout_p), DROPOUT constexpr). ``dummy`` stands in for the seed pointer
    when there is no dropout (never read)."""
    if dropout_p > 0.0:
        assert seed is not None, "attention dropout needs a seed tensor"
        return seed, float(dropout_p), 1.0 / (1.0 - float(dropout_p)), True
    return dummy, 0.0, 1.0, False


@triton.jit
def dropout_keep(seed, base, rows, cols, LK, dropout_p):
    """Keep mask of attention dropout for probabilities ``(rows, cols)`` of one (sequence, head): Philox on the
    element's index ``(base + row) * LK + col`` with ``base = (b * Hq + h) * LQ`` (int64), so the forward and the
    backward kernels (attention and Q-Former alike) regenerate the same mask from the same seed. ``rows``/``cols``
    broadcast to the tile shape."""
    offs = (base + rows.to(tl.int64)) * LK + cols.to(tl.int64)
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def dropout_seed(SEED, DROPOUT: tl.constexpr):
    """The program's Philox seed (int64 ``SEED[0]``) when DROPOUT, else 0 (never used then)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return seed
