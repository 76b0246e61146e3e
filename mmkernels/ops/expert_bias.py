"""Expert-bias update (the PID-controlled balancer of docs/design/longcat_moe.md): one op through every layer.

Layers (the reference and one fused kernel per device class, kept where a measurement shows it pays):
- kernels: ``csrc/cpu/expert_bias.cpp`` (cpp, CPU tensors: 3-10x faster than the reference on CPU,
  docs/ops/expert_bias.md), ``kernels/triton/expert_bias.py`` (triton, CUDA tensors; tested bit for bit against cpp
  and the reference on CPU under the interpreter), ``kernels/reference/expert_bias.py`` (reference, any device);
- registered ops: ``torch.ops.mmkernels.expert_bias_update_`` (the C++ CPU impl from ``mmkernels._C``) and
  ``torch.ops.mmkernels.expert_bias_update_fwd_triton_`` (a ``triton_op``), both mutating ``bias`` and ``state``;
- the validated public function :func:`expert_bias_update_` below;
- the module ``mmkernels.nn.ExpertBiasController``.

No gradient: the bias is a controller state, not a trained parameter.
"""

from __future__ import annotations

import torch

from .._backends import OpBackends, triton_available
from ..kernels.reference.expert_bias import expert_bias_update_reference
from . import _validate as v
from ._library import define

__all__ = ["expert_bias_update_"]

OP = "expert_bias_update_"
# The schema names the update rule `rule` (the public keyword is `mode`): opcheck's dispatch-mode machinery
# reserves an argument called `mode`.
MODES = ("pid", "sign")

_ARGS = (
    "int num_ffn_experts, int top_k, float target_ffn_per_token, float kp, float ki, float kd, str rule, "
    "float? max_abs"
)
NATIVE = define(f"expert_bias_update_(Tensor(a!) bias, Tensor counts, Tensor(b!) state, {_ARGS}) -> ()")


@torch.library.register_fake(NATIVE)
def _native_fake(bias, counts, state, num_ffn_experts, top_k, target_ffn_per_token, kp, ki, kd, rule, max_abs):
    return None


EXPERT_BIAS_BACKENDS = OpBackends(OP, auto_order={"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")})


INT64_MAX = 2**63 - 1


def check_non_negative_counts(op: str, counts: torch.Tensor) -> None:
    """The value rule for ``counts``, the same on every backend, checked without a host sync.

    - Selection counts are histograms: a negative entry means the caller passed something else (e.g. a difference of
      counts): ``counts must be >= 0``.
    - The kernels sum the counts in int64 (and the sign rule multiplies one count by ``N``): an int64 count above
      ``INT64_MAX // numel`` could wrap that sum around, giving a nonsense bias or none. Such a count (far past any
      real batch: 2**63 / 1024 experts is ~9e15 selections) is an error: ``counts must be <= ...``. int32 counts
      never reach the limit.

    ``torch._assert_async`` checks without a host sync: on CPU it raises ``RuntimeError`` at once; on CUDA it is a
    device-side assertion that fails the next synchronising call."""
    if not counts.numel():
        return
    torch._assert_async(counts.min() >= 0, f"{op}: counts must be >= 0 (selections per expert)")
    if counts.dtype == torch.int64:  # int32 values stay below the cap (numel < 2**32)
        cap = INT64_MAX // counts.numel()
        torch._assert_async(counts.max() <= cap, f"{op}: counts must be <= {cap} (INT64_MAX // {counts.numel()} "
                            "experts) so that their sum fits in int64 (it would wrap around)")


# The counts rule is the same on every backend: each checks with torch._assert_async (no host sync) before it
# writes anything (the C++ kernel also checks negatives itself while it sums them).
@EXPERT_BIAS_BACKENDS.register("cpp", batch_invariant=True)  # integer counts: exact
def _cpp(bias, counts, *args) -> None:
    check_non_negative_counts(OP, counts)
    torch.ops.mmkernels.expert_bias_update_(bias, counts, *args)


@EXPERT_BIAS_BACKENDS.register("reference", batch_invariant=True)
def _reference(bias, counts, *args) -> None:
    check_non_negative_counts(OP, counts)
    expert_bias_update_reference(bias, counts, *args)

if triton_available():
    from ..kernels.triton.expert_bias import expert_bias_update_triton
    from ._triton_op import triton_op

    # The launcher is the op: its signature (without `launch`) is the schema, the native op's.
    triton_op("mmkernels::expert_bias_update_fwd_triton_", expert_bias_update_triton, mutates_args={"bias", "state"},
              fake=_native_fake)

    @EXPERT_BIAS_BACKENDS.register("triton", batch_invariant=True)
    def _triton(*args) -> None:
        check_non_negative_counts(OP, args[1])
        torch.ops.mmkernels.expert_bias_update_fwd_triton_(*args)


def expert_bias_update_(
    bias: torch.Tensor,
    counts: torch.Tensor,
    state: torch.Tensor,
    *,
    num_ffn_experts: int,
    top_k: int,
    target_ffn_per_token: float,
    kp: float = 0.0,
    ki: float = 1e-3,
    kd: float = 0.0,
    mode: str = "pid",
    max_abs: float | None = None,
    backend: str | None = None,
) -> None:
    """Update the router's expert bias in place from one step's selection counts. No host synchronisation.

    For FFN experts ``i < N`` (``N = num_ffn_experts``), with ``T_i = counts[i]`` and ``K * T_all = counts.sum()``:

    - ``mode="pid"`` (LongCat-Flash): ``e_i = K_e / (K N) - T_i / (K T_all)`` and
      ``bias_i += ki e_t + kp (e_t - e_{t-1}) + kd (e_t - 2 e_{t-1} + e_{t-2})``; ``state`` holds
      ``[e_{t-1}, e_{t-2}]`` and is advanced in place. ``kp = kd = 0`` is the published pure-integral rule.
    - ``mode="sign"`` (DeepSeek-V3): ``bias_i += ki * sign(mean_j T_j - T_i)`` over FFN experts, i.e. exactly
      ``+ki``, ``-ki`` or unchanged; ``state`` is not used.

    Zero-expert biases (``i >= N``) are never written. ``max_abs`` clamps the FFN biases to ``[-max_abs, max_abs]``
    after the step (anti-windup). A step whose counts are all zero changes nothing.

    Every backend computes in float32 in the order of ``csrc/expert_bias.h``: on CPU cpp, triton and reference agree
    bit for bit (signed zeros included; NaN at the same places, its sign/payload may differ); on a GPU the Triton
    kernel runs with FMA contraction off, so the same order holds by construction (docs/ops/expert_bias.md).

    Args:
        bias: float32 ``[N+Z]``, contiguous, updated in place.
        counts: int32 or int64 ``[N+Z]``: selections per expert over the (global) batch.
        state: float32 ``[2, N]``, contiguous, updated in place (zeros at the start of training).
        num_ffn_experts: N.
        top_k: K, experts chosen per token (FFN and zero slots together).
        target_ffn_per_token: K_e, the wanted mean number of FFN experts per token (0 <= K_e <= K).
        kp, ki, kd: gains, Python numbers (``ki`` is gamma in sign mode), finite as float32 (``|g| <= FLT_MAX``).
        mode: ``"pid"`` or ``"sign"``.
        max_abs: optional clamp on ``|bias_i|`` for FFN experts, ``0 <= max_abs <= FLT_MAX``.
        backend: ``None`` (auto), ``"cpp"`` (CPU), ``"triton"`` (CUDA) or ``"reference"``.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes, devices, or arguments out of range (naming the argument);
            ``bias`` or ``state`` sharing memory with another argument (both are updated in place).
        RuntimeError: a negative count, or an int64 count above ``INT64_MAX // counts.numel()`` (their int64 sum
            could wrap around; a documented limit, far past any real batch): on CPU at once; on CUDA a device-side
            assertion, checked without a host sync, that fails the next synchronising call.
    """
    v.tensor("bias", bias, dtypes=(torch.float32,), dim=1, contiguous=True, op=OP)
    v.tensor("counts", counts, dtypes=(torch.int32, torch.int64), dim=1, op=OP)
    v.tensor("state", state, dtypes=(torch.float32,), dim=2, contiguous=True, op=OP)
    device = v.same_device(OP, bias=bias, counts=counts, state=state)
    v.no_overlap(OP, ("bias", "state"), bias=bias, counts=counts, state=state)
    n_total = bias.numel()
    if counts.numel() != n_total:
        raise ValueError(f"{OP}: counts must have one entry per expert like bias ({n_total}), got {counts.numel()}")
    n = v.integer("num_ffn_experts", num_ffn_experts, op=OP, low=1, high=n_total)
    if tuple(state.shape) != (2, n):
        raise ValueError(f"{OP}: state must have shape (2, num_ffn_experts) = (2, {n}), got {tuple(state.shape)}")
    k = v.integer("top_k", top_k, op=OP, low=1, high=n_total)
    target = v.real("target_ffn_per_token", target_ffn_per_token, op=OP, low=0.0, high=float(k))
    gains = [v.real(name, g, op=OP, float32=True) for name, g in (("kp", kp), ("ki", ki), ("kd", kd))]
    v.choice("mode", mode, MODES, op=OP)
    if max_abs is not None:
        max_abs = v.real("max_abs", max_abs, op=OP, low=0.0, float32=True)
    counts = counts.contiguous()
    _, impl = EXPERT_BIAS_BACKENDS.select(device, backend)
    impl(bias, counts, state, n, k, target, *gains, mode, max_abs)
