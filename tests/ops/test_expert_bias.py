"""mmkernels.ops.expert_bias_update_: every backend against a float64 oracle, exactness rules, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmkernels
from mmkernels import BackendError
from mmkernels.ops import expert_bias_update_
from mmkernels.ops.expert_bias import EXPERT_BIAS_BACKENDS
from mmkernels.testing import assert_close, run_opcheck

CPU = torch.device("cpu")


# The central sweeps' valid calls (tests/op_samples.py collects them): SAMPLES, every argument by name, for
# tests/test_argument_sweep.py; USAGE_SAMPLES, (function, args, kwargs), for tests/test_usage_sweeps.py.
def _usage_update(r):
    def update(**kwargs):  # in place: fresh bias and state on every call
        bias, state = torch.zeros(12), torch.zeros(2, 8)
        counts = torch.tensor([9, 1, 0, 4, 7, 2, 2, 5, 3, 0, 1, 2], dtype=torch.int32)
        expert_bias_update_(bias, counts, state, num_ffn_experts=8, top_k=3, target_ffn_per_token=2.0, kp=0.1,
                            ki=0.3, **kwargs)
        return bias, state
    return update, (), {}


SAMPLES = {
    "expert_bias_update_": lambda r: dict(
        bias=torch.zeros(12), counts=torch.tensor([9, 1, 0, 4, 7, 2, 2, 5, 3, 0, 1, 2], dtype=torch.int32),
        state=torch.zeros(2, 8), num_ffn_experts=8, top_k=3, target_ffn_per_token=2.0, kp=0.1, ki=0.3, kd=0.01,
        mode="pid", max_abs=0.5),
}
USAGE_SAMPLES = {"expert_bias_update_": _usage_update}

CPU_BACKENDS = EXPERT_BIAS_BACKENDS.available(CPU)  # cpp (when _C is built), triton (interpreter), reference

# (N FFN experts, Z zero experts, K): one expert, odd sizes, the LongCat presets, more experts than one block.
SHAPES = [(1, 0, 1), (7, 3, 2), (256, 128, 12), (512, 256, 12), (1000, 37, 16), (3001, 1, 4)]


def oracle(bias, counts, state, n, k, target_ffn_per_token, kp=0.0, ki=1e-3, kd=0.0, mode="pid", max_abs=None):
    """The rule of docs/design/longcat_moe.md in float64 NumPy, written independently of every backend."""
    b = bias.double().numpy().copy()
    s = state.double().numpy().copy()
    c = counts.numpy().astype(np.int64)
    total = c.sum()
    if total == 0:
        return torch.from_numpy(b), torch.from_numpy(s)
    if mode == "sign":
        b[:n] += ki * np.sign(c[:n].mean() - c[:n])
    else:
        e = target_ffn_per_token / (k * n) - c[:n] / total
        b[:n] += ki * e + kp * (e - s[0]) + kd * (e - 2 * s[0] + s[1])
        s = np.stack([e, s[0]])
    if max_abs is not None:
        b[:n] = np.clip(b[:n], -max_abs, max_abs)
    return torch.from_numpy(b), torch.from_numpy(s)


def make_inputs(n, z, k, *, count_dtype=torch.int32, tokens=333, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n + z, generator=g) * 2
    ids = torch.multinomial(torch.softmax(logits, 0), tokens * k, replacement=True, generator=g)
    counts = torch.bincount(ids, minlength=n + z).to(count_dtype)
    bias = torch.randn(n + z, generator=g) * 1e-3
    state = torch.randn(2, n, generator=g) * 1e-4
    return bias, counts, state


def run(backend, bias, counts, state, n, k, **kw):
    expert_bias_update_(bias, counts, state, num_ffn_experts=n, top_k=k, backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,z,k", SHAPES)
@pytest.mark.parametrize("mode", ["pid", "sign"])
@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64])
def test_matches_oracle(backend, n, z, k, mode, count_dtype):
    bias, counts, state = make_inputs(n, z, k, count_dtype=count_dtype)
    kw = dict(target_ffn_per_token=min(k, 0.7 * k), kp=0.3, ki=0.05, kd=0.02, mode=mode, max_abs=None)
    want_b, want_s = oracle(bias, counts, state, n, k, **kw)
    zero_before = bias[n:].clone()
    run(backend, bias, counts, state, n, k, **kw)
    assert torch.equal(bias[n:], zero_before), "zero-expert biases must be bit-identical"
    assert_close(bias, want_b, torch.float32)
    if mode == "pid":
        assert_close(state, want_s, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_several_steps_advance_state(backend):
    n, z, k = 97, 31, 6
    bias, _, state = make_inputs(n, z, k)
    want_b, want_s = bias.double(), state.double()
    kw = dict(target_ffn_per_token=4.0, kp=0.2, ki=0.1, kd=0.05, mode="pid", max_abs=None)
    for step in range(4):
        _, counts, _ = make_inputs(n, z, k, seed=step + 1)
        want_b, want_s = oracle(want_b, counts, want_s, n, k, **kw)
        run(backend, bias, counts, state, n, k, **kw)
    assert_close(bias, want_b, torch.float32)
    assert_close(state, want_s, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clamp(backend):
    n, z, k = 50, 10, 4
    bias, counts, state = make_inputs(n, z, k)
    bias[n:] = 5.0  # zero-expert biases are outside the clamp range and must stay there
    kw = dict(target_ffn_per_token=3.0, kp=0.0, ki=10.0, kd=0.0, mode="pid", max_abs=0.01)
    want_b, _ = oracle(bias, counts, state, n, k, **kw)
    run(backend, bias, counts, state, n, k, **kw)
    assert bias[:n].abs().max() <= 0.01
    assert (bias[:n].abs() == 0.01).any(), "the gains were chosen so that some biases hit the clamp"
    assert torch.equal(bias[n:], torch.full((z,), 5.0))
    assert_close(bias, want_b, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sign_mode_steps_exactly_gamma(backend):
    n, z, k, gamma = 300, 100, 8, 1e-3
    bias, counts, state = make_inputs(n, z, k, tokens=50)
    counts[:3] = int(counts[:n].sum()) // n  # some experts at the mean (mean may be fractional: then none tie)
    before = bias.clone()
    state_before = state.clone()
    run(backend, bias, counts, state, n, k, target_ffn_per_token=6.0, ki=gamma, mode="sign")
    g = torch.tensor(gamma, dtype=torch.float32)
    diff = counts[:n].sum().long() - n * counts[:n].long()
    expected = torch.where(diff > 0, before[:n] + g, torch.where(diff < 0, before[:n] - g, before[:n]))
    assert torch.equal(bias[:n], expected), "each FFN bias moves by exactly +gamma, -gamma or 0"
    assert torch.equal(bias[n:], before[n:])
    assert torch.equal(state, state_before), "sign mode does not use the PID state"


def test_sign_mode_ties_leave_bias_unchanged():
    n = 8
    counts = torch.tensor([5] * n + [3], dtype=torch.int32)
    for backend in CPU_BACKENDS:
        bias = torch.zeros(n + 1)
        run(backend, bias, counts, torch.zeros(2, n), n, 2, target_ffn_per_token=1.0, ki=1e-3, mode="sign")
        assert torch.equal(bias, torch.zeros(n + 1)), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["pid", "sign"])
def test_empty_batch_changes_nothing(backend, mode):
    n, z, k = 20, 5, 3
    bias, _, state = make_inputs(n, z, k)
    b0, s0 = bias.clone(), state.clone()
    run(backend, bias, torch.zeros(n + z, dtype=torch.int32), state, n, k, target_ffn_per_token=2.0, ki=0.1,
        kp=0.1, mode=mode, max_abs=1e-6)
    assert torch.equal(bias, b0) and torch.equal(state, s0)


def test_backends_agree_bitwise_on_cpu():
    """cpp, triton (interpreter) and reference follow one float32 order; on CPU they agree exactly."""
    n, z, k = 513, 255, 12
    results = []
    for backend in CPU_BACKENDS:
        bias, counts, state = make_inputs(n, z, k, seed=3)
        run(backend, bias, counts, state, n, k, target_ffn_per_token=8.0, kp=0.1, ki=0.3, kd=0.01, max_abs=0.05)
        results.append((backend, bias, state))
    for backend, bias, state in results[1:]:
        assert torch.equal(bias, results[0][1]) and torch.equal(state, results[0][2]), (backend, results[0][0])


def test_auto_backend_on_cpu(no_backend_env):
    name, _ = EXPERT_BIAS_BACKENDS.select(CPU)
    assert name == ("cpp" if mmkernels.extension_status().loaded else "reference")


def _opcheck_args(n=37, z=11, k=5):
    bias, counts, state = make_inputs(n, z, k)
    return (bias, counts, state, n, k, 3.0, 0.1, 0.2, 0.0, "pid", 0.5)


@pytest.mark.skipif(not mmkernels.extension_status().loaded, reason="compiled extension not built")
def test_opcheck_native():
    run_opcheck(torch.ops.mmkernels.expert_bias_update_.default, _opcheck_args())


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not available on CPU here")
def test_opcheck_triton():
    run_opcheck(torch.ops.mmkernels.expert_bias_update_fwd_triton_.default, _opcheck_args())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiles_fullgraph(backend):
    n, z, k = 40, 8, 4
    bias, counts, state = make_inputs(n, z, k)
    b_ref, s_ref = bias.clone(), state.clone()

    def step(b, c, s):
        expert_bias_update_(b, c, s, num_ffn_experts=n, top_k=k, target_ffn_per_token=3.0, kp=0.1, ki=0.2,
                            backend=backend)

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(bias, counts, state)
    step(b_ref, counts, s_ref)
    assert torch.equal(bias, b_ref) and torch.equal(state, s_ref)


# ---- bad input ---------------------------------------------------------------------------------------------------

def _good():
    n, z, k = 16, 4, 4
    bias, counts, state = make_inputs(n, z, k)
    return dict(bias=bias, counts=counts, state=state), dict(num_ffn_experts=n, top_k=k, target_ffn_per_token=3.0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda t, a: t.update(bias=t["bias"].half()), TypeError, "bias must be float32"),
        (lambda t, a: t.update(bias=t["bias"].view(4, 5)), ValueError, "bias must have 1 dimension"),
        (lambda t, a: t.update(bias=torch.zeros(40)[::2]), ValueError, "bias must be contiguous"),
        (lambda t, a: t.update(counts=t["counts"].float()), TypeError, "counts must be int32 or int64"),
        (lambda t, a: t.update(counts=t["counts"][:-1]), ValueError, "one entry per expert"),
        (lambda t, a: t.update(state=torch.zeros(2, 15)), ValueError, r"state must have shape \(2, num_ffn_experts\)"),
        (lambda t, a: t.update(state=torch.zeros(2, 16, dtype=torch.float64)), TypeError, "state must be float32"),
        (lambda t, a: t.update(counts=t["counts"].to("meta")), ValueError, "one device"),
        (lambda t, a: a.update(num_ffn_experts=21), ValueError, "num_ffn_experts must be in"),
        (lambda t, a: a.update(num_ffn_experts=0), ValueError, "num_ffn_experts must be in"),
        (lambda t, a: a.update(top_k=0), ValueError, "top_k must be in"),
        (lambda t, a: a.update(top_k=2.0), TypeError, "top_k must be an int"),
        (lambda t, a: a.update(target_ffn_per_token=5.0), ValueError, "target_ffn_per_token must be in"),
        (lambda t, a: a.update(ki=torch.tensor(0.1)), TypeError, "ki must be a Python number"),
        (lambda t, a: a.update(kp=float("nan")), ValueError, "kp must be finite"),
        (lambda t, a: a.update(mode="integral"), ValueError, "mode must be one of"),
        (lambda t, a: a.update(max_abs=-1.0), ValueError, "max_abs must be in"),
    ],
)
def test_bad_input(change, error, match):
    tensors, args = _good()
    change(tensors, args)
    with pytest.raises(error, match=match):
        expert_bias_update_(**tensors, **args)


def test_explicit_unavailable_backend_raises(monkeypatch):
    tensors, args = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton then runs on CUDA tensors only
    with pytest.raises(BackendError, match="'triton' cannot run: .*needs CUDA tensors"):
        expert_bias_update_(**tensors, **args, backend="triton")
    for name in ("flash", "cuda"):  # one fused kernel per device class: triton on CUDA, cpp on CPU
        with pytest.raises(BackendError, match=f"'{name}' is not implemented"):
            expert_bias_update_(**tensors, **args, backend=name)


def test_one_fused_kernel_per_device_class():
    """The reference plus one fused kernel per device class (docs/ops/expert_bias.md has the measurement): cpp on CPU,
    triton on CUDA; auto takes them first."""
    from mmkernels._backends import triton_available

    assert sorted(EXPERT_BIAS_BACKENDS.impls) == ["cpp", "reference", *(["triton"] if triton_available() else [])]
    assert EXPERT_BIAS_BACKENDS.auto_order == {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}


@pytest.mark.skipif(not mmkernels.extension_status().loaded, reason="compiled extension not built")
def test_native_op_checks_its_arguments():
    """Direct torch.ops calls skip the Python validation; the C++ checks still refuse bad tensors."""
    tensors, _ = _good()
    with pytest.raises(RuntimeError, match="state must be a contiguous float32 tensor"):
        torch.ops.mmkernels.expert_bias_update_(tensors["bias"], tensors["counts"], torch.zeros(2, 3), 16, 4, 3.0,
                                                0.0, 0.1, 0.0, "pid", None)


@pytest.mark.gpu
@pytest.mark.parametrize("n,z,k", SHAPES)
@pytest.mark.parametrize("mode", ["pid", "sign"])
def test_gpu_backends_match_oracle(n, z, k, mode):
    dev = torch.device("cuda")
    bias, counts, state = make_inputs(n, z, k)
    kw = dict(target_ffn_per_token=0.7 * k, kp=0.3, ki=0.05, kd=0.02, mode=mode, max_abs=0.1)
    want_b, want_s = oracle(bias, counts, state, n, k, **kw)
    for backend in EXPERT_BIAS_BACKENDS.available(dev):
        b, c, s = bias.to(dev), counts.to(dev), state.to(dev)
        run(backend, b, c, s, n, k, **kw)
        assert torch.equal(b[n:].cpu(), bias[n:]), backend
        assert_close(b.cpu(), want_b, torch.float32, msg=backend)
        if mode == "pid":
            assert_close(s.cpu(), want_s, torch.float32, msg=backend)


# ---- every backend agrees on edge inputs (finding 11) ----------------------------------------------------------------

F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).smallest_normal)


def _edge_cases():
    """(name, counts, bias, state, kwargs): zero T_all, huge int64 counts (float32 rounding of T_i / T_all), clamps at
    0 / a subnormal / FLT_MAX, subnormal and near-FLT_MAX gains (products overflow to inf, inf - inf = NaN), NaN and
    inf already in bias and state, sign mode. Values the kernels take as float32 stay within float32's range (larger
    ones are an error, ``test_values_beyond_float32_are_an_error``)."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for i in range(36):
        n, z = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g))
        k = int(torch.randint(1, n + z + 1, (1,), generator=g))
        counts = [torch.zeros(n + z, dtype=torch.int32),
                  torch.randint(0, 2**40, (n + z,), generator=g, dtype=torch.int64),
                  torch.randint(0, 1000, (n + z,), generator=g, dtype=torch.int32),
                  torch.full((n + z,), 7, dtype=torch.int32)][i % 4]
        scale = 10.0 ** float(torch.randint(-42, 4, (1,), generator=g))
        bias = torch.randn(n + z, generator=g) * scale
        state = torch.randn(2, n, generator=g) * scale
        if i % 5 == 0:
            bias[0], bias[-1], state[0, -1] = float("nan"), float("-inf"), float("inf")
        gains = [0.0, 1e-3, 1e-45, 1e-40, F32_TINY, 3e38, F32_MAX, 0.1, 1 / 3, 7.0]
        kp, ki, kd = (gains[int(j)] for j in torch.randint(0, len(gains), (3,), generator=g))
        kw = dict(num_ffn_experts=n, top_k=k, target_ffn_per_token=float(torch.rand(1, generator=g)) * k, kp=kp,
                  ki=ki, kd=kd, mode=("pid", "sign")[i % 2], max_abs=(None, 0.0, 1e-45, 1e-3, F32_MAX, 0.1)[i % 6])
        cases.append((f"case{i}", counts, bias, state, kw))
    return cases


_SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38, float("nan"), float("inf"), -float("inf"), 1.0,
            -2.5, 1e-7]


def test_backends_agree_on_special_values_nan_positions_included():
    """A new-user fuzz (150 cases of special values in bias and state, both modes, saturating gains): every backend
    agrees bit for bit except a NaN's sign/payload (a NaN bias plus a NaN update term: which one propagates is each
    backend's operand order; 2 of 150 cases differ there), and NaN appears at the same places."""
    n, z, k = 5, 3, 3
    gains = [0.0, 1e-45, 1e-3, 0.3, 3.4e38, 1.0]
    for trial in range(150):
        g = torch.Generator().manual_seed(trial)
        bias, state = (torch.tensor([_SPECIAL[i] for i in torch.randint(0, len(_SPECIAL), (count,), generator=g)])
                       for count in (n + z, 2 * n))
        state = state.view(2, n)
        dtype = (torch.int32, torch.int64)[trial % 4 // 2]
        counts = torch.randint(0, 2**40 if dtype == torch.int64 and trial % 5 == 0 else 50, (n + z,), generator=g,
                               dtype=dtype)
        kw = dict(num_ffn_experts=n, top_k=k, target_ffn_per_token=(0.0, 1.0, 2.0, 3.0, 2.5)[trial % 5],
                  kp=gains[trial % 6], ki=gains[trial // 6 % 6], kd=gains[trial // 2 % 6],
                  mode=("pid", "sign")[trial % 2], max_abs=(None, 0.0, 1e-45, 3.4e38, 0.01)[trial % 5])
        results = _update_on_every_backend(bias, counts, state, CPU, **kw)
        want_b, want_s = results["reference"]
        for backend, (b, st) in results.items():
            assert _same_bits_but_nan_payload(b, want_b), (trial, backend, b, want_b)
            assert _same_bits_but_nan_payload(st, want_s), (trial, backend, st, want_s)


def _update_on_every_backend(bias0, counts, state0, device, **kw) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """backend -> (bias, state) on CPU after one update of copies of ``bias0``/``state0`` on ``device``, for every
    backend available there."""
    results = {}
    for backend in EXPERT_BIAS_BACKENDS.available(device):
        bias, state = bias0.to(device, copy=True), state0.to(device, copy=True)
        expert_bias_update_(bias, counts.to(device), state, backend=backend, **kw)
        results[backend] = (bias.cpu(), state.cpu())
    return results


def _same_bits_but_nan_payload(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The documented CPU rule: NaN exactly where the reference has NaN (its sign and payload may differ: which
    operand's NaN propagates is each backend's operand order), every other value bit for bit (signed zeros,
    subnormals, infinities)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


EDGE_CASES = _edge_cases()


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c[0])
def test_backends_agree_bitwise_on_edge_inputs(case):
    """cpp, triton (interpreter) and reference give the same bits, signed zeros included, on every edge input, and
    NaN at the same places (a NaN's sign/payload may differ); the reference is the rule; the float64 oracle checks
    the finite results."""
    _, counts, bias0, state0, kw = case
    results = _update_on_every_backend(bias0, counts, state0, CPU, **kw)
    want_b, want_s = results["reference"]
    for backend, (b, s) in results.items():
        assert _same_bits_but_nan_payload(b, want_b), (backend, b, want_b)
        assert _same_bits_but_nan_payload(s, want_s), (backend, s, want_s)
    n = kw["num_ffn_experts"]
    assert torch.equal(want_b[n:].view(torch.int32), bias0[n:].view(torch.int32))  # zero experts never written
    oracle_b, _ = oracle(bias0, counts, state0, n, kw["top_k"], kw["target_ffn_per_token"], kw["kp"], kw["ki"],
                         kw["kd"], kw["mode"], kw["max_abs"])
    finite = torch.isfinite(want_b) & torch.isfinite(oracle_b) & (oracle_b.abs() < 1e30)
    torch.testing.assert_close(want_b[finite].double(), oracle_b[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arg", ["kp", "ki", "kd", "max_abs"])
def test_values_beyond_float32_are_an_error(backend, arg):
    """A gain or clamp past float32's range: C++ and Triton would read inf, PyTorch would raise its own overflow
    error; every backend refuses it up front, naming the argument. FLT_MAX itself is accepted everywhere."""
    tensors, args = _good()
    for bad in (1e39, -1e39, 1e300):
        if arg == "max_abs" and bad < 0:
            continue
        with pytest.raises(ValueError, match=f"{arg} must be finite as a float32"):
            expert_bias_update_(**tensors, **args, **{arg: bad}, backend=backend)
    expert_bias_update_(**tensors, **args, **{arg: F32_MAX}, backend=backend)


@pytest.mark.parametrize("arg", ["kp", "ki", "kd", "max_abs"])
def test_controller_refuses_values_beyond_float32(arg):
    with pytest.raises(ValueError, match=f"ExpertBiasController: {arg} must be finite as a float32"):
        mmkernels.nn.ExpertBiasController(8, 2, 2, 1.0, **{arg: 1e39})


@pytest.mark.gpu
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c[0])
def test_gpu_backends_agree_on_edge_inputs(case):
    """On a GPU too, every backend gives the CPU reference's bits: the CUDA kernel rounds each product and sum on its
    own (``__fmul_rn``/``__fadd_rn``, which nvcc never contracts into an FMA) and the Triton kernel is launched with
    ``enable_fp_fusion=False``; both divide with ``div.rn`` and keep subnormals (no ``.ftz``). Checked in the PTX of
    both (no ``fma.rn.f32``); this test is the check on a card."""
    _, counts, bias0, state0, kw = case
    want_b, want_s = _update_on_every_backend(bias0, counts, state0, CPU, **kw)["reference"]
    # NaN payloads differ between x86 and a GPU too (each has its canonical NaN): the CPU rule applies
    for backend, (b, s) in _update_on_every_backend(bias0, counts, state0, torch.device("cuda"), **kw).items():
        assert _same_bits_but_nan_payload(b, want_b), (backend, b, want_b)
        assert _same_bits_but_nan_payload(s, want_s), (backend, s, want_s)
