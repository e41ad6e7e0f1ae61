"""Search methods by name. Each module changes only the mechanism that defines its method.

``get_method(name)`` imports ``pcdarts_core.methods.<module>`` lazily and returns its ``METHOD``.
"""

from __future__ import annotations

import importlib

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


def get_method(name: str) -> SearchMethod:
    """The method called ``name``; ``ValueError`` naming the known methods otherwise."""
    if name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
    module = importlib.import_module(f"{__name__}.{METHOD_MODULES[name]}")
    return module.METHOD


__all__ = ["METHOD_NAMES", "SearchMethod", "get_method"]
