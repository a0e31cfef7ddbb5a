"""Images to noised latents: the first step every method shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hosts.base import Host


def image_noise(shape: torch.Size, seed: int, count: int) -> torch.Tensor:
    """Noise for ``count`` latents of ``shape``: image i draws from its own CPU generator seeded seed + i,
    so results do not depend on batch size or device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) + i)) for i in range(count)])


def encode_and_noise(
    host: Host, pixels: torch.Tensor, size: tuple[int, int], timestep: int, seed: int, latents: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to the working size and encode (unless ``latents`` are given), then noise to ``timestep``."""
    if latents is None:
        x = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        latents = host.encode_images(x.clamp(0, 1))
    latents = latents.to(host.device, host.dtype)
    noise = image_noise(latents.shape[1:], seed, latents.shape[0]).to(latents.device, latents.dtype)
    return latents, host.add_noise(latents, noise, timestep)
