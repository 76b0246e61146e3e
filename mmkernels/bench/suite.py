"""Benchmark suites: one per op, each a list of cases; each case times several providers (ours per backend, and
what users would otherwise run) on the same fresh inputs, so the ratios come from one run on one device."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["BenchConfig", "Case", "Suite", "register_suite", "registered_suites"]


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype | None  # None: the suite's default
    preset: str  # "quick" (small shapes, seconds) or "default" (the shapes the docs quote), or suite-specific
    backends: Sequence[str] | None  # restrict our providers to these backends; None = every available one


@dataclass
class Case:
    name: str  # the shape and options, e.g. "N=512 Z=256 K=12 pid"
    make_inputs: Callable[[], object]
    providers: dict[str, Callable[[object], object]]
    baseline: str  # provider the speed-up column divides by
    mode: str = "fwd"  # "fwd", "bwd" or "fwd+bwd"
    flops: float = 0.0
    bytes: float = 0.0
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    build: Callable[[BenchConfig], list[Case]]
    presets: tuple[str, ...] = ("quick", "default")
    default_dtype: torch.dtype = torch.float32


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def registered_suites() -> dict[str, Suite]:
    importlib.import_module("mmkernels.bench.suites")  # registers the built-in suites

    return dict(_SUITES)
