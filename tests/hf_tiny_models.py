"""``tests/integrations/conftest.py`` (the tiny random-initialised HF models of the integration tests: ``MODELS``
and the builders behind it) as a module, for tests that build those models outside the integration folder's
fixtures. Loaded by path under a private name, once: a conftest is not importable by its name."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType


@functools.cache
def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_hf_tiny_models", Path(__file__).parent / "integrations" /
                                                  "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
