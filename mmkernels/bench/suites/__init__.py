"""Built-in benchmark suites; importing this package registers them.

Every module of this package is imported (found with :mod:`pkgutil`), so a new suite is one new file here that calls
:func:`mmkernels.bench.suite.register_suite`: nothing else (this file, ``bench/suite.py``, ``bench/cli.py``) changes.
Modules whose name starts with ``_`` are helpers and are not imported here.
"""

import importlib
import pkgutil

SUITE_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in SUITE_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
