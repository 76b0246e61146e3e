"""``python -m mmkernels.info``: what is installed and which backends each op can use here."""

from .._info import format_report, info, main

__all__ = ["format_report", "info", "main"]
