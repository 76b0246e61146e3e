"""``mmkernels.info()`` / ``python -m mmkernels.info``: versions, devices, extension status, the ``MMKERNELS_*``
variables and what they mean, backends per op and the one each op runs by default here.

``python -m mmkernels.info`` exits with status 2 and one line on stderr when a variable holds a value its parser
(``mmkernels._env``) rejects; ``info()`` reports it under ``environment`` and in the ops' ``auto`` column."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from ._backends import BackendError, backend_unavailable_reason, registered_ops, triton_available
from ._config import is_batch_invariant
from ._env import VARIABLES, EnvVarError, check
from ._extension import extension_status


def _triton_version() -> str | None:
    if not triton_available():
        return None
    import triton

    return triton.__version__


def _environment() -> dict[str, dict[str, str]]:
    """Every run-time variable mmkernels reads: ``{name: {"value", "meaning"}}`` for the set ones, where ``meaning``
    is what its parser made of it or ``"error: ..."``."""
    out = {}
    for name, parse in VARIABLES.items():
        if name not in os.environ:
            continue
        try:
            meaning = repr(parse())
        except EnvVarError as exc:
            meaning = f"error: {exc}"
        out[name] = {"value": os.environ[name], "meaning": meaning}
    return out


def _auto(op, device: torch.device) -> str:
    """The backend a call with ``backend=None`` gets on ``device`` now (``MMKERNELS_BACKEND`` included), or
    ``"error: ..."`` when that call would raise."""
    try:
        return op.select(device)[0]
    except (BackendError, EnvVarError) as exc:
        return f"error: {exc}"


def info(as_dict: bool = False):
    """Describe this installation. Prints a report, or returns it as a dict when ``as_dict``. Raises ``TypeError``
    unless ``as_dict`` is a bool."""
    from . import __version__
    from .ops._validate import flag

    as_dict = flag("as_dict", as_dict, op="info")

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
    report["environment"] = _environment()
    report["batch_invariant"] = {
        "enabled": is_batch_invariant(),
        "ops": {name: sorted(op.batch_invariant) for name, op in sorted(registered_ops().items())},
        "not_honoured": {name: sorted(set(op.impls) - op.batch_invariant)
                         for name, op in sorted(registered_ops().items()) if set(op.impls) - op.batch_invariant},
    }
    report["auto"] = {}
    for name, op in sorted(registered_ops().items()):
        report["ops"][name] = {
            d: {b: backend_unavailable_reason(b, torch.device(d)) or "available" for b in op.impls} for d in devices
        }
        report["auto"][name] = {d: _auto(op, torch.device(d)) for d in devices}
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
    env = report.get("environment", {})
    lines.append("environment: " + ("; ".join(f"{k}={v['value']!r} -> {v['meaning']}" for k, v in env.items())
                                   if env else "no MMKERNELS_* variable set"))
    inv = report.get("batch_invariant")
    if inv is not None:
        refused = "; ".join(f"{op} ({', '.join(b)})" for op, b in inv["not_honoured"].items()) or "none"
        honoured = "; ".join(f"{op} ({', '.join(b)})" for op, b in inv["ops"].items() if b) or "none"
        lines.append(f"batch-invariant mode: {'on' if inv['enabled'] else 'off'} (mmkernels.set_batch_invariant; "
                     f"process-wide, set in the program that runs the model); honoured by: {honoured}; not honoured "
                     f"(skipped by auto, refused by name in the mode): {refused}")
    if brief:
        return "\n".join(lines)
    lines.append("backends per op (device: backend = status; auto = what backend=None runs here now):")
    for op, per_device in report["ops"].items():
        lines.append(f"  {op}")
        for device, backends in per_device.items():
            parts = ", ".join(f"{b}={'ok' if s == 'available' else 'no'}" for b, s in backends.items())
            auto = report.get("auto", {}).get(op, {}).get(device)
            lines.append(f"    {device}: {parts}" + (f"; auto = {auto}" if auto else ""))
            for b, s in backends.items():
                if s != "available":
                    lines.append(f"      {b}: {s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.info", description=__doc__)
    parser.add_argument("--brief", action="store_true", help="versions and extension status only")
    args = parser.parse_args(argv)
    problems = check()
    if problems:  # the report would describe a run that cannot happen: say what is wrong, in one line, first
        more = f" (and {len(problems) - 1} more bad variable(s))" if len(problems) > 1 else ""
        print(f"{parser.prog}: error: environment: {problems[0]}{more}", file=sys.stderr)
        return 2
    print(format_report(info(as_dict=True), brief=args.brief))
    return 0

