"""ComfyUI node: Text Mask to SEGS, a mask's instances as Impact Pack SEGS, one MASK each and core BOUNDING_BOXes.

SEGS is the Impact Pack's type, ``((H, W), [SEG, ...])``, built here without importing the Impact Pack (it may not be
installed): its nodes read a SEG's fields by name, so a namedtuple with the same fields is all they need.
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch

from ..textmask import options
from ..textmask.errors import ImageError
from ..textmask.images import rgb
from ..textmask.relations import instances
from .text_mask import CATEGORY

# The Impact Pack's SEG (modules/impact/core.py): cropped_image [1, h, w, 3] tensor, cropped_mask [h, w] float32
# numpy, confidence float, crop_region and bbox [x1, y1, x2, y2] image pixels (x2, y2 exclusive), label str.
SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                         "control_net_wrapper"], defaults=[None])


def box_of(instance: torch.Tensor) -> list[int]:
    """The box [x1, y1, x2, y2] of an instance mask [h, w] (bool, not empty), x2 and y2 one past its last pixel."""
    ys, xs = instance.any(1).nonzero()[:, 0], instance.any(0).nonzero()[:, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def _grow(lo: int, hi: int, limit: int, factor: float) -> tuple[int, int]:
    """The span [lo, hi) grown ``factor`` times about its centre, shifted back inside [0, limit) (as Impact's
    make_crop_region does) and rounded outwards, so it always contains [lo, hi)."""
    size = min((hi - lo) * factor, limit)
    start = min(max((lo + hi - size) / 2, 0.0), limit - size)
    return math.floor(start), min(math.ceil(start + size), limit)


def crop_region(box: list[int], crop_factor: float, width: int, height: int) -> list[int]:
    """The region [x1, y1, x2, y2] a detailer crops around ``box``: ``crop_factor`` times its size, inside the image."""
    x1, x2 = _grow(box[0], box[2], width, crop_factor)
    y1, y2 = _grow(box[1], box[3], height, crop_factor)
    return [x1, y1, x2, y2]


def image_instances(mask: torch.Tensor, drop_size: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The instances of one mask [h, w] (``relations.instances``: largest first, every part however small next to
    the largest) whose box has both sides over ``drop_size`` pixels, as bool [K, h, w], and their boxes."""
    found = instances(mask, min_share=0.0)  # a small face beside a large one is a face: drop_size alone decides
    boxes = [box_of(m) for m in found]
    keep = [i for i, b in enumerate(boxes) if b[2] - b[0] > drop_size and b[3] - b[1] > drop_size]
    return found[keep], [boxes[i] for i in keep]


def instance_planes(per_image: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Every image's instances [K_i, H, W] in one MASK batch, image after image; an image without any adds one empty
    mask, so the batch never shifts and an empty result is [1, H, W], never [0, H, W]."""
    return torch.cat([m.float() if len(m) else torch.zeros(1, height, width) for m in per_image])


class TextMaskToSEGS:
    DESCRIPTION = (
        "Splits a MASK into its instances (connected parts, largest first, without those under drop_size) for detailers. "
        "Outputs Impact Pack SEGS of the first image (for Detailer (SEGS), SEGSDetailer, SEGSPaste, SEGSPreview), "
        "one MASK per instance and ComfyUI BOUNDING_BOXes."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SEGS", "MASK", "BOUNDING_BOX", "INT", "INT", "MASK")
    RETURN_NAMES = ("segs", "instances", "bboxes", "count", "counts", "instance_list")
    # counts and instance_list are lists: a node fed from one runs once per item, as ComfyUI's lists do.
    OUTPUT_IS_LIST = (False, False, False, False, True, True)
    OUTPUT_TOOLTIPS = (
        "Impact Pack SEGS of the first image: one SEG per instance, cropped crop_factor times its box.",
        "One full-size mask per instance, largest first, the instances of each image after those of the one before; "
        "an image without any adds one empty mask.",
        "Per image, a list of {x, y, width, height, score} boxes (pixels), as SAM3 Detect outputs them.",
        "How many instances the whole batch has.",
        "How many instances each image has (a list, one per image, 0 where it has none).",
        "The instances as a list of masks [1,H,W], image after image, so the next node runs once per instance; "
        "one empty mask if there is none at all (an empty list would stop the graph).",
    )
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mask": ("MASK", {"tooltip": "The mask to split, e.g. Text Mask's; each image's mask [H,W]."}),
                "image": ("IMAGE", {"tooltip": "The image the mask belongs to, at the mask's size; SEGS crop its "
                                               "first image."}),
                "crop_factor": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 100.0, "step": 0.1,
                                          "tooltip": "Size of each SEG's crop region in units of its box (context "
                                                     "for the detailer)."}),
                "drop_size": ("INT", {"default": 10, "min": 1, "max": 8192, "step": 1,
                                      "tooltip": "Drop instances whose box is not wider and taller than this "
                                                 "(pixels)."}),
                "label": ("STRING", {"default": "textmask",
                                     "tooltip": "Label of every SEG (Impact's label filters read it)."}),
            },
        }

    def run(self, mask, image, crop_factor=3.0, drop_size=10, label="textmask"):
        """mask [B or 1, H, W] (or [H, W]) in [0, 1], image [B, H, W, C] -> (SEGS of image 0, instances
        [N, H, W] float, per-image lists of box dicts, the instance count, the per-image counts, the instances as a
        list)."""
        crop_factor = options.in_range("crop_factor", crop_factor, 1.0, 100.0)  # ComfyUI's bounds let NaN through
        drop_size = options.in_range("drop_size", drop_size, 1, 8192, integer=True)
        if mask.dim() not in (2, 3) or image.dim() != 4 or 0 in mask.shape or 0 in image.shape:
            raise ImageError(f"the mask must be [B,H,W] and the image [B,H,W,C], no side 0; got {list(mask.shape)} "
                             f"and {list(image.shape)}")
        height, width = image.shape[1:3]
        if tuple(mask.shape[-2:]) != (height, width):
            raise ImageError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the image is {width}x{height}; "
                             "give the mask made from this image")
        masks = mask.reshape(-1, height, width).float().cpu()
        if len(masks) == 1:  # one mask serves every image of the batch, as ComfyUI's own nodes broadcast a MASK
            masks = masks.expand(image.shape[0], height, width)
        if len(masks) != image.shape[0]:
            raise ImageError(f"{len(masks)} masks for {image.shape[0]} image(s); give one mask per image, as Text "
                             "Mask makes them for this batch, or one for all")
        if not bool(torch.isfinite(masks).all()):
            raise ImageError("the mask holds NaN or infinite values; give a mask in [0, 1], e.g. Text Mask's")
        masks = masks.clamp(0, 1)  # a MASK after arithmetic may stray past [0, 1]; a SEG's confidence may not
        found = [image_instances(m, drop_size) for m in masks]
        # Mean mask value over the instance: 1.0 for a binary mask, the map's strength for a soft one.
        scores = [[float(m[inst].mean()) for inst in insts] for m, (insts, _) in zip(masks, found)]

        first = rgb(image[:1].float().cpu())  # the detailers expect RGB crops, whatever the IMAGE's channels
        segs = []
        (first_instances, first_boxes), first_scores = found[0], scores[0]
        for inst, box, score in zip(first_instances, first_boxes, first_scores):
            x1, y1, x2, y2 = region = crop_region(box, crop_factor, width, height)
            # The mask's own values on this instance only, so a detailer inpaints one instance at a time.
            cropped = (masks[0] * inst)[y1:y2, x1:x2]
            segs.append(SEG(first[:, y1:y2, x1:x2].clone(), cropped.numpy().astype("float32"), score, region, box,
                            label))

        planes = instance_planes([insts for insts, _ in found], height, width)
        bboxes = [[{"x": b[0], "y": b[1], "width": b[2] - b[0], "height": b[3] - b[1], "score": s}
                   for b, s in zip(boxes, image_scores)] for (_, boxes), image_scores in zip(found, scores)]
        counts = [len(insts) for insts, _ in found]
        listed = [inst[None].float() for insts, _ in found for inst in insts] or [torch.zeros(1, height, width)]
        return ((height, width), segs), planes, bboxes, sum(counts), counts, listed
