"""Mask post-processing: small functions over [..., H, W] float tensors in [0, 1].

Morphology and Otsu run through scipy/scikit-image on the CPU; masks are 2-D and cheap to move.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.filters import threshold_otsu

SOFT_BAND = 0.2  # width of the ramp around a threshold in soft masks, in normalised heatmap units
# Threshold "auto" keeps a region of a one-thing phrase when its peak reaches this share of the strongest region's:
# weaker ones are other things the map half-lights (chosen on Shapes val, docs/quality.md).
STRONG_SHARE = 0.75


def _per_map(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a numpy function to each 2-D map of a [..., H, W] tensor."""
    flat = x.detach().float().cpu().reshape(-1, *x.shape[-2:]).numpy()
    out = np.stack([fn(m) for m in flat]) if len(flat) else flat
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(x.shape).to(x.device)


def normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each [H, W] map to [0, 1]; a constant map becomes all zeros."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > eps, (maps - lo) / span.clamp_min(eps), torch.zeros_like(maps))


def otsu_threshold(heatmap: torch.Tensor) -> float:
    """Otsu's threshold of one map; +inf for a constant map, so that nothing is selected."""
    values = heatmap.detach().float().cpu().numpy().ravel()
    if values.size == 0 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values, nbins=256))


def parse_threshold(value) -> float | str:
    """``"auto"`` (also empty text), ``"otsu"`` or a number in [0, 1], from an API value or typed text; raises
    TextMaskError. "auto" is Otsu's threshold keeping, for a phrase that names one thing, only the regions as strong
    as its best (``auto_regions``); "otsu" keeps every region above Otsu's threshold, as a number does above it."""
    from .errors import TextMaskError

    if isinstance(value, str) and value.strip().lower() in ("", "auto", "otsu"):
        return value.strip().lower() or "auto"
    if isinstance(value, bool):  # True is not a threshold, though float(True) is 1.0
        raise TextMaskError(f"threshold must be 'auto', 'otsu' or a number in [0, 1], got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TextMaskError(f"threshold must be 'auto', 'otsu' or a number in [0, 1], got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise TextMaskError(f"threshold must be 'auto', 'otsu' or a number in [0, 1], got {value!r}")
    return number


def thresholds(heatmaps: torch.Tensor, threshold: float | str) -> torch.Tensor:
    """Per-map thresholds of [..., H, W]: Otsu for ``"auto"`` and ``"otsu"``, else the fixed value (see
    ``parse_threshold``); shape [..., 1, 1]."""
    if threshold in ("auto", "otsu"):
        flat = heatmaps.reshape(-1, *heatmaps.shape[-2:])
        values = [otsu_threshold(m) for m in flat]
        t = torch.tensor(values, dtype=torch.float32, device=heatmaps.device)
        return t.reshape(*heatmaps.shape[:-2], 1, 1)
    return torch.full((*heatmaps.shape[:-2], 1, 1), threshold, device=heatmaps.device)


def strongest_regions(above: torch.Tensor, heat: torch.Tensor, share: float = STRONG_SHARE) -> torch.Tensor:
    """The regions (8-connected) of a binary map ``above`` [H, W] whose peak in ``heat`` [H, W] reaches ``share``
    of the highest region's peak: hysteresis, as Canny's edges keep only the weak edges joined to strong ones.
    Returns bool [H, W]."""
    mask = above.detach().cpu().numpy() > 0.5
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count < 2:
        return torch.from_numpy(mask).to(above.device)
    peaks = ndimage.maximum(heat.detach().float().cpu().numpy(), labels, np.arange(1, count + 1))
    strong = np.flatnonzero(peaks >= share * peaks.max()) + 1
    return torch.from_numpy(np.isin(labels, strong)).to(above.device)


def auto_regions(above: torch.Tensor, heat: torch.Tensor, phrase: str) -> torch.Tensor:
    """What threshold "auto" keeps of a phrase's pixels above Otsu's threshold ``above`` [H, W]: the strongest
    regions when the phrase names one thing ("red car", "sky"), every region when it names several ("cars", "all
    cars"; ``subject.names_several``). Returns bool [H, W]."""
    from .subject import names_several

    return above.bool() if names_several(phrase) else strongest_regions(above, heat)


def soft_threshold(heatmaps: torch.Tensor, t: torch.Tensor, band: float = SOFT_BAND) -> torch.Tensor:
    """Map a heatmap to a ramp that crosses 0.5 exactly at the threshold ``t``.

    Fuzzy OR/AND/NOT (max/min/1-x) keep that crossing, so ``ramp > 0.5`` of a combined expression
    equals the Boolean formula over the per-phrase binary masks.
    """
    return (0.5 + (heatmaps - t) / band).clamp(0.0, 1.0)


def ramp_to_mask(ramp: torch.Tensor, soft: bool) -> torch.Tensor:
    """Binary mask (ramp > 0.5) or, when soft, the upper half of the ramp stretched to [0, 1]."""
    if soft:
        return (2.0 * ramp - 1.0).clamp(0.0, 1.0)
    return (ramp > 0.5).float()


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of masks [..., H, W] in [0, 1], standard deviation ``sigma`` in pixels (feathering)."""
    if sigma <= 0:
        return mask
    return _per_map(lambda m: ndimage.gaussian_filter(m, sigma=sigma, mode="nearest"), mask).clamp(0, 1)


def grow(mask: torch.Tensor, pixels: float) -> torch.Tensor:
    """Grow (positive) or shrink (negative) masks [..., H, W] by a disc of radius ``|pixels|`` pixels."""
    if pixels == 0:
        return mask
    r = abs(float(pixels))

    def binary(m: np.ndarray) -> np.ndarray:
        # Exact disc morphology through the Euclidean distance transform, linear in the image size.
        on = m > 0.5
        if pixels > 0:
            return (ndimage.distance_transform_edt(~on) <= r).astype(np.float32) if on.any() else on.astype(np.float32)
        return (ndimage.distance_transform_edt(on) > r).astype(np.float32)

    def soft(m: np.ndarray) -> np.ndarray:
        from skimage.morphology import dilation, disk, erosion

        if r < 1:  # a disc under one pixel holds only its centre, as the binary rule finds
            return m
        footprint = disk(int(round(r)), decomposition="sequence")
        return (dilation if pixels > 0 else erosion)(m, footprint)

    is_binary = bool(((mask == 0) | (mask == 1)).all())
    return _per_map(binary if is_binary else soft, mask)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill holes: background regions not connected to the border become 1."""
    return _per_map(lambda m: np.maximum(m, ndimage.binary_fill_holes(m > 0.5).astype(np.float32)), mask)


def invert(mask: torch.Tensor) -> torch.Tensor:
    """1 - mask."""
    return 1.0 - mask


def resize(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize [..., h, w] maps to exactly ``size`` = (H, W), mapping the full extent onto the full extent."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kw = {} if mode == "nearest" else {"align_corners": False}
    y = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    return y.reshape(*lead, *size)


def postprocess(
    mask: torch.Tensor,
    *,
    fill: bool = False,
    grow_px: float = 0,
    invert_mask: bool = False,
    blur_px: float = 0,
) -> torch.Tensor:
    """Fill holes, grow/shrink, invert, then blur masks [..., H, W] in [0, 1], in that order (so blur feathers the
    final edge); ``grow_px`` and ``blur_px`` are in pixels."""
    if fill:
        mask = fill_holes(mask)
    mask = grow(mask, grow_px)
    if invert_mask:
        mask = invert(mask)
    return gaussian_blur(mask, blur_px)


COMBINE_MODES = ("replace", "add", "subtract")


def combine_mode(mode) -> str:
    """``mode``, checked: one line naming the choices otherwise."""
    if mode not in COMBINE_MODES:
        from .errors import TextMaskError

        raise TextMaskError(f"mask mode must be {', '.join(COMBINE_MODES[:-1])} or {COMBINE_MODES[-1]}, got {mode!r}")
    return mode


def combine(ours: torch.Tensor, painted: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Combine a text mask with a hand-painted one ([H, W] in [0, 1]): replace, add (max) or subtract."""
    combine_mode(mode)
    if painted is None or mode == "replace":
        return ours if mode != "subtract" else torch.zeros_like(ours)
    if mode == "add":
        return torch.maximum(ours, painted)
    return painted * (1 - ours)


def edge_refined(maps: torch.Tensor, pixels: torch.Tensor, working: tuple[int, int], size: tuple[int, int],
                 region: tuple[int, int, int, int], latent_factor: int) -> torch.Tensor:
    """Maps [B, P, h, w] of ``region`` = (top, left, h, w) of images ``pixels`` [B, 3, H, W] (``size`` = (H, W),
    worked on at ``working``) refined by PAMR along the image, on a grid twice the latent's (at most the working
    size): there the image has the detail the attention lacks, at a sixteenth of the working size's cost for SD.
    One image at a time, on the CPU, so a long batch holds one image's neighbours at once."""
    top, left, rh, rw = region
    (wh, ww), (ih, iw) = working, size
    side = [round(rh * wh / ih), round(rw * ww / iw)]  # the region at the working size
    grid = tuple(max(1, min(s, 2 * -(-s // latent_factor))) for s in side)
    out = []
    for i in range(maps.shape[0]):
        guide = F.interpolate(pixels[i : i + 1, :, top : top + rh, left : left + rw].float(), size=grid,
                              mode="bilinear", align_corners=False, antialias=True)
        out.append(pamr(resize(maps[i : i + 1].float(), grid), guide))
    return torch.cat(out)


def over_frames(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Values [B, ...] of consecutive frames averaged over neighbouring frames with a Gaussian of ``sigma`` frames
    (edges repeat the first and last frame); 0, or a single frame, returns them as they are."""
    if sigma <= 0 or values.shape[0] < 2:
        return values
    from scipy.ndimage import gaussian_filter1d

    smoothed = gaussian_filter1d(values.float().cpu().numpy(), float(sigma), axis=0, mode="nearest", truncate=3.0)
    return torch.from_numpy(smoothed).to(values.device)


def temporal_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Maps [B, P, h, w] smoothed ``over_frames``, so a video batch's masks do not flicker, each normalised again
    as every map is; 0 returns them as they are."""
    if sigma <= 0 or maps.shape[0] < 2:
        return maps
    return normalize(over_frames(maps, sigma))


def presence_gate(presence: torch.Tensor | None, min_presence: float) -> torch.Tensor | None:
    """Where each phrase's presence [B, P] reaches ``min_presence`` (bool [B, P]); None when the gate is off (0)."""
    if min_presence == 0:
        return None
    if presence is None:
        from .errors import TextMaskError

        raise TextMaskError("min_presence needs a presence score, which `attention` measures with heads='information' "
                            "and aggregation='aggsd' on an attention grid larger than one pixel; use those (the "
                            "defaults) or a larger resolution, or leave min_presence at 0")
    return presence >= min_presence


def masks_from_maps(expr, phrases: list[str], maps: torch.Tensor, size: tuple[int, int],
                    region: tuple[int, int, int, int], threshold: float | str,
                    auto_threshold: float | str | None = None, *, soft: bool = False, blur: float = 0.0,
                    grow_px: float = 0.0, fill: bool = False, invert_mask: bool = False,
                    present: torch.Tensor | None = None):
    """The ``MaskResult`` of a mask prompt from its phrases' normalised maps [B, P, h, w].

    Each phrase is thresholded on its own map ("auto": Otsu's, keeping a one-thing phrase's strongest regions,
    unless the method's ``auto_threshold`` says "otsu" or gives the value its calibrated maps take), the maps are
    resized onto ``region`` = (top, left, h, w) of an image of ``size`` (nothing outside it), combined by the
    prompt's logic, then filled, grown, inverted and blurred. Where ``present`` [B, P] (bool) is False, the phrase
    selects nothing at any threshold and its map is empty: "A AND NOT B" is then A.
    """
    from .mask_prompt import evaluate
    from .results import MaskResult

    if not bool(torch.isfinite(maps).all()):
        from .errors import NONFINITE_HINT, TextMaskError

        raise TextMaskError(f"the word maps came out NaN or infinite; {NONFINITE_HINT}")
    if threshold == "auto" and auto_threshold is not None:
        threshold = auto_threshold
    if present is not None:
        maps = maps * present[..., None, None]
    t = thresholds(maps, threshold)  # on the method's own grid, per image and phrase
    if present is not None:
        t = torch.where(present[..., None, None], t, torch.inf)
    top, left, h, w = region
    heat = resize(maps, (h, w)).clamp(0, 1)  # [B, P, h, w] over the pixels the latents cover
    if (h, w) != tuple(size):
        heat = F.pad(heat, (left, size[1] - w - left, top, size[0] - h - top))
    index = {p.lower(): i for i, p in enumerate(phrases)}
    ramps = soft_threshold(heat, t)
    if threshold == "auto":  # Otsu's, keeping a one-thing phrase's strongest regions only
        for b in range(heat.shape[0]):
            for i, p in enumerate(phrases):
                above = heat[b, i] > t[b, i]
                ramps[b, i] *= auto_regions(above, heat[b, i], p) | ~above
    ramp = evaluate(expr, lambda p: ramps[:, index[p.lower()]])
    combined = evaluate(expr, lambda p: heat[:, index[p.lower()]])
    masks = postprocess(ramp_to_mask(ramp, soft), fill=fill, grow_px=grow_px, invert_mask=invert_mask, blur_px=blur)
    return MaskResult(masks=masks.contiguous(), heatmaps=combined.contiguous(),
                      terms={p: heat[:, i].contiguous() for i, p in enumerate(phrases)})


PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)  # Araslanov & Roth's settings, as TCL and OVDiff use them
PAMR_ITERATIONS = 10


def _neighbour_views(x: torch.Tensor, dilations, centre: bool = False):
    """Each pixel's 8 neighbours at each dilation (edges replicated), one [B, C, H, W] view at a time, with the pixel
    itself first at each dilation if ``centre``."""
    h, w = x.shape[-2:]
    for d in dilations:
        p = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx or centre:
                    yield p[..., d + dy : d + dy + h, d + dx : d + dx + w]


def _neighbours(x: torch.Tensor, dilations, centre: bool = False) -> torch.Tensor:
    """``_neighbour_views`` stacked: [B, C, H, W] -> [B, C, (8 or 9)·D, H, W]."""
    return torch.stack(list(_neighbour_views(x, dilations, centre)), dim=2)


def pamr(maps: torch.Tensor, image: torch.Tensor, iterations: int = PAMR_ITERATIONS,
         dilations=PAMR_DILATIONS) -> torch.Tensor:
    """Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020): propagate maps [B, P, H, W] between
    neighbouring pixels of ``image`` [B, 3, H, W] (in [0, 1]) that look alike, ``iterations`` times.

    A neighbour's weight is softmax over neighbours of −|Δcolour| / (0.1·σ), σ the colour's standard deviation
    over every dilation's 3×3 window, averaged over the channels; every dilation's 8 neighbours take part.
    """
    image = image.float()
    diff = (_neighbours(image, dilations) - image[:, :, None]).abs()  # [B, 3, N, H, W]
    sigma = _neighbours(image, dilations, centre=True).std(dim=2, keepdim=True)
    weight = (-diff / (1e-8 + 0.1 * sigma)).mean(1, keepdim=True).softmax(dim=2)  # [B, 1, N, H, W]
    out = maps.float()
    for _ in range(int(iterations)):
        out = _propagated(out, weight, dilations)
    return out


def _propagated(x: torch.Tensor, weight: torch.Tensor, dilations) -> torch.Tensor:
    """One PAMR step: Σ over neighbours of x's neighbour times its weight [B, 1, N, H, W], x [B, P, H, W]. Added
    one neighbour at a time, so memory stays at x's size whatever the map count."""
    out = torch.zeros_like(x)
    for n, view in enumerate(_neighbour_views(x, dilations)):
        out.addcmul_(view, weight[:, :, n])
    return out
