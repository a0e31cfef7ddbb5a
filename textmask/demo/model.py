"""The bundled Shapes model: a tiny SD-family model trained on textmask.demo.scenes (see MODEL_CARD.md)."""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_DIR = Path(__file__).resolve().parent / "model"


def load_demo_masker(directory: Path | str = MODEL_DIR, device: str = "cpu"):
    """A TextMasker over the bundled model (or another Shapes model folder: a UNet or an MM-DiT), loaded through the
    same diffusers host as a user's checkpoint."""
    from ..errors import CheckpointError
    from ..masker import TextMasker

    directory = Path(directory)
    if not ((directory / "unet").is_dir() or (directory / "transformer").is_dir()):
        raise CheckpointError(f"the demo model is missing from {directory}; reinstall textmask")
    return TextMasker.from_pretrained(directory, device=device, dtype=torch.float32)
