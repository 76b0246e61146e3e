"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so this runs before mmkernels loads:
without a CUDA device, Triton kernels run on CPU tensors through the interpreter (fp32/fp16 only: the
interpreter mishandles bf16 on CPU)."""

from __future__ import annotations

import os
import sys

import torch

assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The whole suite runs with the ops' host-side value checks on (every bad-input test expects its ValueError); the
# sync-budget tests (tests/test_sync_budget.py) switch them off with mmkernels.debug_checks(False). Set in the
# environment, so spawned test processes (distributed, CLI) check too.
os.environ.setdefault("MMKERNELS_DEBUG_CHECKS", "1")

import pytest  # noqa: E402

import mmkernels  # noqa: E402  (registers the ops with the interpreter setting in place)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The tests' helper modules (op_samples, random_weights, hf_tiny_models, triton_launches) import by name from every
# test folder: --import-mode=importlib keeps tests/ off sys.path, so it is put there once, here.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else CPU (Triton then runs under the interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same seed; tests that need other draws use their own torch.Generator."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def cpu_threads():
    """``cpu_threads(n)`` sets torch's CPU thread count for the test; the caller's count is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def batch_invariant_mode():
    """The test runs inside ``mmkernels.batch_invariant()``; the mode's kernels are gone again afterwards."""
    with mmkernels.batch_invariant():
        yield
    assert not mmkernels.batch_invariance.routed()


@pytest.fixture
def no_backend_env(monkeypatch):
    """Run with MMKERNELS_BACKEND unset, whatever the caller's environment says."""
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)



if os.environ.get("MMKERNELS_RECORD_TRITON") and os.environ.get("TRITON_INTERPRET") == "1":
    from triton_launches import record_launches  # tests/triton_launches.py

    record_launches(os.environ["MMKERNELS_RECORD_TRITON"])


@pytest.fixture
def ops_run(monkeypatch):
    """Records ``(op, backend)`` for every mmkernels op call (each public op resolves its backend once per call), so a
    test can say which ops ran and on what."""
    from mmkernels._backends import OpBackends

    seen: list[tuple[str, str]] = []
    original = OpBackends.select

    def spy(self, device, backend=None, args=None):
        name, impl = original(self, device, backend, args)
        seen.append((self.op, name))
        return name, impl

    monkeypatch.setattr(OpBackends, "select", spy)
    return seen
