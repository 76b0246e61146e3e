"""Test helpers shared by the test suite, the benchmarks and contributors' own tests.

- ``TOLERANCES``: the one tolerance table, by dtype (relative/absolute).
- ``assert_close``: compare with the table's tolerance for the *input* dtype.
- ``assert_within_ref_error``: the flash-attn rule for attention-like ops (error <= factor x the error of the
  same-dtype PyTorch reference, both measured against a float64/fp32 truth, plus :func:`ref_error_floor`);
  ``assert_all_within_ref_error`` applies it to an op's output and every gradient at once. Every attention-like
  test (attention dense/varlen/packed, Q-Former, the valid-region sweep) goes through these two.
- ``run_opcheck``: ``torch.library.opcheck`` with the standard tests.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "HostSyncs", "assert_all_within_ref_error", "assert_close", "assert_within_ref_error",
           "count_host_syncs", "ref_error_floor", "rel_error", "run_opcheck", "tolerance"]

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


def ref_error_floor(truth: torch.Tensor, *, logits: float = 1.0, ulps: float = 4.0,
                    dtype: torch.dtype | None = None) -> float:
    """The absolute floor of the 2x rule: ``ulps`` fp32 ulps of ``max(1, max|truth|) * max(1, logits)``, plus (with
    ``dtype``, the result's dtype) twice the error of rounding the truth to ``dtype`` (flash-attn 3's floor: no
    kernel can beat storing the exact answer in its output dtype).

    The kernels accumulate in fp32 and recompute the probabilities from the saved log-sum-exp (FlashAttention-2):
    ``p = exp(s - lse)`` carries the absolute rounding of ``s`` and ``lse``, a few fp32 ulps of the largest
    ``|logit|`` (``logits``: ``max |softmax_scale * q . k|`` of the problem), which the reference's softmax does not
    (a one-hot row is exactly 1 there). Where the same-dtype reference is exact by construction (one key: dq = dk
    = 0, dv = dO) the rule alone would demand bit-exactness. With ordinary logits the floor is a few fp32 ulps, far
    below any fp16 reference's error; at ``|logit| ~ 1e4`` it is the fp32 resolution of such scores."""
    if not truth.numel():
        return 0.0
    t = truth.detach()
    floor = ulps * torch.finfo(torch.float32).eps * max(1.0, t.abs().max().item()) * max(1.0, float(logits))
    if dtype is not None and dtype != t.dtype:
        finite = torch.isfinite(t)
        rounded = torch.where(finite, t, 0.0)
        floor += 2 * (rounded.to(dtype).to(t.dtype) - rounded).abs().max().item()
    return floor


def assert_within_ref_error(actual: torch.Tensor, ref_same_dtype: torch.Tensor, truth: torch.Tensor, *,
                            factor: float = 2.0, floor: float | None = None, logits: float = 1.0,
                            name: str = "output") -> None:
    """flash-attn's rule: ``max|actual - truth| <= factor * max|ref - truth| + floor``.

    ``truth`` is the op computed in float64 (or fp32 for bf16/fp16 inputs), ``ref_same_dtype`` PyTorch's reference
    in the inputs' dtype. ``floor`` defaults to :func:`ref_error_floor` of the truth (and ``logits``). A NaN or inf
    in ``actual`` where the truth is finite fails (a non-finite reference error would otherwise allow anything)."""
    assert tuple(actual.shape) == tuple(truth.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    if not actual.numel():
        return
    a, t = actual.detach().double(), truth.detach().double()
    bad = ~torch.isfinite(a) & torch.isfinite(t)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the float64 truth is finite"
    ours = (a - t).abs().nan_to_num(nan=0.0).max().item()  # NaN only where the truth itself is NaN
    theirs = (ref_same_dtype.detach().double() - t).abs().nan_to_num(nan=float("inf")).max().item()
    if floor is None:
        floor = ref_error_floor(truth, logits=logits, dtype=actual.dtype)
    assert ours <= factor * theirs + floor, (
        f"{name}: max error {ours:.3e} > {factor} x reference error {theirs:.3e} + {floor:.1e}"
    )


def assert_all_within_ref_error(actual, ref_same_dtype, truth, *, names=("out", "dq", "dk", "dv"),
                                factor: float = 2.0, floor: float | None = None, logits: float = 1.0,
                                prefix: str = "") -> None:
    """:func:`assert_within_ref_error` on each of several results (an op's output and its gradients, in the order
    of ``names``), each with its own default floor."""
    actual, ref_same_dtype, truth = list(actual), list(ref_same_dtype), list(truth)
    assert len(actual) == len(ref_same_dtype) == len(truth) == len(names), "one result per name"
    for name, a, r, t in zip(names, actual, ref_same_dtype, truth, strict=True):
        assert_within_ref_error(a, r, t, factor=factor, floor=floor, logits=logits, name=f"{prefix}{name}")


def run_opcheck(op, args: tuple, kwargs: dict | None = None) -> None:
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch); raises on failure."""
    results = torch.library.opcheck(op, args, kwargs or {})
    failed = {k: v for k, v in results.items() if v != "SUCCESS"}
    assert not failed, f"opcheck failed for {op}: {failed}"


# ---- host-sync counting ---------------------------------------------------------------------------------------------

# Tensor methods and torch functions whose result needs the tensor's values on the host: on CUDA each one waits for
# the device (torch.cuda.set_sync_debug_mode flags most of them). Counted at the Python level, so the count is the
# same on CPU, under Triton's interpreter, as on a GPU: the sync budget tests run on the Triton path without a card.
_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
                 "unique", "masked_select")
_SYNC_FUNCTIONS = ("nonzero", "unique", "masked_select", "equal", "argwhere")


class HostSyncs:
    """What :func:`count_host_syncs` saw: ``count`` and, per call, ``"<function> at <file>:<line>"``."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __repr__(self) -> str:
        return f"HostSyncs({self.count}: {self.calls})"


def _caller(skip_prefixes: tuple[str, ...]) -> str | None:
    """``file:line`` of the first frame outside this module, or None when that frame is in a skipped package."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    if frame is None:
        return "?"
    module = frame.f_globals.get("__name__", "") or ""
    if module.startswith(skip_prefixes):
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class count_host_syncs:  # noqa: N801 - used as a context manager, like torch's lower-case ones
    """Count the calls that read tensor values on the host (``item``, ``tolist``, ``bool(t)``, ``int(t)``,
    ``nonzero``, ``unique``, ``masked_select``, ``torch.equal``, ``.cpu()``, ``.numpy()``, boolean-mask indexing)
    made inside the ``with`` block, by anyone but Triton's interpreter (its launch reads arguments on the host by
    design; on a GPU that is the kernel launch itself)::

        with count_host_syncs() as syncs:
            attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=16, max_seqlen_k=16)
        assert syncs.count == 0, syncs.calls

    A tensor that lives on the host on purpose (a CPU tensor of split sizes under the gloo backend) still counts:
    the budget is about the code path, which on CUDA would wait. Not thread-safe; not for use under torch.compile.
    """

    def __init__(self, *, skip: tuple[str, ...] = ("triton",)) -> None:
        self.skip = tuple(skip)
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> HostSyncs:
        found = HostSyncs()
        skip = self.skip
        inside: list[str] = []  # the counted call in progress (its nested re-entry is not a second read)

        def wrap(owner, name):
            original = getattr(owner, name, None)
            if original is None:
                return

            def counted(*args, **kwargs):
                if inside:  # the same call seen again through the TorchFunctionMode below: counted once
                    return original(*args, **kwargs)
                where = _caller(skip)
                if where is not None:
                    found.calls.append(f"{name} at {where}")
                inside.append(name)
                try:
                    return original(*args, **kwargs)
                finally:
                    inside.pop()

            self._saved.append((owner, name, original))
            setattr(owner, name, counted)

        for name in _SYNC_METHODS:
            wrap(torch.Tensor, name)
        for name in _SYNC_FUNCTIONS:
            wrap(torch, name)
        # Boolean-mask indexing is seen through a TorchFunctionMode, not by replacing ``Tensor.__getitem__``: a Python
        # ``__getitem__`` on the class makes torch.tensor([0-d tensors]) treat each element as a sequence and fail.
        self._mode = _BoolIndexMode(found, skip)
        self._mode.__enter__()
        return found

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)


class _BoolIndexMode(torch.overrides.TorchFunctionMode):
    """Records ``t[mask]`` with a boolean ``mask`` (a host sync: the result's size is the mask's count)."""

    def __init__(self, found: HostSyncs, skip: tuple[str, ...]) -> None:
        super().__init__()
        self.found, self.skip = found, skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            index = args[1]
            items = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                where = _caller(self.skip)
                if where is not None:
                    self.found.calls.append(f"boolean-mask index at {where}")
        return func(*args, **(kwargs or {}))
