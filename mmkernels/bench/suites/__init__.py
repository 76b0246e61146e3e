"""Built-in benchmark suites; importing this package registers them."""

from . import expert_bias  # noqa: F401
