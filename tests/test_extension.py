"""The compiled extension is optional: without it (or with a stale one) the package imports and ops still work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mmkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import warnings, torch
    PRE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mmkernels
    from mmkernels.ops import expert_bias_update_
    st = mmkernels.extension_status()
    bias, state = torch.zeros(6), torch.zeros(2, 4)
    expert_bias_update_(bias, torch.tensor([5, 1, 0, 2, 3, 1], dtype=torch.int32), state,
                        num_ffn_experts=4, top_k=2, target_ffn_per_token=1.5, ki=0.5)
    assert bias[:4].abs().sum() > 0 and torch.equal(bias[4:], torch.zeros(2))
    assert mmkernels.available_backends("expert_bias_update_", "cpu") == ["reference"]
    names = [type(w.message).__name__ for w in caught]
    print(st.loaded, st.reason, names.count("ExtensionWarning"))
    """
)


def run(pre: str = "", env: dict | None = None) -> str:
    code = SCRIPT.replace("PRE", pre)
    inherited = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMKERNELS_NO_EXTENSION")}
    full_env = inherited | (env or {})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_works_with_extension_disabled():
    assert run(env={"MMKERNELS_NO_EXTENSION": "1"}) == "False disabled by MMKERNELS_NO_EXTENSION=1 0"


def test_stale_extension_is_not_loaded_and_warns_once():
    pre = textwrap.dedent(
        """
        import sys, types
        info = types.ModuleType("mmkernels._build_info")
        info.TORCH_VERSION, info.CUDA_BUILT, info.CUDA_ARCHS, info.CUDA_SKIP_REASON = "1.0.0", False, None, "x"
        sys.modules["mmkernels._build_info"] = info
        """
    )
    loaded, *reason, n_warnings = run(pre=pre).split()
    assert loaded == "False" and " ".join(reason) == f"built for torch 1.0.0, running torch {torch_version()}"
    assert n_warnings == "1"


def test_missing_extension_warns_once():
    pre = "import sys; sys.modules['mmkernels._C'] = None  # as if the .so were deleted"
    loaded, *reason, n_warnings = run(pre=pre).split()
    assert loaded == "False" and n_warnings == "1"


def torch_version() -> str:
    import torch

    return torch.__version__


def test_status_in_this_process_is_consistent():
    st = mmkernels.extension_status()
    assert st.loaded == (st.reason == "")
    if st.loaded:
        assert st.module.has_cuda_kernels() == st.cuda
