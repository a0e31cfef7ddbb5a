"""Segmenting with OVDiff prototypes: features over sliding windows and the full image, nearest-prototype
matching by cosine similarity, and an argmax over background and the classes."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import forward, options
from ..clip import clip_scorer
from ..errors import TextMaskError
from ..hosts.contract import Host
from ..results import LabelsResult
from .features import extract
from .prototypes import Prototypes, stuff_filter

# The reference's windows, in pixels of a 512 px working size (scaled with it), plus the whole image.
WINDOWS = (448, 336)
STRIDE = 224
REFERENCE_SIDE = 512


def window_boxes(height: int, width: int, scale: float) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of every sliding window (sizes 448 and 336, stride 224, scaled) and the full image."""
    boxes = [(0, 0, height, width)]
    stride = max(1, round(STRIDE * scale))
    for size in WINDOWS:
        s = round(size * scale)
        if s >= min(height, width):
            continue
        tops = sorted({*range(0, height - s, stride), height - s})
        lefts = sorted({*range(0, width - s, stride), width - s})
        boxes += [(t, l, s, s) for t in tops for l in lefts]
    return boxes


def match(features: torch.Tensor, fg: list[torch.Tensor], bg: torch.Tensor, unit: bool = False) -> torch.Tensor:
    """Scores [1 + C, h, w] on the features' device: background first (max cosine over ``bg``), then each
    class's max over its ``fg``. ``unit``: the prototypes are already unit rows on that device."""
    d, h, w = features.shape
    f = F.normalize(features.reshape(d, -1).T.float(), dim=-1)  # [N, D]

    def best(protos: torch.Tensor) -> torch.Tensor:
        protos = protos.to(f.device) if unit else unit_rows(protos, f.device)
        if protos.shape[-1] != d:
            raise TextMaskError(f"these prototypes hold features {protos.shape[-1]} wide, this model's are {d}: they "
                                "were built with another model; build them with this one")
        return (f @ protos.T).max(-1).values

    out = [best(bg) if len(bg) else torch.full((h * w,), -1.0, device=f.device)]
    out += [best(p) for p in fg]
    return torch.stack(out).reshape(-1, h, w)


def unit_rows(protos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Prototypes [K, D] as float32 unit rows on ``device``."""
    return F.normalize(protos.to(device).float(), dim=-1)


def clip_select(clip, image: torch.Tensor, names: Sequence[str], topk: int = 3) -> list[int]:
    """The reference's CLIP pre-filter: classes scoring ≥ 1/N, then the best combination by a multi-label prompt."""
    probs = clip.image_text_probs(image, [f"a photo of a {n}." for n in names])
    keep = [i for i, p in enumerate(probs.tolist()) if p >= 1 / len(names)]
    if not keep:
        keep = probs.topk(min(topk, len(names))).indices.tolist()
    if len(keep) > topk:
        keep = sorted(keep, key=lambda i: -float(probs[i]))[:topk]
    combos = [c for r in range(1, len(keep) + 1) for c in itertools.combinations(keep, r)]
    texts = [" and ".join("a " + names[i] for i in c) for c in combos]
    sims = clip.image_text_probs(image, texts)
    return sorted(combos[int(sims.argmax())])


@torch.inference_mode()
def label(prototypes: Prototypes, images, *, host: Host | None = None, classes: Sequence[str] | None = None,
          clip=None, seed: int = 0, resolution: int | None = None, batch_size: int = 4) -> LabelsResult:
    """Label every pixel with the nearest class prototype (or background), per image; ``batch_size`` windows
    share a UNet forward (fewer if the GPU runs out of memory). ``clip``: a local CLIP folder (run on the host's
    device) or a scorer with ``image_text_probs``, for the reference's class pre-filter."""
    if not isinstance(prototypes, Prototypes):
        raise TextMaskError(f"prototypes must be what build_prototypes returns, got {type(prototypes).__name__}")
    host = host or prototypes.host
    if host is None:
        raise TextMaskError("these prototypes carry no model; pass the host that built them")
    seed, batch_size = options.seed(seed), options.batch_size(batch_size)
    protos = prototypes.classes
    if classes is not None:
        classes = options.names(classes, "classes", "class")
        index = {c.name.lower(): c for c in protos}
        missing = [c for c in classes if c.lower() not in index]
        if missing:
            raise TextMaskError(f"no prototypes for: {', '.join(missing)}; build them first")
        protos = [index[c.lower()] for c in classes]
    names = [c.name for c in protos]
    clip = clip_scorer(clip, host.device)
    # Normalised once and kept on the device: per window they cost more than the matching itself.
    bg_all = [unit_rows(b, host.device) for b in stuff_filter(protos)]
    fg_all = [unit_rows(c.foreground(), host.device) for c in protos]
    native = resolution or prototypes.settings.resolution or host.geometry.resolution  # as the support images were made
    images = forward.prepare_images(host, images, native, self_attention=True)
    pixels, size = images.pixels, images.working
    height, width = images.size
    scale = native / REFERENCE_SIDE  # windows keep their share of the working size
    empty = forward.encode_prompts(host, [""])
    labels, masks, scores = [], [], []
    for rows in forward.batches(host, len(images), 1, "ovdiff"):
        b = rows.start
        image = F.interpolate(pixels[rows], size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        chosen = list(range(len(protos)))
        if clip is not None and len(protos) > 1:
            chosen = clip_select(clip, pixels[b], names)
        fg = [fg_all[i] for i in chosen]
        bg = torch.cat([bg_all[i] for i in chosen]) if chosen else fg_all[0][:0]
        # The window sums stay on the device: one copy to the CPU per image, not one sync per window.
        total = torch.zeros(1 + len(chosen), *size, device=host.device)
        count = torch.zeros(1, *size, device=host.device)

        def window_scores(crops: torch.Tensor) -> list[torch.Tensor]:
            """Each crop's scores [1, 1 + C, h, w]; all of them are computed before any is added."""
            latents = host.encode_images(crops.to(host.device))
            feats, _ = extract(host, latents, empty, seed + b, shared_noise=True)
            return [match(f, fg, bg, unit=True)[None].to(total.device) for f in feats]

        def add(scores: list[torch.Tensor], boxes: list[tuple[int, int, int, int]]) -> None:
            for s, (t, l, h, w) in zip(scores, boxes):
                total[:, t : t + h, l : l + w] += F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)[0]
                count[:, t : t + h, l : l + w] += 1

        whole, *windows = window_boxes(*size, scale)
        add(window_scores(image), [whole])  # alone: the working size need not be square

        def crops(part: slice) -> list[torch.Tensor]:
            # A window is seen at the model's native size, like a full image; so the windows batch.
            return window_scores(torch.cat([
                F.interpolate(image[..., t : t + h, l : l + w], size=(native, native), mode="bicubic",
                              align_corners=False, antialias=True) for t, l, h, w in windows[part]]).clamp(0, 1))

        for part, window_maps in forward.halving_batches(host, len(windows), batch_size, crops):
            add(window_maps, windows[part])
        mean = (total / count).cpu()
        full = F.interpolate(mean[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        lab_local = full.argmax(0)
        lab = torch.zeros_like(lab_local)
        for j, i in enumerate(chosen):
            lab[lab_local == j + 1] = i + 1
        per_class = torch.full((1 + len(protos), height, width), -1.0)
        per_class[0] = full[0]
        for j, i in enumerate(chosen):
            per_class[i + 1] = full[j + 1]
        labels.append(lab)
        masks.append(torch.stack([(lab == i + 1).float() for i in range(len(protos))]))
        scores.append(per_class)
    return LabelsResult(names, torch.stack(labels), torch.stack(masks), torch.stack(scores))
