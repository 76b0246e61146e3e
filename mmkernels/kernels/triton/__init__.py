"""Triton kernels, one file per op family. Import this package only when triton is installed.

Importing the package imports every kernel module in it, so that the tuning core (``tuning.py``, which imports no
kernel) knows every kernel's search space (its ``tuning.register(...)`` block) before it reads a tuning file: a new
kernel family is one new module here, found without editing this file. :data:`TUNE_FIRST` keeps the families that
``mmkernels-bench tune all`` sweeps (and lists) first in their order of importance; the rest follow by name.
"""

import importlib
import pkgutil

TUNE_FIRST = ("attention", "qformer_attention", "patch_embed", "moe")

_found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _name in (*TUNE_FIRST, *(n for n in _found if n not in TUNE_FIRST)):
    importlib.import_module(f"{__name__}.{_name}")
del _found, _name
