"""Backend registry: which implementation of an op runs for given tensors.

Backends:
- ``"cuda"``: CUDA kernels of the compiled extension ``mmkernels._C`` (CUDA tensors).
- ``"cpp"``: C++ CPU kernels of the compiled extension (CPU tensors).
- ``"triton"``: our Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests).
- ``"reference"``: plain PyTorch, any device. Also the tests' and the benchmarks' baseline.

``backend=None`` means auto: the op's preference order for the device, first available wins; an unavailable
auto choice falls back quietly (logged at debug). ``MMKERNELS_BACKEND=<name>`` replaces auto for every op that
implements that backend. An explicit choice (argument or environment) that cannot run raises ``BackendError``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ._config import is_batch_invariant
from ._env import BACKEND_CHOICES, EnvVarError, backend_override, triton_interpreting
from ._extension import extension_status

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendChoice",
    "ModuleBackend",
    "OpBackends",
    "available_backends",
    "backend_parts",
    "registered_ops",
    "resolve_backends",
    "triton_available",
]

logger = logging.getLogger("mmkernels")

BACKENDS = ("cuda", "cpp", "triton", "reference")
assert BACKENDS == BACKEND_CHOICES, "mmkernels._env.BACKEND_CHOICES must list the same backends"


def _debug(msg: str, *args) -> None:
    # Backend selection runs inside torch.compile'd code too; a logging call there is a graph break, which
    # fullgraph=True turns into an error. Log in eager mode only.
    if not torch.compiler.is_compiling():
        logger.debug(msg, *args)


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the op for these tensors."""


_TRITON_AVAILABLE: bool | None = None


def triton_available() -> bool:
    # A plain module-level cache (not functools.cache, which torch.compile warns about when it traces a caller).
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_AVAILABLE


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a human-readable reason."""
    if name == "reference":
        return None
    if name in ("cuda", "cpp"):
        ext = extension_status()
        if not ext.loaded:
            return f"the compiled extension is not loaded ({ext.reason})"
        if name == "cuda":
            if device.type != "cuda":
                return f"backend 'cuda' needs CUDA tensors, got {device.type} tensors"
            if not ext.cuda:
                return f"the extension was built without CUDA kernels ({ext.cuda_skip_reason or 'CPU-only build'})"
            if not torch.cuda.is_available():
                return "no CUDA device is available"
            return None
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {device.type} tensors"
        return None
    if name == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), got {device.type} tensors"
    return f"unknown backend {name!r}"


@dataclass
class OpBackends:
    """The implementations of one op, and its auto-selection order per device type."""

    op: str
    auto_order: dict[str, Sequence[str]] = field(
        default_factory=lambda: {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
    )
    impls: dict[str, Callable] = field(default_factory=dict)
    # Per backend, the inputs it can take: ``supports(*args)`` is None when it can, else the reason ("N+Z <= 1024").
    supports: dict[str, Callable[..., str | None]] = field(default_factory=dict)
    # The backends that honour the batch-invariant mode (``mmkernels.set_batch_invariant``): under the mode, auto
    # selection takes only these and an explicit choice of another raises.
    batch_invariant: set[str] = field(default_factory=set)
    _resolved: dict = field(default_factory=dict, repr=False)  # select()'s cache

    def __post_init__(self) -> None:
        _REGISTRY[self.op] = self

    def register(self, name: str, *, supports: Callable[..., str | None] | None = None,
                 batch_invariant: bool = False) -> Callable[[Callable], Callable]:
        """Decorator: ``fn`` implements the op on backend ``name``. ``supports``, called with the same arguments as
        ``fn``, declares the backend's limits (sizes, dtypes, shapes): auto-selection skips a backend whose
        ``supports`` returns a reason, and an explicit choice raises :class:`BackendError` with it.
        ``batch_invariant``: the implementation honours the batch-invariant mode (its results for a row do not
        depend on the rest of the call while ``mmkernels.is_batch_invariant()``; tested by
        ``tests/test_batch_invariance.py``)."""
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")

        def deco(fn: Callable) -> Callable:
            self._resolved.clear()
            self.impls[name] = fn
            if supports is not None:
                self.supports[name] = supports
            if batch_invariant:
                self.batch_invariant.add(name)
            else:
                self.batch_invariant.discard(name)
            return fn

        return deco

    def available(self, device: torch.device) -> list[str]:
        return [n for n in self.impls if backend_unavailable_reason(n, device) is None]

    def select(self, device: torch.device, backend: str | None = None, args: tuple | None = None
               ) -> tuple[str, Callable]:
        """Resolve ``backend`` (None = auto) for tensors on ``device``; returns (name, implementation).

        ``args``: the arguments the implementation will be called with, checked against each backend's declared
        limits (``register(..., supports=...)``).

        What does not depend on ``args`` (the environment override, which backends exist and can run on this device
        type, in which order) is resolved once per (device type, backend, ``MMKERNELS_BACKEND``, interpreter) and
        cached, as every op call resolves its backend; a call then evaluates only the declared limits of the
        cached candidates. Not cached while compiling (the trace resolves it once anyway).
        """
        device = torch.device(device)
        key = (device.type, backend, is_batch_invariant(), *_env_key())
        compiling = torch.compiler.is_compiling()
        plan = None if compiling else self._resolved.get(key)
        if plan is None:
            plan = self._plan(device, backend)
            if not compiling:
                self._resolved[key] = plan
        name = self._pick(plan, args, device)
        return name, _outside_autocast(self.impls[name], device)

    def _plan(self, device: torch.device, backend: str | None) -> tuple[str | None, tuple[str, ...]]:
        """(source of an explicit choice or None for auto, the candidate backends in order): everything that does not
        depend on the call's arguments. Raises ``BackendError`` for an explicit choice that cannot run here."""
        source = "backend="
        if backend is None:
            try:
                env = backend_override()  # the one parser of MMKERNELS_BACKEND (mmkernels._env)
            except EnvVarError as exc:
                raise BackendError(f"{self.op}: {exc}") from None
            if env is not None and env in self.impls:
                backend, source = env, "MMKERNELS_BACKEND="
            elif env is not None:
                _debug("%s: has no %r backend; MMKERNELS_BACKEND ignored, using auto", self.op, env)
        if backend is not None:
            if backend not in self.impls:
                raise BackendError(
                    f"{self.op}: {source}{backend!r} is not implemented; this op has {sorted(self.impls)}"
                )
            reason = backend_unavailable_reason(backend, device)
            if reason is not None:
                raise BackendError(f"{self.op}: {source}{backend!r} cannot run: {reason}")
            if is_batch_invariant() and backend not in self.batch_invariant:
                raise BackendError(f"{self.op}: {source}{backend!r} does not honour the batch-invariant mode "
                                   f"(mmkernels.set_batch_invariant); backends that do: "
                                   f"{sorted(self.batch_invariant) or 'none'}")
            return source, (backend,)
        candidates = []
        invariant = is_batch_invariant()
        for name in self.auto_order.get(device.type, ("reference",)):
            if name not in self.impls:
                continue
            if invariant and name not in self.batch_invariant:
                _debug("%s: auto skips %r: it does not honour the batch-invariant mode", self.op, name)
                continue
            reason = backend_unavailable_reason(name, device)
            if reason is None:
                candidates.append(name)
            else:
                _debug("%s: auto skips %r: %s", self.op, name, reason)
        if invariant and not candidates:
            raise BackendError(f"{self.op}: no backend that honours the batch-invariant mode "
                               f"(mmkernels.set_batch_invariant) can run on {device}; backends that do: "
                               f"{sorted(self.batch_invariant) or 'none'}")
        if not candidates and "reference" not in self.impls:
            raise BackendError(f"{self.op}: no backend can run on {device}")
        return None, tuple(candidates)

    def _pick(self, plan: tuple[str | None, tuple[str, ...]], args: tuple | None, device: torch.device) -> str:
        """The first candidate of ``plan`` whose declared limits take ``args`` (an explicit choice must take them);
        auto falls back to the reference, whatever it declares."""
        source, candidates = plan
        for name in candidates:
            check = self.supports.get(name) if args is not None else None
            reason = check(*args) if check is not None else None
            if reason is None:
                return name
            if source is not None:
                raise BackendError(f"{self.op}: {source}{name!r} cannot run: {reason}")
            _debug("%s: auto skips %r: %s", self.op, name, reason)
        if "reference" in self.impls and (not is_batch_invariant() or "reference" in self.batch_invariant):
            return "reference"
        raise BackendError(f"{self.op}: no backend can run on {device}")


# os.environ's own mapping on POSIX (bytes names): what os.environ.get reads, without encoding the name on every call.
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENVIRON = _ENVIRON if isinstance(_ENVIRON, dict) else None


def _env_key() -> tuple:
    """(``MMKERNELS_BACKEND``, ``TRITON_INTERPRET``) as set now: the part of :meth:`OpBackends.select`'s cache key
    that the environment decides. Every op call builds it, so it is read without ``os.environ.get``'s per-call name
    encoding (2 x ~1 us on a 2-core CPU, more than the cached resolution saves); same values, same updates
    (``os.environ[...] = ...``, ``monkeypatch.setenv``)."""
    if _ENVIRON is not None:
        return _ENVIRON.get(b"MMKERNELS_BACKEND"), _ENVIRON.get(b"TRITON_INTERPRET")
    return os.environ.get("MMKERNELS_BACKEND"), os.environ.get("TRITON_INTERPRET")


def _outside_autocast(impl: Callable, device: torch.device) -> Callable:
    """Every backend computes in the precision its op documents (fp32 router math, fp32 softmax statistics, inputs'
    dtype for the products), whatever autocast region the caller is in: an enabled autocast would silently recast
    the reference's matmuls (e.g. fp32 router logits to bf16) and make backends disagree. The caller's autocast
    still decides the dtype of the tensors it hands to the op."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return impl

    @functools.wraps(impl)
    def run(*args, **kwargs):
        with torch.autocast(device.type, enabled=False):
            return impl(*args, **kwargs)

    return run


_REGISTRY: dict[str, OpBackends] = {}


def registered_ops() -> dict[str, OpBackends]:
    """Every public op with its backends, by op name."""
    return dict(_REGISTRY)


def available_backends(op: str, device: str | torch.device = "cpu") -> list[str]:
    """The backends of ``op`` that can run on ``device`` right now."""
    return _REGISTRY[op].available(torch.device(device))


BackendChoice = str | Mapping[str, str | None] | None
"""What a module or model takes as ``backend``: ``None`` (auto for every op), one backend name for every op it runs,
or a mapping ``{op name: backend or None}`` (ops not named run on auto), e.g. ``{"moe_experts": "triton"}``."""


def resolve_backends(owner: str, backend: BackendChoice, ops: Sequence[str]) -> dict[str, str | None]:
    """The backend each op of a module runs on, checked when the module is built.

    A name given for every op must be implemented by each of ``ops``; a mapping may name only ops of ``ops``. Raises
    ``BackendError`` (naming the op, the backend and the alternatives) instead of failing at the first forward.
    Whether the backend can run on the tensors' device is checked per call, as for the functional ops.
    """
    if backend is None:
        return dict.fromkeys(ops)
    if isinstance(backend, str):
        chosen = dict.fromkeys(ops, backend)
    elif isinstance(backend, Mapping):
        unknown = sorted(set(backend) - set(ops))
        if unknown:
            raise BackendError(f"{owner}: backend names ops it does not run: {unknown}; its ops are {list(ops)}")
        chosen = {op: backend.get(op) for op in ops}
    else:
        raise TypeError(f"{owner}: backend must be None, a backend name or a mapping {{op: backend}}, "
                        f"got {type(backend).__name__}")
    for op, name in chosen.items():
        if name is None:
            continue
        if name not in BACKENDS:
            raise BackendError(f"{owner}: unknown backend {name!r} for {op}; expected one of {BACKENDS}")
        impls = _REGISTRY[op].impls if op in _REGISTRY else {}
        if name not in impls:
            raise BackendError(
                f"{owner}: {op} has no {name!r} backend (it has {sorted(impls)}); pass a mapping such as "
                f"backend={{{op!r}: {sorted(impls)[0]!r}}} to choose per op"
            )
    return chosen


class ModuleBackend:
    """The ``backend`` attribute of a module: checked with :func:`resolve_backends` whenever it is set (so at
    construction too); ``module._backends[op]`` is what the module passes to each op.

    Use as a class attribute, ``backend = ModuleBackend("patch_embed")``, and assign ``self.backend = backend`` in
    ``__init__``. A composite module (a model, a decoder layer, an MoE block) declares the union of its parts' ops,
    ``backend = ModuleBackend("patch_embed", "attention")``, and writes no setter of its own: setting it checks the
    whole choice first, then hands each part that carries a ``ModuleBackend`` (the nearest ones below it, found by
    walking its submodules) the share of the choice for that part's ops: the same name or ``None`` as given, or the
    mapping restricted to the part's ops (a part of one op gets that op's entry). Parts added after the assignment
    (in ``__init__``, after ``self.backend = ...``) get it the next time it is set; composites assign it last.
    Assigning a part's ``backend`` directly changes that part only: the composite's ``backend`` reads what was last
    assigned to the composite itself.
    """

    def __init__(self, *ops: str) -> None:
        if not ops:
            raise TypeError("ModuleBackend: name at least one op")
        self.ops = ops
        self.owner = ""

    def __set_name__(self, owner: type, name: str) -> None:
        if name != "backend":
            raise TypeError(f"{owner.__name__}.{name}: a ModuleBackend must be the class attribute 'backend'")
        self.owner = owner.__name__

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__["_backend_choice"]

    def __set__(self, obj, value: BackendChoice) -> None:
        chosen = resolve_backends(self.owner, value, self.ops)  # the whole choice, before any part changes
        parts = list(backend_parts(obj))
        for part in parts:
            extra = sorted(set(_descriptor(part).ops) - set(self.ops))
            if extra:
                raise TypeError(f"{self.owner}: part {type(part).__name__} runs ops {extra} that {self.owner}'s "
                                f"ModuleBackend does not declare")
        obj.__dict__["_backends"] = chosen
        obj.__dict__["_backend_choice"] = value
        for part in parts:
            part.backend = _share(value, chosen, _descriptor(part).ops)


def _descriptor(module) -> ModuleBackend | None:
    found = getattr(type(module), "backend", None)
    return found if isinstance(found, ModuleBackend) else None


def backend_parts(module):
    """The nearest submodules of ``module`` that carry a :class:`ModuleBackend` (not ``module`` itself; the walk
    stops at each one found, which passes the choice further down itself)."""
    stack = list(reversed(list(getattr(module, "_modules", {}).values())))
    while stack:
        child = stack.pop()
        if child is None:
            continue
        if _descriptor(child) is not None:
            yield child
        else:
            stack.extend(reversed(list(child._modules.values())))


def _share(value: BackendChoice, chosen: Mapping[str, str | None], ops: Sequence[str]) -> BackendChoice:
    """A part's share of a composite's choice: a name or None as given; a mapping restricted to the part's ops."""
    if value is None or isinstance(value, str):
        return value
    if len(ops) == 1:
        return chosen[ops[0]]
    return {op: chosen[op] for op in ops}
