"""Noise-difference maps (LD-ZNet, Figure 1): where the text changes the predicted noise."""

from __future__ import annotations

import torch

from ..postprocess import normalize


def noise_difference(eps_text: torch.Tensor, eps_null: torch.Tensor) -> torch.Tensor:
    """Per-pixel ‖ε(z_t, text) − ε(z_t, ∅)‖₂ over channels, min-max normalised.

    eps_text is [B, P, C, h, w] (one row per phrase), eps_null is [B, C, h, w]; returns [B, P, h, w].
    """
    diff = (eps_text.float() - eps_null.float().unsqueeze(1)).norm(dim=2)
    return normalize(diff)
