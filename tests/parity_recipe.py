"""Weights the parity fixtures can rebuild without the reference: every key of a reference model redrawn from a
seeded generator around that key's own initial mean and deviation. The fixture stores (key, shape, mean, std)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

Spec = list[tuple[str, tuple[int, ...], float, float]]


def spec_of(state_dict: dict[str, torch.Tensor]) -> Spec:
    """(key, shape, mean, std) per key; a key with no spread (zero-initialised outputs) gets a std of 0.05, so that
    every layer matters."""
    spec = []
    for key, value in state_dict.items():
        v = value.double()
        std = float(v.std()) if v.numel() > 1 else 0.0
        spec.append((key, tuple(value.shape), float(v.mean()), std if std > 1e-6 else 0.05))
    return spec


def weights(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for (key, shape, mean, std) rows: key i draws from a generator seeded ``seed`` + i."""
    out = {}
    for i, (key, shape, mean, std) in enumerate(spec):
        g = torch.Generator().manual_seed(seed + i)
        out[key] = torch.randn(tuple(shape), generator=g, dtype=torch.float64).float() * std + mean
    return out


def spec_arrays(spec: Spec) -> dict[str, np.ndarray]:
    """The spec as arrays for ``np.savez_compressed``."""
    return {"keys": np.array([k for k, *_ in spec]), "shapes": np.array([",".join(map(str, s)) for _, s, *_ in spec]),
            "stats": np.array([(m, s) for *_, m, s in spec])}


def load_spec(path: Path) -> tuple[Spec, np.lib.npyio.NpzFile]:
    """The spec stored in a fixture, and the fixture."""
    stored = np.load(path)
    spec = [(str(k), tuple(int(n) for n in str(s).split(",")), float(m), float(sd))
            for k, s, (m, sd) in zip(stored["keys"], stored["shapes"], stored["stats"])]
    return spec, stored
