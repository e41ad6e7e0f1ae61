"""Search methods by name. Each module changes only the mechanism that defines its method.

Importing this package registers every module's ``METHOD`` under its name in the registry of
:mod:`pcdarts_core.config` (``pcdarts_core`` imports it, so the registry is full wherever configs are built);
``get_method(name)`` returns it.
"""

from __future__ import annotations

import importlib

from ..config import get_method, register_method
from .base import SearchMethod

#: method name -> module in this package
METHOD_MODULES: dict[str, str] = {
    "pcdarts": "pcdarts",
    "darts": "darts",
    "pdarts": "pdarts",
    "sharpdarts": "sharpdarts",
    "rome": "rome",
    "entrannas": "entrannas",
}

METHOD_NAMES: tuple[str, ...] = tuple(METHOD_MODULES)


for _name, _module in METHOD_MODULES.items():
    register_method(_name, importlib.import_module(f"{__name__}.{_module}").METHOD)


__all__ = ["METHOD_NAMES", "SearchMethod", "get_method"]
