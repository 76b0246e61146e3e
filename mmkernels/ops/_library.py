"""The ``mmkernels`` operator namespace. Schemas are declared here, once, in Python (the torchao way), so every
op exists whether or not the compiled extension is built; ``mmkernels._C`` only registers implementations."""

from __future__ import annotations

import torch

lib = torch.library.Library("mmkernels", "FRAGMENT")


def define(schema: str) -> str:
    """Declare ``mmkernels::<schema>`` and return its qualified name."""
    lib.define(schema)
    return "mmkernels::" + schema.split("(", 1)[0]
