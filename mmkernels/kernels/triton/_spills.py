"""Registers, spills and shared memory of a Triton kernel specialisation, for a GPU target, without a GPU.

Triton fills ``n_regs`` / ``n_spills`` in a compiled kernel's metadata only when it loads the cubin on a device, so
these numbers come from the assembler instead: :func:`compile_stats` compiles the kernel with ``triton.compile``
for ``GPUTarget("cuda", arch, 32)`` (cached like any Triton compile), runs Triton's bundled ``ptxas -v`` on the
generated PTX with the flags Triton's own PTX -> cubin step uses, and parses the report. The register count and
stack frame are checked against the cubin Triton built (``cuobjdump --dump-resource-usage``) when cuobjdump is
there, so the spill numbers describe the code that would run.

Used by ``tests/triton_gpu_compile.py`` (``make check-triton``: the spill report, failing on spilling default
configs) and meant for the tuning layer, to drop spilling configurations from a search space before anything is
timed. Needs real ``@triton.jit`` functions: not under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any

__all__ = ["PtxasError", "compile_stats", "parse_ptxas_log", "spills"]

_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+)")


class PtxasError(RuntimeError):
    """ptxas rejected the PTX, or its report could not be read."""


def parse_ptxas_log(log: str) -> dict[str, int]:
    """``{"registers", "stack", "spill_stores", "spill_loads"}`` (registers per thread, bytes per thread) of the
    first entry function in a ``ptxas -v`` log; raises :class:`PtxasError` when the log has no register line.

    ptxas prints, per entry function, ``N bytes stack frame, S bytes spill stores, L bytes spill loads`` and then
    ``Used R registers, ...``; a Triton PTX module holds one entry function (everything else is inlined)."""
    used = _USED.search(log)
    if used is None:
        raise PtxasError(f"no 'Used N registers' line in the ptxas report:\n{log}")
    spill = _SPILLS.search(log[: used.start()])
    stack, stores, loads = (int(g) for g in spill.groups()) if spill else (0, 0, 0)
    return {"registers": int(used.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def spills(stats: dict[str, Any]) -> bool:
    """True when a :func:`compile_stats` result spills registers to local memory (stores or loads)."""
    return stats["spill_stores"] > 0 or stats["spill_loads"] > 0


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:  # Triton >= 3.5: a ptxas per architecture family (Blackwell has its own)
        return nv.get_ptxas(arch).path
    except TypeError:  # older releases: one ptxas
        return nv.get_ptxas().path


def _ptxas_flags(metadata) -> list[str]:
    """The flags of Triton's ``make_cubin`` that change code generation (line info does not, but is kept so the
    command matches): FMA fusion, extra ``ptx_options``, and the register allocator level Triton pins for ptxas
    13.x (accepted by 12.x too)."""
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    extra = getattr(metadata, "ptx_options", None)
    if extra:
        flags += extra.split(" ")
    return flags


def _cubin_usage(ptxas: str, cubin: bytes, tmp: str) -> tuple[int, int] | None:
    """(registers, stack bytes) of the cubin Triton built, or None when cuobjdump is not beside ptxas."""
    tool = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None
    path = os.path.join(tmp, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    found = _CUOBJDUMP.search(out.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else None


def compile_stats(kernel, signature: dict[str, str], constexprs: dict[str, Any], options: dict[str, Any],
                  arch: int) -> dict[str, int]:
    """Compile one specialisation of ``kernel`` for compute capability ``arch`` (80, 90, ...) and measure it.

    Args:
        kernel: a ``@triton.jit`` function (not interpreted: call without ``TRITON_INTERPRET=1``).
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``, ...), as
            ``triton.compiler.ASTSource`` takes it.
        constexprs: argument name -> value for every ``constexpr`` argument.
        options: launch options (``num_warps``, ``num_stages``, ``num_ctas``, ...).
        arch: compute capability as an int: 80 for sm_80, 90 for sm_90a.

    Returns:
        ``{"registers": per thread, "spill_stores": bytes per thread, "spill_loads": bytes per thread,
        "stack": bytes per thread, "shared": bytes of shared memory per program (what the launch requests)}``.

    Raises:
        RuntimeError: under ``TRITON_INTERPRET=1`` (``kernel`` is then not a compilable function).
        triton.CompilationError (and the other errors of ``triton.compile``): the compiler rejects the kernel.
        PtxasError: ptxas fails or reports something unreadable, or its register count differs from the cubin
            Triton built (the flags above no longer match Triton's).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"compile_stats needs a @triton.jit function, got {type(kernel).__name__} "
                           "(unset TRITON_INTERPRET: the interpreter never compiles)")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = _ptxas(arch)
    with tempfile.TemporaryDirectory(prefix="mmkernels-ptxas-") as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        cmd = [ptxas, *_ptxas_flags(compiled.metadata), f"--gpu-name={sm_arch_from_capability(arch)}", ptx,
               "-o", os.path.join(tmp, "out.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise PtxasError(f"ptxas failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr}")
        stats = parse_ptxas_log(run.stderr)
        built = _cubin_usage(ptxas, compiled.asm["cubin"], tmp)
    if built is not None and built != (stats["registers"], stats["stack"]):
        raise PtxasError(f"ptxas -v says {stats['registers']} registers / {stats['stack']} stack bytes, the cubin "
                         f"Triton built has {built[0]} / {built[1]}: the ptxas flags no longer match Triton's")
    stats["shared"] = int(compiled.metadata.shared)
    return stats
