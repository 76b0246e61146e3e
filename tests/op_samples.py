"""The valid calls of every op, collected from the op's own test file, for the central sweeps.

A new op family needs no edit to ``tests/test_argument_sweep.py`` or ``tests/test_usage_sweeps.py``: its test file
``tests/ops/test_<name>.py`` declares, at module level,

- ``SAMPLES``: call name -> ``lambda r: dict(...)``, one valid call with every argument by name (fp32, CPU, awkward
  sizes). The call name is the op's registry name (``"attention"``) or the op name with a variant in brackets
  (``"attention[varlen]"``) for a second form whose arguments are swept too. The argument sweep replaces one argument
  at a time with a bad value and runs every call on every backend.
- ``USAGE_SAMPLES`` (optional): op name -> ``lambda r: (function, args, kwargs)`` for the usage sweeps (autocast,
  ``torch.compile``, float64, meta, double backward). Without one, the usage sweeps call ``mmkernels.ops.<op>`` with
  ``SAMPLES[<op>]``: its leading tensor arguments positionally (they become the compiled graph's inputs), the rest
  by name.

``r(*shape, seed=0)`` is ``torch.randn`` from a generator seeded with ``seed``: every call builds fresh tensors.

The test files are imported by path (the tests folder is not a package). A registered op without a sample, a sample
declared in two files, naming no registered op or not a function, and a test file that cannot be imported are
*problems*: :func:`check` fails listing all of them. The sweeps parametrize over the ops that have samples, so a
missing sample fails one test per sweep (``test_every_public_op_has_a_valid_call``, ``test_every_op_has_inputs``),
never the sweeps' collection.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mmkernels.ops
from mmkernels._backends import registered_ops

OPS_TESTS = Path(__file__).resolve().parent / "ops"
CONVENTION = ("declare SAMPLES = {{{op!r}: lambda r: dict(<every argument by name>)}} at module level in its "
              "tests/ops/test_<name>.py (see tests/op_samples.py)")


def r(*shape, seed: int = 0) -> torch.Tensor:
    """fp32 CPU normal draws of ``shape`` from a generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def op_of(call: str) -> str:
    """``"attention[varlen]"`` -> ``"attention"``."""
    return call.split("[")[0]


_CACHE: tuple | None = None


def _collect() -> tuple[dict[str, Callable], dict[str, Callable], dict[str, str], list[str]]:
    global _CACHE
    if _CACHE is None:
        _CACHE = collect(OPS_TESTS)
    return _CACHE


def collect(folder: Path) -> tuple[dict[str, Callable], dict[str, Callable], dict[str, str], list[str]]:
    """(SAMPLES, USAGE_SAMPLES, ``"SAMPLES['op']"`` -> declaring file, problems), merged over ``folder/test_*.py``
    (``tests/ops``): one problem line per registered op without a sample, declaration made twice, name that is no
    registered op, sample that is not a function, or file that cannot be imported."""
    samples: dict[str, Callable] = {}
    usage: dict[str, Callable] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    skipped: list[str] = []
    for path in sorted(folder.glob("test_*.py")):
        rel = f"tests/{folder.name}/{path.name}"
        spec = importlib.util.spec_from_file_location(f"_op_samples.{folder.name}.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except pytest.skip.Exception as exc:  # a whole file skipped here (an optional dependency): no samples from it
            skipped.append(f"{rel} skips itself here: {exc}")
            continue
        except Exception as exc:  # reported by check(); the file's own collection shows the traceback
            problems.append(f"{rel} could not be imported for its samples: {type(exc).__name__}: {exc}")
            continue
        for attr, into in (("SAMPLES", samples), ("USAGE_SAMPLES", usage)):
            declared = getattr(module, attr, {})
            if not isinstance(declared, dict):
                problems.append(f"{rel}: {attr} must be a dict of name -> lambda r: ..., got {type(declared).__name__}")
                continue
            for call, make in declared.items():
                key = f"{attr}[{call!r}]"
                if key in where:
                    problems.append(f"{key} is declared twice: in {where[key]} and in {rel}")
                    continue
                if op_of(call) not in registered_ops():
                    problems.append(f"{key} in {rel} names no registered op (registered: {sorted(registered_ops())})")
                    continue
                if not callable(make):
                    problems.append(f"{key} in {rel} must be a function of r, got {type(make).__name__}")
                    continue
                where[key] = rel
                into[call] = make
    for op in sorted(registered_ops()):
        if op not in samples:
            problems.append(f"op {op!r} has no valid call for the central sweeps (tests/test_argument_sweep.py, "
                            f"tests/test_usage_sweeps.py): {CONVENTION.format(op=op)}"
                            + "".join(f"; {line}" for line in skipped))
    return samples, usage, where, problems


def check() -> None:
    """Fail with every problem found (a registered op without a sample, a duplicate, an unknown op name)."""
    problems = _collect()[3]
    assert not problems, "\n".join(problems)


def calls() -> list[str]:
    """Every declared call: the ops in sorted order, then the variants (``op[variant]``) in sorted order."""
    names = _collect()[0]
    return sorted(c for c in names if "[" not in c) + sorted(c for c in names if "[" in c)


def ops() -> list[str]:
    """The registered ops that have a sample, sorted."""
    return [c for c in calls() if "[" not in c]


def good_args(call: str) -> dict:
    """One valid call of ``call`` (an op or ``op[variant]``), every argument by name, fresh tensors."""
    samples = _collect()[0]
    if call not in samples:
        raise AssertionError(f"no valid call for {call!r}: {CONVENTION.format(op=call)}")
    return samples[call](r)


def usage(op: str) -> tuple[Callable, tuple, dict]:
    """(function, args, kwargs) for the usage sweeps: ``USAGE_SAMPLES[op]`` when declared, else ``ops.<op>`` with
    ``SAMPLES[op]`` (leading tensor arguments positionally, the rest by name)."""
    _, declared, _, _ = _collect()
    if op in declared:
        return declared[op](r)
    return derived_usage(op)


def derived_usage(op: str) -> tuple[Callable, tuple, dict]:
    """``(ops.<op>, args, kwargs)`` from ``SAMPLES[op]``: its leading tensor arguments positionally, the rest by
    name."""
    fn = getattr(mmkernels.ops, op)
    kwargs = good_args(op)
    args = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is not param.POSITIONAL_OR_KEYWORD or not isinstance(kwargs.get(name), torch.Tensor):
            break
        args.append(kwargs.pop(name))
    return fn, tuple(args), kwargs
