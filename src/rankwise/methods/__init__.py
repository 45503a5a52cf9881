"""Built-in adapter methods: every module in this package registers one method by name on import.

Adding a method is adding a file here; modules whose name starts with ``_`` are helpers.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
