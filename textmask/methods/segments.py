"""Segment everything (DiffSeg) and named segments (DiffSeg segments labelled by cross-attention), on the engine."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import defaults, forward, options
from .. import postprocess as pp
from ..errors import TextMaskError
from ..hosts.contract import Host
from ..results import LabelsResult, SegmentsResult
from .attention import CrossAttentionMaps, SelfAttentionAggregate, attention_prompt
from .diffseg import diffseg


def _forwards(host: Host, images: forward.Images, prompt: str, groups, timestep: int, seed: int, batch_size: int,
              desc: str):
    """Yield (self-attention aggregate [b, N, N], its grid, cross maps [b, P, h, w] or None) per batch.

    As the reference runs DiffSeg, the UNet sees the clean latent under timestep t's embedding: no noise, so
    ``seed`` changes nothing here (it stays for the API's sake)."""
    cond = forward.encode_prompts(host, [prompt])
    for rows in forward.batches(host, len(images), batch_size, desc):
        latents = forward.encode(host, images.pixels[rows], images.working)
        x, sigma = forward.without_noise(host, latents, timestep)
        selfagg = SelfAttentionAggregate()
        cross = CrossAttentionMaps(groups) if groups else None
        forward.eps(host, x, sigma, cond.select([0] * x.shape[0]), latents, [selfagg] + ([cross] if cross else []))
        yield selfagg.result(), selfagg.size, (cross.aggregate() if cross else None)


# Upsampled segment maps stay on the GPU up to this size; a larger stack (a huge image) is resized on the CPU.
FULL_RES_BYTES = 256 << 20


def _upsampled_argmax(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The index of the highest of the segment maps [K, N], each upsampled to ``size``, per pixel (on the CPU)."""
    on = maps.device if len(maps) * size[0] * size[1] * 4 <= FULL_RES_BYTES else torch.device("cpu")
    return pp.resize(maps.reshape(-1, *grid).float().to(on), size).argmax(0).cpu()


def _full_res_labels(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Upsample segment maps [K, N] to the image and take the argmax, relabelled by decreasing area."""
    labels = _upsampled_argmax(maps, grid, size)
    counts = torch.bincount(labels.reshape(-1), minlength=len(maps))
    order = [int(k) for k in counts.argsort(descending=True) if counts[k] > 0]
    remap = torch.full((len(maps),), -1, dtype=torch.long)
    remap[order] = torch.arange(len(order))
    return remap[labels]


def segment_everything(
    host: Host, images, *, tau: float = defaults.TAU, kmeans: bool = False, timestep: int = defaults.TIMESTEP,
    seed: int = 0, resolution: int | None = None, batch_size: int = 1,
) -> SegmentsResult:
    """DiffSeg over the host's self-attention; masks at the exact input size."""
    tau, timestep, seed = options.tau(tau), options.timestep(timestep), options.seed(seed)
    batch_size = options.batch_size(batch_size)
    images = forward.prepare_images(host, images, resolution)
    labels, masks = [], []
    with torch.inference_mode():
        for attention, grid, _ in _forwards(host, images, "", None, timestep, seed, batch_size, "segments"):
            for a in attention:
                _, maps = diffseg(a, grid, threshold=tau, kmeans=kmeans)
                lab = _full_res_labels(maps, grid, images.size)
                labels.append(lab)
                masks.append(torch.stack([(lab == k).float() for k in range(int(lab.max()) + 1)]))
    return SegmentsResult(torch.stack(labels), masks)


def named_segments(
    host: Host, images, names: Sequence[str], *, tau: float = defaults.TAU, timestep: int = defaults.TIMESTEP,
    seed: int = 0, resolution: int | None = None, batch_size: int = 1,
) -> LabelsResult:
    """Label DiffSeg segments with names: each segment takes the name (or background) of highest mean attention."""
    tau, timestep, seed = options.tau(tau), options.timestep(timestep), options.seed(seed)
    batch_size = options.batch_size(batch_size)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TextMaskError("names must be a list of words, e.g. ['sky', 'person']")
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise TextMaskError("give at least one name, and no empty names")
    dupes = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
    if dupes:
        raise TextMaskError(f"duplicate names: {', '.join(dupes)}")
    images = forward.prepare_images(host, images, resolution)
    prompt = attention_prompt(names)
    token_map = forward.encode_prompts(host, [prompt]).token_maps[0]
    groups = [[0]] + [token_map.find(n) for n in names]  # position 0 is [SOS]: its map stands for background
    all_masks, all_labels = [], []
    with torch.inference_mode():
        for attention, grid, cross in _forwards(host, images, prompt, groups, timestep, seed, batch_size,
                                                "named segments"):
            for a, ca in zip(attention, cross):
                seg, maps = diffseg(a, grid, threshold=tau)
                ca = pp.resize(ca.float().cpu(), grid)  # [1 + names, h, w] on the segment grid
                seg = seg.cpu()
                score = torch.stack([ca[:, seg == k].mean(-1) for k in range(len(maps))])  # [K, 1 + names]
                segment_label = score.argmax(-1)
                pixel_segment = _upsampled_argmax(maps, grid, images.size)
                label = segment_label[pixel_segment]
                all_labels.append(label)
                all_masks.append(torch.stack([(label == i + 1).float() for i in range(len(names))]))
    return LabelsResult(list(names), torch.stack(all_labels), torch.stack(all_masks))
