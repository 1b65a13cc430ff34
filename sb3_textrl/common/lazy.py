"""Lazy package attributes (PEP 562): a package names what it exports and imports each module on first use.

``import sb3_textrl`` then costs milliseconds instead of loading torch, transformers and Stable-Baselines3, and the
command line builds its parser without them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """
    The ``__getattr__`` and ``__dir__`` of a package whose attributes are imported from its modules when first used.

    Usage, in a package's ``__init__.py``::

        __getattr__, __dir__ = lazy_exports(__name__, {"package.module": ("Name", "other_name")})

    :param package: the package's ``__name__``
    :param exports: module path -> the names it provides (each name is then an attribute of the package)
    :return: ``(__getattr__, __dir__)`` to assign at the package's top level; ``__getattr__`` also imports a
        submodule asked for by name
    """
    origin = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in origin:
            # A submodule, e.g. `import sb3_textrl; sb3_textrl.policies`, worked while the package imported it eagerly.
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(origin[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups no longer reach __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(origin))

    return __getattr__, __dir__
