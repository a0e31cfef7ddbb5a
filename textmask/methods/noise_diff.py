"""Noise-difference maps (LD-ZNet, Figure 1): where the text changes the predicted noise."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import defaults, forward
from ..hosts.contract import Conditioning, Host
from ..postprocess import gaussian_blur, normalize

# One latent pixel. The per-pixel difference carries white noise: the sampled noise's own, and at half precision
# the rounding of two nearly equal predictions (bf16 keeps 8 bits). Blurring it away lets bf16 maps track fp32
# ones and sharpens the maps (the Shapes model card).
SMOOTHING = 1.0


def noise_difference(eps_text: torch.Tensor, eps_null: torch.Tensor, sigma: float = SMOOTHING) -> torch.Tensor:
    """Per-pixel ‖ε(z_t, text) − ε(z_t, ∅)‖₂ over channels, blurred by ``sigma`` latent pixels, min-max normalised.

    eps_text is [B, P, C, h, w] (one row per phrase), eps_null is [B, C, h, w]; returns [B, P, h, w].
    """
    diff = (eps_text.float() - eps_null.float().unsqueeze(1)).norm(dim=2)
    return normalize(gaussian_blur(normalize(diff), sigma))  # normalised first: the blur clamps to [0, 1]


class NoiseDiffDecoder:
    """One forward per image with [∅, phrase 1, …, phrase P] rows, image-major; maps of ‖ε_text − ε_∅‖."""

    resolution = None
    size_multiple = None
    measures_presence = False
    reads_self_attention = False
    presence = None

    def __init__(self, cond: Conditioning):
        self.cond = cond  # rows: [∅, phrase 1, …, phrase P]

    def __call__(self, host: Host, latents: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], len(self.cond)
        rows = [i for _ in range(b) for i in range(n)]
        eps = forward.eps(host, x.repeat_interleave(n, 0), sigma.repeat_interleave(n, 0), self.cond.select(rows),
                          latents.repeat_interleave(n, 0))
        eps = eps.reshape(b, n, *eps.shape[1:])
        return noise_difference(eps[:, 1:], eps[:, 0]).float().cpu()


class NoiseDiffMethod:
    """``noise-diff``: where each phrase changes the predicted noise against the empty prompt (LD-ZNet, Fig. 1)."""

    name = "noise-diff"
    timestep = defaults.TIMESTEP
    # Otsu per map, every region: keeping the strongest only was no better on Shapes val (docs/quality.md)
    auto_threshold = "otsu"
    needs_images = False
    needs_weights = False
    options = ()

    def setup(self, host: Host, phrases: Sequence[str], prompt: str | None) -> NoiseDiffDecoder:
        if prompt is not None and prompt.strip():
            token_map = forward.encode_prompts(host, [prompt]).token_maps[0]
            for p in phrases:
                token_map.find(p)  # the same "not in the prompt" contract as the attention method
        return NoiseDiffDecoder(forward.encode_prompts(host, [""] + list(phrases)))
