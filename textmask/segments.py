"""Segment everything (DiffSeg) and named segments (DiffSeg segments labelled by cross-attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import postprocess as pp
from .capture import AttentionCapture
from .errors import TextMaskError
from .hosts.base import Host, iter_chunks
from .images import to_batch, working_size
from .latents import encode_and_noise
from .methods.attention import CrossAttentionMaps, SelfAttentionAggregate
from .methods.diffseg import diffseg


@dataclass
class SegmentsResult:
    """Per image: a label map at the exact input size and one mask per segment, largest first."""

    labels: torch.Tensor  # [B, H, W] long, 0..K_b-1 in order of decreasing area
    masks: list[torch.Tensor]  # per image [K_b, H, W] float in {0, 1}


@dataclass
class SemanticResult:
    """Masks in the names' order; label 0 is background, i + 1 is names[i]."""

    names: list[str]
    masks: torch.Tensor  # [B, len(names), H, W]
    labels: torch.Tensor  # [B, H, W] long


def _capture(host: Host, pixels, size, prompt: str, groups, timestep: int, seed: int, batch_size: int):
    """Yield (self-attention aggregate [b, N, N], its grid, cross maps [b, P, h, w] or None) per batch chunk."""
    cond = host.encode_prompts([prompt])
    for rows in iter_chunks(pixels.shape[0], batch_size):
        host.check_interrupt()
        latents, noisy = encode_and_noise(host, pixels[rows], size, timestep, seed + rows.start)
        b = latents.shape[0]
        selfagg = SelfAttentionAggregate()
        cross = CrossAttentionMaps(groups) if groups else None

        def sink(layer, start, probs, selfagg=selfagg, cross=cross):
            (selfagg if layer.kind == "self" else cross)(layer, start, probs)

        want = (lambda l: True) if groups else (lambda l: l.kind == "self")
        with AttentionCapture(host.attention_modules(), tuple(latents.shape[-2:]), probs=want, sink=sink):
            host.predict_noise(noisy, timestep, cond.select([0] * b), latents)
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
    host: Host, images, *, tau: float = 1.1, kmeans: bool = False, timestep: int = 300, seed: int = 0,
    resolution: int | None = None, batch_size: int = 1,
) -> SegmentsResult:
    """DiffSeg over the host's self-attention; masks at the exact input size."""
    if tau <= 0:
        raise TextMaskError(f"tau must be positive, got {tau}")
    pixels = to_batch(images)
    height, width = pixels.shape[-2:]
    size = working_size(height, width, resolution or host.resolution, host.size_multiple)
    labels, masks = [], []
    with torch.inference_mode(), host.progress(pixels.shape[0], "segments") as bar:
        for attention, grid, _ in _capture(host, pixels, size, "", None, timestep, seed, batch_size):
            for a in attention:
                _, maps = diffseg(a, grid, threshold=tau, kmeans_steps=3 if kmeans else 0)
                lab = _full_res_labels(maps, grid, (height, width))
                labels.append(lab)
                masks.append(torch.stack([(lab == k).float() for k in range(int(lab.max()) + 1)]))
                bar.update(1)
    return SegmentsResult(torch.stack(labels), masks)


def named_segments(
    host: Host, images, names: Sequence[str], *, tau: float = 1.1, timestep: int = 300, seed: int = 0,
    resolution: int | None = None, batch_size: int = 1,
) -> SemanticResult:
    """Label DiffSeg segments with names: each segment takes the name (or background) of highest mean attention."""
    from .masker import attention_prompt

    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise TextMaskError("give at least one name, and no empty names")
    dupes = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
    if dupes:
        raise TextMaskError(f"duplicate names: {', '.join(dupes)}")
    pixels = to_batch(images)
    height, width = pixels.shape[-2:]
    size = working_size(height, width, resolution or host.resolution, host.size_multiple)
    prompt = attention_prompt(names)
    token_map = host.encode_prompts([prompt]).token_maps[0]
    groups = [[0]] + [token_map.find(n) for n in names]  # position 0 is [SOS]: its map stands for background
    all_masks, all_labels = [], []
    with torch.inference_mode(), host.progress(pixels.shape[0], "named segments") as bar:
        for attention, grid, cross in _capture(host, pixels, size, prompt, groups, timestep, seed, batch_size):
            for a, ca in zip(attention, cross):
                seg, maps = diffseg(a, grid, threshold=tau)
                ca = pp.resize(ca.float().cpu(), grid)  # [1 + names, h, w] on the segment grid
                seg = seg.cpu()
                score = torch.stack([ca[:, seg == k].mean(-1) for k in range(len(maps))])  # [K, 1 + names]
                segment_label = score.argmax(-1)
                pixel_segment = _upsampled_argmax(maps, grid, (height, width))
                label = segment_label[pixel_segment]
                all_labels.append(label)
                all_masks.append(torch.stack([(label == i + 1).float() for i in range(len(names))]))
                bar.update(1)
    return SemanticResult(list(names), torch.stack(all_masks), torch.stack(all_labels))
