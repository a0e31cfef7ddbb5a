"""Writing masks and heatmap overlays as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .images import rgb

# Anchor colours of a perceptually ordered dark-to-bright map (black, purple, red, orange, pale yellow).
_COLOURS = torch.tensor(
    [[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.74, 0.22, 0.33], [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]]
)


def colourize(heatmap: torch.Tensor) -> torch.Tensor:
    """[..., H, W] in [0, 1] -> [..., H, W, 3] RGB through a dark-to-bright colour map."""
    x = heatmap.float().clamp(0, 1) * (len(_COLOURS) - 1)
    lo = x.floor().long().clamp(max=len(_COLOURS) - 2)
    frac = (x - lo).unsqueeze(-1)
    c = _COLOURS.to(heatmap.device)
    return c[lo] * (1 - frac) + c[lo + 1] * frac


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Blend a colourised heatmap over an image [..., H, W, C] (1-4 channels, read as ``images.rgb`` reads them) and
    a heatmap [..., H, W], both in [0, 1] -> [..., H, W, 3]."""
    return (rgb(image.float()) * (1 - alpha) + colourize(heatmap) * alpha).clamp(0, 1)


def save_mask(mask: torch.Tensor, path: str | Path) -> None:
    """Save a [H, W] mask in [0, 1] as an 8-bit grayscale PNG (255 = selected)."""
    from PIL import Image

    a = (mask.detach().float().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(a).save(path, format="PNG")


def save_rgb(image: torch.Tensor, path: str | Path) -> None:
    """Save a [H, W, 3] image in [0, 1] as PNG."""
    from PIL import Image

    a = (image.detach().float().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(a).save(path, format="PNG")


def save_overlay(image: torch.Tensor, heatmap: torch.Tensor, path: str | Path) -> None:
    """Save the heatmap blended over the image ([H, W, 3] and [H, W])."""
    save_rgb(overlay(image, heatmap), path)


def colour_labels(labels: torch.Tensor) -> torch.Tensor:
    """[..., H, W] integer labels -> [..., H, W, 3] RGB with well-separated hues (golden-ratio steps)."""
    import colorsys

    count = int(labels.max()) + 1 if labels.numel() else 1
    palette = torch.tensor([colorsys.hsv_to_rgb((0.618034 * k) % 1.0, 0.65, 0.95) for k in range(count)], dtype=torch.float32)
    return palette[labels.long().cpu()]
