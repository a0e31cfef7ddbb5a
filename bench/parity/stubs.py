"""The harnesses' one import fix: empty modules for packages a reference imports but never calls here."""

from __future__ import annotations

import importlib
import sys
import types


def empty_attribute(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})  # any other name resolves to an empty class


def stub_missing(*names: str) -> None:
    """Install an empty module for each of ``names`` that cannot be imported (parents included)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules:
                    module = types.ModuleType(sub)
                    module.__path__ = []
                    module.__getattr__ = empty_attribute
                    sys.modules[sub] = module
                if i > 1:
                    setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[sub])
