"""What the parity harnesses share: their command line, and the import fix of empty modules for packages a
reference imports but never calls here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch


def command_line(doc: str, env: str, repository: str) -> argparse.Namespace:
    """``--reference PATH`` (default ``$env``) and ``--write-fixture``; exits in one line without a reference."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get(env), help=f"{repository} checkout")
    parser.add_argument("--write-fixture", action="store_true", help="write the fixture into tests/fixtures/parity/")
    args = parser.parse_args()
    if not args.reference:
        sys.exit(f"give the reference checkout: --reference PATH or {env}")
    return args


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours − reference| / max |reference|: the figure every harness reports."""
    return float((ours - reference).abs().max() / reference.abs().max())


def write_fixture(path: Path, **arrays) -> None:
    """The reference's outputs (and the inputs' recipe), compressed, for tests/test_parity.py."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


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
