"""Build mmkernels and its optional compiled extension ``mmkernels._C``.

What gets built:
- C++ CPU sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) always.
- CUDA sources (``csrc/cuda/*.cu``) when torch is a CUDA build and a CUDA toolkit (nvcc) is found.

Environment variables:
- ``MMKERNELS_SKIP_CUDA_BUILD=1``: never compile CUDA sources.
- ``MMKERNELS_SKIP_EXTENSION=1``: build no extension at all (pure-Python install).
- ``MMKERNELS_CUDA_ARCHS``: ``;``-separated targets, default ``80;90a``; ``+PTX`` on an entry also embeds PTX.
- ``MAX_JOBS``: parallel compile jobs; default sized from cores and free memory.
- ``CUDA_HOME``: the toolkit to use (otherwise the toolkit that ``nvcc`` on PATH leads to, then /usr/local/cuda).

The package works without the extension: every op has Triton and PyTorch backends.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90a"


def log(msg: str) -> None:
    # setuptools swallows stdout at default verbosity; stderr shows up in `pip install -v` and in build logs.
    print(f"[mmkernels build] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_from_nvcc(nvcc: str) -> Path | None:
    """The toolkit root that an ``nvcc`` on PATH belongs to.

    ``nvcc`` on PATH is often a symlink or a one-line wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)
    living outside the toolkit, so its own parent is the wrong root.
    """
    path = Path(nvcc).resolve()
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        match = re.search(rb"(/[^\s\"']+)/bin/nvcc\b", head)
        if match:
            path = Path(match.group(1).decode()) / "bin" / "nvcc"
    root = path.parent.parent
    return root if (root / "include" / "cuda_runtime.h").exists() else None


def find_cuda_home() -> Path | None:
    candidates: list[tuple[str, Path | None]] = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(("CUDA_HOME", Path(os.environ["CUDA_HOME"])))
    if os.environ.get("CUDA_PATH"):
        candidates.append(("CUDA_PATH", Path(os.environ["CUDA_PATH"])))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((f"nvcc on PATH ({nvcc})", _toolkit_from_nvcc(nvcc)))
    candidates.append(("/usr/local/cuda", Path("/usr/local/cuda")))
    for source, root in candidates:
        if root is not None and (root / "bin" / "nvcc").exists():
            log(f"CUDA toolkit: {root} (from {source})")
            return root.resolve()
    return None


def torch_bundled_cuda_includes() -> list[str]:
    """Headers shipped in torch's nvidia-* wheels (e.g. cusparse.h in nvidia/cu13/include) that a slim toolkit lacks."""
    found: list[str] = []
    for entry in sys.path:
        for inc in sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))):
            if re.fullmatch(r"cu\d+", Path(inc).parent.name) and os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def cuda_arch_flags(spec: str) -> list[str]:
    flags = []
    for raw in filter(None, (s.strip() for s in spec.replace(",", ";").split(";"))):
        ptx = raw.endswith("+PTX")
        arch = raw.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d+[af]?", arch):
            raise SystemExit(f"MMKERNELS_CUDA_ARCHS: cannot parse {raw!r} (expected e.g. '80;90a;100+PTX')")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def default_max_jobs() -> int:
    # nvcc peaks around 1.5 GiB per job on our sources; leave headroom.
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as meminfo:
            avail_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
        by_mem = max(1, int(avail_kib / (1.5 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        by_mem = cores
    return max(1, min(cores, by_mem))


def write_build_info(torch_version: str, cuda_built: bool, archs: str | None, reason: str) -> None:
    info = ROOT / "mmkernels" / "_build_info.py"
    info.write_text(
        "# Written by setup.py at build time; read by mmkernels._extension to check the extension matches torch.\n"
        f"TORCH_VERSION = {torch_version!r}\n"
        f"CUDA_BUILT = {cuda_built!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CUDA_SKIP_REASON = {reason!r}\n"
    )


def extension_modules():
    if _env_flag("MMKERNELS_SKIP_EXTENSION"):
        log("MMKERNELS_SKIP_EXTENSION=1: building no extension (pure Python; Triton and PyTorch backends only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable at build time: building no extension. "
            "Install torch first and use `pip install --no-build-isolation -e .`")
        return [], {}

    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cpp_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))

    cxx_flags = ["-O3"]  # torch.utils.cpp_extension adds the C++ standard its headers need
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]

    reason = ""
    cuda_home = None
    if _env_flag("MMKERNELS_SKIP_CUDA_BUILD"):
        reason = "MMKERNELS_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            reason = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"

    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(default_max_jobs())
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); MAX_JOBS={os.environ['MAX_JOBS']}")
    log(f"C++ CPU sources: {', '.join(cpp_sources)}")

    if cuda_home is None:
        log(f"CUDA sources SKIPPED: {reason}")
        write_build_info(torch.__version__, False, None, reason)
        ext = cpp_extension.CppExtension(
            "mmkernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, define_macros=define_macros
        )
        return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

    # torch.utils.cpp_extension reads CUDA_HOME at import; make sure it sees the toolkit we chose.
    os.environ["CUDA_HOME"] = str(cuda_home)
    cpp_extension.CUDA_HOME = str(cuda_home)
    archs = os.environ.get("MMKERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *cuda_arch_flags(archs)]
    extra_includes = [inc for inc in torch_bundled_cuda_includes() if not Path(inc).samefile(cuda_home / "include")]
    log(f"CUDA sources: {', '.join(cu_sources)} for archs {archs}")
    if extra_includes:
        log(f"extra CUDA headers from torch's bundled wheels: {', '.join(extra_includes)}")
    write_build_info(torch.__version__, True, archs, "")
    ext = cpp_extension.CUDAExtension(
        "mmkernels._C",
        cpp_sources + cu_sources,
        include_dirs=extra_includes,
        extra_compile_args={
            "cxx": [*cxx_flags, "-DMMKERNELS_WITH_CUDA"],
            "nvcc": [*nvcc_flags, "-DMMKERNELS_WITH_CUDA"],
        },
        define_macros=define_macros,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
