"""``mmkernels.info()`` / ``python -m mmkernels.info``: versions, devices, extension status, backends per op."""

from __future__ import annotations

import argparse
import platform

import torch

from ._backends import backend_unavailable_reason, registered_ops, triton_available
from ._extension import extension_status


def _triton_version() -> str | None:
    if not triton_available():
        return None
    import triton

    return triton.__version__


def info(as_dict: bool = False):
    """Describe this installation. Prints a report, or returns it as a dict when ``as_dict``."""
    from . import __version__

    ext = extension_status()
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    report = {
        "mmkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "devices": {d: (torch.cuda.get_device_name(d) if d != "cpu" else platform.processor() or "cpu")
                    for d in devices},
        "extension": {
            "loaded": ext.loaded,
            "cuda_kernels": ext.cuda,
            "reason": ext.reason,
            "built_with_torch": ext.built_with_torch,
            "cuda_archs": ext.cuda_archs,
            "cuda_skipped_because": ext.cuda_skip_reason,
        },
        "ops": {},
    }
    for name, op in sorted(registered_ops().items()):
        report["ops"][name] = {
            d: {b: backend_unavailable_reason(b, torch.device(d)) or "available" for b in op.impls} for d in devices
        }
    if as_dict:
        return report
    print(format_report(report))
    return None


def format_report(report: dict, brief: bool = False) -> str:
    ext = report["extension"]
    if ext["loaded"]:
        ext_line = f"loaded (CUDA kernels: {'yes' if ext['cuda_kernels'] else 'no'}"
        ext_line += f", archs {ext['cuda_archs']})" if ext["cuda_kernels"] else f": {ext['cuda_skipped_because']})"
    else:
        ext_line = f"not loaded: {ext['reason']}"
    lines = [
        f"mmkernels {report['mmkernels']}  python {report['python']}  torch {report['torch']} "
        f"(CUDA {report['torch_cuda']})  triton {report['triton']}",
        f"extension mmkernels._C: {ext_line}",
        "devices: " + ", ".join(f"{d} ({name})" for d, name in report["devices"].items()),
    ]
    if brief:
        return "\n".join(lines)
    lines.append("backends per op (device: backend = status):")
    for op, per_device in report["ops"].items():
        lines.append(f"  {op}")
        for device, backends in per_device.items():
            parts = ", ".join(f"{b}={'ok' if s == 'available' else 'no'}" for b, s in backends.items())
            lines.append(f"    {device}: {parts}")
            for b, s in backends.items():
                if s != "available":
                    lines.append(f"      {b}: {s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.info", description=__doc__)
    parser.add_argument("--brief", action="store_true", help="versions and extension status only")
    args = parser.parse_args(argv)
    print(format_report(info(as_dict=True), brief=args.brief))
    return 0

