"""mmkernels/_env.py: one parser per environment variable; every bad value is an EnvVarError naming the variable, its
value and what it accepts, wherever the variable is read (library call, info, CLIs)."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import _env
from mmkernels._backends import BackendError, registered_ops

# variable -> (values and what the parser makes of them, rejected values)
CASES = {
    "MMKERNELS_BACKEND": ({"": None, "triton": "triton", " cpp ": "cpp", "reference": "reference"},
                          ["nonsense", "Triton", "cuda,triton", "auto"]),
    "MMKERNELS_ATTENTION_PACKED": ({"": None, "auto": None, "0": False, "1": True}, ["yes", "2", "packed"]),
    "MMKERNELS_AUTOTUNE": ({"": False, "0": False, "1": True, "true": True, "OFF": False, "yes": True},
                           ["2", "maybe", "-1", "1.0"]),
    "MMKERNELS_NO_EXTENSION": ({"": False, "1": True, "no": False, "On": True}, ["2", "perhaps"]),
    "MMKERNELS_DEBUG_CHECKS": ({"": False, "0": False, "1": True, "on": True, "False": False}, ["2", "debug"]),
    "MMKERNELS_TUNING_DEVICE": ({"": None, "NVIDIA H100 80GB HBM3": "NVIDIA H100 80GB HBM3"}, ["H100\x07", "a\nb"]),
    "MMKERNELS_TUNING_DIR": ({"": None}, ["FILE"]),
}


def test_every_variable_has_cases():
    assert set(CASES) == set(_env.VARIABLES)


@pytest.mark.parametrize("var", CASES)
def test_each_parser_accepts_its_values_and_rejects_the_rest_naming_the_variable(var, monkeypatch, tmp_path):
    good, bad = CASES[var]
    parse = _env.VARIABLES[var]
    monkeypatch.delenv(var, raising=False)
    assert parse() in (None, False)
    for value, meaning in good.items():
        monkeypatch.setenv(var, value)
        assert parse() == meaning, value
        assert _env.check() == []
    for value in bad:
        if value == "FILE":
            value = str(tmp_path / "a_file")
            (tmp_path / "a_file").write_text("")
        monkeypatch.setenv(var, value)
        with pytest.raises(_env.EnvVarError, match=f"^{var}=.* is not valid: expected ") as exc:
            parse()
        assert isinstance(exc.value, ValueError) and repr(value) in str(exc.value)
        assert _env.check() == [str(exc.value)]


def test_tuning_dir_may_not_exist_yet(monkeypatch, tmp_path):
    monkeypatch.setenv("MMKERNELS_TUNING_DIR", str(tmp_path / "later"))
    assert _env.tuning_dir() == tmp_path / "later"


def test_ops_raise_a_backend_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="MMKERNELS_BACKEND='nonsense' is not valid"):
        mmkernels.ops.expert_bias_update_(torch.zeros(4), torch.zeros(4, dtype=torch.int32), torch.zeros(2, 3),
                                          num_ffn_experts=3, top_k=1, target_ffn_per_token=1.0)


def test_info_reports_the_environment_and_what_auto_runs(monkeypatch):
    """The finding: ``info`` said every op was fine under MMKERNELS_BACKEND=nonsense. Now it shows the variable's
    meaning (or error) and, per op and device, what backend=None runs (or the error it raises)."""
    monkeypatch.setenv("MMKERNELS_BACKEND", "nonsense")
    report = mmkernels.info(as_dict=True)
    assert report["environment"]["MMKERNELS_BACKEND"]["meaning"].startswith("error: MMKERNELS_BACKEND='nonsense'")
    for op, per_device in report["auto"].items():
        assert per_device["cpu"].startswith(f"error: {op}: MMKERNELS_BACKEND='nonsense' is not valid"), op
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    report = mmkernels.info(as_dict=True)
    assert report["environment"]["MMKERNELS_BACKEND"]["meaning"] == "'reference'"
    assert all(per_device["cpu"] == "reference" for per_device in report["auto"].values())
    monkeypatch.delenv("MMKERNELS_BACKEND")
    report = mmkernels.info(as_dict=True)
    for op, per_device in report["auto"].items():
        assert per_device["cpu"] == registered_ops()[op].select(torch.device("cpu"))[0]


def test_debug_checks_follow_the_variable_once_and_the_python_switch_overrides_it(monkeypatch):
    """MMKERNELS_DEBUG_CHECKS is parsed once (an op call must not parse the environment), set_debug_checks(None)
    reads it again, True/False override it, the context manager restores the previous setting, and a bad value is
    an EnvVarError naming the variable at the first question."""
    from mmkernels import _config

    monkeypatch.setattr(_config, "_DEBUG_CHECKS", None)
    monkeypatch.setattr(_config, "_DEBUG_FROM_ENV", None)
    monkeypatch.setenv("MMKERNELS_DEBUG_CHECKS", "1")
    assert mmkernels.debug_checks_enabled() is True
    monkeypatch.setenv("MMKERNELS_DEBUG_CHECKS", "0")
    assert mmkernels.debug_checks_enabled() is True  # parsed once
    mmkernels.set_debug_checks(None)
    assert mmkernels.debug_checks_enabled() is False  # read again
    with mmkernels.debug_checks():
        assert mmkernels.debug_checks_enabled() is True
        with mmkernels.debug_checks(False):
            assert mmkernels.debug_checks_enabled() is False
        assert mmkernels.debug_checks_enabled() is True
    assert mmkernels.debug_checks_enabled() is False
    for bad in ("yes please", 1, "1"):
        with pytest.raises(TypeError, match="set_debug_checks: enabled must be a bool or None"):
            mmkernels.set_debug_checks(bad)
    monkeypatch.setenv("MMKERNELS_DEBUG_CHECKS", "maybe")
    mmkernels.set_debug_checks(None)
    with pytest.raises(_env.EnvVarError, match="MMKERNELS_DEBUG_CHECKS='maybe' is not valid"):
        mmkernels.debug_checks_enabled()
    monkeypatch.setenv("MMKERNELS_DEBUG_CHECKS", "1")
    mmkernels.set_debug_checks(None)
    assert mmkernels.debug_checks_enabled() is True  # the suite's setting, as tests/conftest.py makes it
