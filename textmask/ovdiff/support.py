"""OVDiff's support set: images sampled by the host model for one class, with the class tokens' attribution
summed while sampling (no second pass), and their foreground / background split by DiffSeg segments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.ndimage import binary_erosion

from .. import defaults, forward
from .. import postprocess as pp
from ..capture import AttentionLayer, Need, context_matcher
from ..hosts.contract import Host
from ..methods.attention import CrossAttentionMaps
from ..methods.diffseg import diffseg

PROMPT = "A good picture of a {}"
NEGATIVE = "text, low quality, blurry, cartoon, meme, low resolution, bad, poor, faded"
FG_FALLBACK, BG_THRESHOLD = 0.5, 0.2


class AttributionSum(CrossAttentionMaps):
    """Capture sink: the class tokens' cross-attention summed over layers, heads and forwards, at ``size``.

    It stays on the device while sampling, so no forward waits on a copy to the CPU; ``result()`` reads it.
    """

    def __init__(self, positions: list[int], count: int, size: tuple[int, int], context_rows=None):
        # Every layer alike, and a sum over the class tokens rather than their mean; only the rows whose text
        # context is the class prompt (``context_rows``), however the sampler batches cond and uncond.
        super().__init__([positions], layer_weight=lambda layer: float(len(positions)), heads="mean",
                         need=Need(kinds=("cross",), context_rows=context_rows))
        self.count, self.size = count, size

    def __call__(self, layer: AttentionLayer, start: int, probs: torch.Tensor) -> None:
        if probs.shape[0] != self.count:
            raise RuntimeError(f"expected {self.count} conditional rows per forward, got {probs.shape[0]}")
        super().__call__(layer, start, probs)

    def result(self) -> torch.Tensor:
        """The sum [count, *size] on the CPU (zeros if nothing was captured)."""
        if not self.sums:
            return torch.zeros(self.count, *self.size)
        return self.total(self.size, mode="bilinear")[:, 0].cpu()


@dataclass
class SupportImage:
    latents: torch.Tensor  # [C, h, w], host-scaled
    attribution: torch.Tensor  # [h, w], min-max normalised


def sample_support(host: Host, name: str, count: int, *, steps: int, cfg: float, seed: int, batch_size: int = 4,
                   resolution: int | None = None, on_image=None) -> list[SupportImage]:
    """``count`` images of ``name`` sampled by the host with DPM-Solver++, and their attributions."""
    side = forward.check_square_side(host, resolution) // host.geometry.latent_factor
    prompt = PROMPT.format(name)
    cond = forward.encode_prompts(host, [prompt])
    positions = cond.token_maps[0].find(name)
    out: list[SupportImage] = []
    for rows in forward.iter_chunks(count, batch_size):
        start, n = rows.start, rows.stop - rows.start
        attribution = AttributionSum(positions, n, (side, side), context_matcher(cond.context))
        # The host's own sampler runs the forwards, so this is the one capture outside forward.eps.
        with host.attention_capture((side, side), [attribution]):
            latents = host.sample(prompt, NEGATIVE, n, steps=steps, cfg=cfg, seed=seed + start, resolution=resolution)
        total = attribution.result()
        for i in range(n):
            out.append(SupportImage(latents[i].detach(), pp.normalize(total[i][None])[0]))
            if on_image is not None:
                on_image()
    return out


def split_foreground(attention: torch.Tensor, grid: tuple[int, int], attribution: torch.Tensor,
                     tau: float = defaults.TAU) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) bool masks on ``grid`` from DiffSeg segments of one image's self-attention.

    Foreground is the segment of highest mean attribution; background is the lowest-ranked segment where the
    attribution is < 0.2, eroded by one pixel. With a single segment: attribution > 0.5 and < 0.2.
    """
    attr = pp.resize(attribution[None, None].float(), grid)[0, 0]
    labels, maps = diffseg(attention, grid, threshold=tau)
    labels = labels.cpu()
    if len(maps) < 2:
        return attr > FG_FALLBACK, attr < BG_THRESHOLD
    means = torch.stack([attr[labels == k].mean() if (labels == k).any() else attr.new_tensor(-1.0) for k in range(len(maps))])
    order = means.argsort(descending=True)
    fg = labels == order[0]
    bg = (labels == order[-1]) & (attr < BG_THRESHOLD)
    bg = torch.from_numpy(binary_erosion(bg.numpy()))
    return fg, bg
