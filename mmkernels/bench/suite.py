"""Benchmark suites: one per op, each a list of shapes; each shape times several providers (ours per backend, and
what users would otherwise run) on the same fresh inputs, so the ratios come from one run on one device.

A suite declares only what is particular to its op: its shapes, each with forward providers and analytic forward
FLOPs/bytes (:class:`Shape`), and which registered ops its ``mmkernels[...]`` rows run (``Suite.ops``). The base here
owns the rest, the same for every suite:

- modes: ``fwd`` runs the providers under ``torch.no_grad()``; ``fwd+bwd`` runs the forward and the gradients of
  the shape's ``Inputs.wrt`` tensors (or, when it names none, of every leaf that requires grad: a model's
  parameters); ``bwd`` runs the forward once per input set, outside the timed calls, and times the gradients only.
- FLOPs and bytes per mode: the backward is ``Suite.bwd_flop_factor`` times the forward FLOPs (2: the input- and the
  weight-gradient GEMMs; attention 2.5) and twice the forward bytes, unless the shape gives its own counts.
- "can this provider run here": baselines of a shape with ``probe`` inputs are tried once on those tiny inputs
  (cached per suite, provider, device, dtype and ``probe_key``) and left out where they fail; our rows never are:
  a failure of ours is a failure of the run.
- which of our backends are timed (:meth:`Suite.ours`), and why a requested one cannot be
  (:meth:`Suite.backend_problem`), so the CLI can refuse a request before anything is timed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "MICROSECOND",
    "MODES",
    "BenchConfig",
    "Case",
    "Inputs",
    "Shape",
    "Suite",
    "has_module",
    "in_mode",
    "mmkernels_providers",
    "register_suite",
    "registered_suites",
]

MODES = ("fwd", "bwd", "fwd+bwd")
# Suite tag: calls take microseconds, so launch gaps can dominate a launch-inclusive time; such suites also get
# CUDA-graph replay times by default.
MICROSECOND = "microsecond"


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype | None  # None: the suite's default
    preset: str  # "quick" (small shapes, seconds) or "default" (the shapes the docs quote), or suite-specific
    backends: Sequence[str] | None  # restrict our providers to these backends; None = the default set (Suite.ours)
    # L2 flush before every timed call (CUDA; a no-op on CPUs): None = memory-bound rows only, True = all, False = none
    l2_flush: bool | None = None
    # CUDA-graph replay times next to the launch-inclusive ones: None = suites tagged MICROSECOND, True/False = all/none
    cuda_graph: bool | None = None

    def __post_init__(self) -> None:
        from ..ops._validate import flag

        for name in ("l2_flush", "cuda_graph"):  # a string from a config file would read as True
            object.__setattr__(self, name, flag(name, getattr(self, name), op="BenchConfig", none=True))


@dataclass
class Case:
    """One timed unit: a shape in one mode. ``providers`` take the object ``make_inputs()`` returns."""

    name: str  # the shape and options, e.g. "N=512 Z=256 K=12 pid"
    make_inputs: Callable[[], object]
    providers: dict[str, Callable[[object], object]]
    baseline: str  # provider the speed-up column divides by
    mode: str = "fwd"  # "fwd", "bwd" or "fwd+bwd"
    flops: float = 0.0
    bytes: float = 0.0
    params: dict = field(default_factory=dict)


@dataclass
class Inputs:
    """One set of fresh inputs. Providers are called as ``fn(*args)`` and return the output (a tensor or a tuple).

    With gradients (modes ``bwd`` and ``fwd+bwd``): ``wrt`` are the tensors to differentiate (leaves with
    ``requires_grad``; empty: every leaf the output depends on, e.g. a model's parameters, accumulated into
    ``.grad`` as a training step does) and ``grad_out`` the output's gradient (same structure as the output).
    """

    args: tuple
    wrt: tuple = ()
    grad_out: Any = None
    saved: dict = field(default_factory=dict)  # bwd mode: each provider's forward output on these inputs


@dataclass
class Shape:
    """One problem size of a suite, in every mode the suite times.

    ``make_inputs(grad)`` returns fresh :class:`Inputs` (``grad``: the mode takes gradients, so set
    ``requires_grad`` and give ``grad_out``). ``flops``/``bytes`` count the forward (each input read once, each
    output written once); ``bwd_flops``/``bwd_bytes`` the backward alone when the suite's default rule (see the
    module docstring) does not fit. ``probe(grad)`` gives tiny inputs of the same kind (head dim, dtype, ...) on
    which baselines are tried once; ``skip(provider, mode)`` leaves a provider out of one mode (e.g. where it would
    not fit in memory).
    """

    name: str
    make_inputs: Callable[[bool], Inputs]
    providers: dict[str, Callable[..., Any]]
    baseline: str
    flops: float = 0.0
    bytes: float = 0.0
    bwd_flops: float | None = None
    bwd_bytes: float | None = None
    params: dict = field(default_factory=dict)
    modes: Sequence[str] | None = None  # None: the suite's modes
    probe: Callable[[bool], Inputs] | None = None
    probe_key: Hashable = None
    skip: Callable[[str, str], bool] | None = None


def has_module(name: str) -> bool:
    """Whether ``name`` is importable here (an optional baseline's package: transformers, flash_attn, ...)."""
    return importlib.util.find_spec(name) is not None


def _backward(out, x: Inputs, retain: bool):
    if x.wrt:
        return torch.autograd.grad(out, x.wrt, x.grad_out, retain_graph=retain)
    torch.autograd.backward(out, x.grad_out, retain_graph=retain)
    return out


def in_mode(fn: Callable[..., Any], mode: str) -> Callable[[Inputs], Any]:
    """``fn(*args)`` (a forward) as the callable that mode times on an :class:`Inputs`."""
    if mode == "fwd":
        def run(x: Inputs):
            with torch.no_grad():
                return fn(*x.args)
    elif mode == "fwd+bwd":
        def run(x: Inputs):
            return _backward(fn(*x.args), x, retain=False)
    elif mode == "bwd":
        def run(x: Inputs):
            out = x.saved.get(run)
            if out is None:  # first call on these inputs: the forward, outside the timed calls after warm-up
                out = x.saved[run] = fn(*x.args)
            return _backward(out, x, retain=True)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return run


_PROBES: dict[tuple, bool] = {}


def _runs_here(key: tuple, fn: Callable[..., Any], probe: Callable[[bool], Inputs], grad: bool) -> bool:
    """Whether a baseline runs on the probe's tiny inputs (tried once per key; any failure means: not here)."""
    if key not in _PROBES:
        try:
            in_mode(fn, "fwd+bwd" if grad else "fwd")(probe(grad))
            _PROBES[key] = True
        except Exception:  # noqa: BLE001  (unsupported dtype / head dim / device in the installed torch)
            _PROBES[key] = False
    return _PROBES[key]


@dataclass(frozen=True)
class Suite:
    """A benchmark suite. ``shapes(config, ours)`` declares the shapes for a config; ``ours`` are the backends to
    time (strings; ``None`` for a model suite's automatic choice), see :meth:`ours`; ``config.dtype`` is resolved.

    ``ops``: the registered ops (``mmkernels._backends``) that our rows run; a ``model`` suite (our rows run a whole
    model, the backend reaching every op inside) names every op inside.
    ``reference_is_baseline``: a baseline already is our reference, so ``mmkernels[reference]`` is timed only
    when asked for. ``tags``: :data:`MICROSECOND` for ops whose calls take microseconds (CUDA-graph timing on by
    default). ``backend_limits(backend, config)`` (``config.dtype`` resolved): why the suite cannot time one
    of our backends for this config although the device runs it (e.g. a dtype), or None. ``tune_cases``: the
    problems ``mmkernels-bench tune`` sweeps for the family's Triton kernels (see :mod:`mmkernels.bench.tune_cases`).
    """

    name: str
    description: str
    shapes: Callable[[BenchConfig, list], list[Shape]]
    presets: tuple[str, ...] = ("quick", "default")
    default_dtype: torch.dtype = torch.float32
    cpu_dtype: torch.dtype | None = None  # the default on CPUs, where it differs (bf16 is slow on many CPUs)
    ops: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("fwd",)
    bwd_flop_factor: float = 2.0
    reference_is_baseline: bool = False
    backend_limits: Callable[[str, BenchConfig], str | None] | None = None
    model: bool = False
    tags: tuple[str, ...] = ()  # e.g. MICROSECOND
    # Triton kernel name (``tuning.SPACES``) -> its representative problems for ``mmkernels-bench tune``: launch
    # shapes (the dicts the launchers pass to ``tuning.pick``), most important first. A family's tune problems live
    # in its suite, next to the shapes it is timed at.
    tune_cases: Mapping[str, Callable[[], list[dict]]] = field(default_factory=dict)

    def dtype(self, config: BenchConfig) -> torch.dtype:
        """The dtype the suite's inputs have for ``config`` (``--dtype``, else the suite's default there)."""
        if config.dtype is not None:
            return config.dtype
        return self.cpu_dtype if config.device.type == "cpu" and self.cpu_dtype is not None else self.default_dtype

    def implemented(self) -> list[str]:
        """Backends every op of this suite implements."""
        from .._backends import BACKENDS, registered_ops

        importlib.import_module("mmkernels.ops")  # registers the ops
        impls = [set(registered_ops()[op].impls) for op in self.ops]
        return [b for b in BACKENDS if impls and all(b in i for i in impls)]

    def backend_problem(self, backend: str, config: BenchConfig) -> str | None:
        """Why ``mmkernels[backend]`` rows cannot be timed for ``config`` (None: they can)."""
        from .._backends import backend_unavailable_reason

        if backend not in self.implemented():
            return f"{self.name} has no {backend!r} backend (it has {', '.join(self.implemented()) or 'none'})"
        reason = backend_unavailable_reason(backend, config.device)
        if reason is None and self.backend_limits is not None:
            reason = self.backend_limits(backend, dataclasses.replace(config, dtype=self.dtype(config)))
        return None if reason is None else f"{self.name}: backend {backend!r} cannot run: {reason}"

    def ours(self, config: BenchConfig) -> list:
        """Our backends to time. Requested (``config.backends``): those this suite implements (the CLI refuses the
        ones that cannot run before timing anything). Default: every backend that runs here, except the Triton
        interpreter on CPU (correctness only, not speed) and ``reference`` on GPUs or where a baseline already is
        the reference. A model suite times the model's automatic choice by default."""
        if config.backends is not None:
            return [b for b in config.backends if b in self.implemented()]
        if self.model:
            return [None]
        keep = []
        for b in self.implemented():
            if self.backend_problem(b, config) is not None:
                continue
            if b == "triton" and config.device.type == "cpu":
                continue
            if b == "reference" and (config.device.type == "cuda" or self.reference_is_baseline):
                continue
            keep.append(b)
        return keep

    def build(self, config: BenchConfig) -> list[Case]:
        """The timed cases for ``config``: every shape in every mode, with the providers that run here. The suite's
        ``shapes`` sees ``config.dtype`` resolved (:meth:`dtype`)."""
        dtype = self.dtype(config)
        ours = self.ours(config)
        config = dataclasses.replace(config, dtype=dtype)
        cases = []
        for shape in self.shapes(config, ours):
            modes = shape.modes or self.modes

            def runs(name: str, mode: str, shape=shape, modes=modes) -> bool:
                skipped = shape.skip or (lambda name, mode: False)
                if skipped(name, mode):
                    return False
                if name.startswith("mmkernels") or shape.probe is None:
                    return True

                def probe(grad: bool) -> bool:
                    key = (self.name, name, str(config.device), dtype, grad, shape.probe_key)
                    return _runs_here(key, shape.providers[name], shape.probe, grad)

                # A forward that works may still have no backward here; a backward that works implies the forward
                # (one probe, not two: a compiled baseline compiles on each).
                if mode == "fwd" and any(m != "fwd" and not skipped(name, m) for m in modes) and probe(True):
                    return True
                return probe(mode != "fwd")

            bwd_flops = shape.bwd_flops if shape.bwd_flops is not None else self.bwd_flop_factor * shape.flops
            bwd_bytes = shape.bwd_bytes if shape.bwd_bytes is not None else 2.0 * shape.bytes
            for mode in modes:
                timed = {name: in_mode(fn, mode) for name, fn in shape.providers.items() if runs(name, mode)}
                if not timed:
                    continue
                cases.append(Case(
                    name=shape.name,
                    make_inputs=lambda shape=shape, g=mode != "fwd": shape.make_inputs(g),
                    providers=timed,
                    baseline=shape.baseline if shape.baseline in timed else next(iter(timed)),
                    mode=mode,
                    flops={"fwd": shape.flops, "bwd": bwd_flops, "fwd+bwd": shape.flops + bwd_flops}[mode],
                    bytes={"fwd": shape.bytes, "bwd": bwd_bytes, "fwd+bwd": shape.bytes + bwd_bytes}[mode],
                    params=dict(shape.params),
                ))
        return cases


def mmkernels_providers(ours: Sequence, make: Callable[[Any], Callable[..., Any]], label: str = "mmkernels"
                        ) -> dict[str, Callable[..., Any]]:
    """``{"mmkernels[<backend>]": make(backend)}`` for our backends (``None``, a model's auto choice: ``label``)."""
    return {label if b is None else f"{label}[{b}]": make(b) for b in ours}


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def registered_suites() -> dict[str, Suite]:
    importlib.import_module("mmkernels.bench.suites")  # registers the built-in suites

    return dict(_SUITES)
