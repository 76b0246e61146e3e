"""Shared pieces of the state-dict converters: a clear error for unknown or missing keys."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConversionError", "check_keys"]


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
