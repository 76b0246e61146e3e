"""Test helpers shared by the test suite, the benchmarks and contributors' own tests.

- ``TOLERANCES``: the one tolerance table, by dtype (relative/absolute).
- ``assert_close``: compare with the table's tolerance for the *input* dtype.
- ``assert_within_ref_error``: the flash-attn rule for attention-like ops (error <= factor x the error of the
  same-dtype PyTorch reference, both measured against a float64/fp32 truth).
- ``run_opcheck``: ``torch.library.opcheck`` with the standard tests.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close", "assert_within_ref_error", "rel_error", "run_opcheck", "tolerance"]

# (rtol, atol) per input dtype. fp32 math can be reassociated (FMA, block reductions): a few ulps of headroom.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1.3e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, *, reduction_length: int = 1) -> tuple[float, float]:
    """(rtol, atol) for results computed from ``dtype`` inputs, scaled by sqrt of the reduction length."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, reduction_length**0.5 / 16)
    return rtol * scale, atol * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
                 reduction_length: int = 1, msg: str = "") -> None:
    rtol, atol = tolerance(dtype or actual.dtype, reduction_length=reduction_length)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def rel_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """||actual - truth|| / ||truth|| in float64 (NaN if either has a NaN)."""
    a, t = actual.double(), truth.double()
    return float((a - t).norm() / t.norm().clamp_min(1e-300))


def assert_within_ref_error(actual: torch.Tensor, ref_same_dtype: torch.Tensor, truth: torch.Tensor, *,
                            factor: float = 2.0, floor: float | None = None, name: str = "output") -> None:
    """flash-attn's rule: max|actual - truth| <= factor * max|ref - truth| + floor."""
    ours = (actual.double() - truth.double()).abs().max().item() if actual.numel() else 0.0
    theirs = (ref_same_dtype.double() - truth.double()).abs().max().item() if actual.numel() else 0.0
    if floor is None:
        floor = TOLERANCES.get(actual.dtype, (0.0, 1e-6))[1] * 1e-2
    assert ours == ours, f"{name}: NaN in result"
    assert ours <= factor * theirs + floor, (
        f"{name}: max error {ours:.3e} > {factor} x reference error {theirs:.3e} + {floor:.1e}"
    )


def run_opcheck(op, args: tuple, kwargs: dict | None = None) -> None:
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch); raises on failure."""
    results = torch.library.opcheck(op, args, kwargs or {})
    failed = {k: v for k, v in results.items() if v != "SUCCESS"}
    assert not failed, f"opcheck failed for {op}: {failed}"
