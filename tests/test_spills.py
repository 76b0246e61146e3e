"""mmkernels.kernels.triton._spills: registers / spills / shared memory of a kernel for a GPU target, from ptxas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mmkernels.kernels.triton._spills import PtxasError, parse_ptxas_log, spills

_LOG_SPILL = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dkdv_kernel
    536 bytes stack frame, 652 bytes spill stores, 752 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 536 bytes cumulative stack size
ptxas info    : Compile time = 441.778 ms
"""

_LOG_CLEAN = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'add_kernel' for 'sm_80'
ptxas info    : Function properties for add_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, 380 bytes cmem[0]
"""


def test_parse_ptxas_log():
    assert parse_ptxas_log(_LOG_SPILL) == {"registers": 255, "stack": 536, "spill_stores": 652, "spill_loads": 752}
    clean = parse_ptxas_log(_LOG_CLEAN)
    assert clean == {"registers": 18, "stack": 0, "spill_stores": 0, "spill_loads": 0}
    assert spills(parse_ptxas_log(_LOG_SPILL)) and not spills(clean)
    assert spills({"spill_stores": 0, "spill_loads": 4})


def test_parse_ptxas_log_rejects_a_log_without_registers():
    with pytest.raises(PtxasError, match="Used N registers"):
        parse_ptxas_log("ptxas fatal   : Unresolved extern function 'foo'\n")


def test_compile_stats_needs_a_jit_function():
    from mmkernels.kernels.triton._spills import compile_stats

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_stats(lambda x: x, {"x": "*fp32"}, {}, {"num_warps": 4}, 90)


_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N) + 1.0, mask=offs < N)

    @triton.jit
    def hog_kernel(X, Y, BLOCK: tl.constexpr):
        # one warp keeps BLOCK / 32 floats per thread alive across the reduction: over 255 registers spill
        x = tl.load(X + tl.arange(0, BLOCK))
        tl.store(Y + tl.arange(0, BLOCK), x * tl.sum(x, 0) + tl.exp(x))
''')

_DRIVER = textwrap.dedent('''
    import json, sys
    from kernels_under_test import add_kernel, hog_kernel
    from mmkernels.kernels.triton._spills import compile_stats
    out = {}
    for arch in (80, 90):
        out[f"add{arch}"] = compile_stats(add_kernel, {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                                          {"BLOCK": 256}, {"num_warps": 4}, arch)
        out[f"hog{arch}"] = compile_stats(hog_kernel, {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"},
                                          {"BLOCK": 16384}, {"num_warps": 1}, arch)
    print(json.dumps(out))
''')


def test_compile_stats_for_sm80_and_sm90(tmp_path):
    """Real compiles (no GPU needed), in a child process: the test session runs Triton in the interpreter."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    (tmp_path / "kernels_under_test.py").write_text(_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    for arch in (80, 90):
        add, hog = stats[f"add{arch}"], stats[f"hog{arch}"]
        assert set(add) == {"registers", "spill_stores", "spill_loads", "stack", "shared"}
        assert 0 < add["registers"] <= 64 and not spills(add) and add["stack"] == 0
        assert hog["spill_stores"] > 0 and hog["spill_loads"] > 0 and hog["stack"] > 0, hog
