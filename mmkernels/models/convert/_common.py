"""Shared pieces of the state-dict converters: a clear error for unknown or missing keys."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ["ConversionError", "check_keys", "check_value", "strip_prefix"]


class ConversionError(ValueError):
    """A checkpoint does not fit the target model: unknown keys, missing keys or wrong shapes."""


def _listing(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(source: str, unknown: Iterable[str], missing: Iterable[str]) -> None:
    """Raise :class:`ConversionError` naming every unknown and missing key (nothing when both are empty)."""
    unknown, missing = sorted(set(unknown)), sorted(set(missing))
    if not unknown and not missing:
        return
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} unknown key(s): {_listing(unknown)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    raise ConversionError(f"{source}: the state dict does not match; " + "; ".join(parts))


def check_value(source: str, key: str, value: object, shape: Sequence[int] | None = None) -> None:
    """Raise :class:`ConversionError` naming ``key`` unless ``value`` is a floating-point ``torch.Tensor`` (of
    ``shape`` when given): a NumPy array, a list, an integer tensor or a wrong shape in a checkpoint."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"{source}: {key} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ConversionError(f"{source}: {key} must be a floating-point tensor, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ConversionError(f"{source}: {key} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def strip_prefix(state_dict: Mapping[str, object], prefix: str | None, *, candidates: Sequence[str] = (),
                 is_root: Callable[[Mapping[str, object], str], bool] | None = None) -> tuple[dict, str]:
    """The entries under ``prefix`` with it removed (keys without it are dropped), and the prefix used.

    ``prefix=None`` detects it: the first of ``candidates`` for which ``is_root(state_dict, candidate)`` holds (the
    state dict of a wrapper, e.g. ``vision_model.`` of a BLIP-2 model), else ``""`` (the dict is the model's own).
    """
    if prefix is None:
        prefix = next((p for p in candidates if is_root is not None and is_root(state_dict, p)), "")
    if not prefix:
        return dict(state_dict), ""
    return {k[len(prefix):]: t for k, t in state_dict.items() if k.startswith(prefix)}, prefix
