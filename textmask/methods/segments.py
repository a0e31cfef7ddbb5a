"""Segment everything (DiffCut or DiffSeg) and named segments (those segments labelled by cross-attention).

Both run one forward per batch: DiffCut's features come from the encoder's last self-attention at its coarsest
grid (``diffcut.encoder_features``; an MM-DiT's image-to-image attention rows instead), DiffSeg's from the
self-attention of every layer (``SelfAttentionAggregate``).
Segments are given as maps [K, N] on their grid, and every output pixel takes the highest one, upsampled.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import defaults, forward, options
from .. import postprocess as pp
from ..errors import CaptureError, TextMaskError
from ..hosts.contract import Conditioning, Host
from ..results import LabelsResult, SegmentsResult
from .attention import CrossAttentionMaps, SelfAttentionAggregate, phrase_conditioning
from .diffcut import (DIFFCUT_GRID, concept_scores, encoder_features, encoder_self_attention, pooled_rows,
                      pooled_tokens, recursive_ncut)
from .diffseg import diffseg


def encoder_modules(host: Host) -> list:
    """The host's UNet encoder self-attention modules, where DiffCut reads its features; none on an MM-DiT."""
    try:
        modules = host.attention_modules()
    except CaptureError:  # MM-DiT hosts have no UNet attention modules
        return []
    return encoder_self_attention(modules)


def _forwards(host: Host, segmenter: str, images: forward.Images, cond: Conditioning, groups, timestep: int,
              seed: int, batch_size: int, desc: str):
    """Yield (the batch's rows, each image's features [N, C] or attention [N, N], their grid, cross maps
    [b, P, h, w] or None) per batch.

    DiffCut's forward is the reference's: the latent noised at ``timestep`` with per-image seeds. Its features are a
    UNet encoder's (``encoder_features``); an MM-DiT has no encoder, and there the image-to-image attention rows
    stand in. Either is pooled to at most DiffCut's 32×32 grid. DiffSeg's forward, as its reference runs it: the clean
    latent under timestep t's embedding, so ``seed`` changes nothing there."""
    modules = encoder_modules(host) if segmenter == "diffcut" else []
    for rows in forward.batches(host, len(images), batch_size, desc):
        latents = forward.encode(host, images.pixels[rows], images.working)
        cross = CrossAttentionMaps(groups) if groups else None
        ctx = cond.select([0] * latents.shape[0])
        if segmenter == "diffcut":
            x, sigma = forward.add_noise(host, latents, timestep, seed + rows.start)
        else:
            x, sigma = forward.without_noise(host, latents, timestep)
        if modules:
            features = encoder_features(modules, tuple(latents.shape[-2:]))
            with features:
                forward.eps(host, x, sigma, ctx, latents, [cross] if cross else [])
            grid = features.grid  # refuses in one line if no hook saw the encoder (a compiled model)
            kept, grid = pooled_tokens(features.output, grid, DIFFCUT_GRID)
            yield rows, list(kept), grid, (cross.aggregate() if cross else None)
            continue
        selfagg = SelfAttentionAggregate()
        forward.eps(host, x, sigma, ctx, latents, [selfagg] + ([cross] if cross else []))
        attention, grid = selfagg.result(), selfagg.size
        if segmenter == "diffcut":
            attention, grid = pooled_rows(attention, grid, DIFFCUT_GRID)
        yield rows, list(attention), grid, (cross.aggregate() if cross else None)


def _segment_maps(segmenter: str, per_image: torch.Tensor, grid: tuple[int, int], *, tau: float, cut: float,
                  kmeans: bool = False) -> torch.Tensor:
    """Segment maps [K, N] on ``grid`` from one image's features [N, C] (DiffCut) or attention [N, N] (DiffSeg).
    DiffCut's cuts run on the CPU, in float32 as the reference's, so the segments are the same on every device."""
    if segmenter == "diffcut":
        return concept_scores(per_image, recursive_ncut(per_image.cpu(), cut, defaults.CUT_ALPHA).to(per_image.device))
    return diffseg(per_image, grid, threshold=tau, kmeans=kmeans)[1]


def _edges(maps: torch.Tensor, grid: tuple[int, int], images: forward.Images, index: int,
           host: Host) -> tuple[torch.Tensor, tuple[int, int]]:
    """Segment maps [K, N] on ``grid`` refined along image ``index`` by PAMR (``pp.edge_refined``): the maps
    [K, N'] and their grid, twice the latent's."""
    refined = pp.edge_refined(maps.reshape(1, -1, *grid).float().cpu(), images.pixels[index : index + 1].cpu(),
                              images.working, images.size, (0, 0, *images.size), host.geometry.latent_factor)[0]
    return refined.flatten(1), tuple(refined.shape[-2:])


def _settings(segmenter, tau, cut, timestep, seed, batch_size, kmeans: bool = False) -> tuple:
    segmenter, kmeans = options.segmenter(segmenter), options.flag("kmeans", kmeans)
    if kmeans and segmenter != "diffseg":
        raise TextMaskError("kmeans refines DiffSeg's segments; pass segmenter='diffseg' with it")
    tau, cut, seed, batch_size = options.tau(tau), options.cut(cut), options.seed(seed), options.batch_size(batch_size)
    own = defaults.DIFFCUT_TIMESTEP if segmenter == "diffcut" else defaults.TIMESTEP
    return segmenter, tau, cut, options.timestep(own if timestep is None else timestep), seed, batch_size


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
    host: Host, images, *, segmenter: str = defaults.SEGMENTER, tau: float = defaults.TAU, cut: float = defaults.CUT,
    kmeans: bool = False, timestep: int | None = None, seed: int = 0, resolution: int | None = None,
    batch_size: int = 1, pamr: bool = defaults.PAMR,
) -> SegmentsResult:
    """Segments of the host's attention by ``segmenter`` ("diffcut" or "diffseg"); masks at the exact input size.
    ``cut``: DiffCut's threshold; ``tau`` and ``kmeans``: DiffSeg's; ``timestep`` None: the segmenter's reference
    (50 for DiffCut, 300 for DiffSeg); ``pamr``: refine the segments along the image's edges."""
    segmenter, tau, cut, timestep, seed, batch_size = _settings(segmenter, tau, cut, timestep, seed, batch_size, kmeans)
    pamr, kmeans = options.flag("pamr", pamr), options.flag("kmeans", kmeans)
    images = forward.prepare_images(host, images, resolution, self_attention=segmenter == "diffseg")
    labels, masks = [], []
    with torch.inference_mode():
        empty = forward.encode_prompts(host, [""])
        for rows, per_image, grid, _ in _forwards(host, segmenter, images, empty, None, timestep, seed, batch_size,
                                                  "segments"):
            for index, a in zip(range(rows.start, rows.stop), per_image):
                maps, on = _segment_maps(segmenter, a, grid, tau=tau, cut=cut, kmeans=kmeans), grid
                if pamr:
                    maps, on = _edges(maps, grid, images, index, host)
                lab = _full_res_labels(maps, on, images.size)
                labels.append(lab)
                masks.append(torch.stack([(lab == k).float() for k in range(int(lab.max()) + 1)]))
    return SegmentsResult(torch.stack(labels), masks)


def segment_names(cross: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """Each of ``count`` segments' name [K]: 1 + the index of the name whose map is higher inside the segment than
    outside by the most, or 0 (background) where no name's is higher inside. cross [P, h, w] (each map min-max
    normalised); segments [h, w] labels 0..K-1 on the same grid. A segment that covers the whole grid, or none of
    it, is background: no map can be higher inside it than outside."""
    flat, seg = cross.flatten(1).float(), segments.reshape(-1)
    names = torch.zeros(count, dtype=torch.long)
    for k in range(count):
        inside = seg == k
        if inside.all() or not inside.any():
            continue
        contrast = flat[:, inside].mean(1) - flat[:, ~inside].mean(1)
        if contrast.max() > 0:
            names[k] = int(contrast.argmax()) + 1
    return names


def named_segments(
    host: Host, images, names: Sequence[str], *, segmenter: str = defaults.SEGMENTER, tau: float = defaults.TAU,
    cut: float = defaults.CUT, timestep: int | None = None, seed: int = 0, resolution: int | None = None,
    batch_size: int = 1, pamr: bool = defaults.PAMR,
) -> LabelsResult:
    """Label segments with names (``segment_names``), from one forward under the names' conditioning
    (``phrase_conditioning``)."""
    segmenter, tau, cut, timestep, seed, batch_size = _settings(segmenter, tau, cut, timestep, seed, batch_size)
    names, pamr = options.names(names), options.flag("pamr", pamr)
    images = forward.prepare_images(host, images, resolution, self_attention=segmenter == "diffseg")
    cond, groups = phrase_conditioning(host, names)
    all_masks, all_labels = [], []
    with torch.inference_mode():
        for rows, per_image, grid, cross in _forwards(host, segmenter, images, cond, groups, timestep, seed,
                                                      batch_size, "named segments"):
            for index, a, ca in zip(range(rows.start, rows.stop), per_image, cross):
                maps, on = _segment_maps(segmenter, a, grid, tau=tau, cut=cut).float().cpu(), grid
                if pamr:
                    maps, on = _edges(maps, grid, images, index, host)
                ca = ca.float().cpu()  # [names, h, w] at the finest cross-attention grid
                on_cross = pp.resize(maps.reshape(-1, *on), tuple(ca.shape[-2:])).argmax(0)
                segment_label = segment_names(ca, on_cross, len(maps))
                label = segment_label[_upsampled_argmax(maps, on, images.size)]
                all_labels.append(label)
                all_masks.append(torch.stack([(label == i + 1).float() for i in range(len(names))]))
    return LabelsResult(list(names), torch.stack(all_labels), torch.stack(all_masks))
