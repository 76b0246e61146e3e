"""Compile every Triton kernel specialisation the CPU tests launched for real GPU targets (no GPU needed).

The interpreter runs kernels as NumPy and never calls the Triton compiler, so it cannot catch what only the
compiler rejects (block shapes tl.dot refuses, type errors, unsupported ops). This closes that gap:

    MMKERNELS_RECORD_TRITON=/tmp/tests.jsonl pytest tests        # what the CPU tests launched (interpreter)
    TRITON_INTERPRET=1 python tests/triton_launches.py /tmp/gpu.jsonl  # what the launchers pick on a GPU
    python tests/triton_gpu_compile.py /tmp/gpu.jsonl /tmp/tests.jsonl  # compile both for sm_80 and sm_90

Half-precision specialisations are compiled for fp16 and again for bf16 (which the interpreter cannot run), and
each compiled kernel's shared memory is checked against the target's per-block limit. Exit status 1 if any
specialisation fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be real JIT functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Most shared memory one block may use (bytes), per compute capability: a kernel needing more fails at launch
# with OutOfResources, which only a compile for the real target reveals.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def variants(spec: dict) -> list[dict]:
    out = [spec]
    if any(t == "*fp16" for t in spec["signature"].values()):
        bf16 = dict(spec, signature={k: ("*bf16" if t == "*fp16" else t) for k, t in spec["signature"].items()})
        out.append(bf16)
    return out


def compile_one(spec: dict, arch: int) -> tuple[dict, int, int | None, str | None]:
    """Compile one specialisation for sm_<arch>: (spec, arch, shared bytes, error or None)."""
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    src = ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"])
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as exc:  # report every failure, not only the first
        return spec, arch, None, f"{type(exc).__name__}: {exc}"
    shared, limit = compiled.metadata.shared, SHARED_LIMIT.get(arch, 232448)
    if shared > limit:
        return spec, arch, shared, f"needs {shared} bytes of shared memory; sm_{arch} allows {limit}"
    return spec, arch, shared, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("launches", nargs="+", help="JSON lines from tests/triton_launches.py")
    parser.add_argument("--archs", default="80,90", help="compute capabilities to compile for")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--verbose", action="store_true", help="a line per compiled specialisation")
    args = parser.parse_args()
    specs = []
    for path in args.launches:
        with open(path) as f:
            specs += [json.loads(line) for line in f if line.strip()]
    unique = {json.dumps(v, sort_keys=True): v for s in specs for v in variants(s)}
    archs = [int(a) for a in args.archs.split(",")]
    work = [(spec, arch) for spec in unique.values() for arch in archs]
    failures, per_kernel, start = [], {}, time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for spec, arch, shared, error in pool.map(compile_one, *zip(*work)):
            if error is not None:
                failures.append(f"{spec['module']}.{spec['kernel']} sm_{arch} {spec['signature']} "
                                f"{spec['constexprs']} {spec['options']}: {error}")
                continue
            per_kernel[spec["kernel"]] = per_kernel.get(spec["kernel"], 0) + 1
            if args.verbose:
                print(f"ok sm_{arch} smem {shared:6d} {spec['kernel']} {spec['constexprs']} {spec['options']}")
    for name, n in sorted(per_kernel.items()):
        print(f"  {name}: {n} compiled")
    print(f"{sum(per_kernel.values())} compiled, {len(failures)} failed ({len(unique)} specialisations x "
          f"{len(archs)} archs) in {time.time() - start:.0f}s")
    for failure in failures:
        print("FAILED " + failure[:2000], file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
