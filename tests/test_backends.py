"""The backend registry: auto choice, MMKERNELS_BACKEND, explicit choices that cannot run."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import BackendError
from mmkernels._backends import _REGISTRY, OpBackends, backend_unavailable_reason


@pytest.fixture
def toy(no_backend_env):
    op = OpBackends("toy_op_for_tests")
    op.register("reference")(lambda: "reference")
    op.register("triton")(lambda: "triton")
    op.register("cuda")(lambda: "cuda")
    yield op
    _REGISTRY.pop("toy_op_for_tests")


def test_auto_on_cpu_skips_gpu_backends(toy):
    name, fn = toy.select(torch.device("cpu"))
    assert name == "reference" and fn() == "reference"


def test_env_override(toy, monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    name, _ = toy.select(torch.device("cpu"))  # triton runs on CPU here only under the interpreter
    assert name == "triton"
    monkeypatch.setenv("MMKERNELS_BACKEND", "cpp")  # an op without that backend keeps auto
    assert toy.select(torch.device("cpu"))[0] == "reference"
    monkeypatch.setenv("MMKERNELS_BACKEND", "cuda")  # an op with it, but it cannot run: explicit, so it raises
    with pytest.raises(BackendError, match="MMKERNELS_BACKEND='cuda' cannot run"):
        toy.select(torch.device("cpu"))
    monkeypatch.setenv("MMKERNELS_BACKEND", "fastest")
    with pytest.raises(BackendError, match="MMKERNELS_BACKEND='fastest' is not valid: expected one of cuda, cpp"):
        toy.select(torch.device("cpu"))


def test_explicit_choice(toy):
    assert toy.select(torch.device("cpu"), "reference")[0] == "reference"
    with pytest.raises(BackendError, match="'cuda' cannot run"):  # no CUDA tensors (or no extension at all)
        toy.select(torch.device("cpu"), "cuda")
    with pytest.raises(BackendError, match="is not implemented"):
        toy.select(torch.device("cpu"), "cpp")


def test_register_unknown_backend_rejected(toy):
    with pytest.raises(ValueError, match="unknown backend"):
        toy.register("cudnn")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in backend_unavailable_reason("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_unavailable_reason("triton", torch.device("cpu")) is None


def test_public_listing():
    assert "expert_bias_update_" in mmkernels.registered_ops()
    assert "reference" in mmkernels.available_backends("expert_bias_update_", "cpu")


def test_deterministic_switch():
    assert not mmkernels.is_deterministic()
    with mmkernels.deterministic():
        assert mmkernels.is_deterministic()
    assert not mmkernels.is_deterministic()


def test_auto_fallback_traces_under_fullgraph_compile(monkeypatch, no_backend_env):
    """Skipping an unavailable backend logs at debug in eager mode only: inside torch.compile the log call
    would be a graph break, an error with fullgraph=True."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton cannot run on CPU tensors now
    op = OpBackends("toy_fallback_for_tests", auto_order={"cpu": ("triton", "reference")})
    op.register("triton")(lambda x: x * 2)
    op.register("reference")(lambda x: x + 1)
    try:
        def f(x):
            return op.select(x.device)[1](x)

        torch._dynamo.reset()
        x = torch.ones(3)
        assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + 1)
    finally:
        _REGISTRY.pop("toy_fallback_for_tests")


def test_declared_limits_steer_auto_and_fail_explicit(no_backend_env, monkeypatch):
    """A backend's ``supports`` (its size/dtype limits) is checked against the call's arguments: auto skips it, an
    explicit choice raises BackendError with the reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = OpBackends("toy_limits_for_tests", auto_order={"cpu": ("triton", "reference")})
    try:
        op.register("reference")(lambda n: "reference")
        op.register("triton", supports=lambda n: None if n <= 8 else f"n <= 8, got n = {n}")(lambda n: "triton")
        cpu = torch.device("cpu")
        assert op.select(cpu, None, (4,))[0] == "triton"
        assert op.select(cpu, None, (9,))[0] == "reference"
        with pytest.raises(BackendError, match="n <= 8, got n = 9"):
            op.select(cpu, "triton", (9,))
        assert op.select(cpu, "triton", (8,))[1](8) == "triton"
    finally:
        _REGISTRY.pop("toy_limits_for_tests")


def test_available_backends_tell_the_truth_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    for op in mmkernels.registered_ops():
        assert mmkernels.available_backends(op, "cuda") == ["reference"], op


def test_float64_patch_embed_takes_the_reference():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, w, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(mmkernels.ops.patch_embed(x, w), want)
    with pytest.raises(BackendError, match="float64"):
        mmkernels.ops.patch_embed(x, w, backend="triton")


def test_ops_with_limits_use_the_cache_and_check_limits_per_call(no_backend_env, monkeypatch):
    """The resolution that does not depend on the arguments (which backends can run on the device, in which order) is
    cached for ops that declare limits too; each call evaluates only the limits."""
    from mmkernels import _backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = OpBackends("toy_cached_limits_for_tests", auto_order={"cpu": ("triton", "reference")})
    limits = []
    try:
        op.register("reference")(lambda n: "reference")
        op.register("triton", supports=lambda n: limits.append(n) or (None if n <= 8 else f"n <= 8, got {n}"))(
            lambda n: "triton")
        probes = []
        real = _backends.backend_unavailable_reason
        monkeypatch.setattr(_backends, "backend_unavailable_reason", lambda *a: probes.append(a) or real(*a))
        cpu = torch.device("cpu")
        assert [op.select(cpu, None, (n,))[0] for n in (4, 9, 4, 9)] == ["triton", "reference"] * 2
        assert len(probes) == 2 and limits == [4, 9, 4, 9]  # device checks once (triton, reference); limits per call
        with pytest.raises(BackendError, match="'triton' cannot run: n <= 8, got 9"):
            op.select(cpu, "triton", (9,))
        assert op.select(cpu, "triton", (8,))[1](8) == "triton"
        seen = len(probes)
        assert op.select(cpu, "triton", (3,))[0] == "triton" and len(probes) == seen  # the explicit choice cached
        monkeypatch.setenv("MMKERNELS_BACKEND", "reference")  # a new key: resolved again
        assert op.select(cpu, None, (4,))[0] == "reference" and len(probes) > seen
    finally:
        _REGISTRY.pop("toy_cached_limits_for_tests")
