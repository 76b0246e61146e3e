"""mmkernels.info() and `python -m mmkernels.info`."""

from __future__ import annotations

import subprocess
import sys

import torch

import mmkernels


def test_info_dict():
    report = mmkernels.info(as_dict=True)
    assert report["torch"] == torch.__version__
    assert set(report["extension"]) >= {"loaded", "cuda_kernels", "reason"}
    assert report["ops"]["expert_bias_update_"]["cpu"]["reference"] == "available"


def test_info_prints(capsys):
    assert mmkernels.info() is None
    out = capsys.readouterr().out
    assert "extension mmkernels._C" in out and "expert_bias_update_" in out


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "mmkernels.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backends per op" in out.stdout
