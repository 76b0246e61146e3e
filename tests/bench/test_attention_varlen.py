"""The attention suite's packed varlen rows: the cases, their counts, a tiny CPU run, and the packed=0 row's pinning
of MMKERNELS_ATTENTION_PACKED (forward and backward, restored after each)."""

from __future__ import annotations

import os

import pytest
import torch

import mmkernels.bench.suites.attention as suite_mod
import mmkernels.kernels.triton.attention_varlen as attention_packed  # where packed_pays reads the override
from mmkernels.bench import BenchConfig, registered_suites, run_cases

CPU = torch.device("cpu")
ENV = suite_mod.PACKED_ENV


def _varlen(cases):
    return [c for c in cases if c.name.startswith("varlen")]


def test_varlen_cases_cover_the_vision_lengths_and_head_dims():
    suite = registered_suites()["attention"]
    assert "varlen" in suite.presets
    full = {(length, h, d) for _, _, length, h, d in suite_mod.VARLEN_SHAPES["gpu"]}
    assert {(197, 12, 64), (257, 16, 64), (257, 16, 88), (577, 16, 72), (1025, 16, 80)} <= full
    for preset in ("default", "vision", "varlen"):
        assert suite_mod.VARLEN_SHAPES[preset] == suite_mod.VARLEN_SHAPES["gpu"], preset
    (quick,) = suite_mod.VARLEN_SHAPES["quick"]
    _, b, length, h, d = quick
    assert b * length <= 256 and h <= 2, "the quick preset stays tiny (make bench)"


def test_quick_varlen_rows_run_on_cpu_with_valid_score_counts():
    suite = registered_suites()["attention"]
    config = BenchConfig(CPU, torch.float32, "quick", None)
    cases = _varlen(suite.build(config))
    assert [c.mode for c in cases] == ["fwd", "bwd", "fwd+bwd"]
    (_, b, length, h, d), = suite_mod.VARLEN_SHAPES["quick"]
    fwd = cases[0]
    assert set(fwd.providers) == {"mmkernels[reference]", "sdpa-math"} and fwd.baseline == "sdpa-math"
    assert fwd.flops == 4.0 * h * d * b * length**2  # valid scores only: sum over images of L_i^2
    assert fwd.bytes == 4 * 4 * b * length * h * d + 2 * 4 * (b + 1)
    assert cases[2].flops == pytest.approx(3.5 * fwd.flops) and cases[2].bytes == 3 * fwd.bytes

    # the providers agree: ours on the packed rows, SDPA on the dense batch they view
    x = fwd.make_inputs()
    outs = {name: fn(x) for name, fn in fwd.providers.items()}
    assert outs["mmkernels[reference]"].shape == (b * length, h, d)
    torch.testing.assert_close(outs["mmkernels[reference]"], outs["sdpa-math"], atol=2e-5, rtol=2e-5)
    x = cases[2].make_inputs()
    grads = {name: fn(x) for name, fn in cases[2].providers.items()}
    for ours, base in zip(grads["mmkernels[reference]"], grads["sdpa-math"], strict=True):
        torch.testing.assert_close(ours, base, atol=1e-4, rtol=1e-4)

    rows = run_cases(suite, cases, config, warmup_ms=1, rep_ms=2)
    assert len(rows) == 6 and all(r.median_ms > 0 and r.lower_bound_ms > 0 for r in rows)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton rows on CPU need the interpreter")
@pytest.mark.parametrize("caller", [None, "1"])
def test_packed0_row_pins_the_env_in_forward_and_backward_and_restores_it(monkeypatch, caller):
    monkeypatch.setitem(suite_mod.VARLEN_SHAPES, "quick", [("varlen interp", 2, 16, 1, 16)])
    if caller is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, caller)
    seen = []
    real = attention_packed.attention_packed_override

    def spy():
        seen.append(os.environ.get(ENV))
        return real()

    monkeypatch.setattr(attention_packed, "attention_packed_override", spy)
    suite = registered_suites()["attention"]
    config = BenchConfig(CPU, torch.float32, "quick", ("triton",))
    by_mode = {c.mode: c for c in _varlen(suite.build(config))}
    assert set(by_mode["fwd"].providers) == {"mmkernels[triton]", "mmkernels[triton] packed=0", "sdpa-math"}

    for mode, launches in (("fwd", 1), ("fwd+bwd", 2), ("bwd", 2)):
        case = by_mode[mode]
        x = case.make_inputs()
        seen.clear()
        case.providers["mmkernels[triton] packed=0"](x)
        if mode == "bwd":
            case.providers["mmkernels[triton] packed=0"](x)  # a second timed backward on the saved forward
            launches = 3
        assert seen == ["0"] * launches, mode
        assert os.environ.get(ENV) == caller, "restored after the forward and after each backward"
        seen.clear()
        case.providers["mmkernels[triton]"](x)
        assert seen and set(seen) == {caller}, "the plain row runs with the caller's setting"
    rows = run_cases(suite, list(by_mode.values()), config, warmup_ms=1, rep_ms=2)
    assert {r.provider for r in rows} == {"mmkernels[triton]", "mmkernels[triton] packed=0", "sdpa-math"}
    assert os.environ.get(ENV) == caller
