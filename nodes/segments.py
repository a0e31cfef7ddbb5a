"""ComfyUI nodes: Segment Everything (DiffSeg) and Named Segments."""

from __future__ import annotations

import torch

from ..textmask.errors import TextMaskError
from ..textmask.hosts.comfy import ComfyHost
from ..textmask.io import colour_labels
from ..textmask.masker import DEFAULT_TIMESTEP, TextMasker
from .text_mask import CATEGORY

MODELS = {
    "model": ("MODEL", {"tooltip": "The diffusion model whose self-attention groups the pixels."}),
    "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
    "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image."}),
    "image": ("IMAGE", {"tooltip": "Images to segment; every item of the batch is processed."}),
}
COMMON = {
    "tau": ("FLOAT", {"default": 1.1, "min": 0.05, "max": 10.0, "step": 0.05,
                      "tooltip": "KL merge threshold: lower splits into more segments."}),
    "timestep": ("INT", {"default": DEFAULT_TIMESTEP, "min": 0, "max": 999, "tooltip": "Noise level of the forward (0-999)."}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed; image i uses seed + i."}),
}
OPTIONAL = {"resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64,
                                   "tooltip": "Working resolution in pixels; 0 = the model's native."})}


class SegmentEverything:
    DESCRIPTION = ("Splits each image into segments with DiffSeg, from the model's own self-attention. Outputs one "
                   "MASK per segment (largest first, images in order) and a coloured label image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("segments", "labels")
    OUTPUT_TOOLTIPS = ("One mask per segment, largest first; the segments of each image follow each other.",
                       "Each segment in its own colour.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS, **COMMON, "kmeans": ("BOOLEAN", {"default": False, "tooltip": "Refine with K-means."})},
                "optional": OPTIONAL}

    def run(self, model, clip, vae, image, tau, timestep, seed, kmeans, resolution=0):
        masker = TextMasker(ComfyHost(model, clip, vae))
        res = masker.segments(image, tau=tau, kmeans=kmeans, timestep=timestep, seed=seed, resolution=resolution or None)
        return torch.cat(res.masks).float(), colour_labels(res.labels)


class NamedSegments:
    DESCRIPTION = ("Labels DiffSeg segments with your words: each segment goes to the name it attends to most, or to "
                   "the background. Outputs one MASK per name, in the names' order, and a label image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "labels")
    OUTPUT_TOOLTIPS = ("One mask per name (per image, names in order).", "Background and each name in its own colour.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS, "names": ("STRING", {"multiline": False, "default": "sky, person, road",
                                                            "tooltip": "Comma-separated names."}), **COMMON},
                "optional": OPTIONAL}

    def run(self, model, clip, vae, image, names, tau, timestep, seed, resolution=0):
        parts = [n.strip() for n in str(names).split(",") if n.strip()]
        if not parts:
            raise TextMaskError("give at least one name (comma-separated)")
        masker = TextMasker(ComfyHost(model, clip, vae))
        res = masker.semantic(image, parts, tau=tau, timestep=timestep, seed=seed, resolution=resolution or None)
        return res.masks.reshape(-1, *res.masks.shape[-2:]).float(), colour_labels(res.labels)


class ReferringMask:
    DESCRIPTION = ("Masks the one object a referring expression names ('the man on the left', 'black horse jumping') "
                   "with Ref-Diff: the subject's attention scores DiffSeg proposals. Outputs a MASK and the heatmap.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "heatmap")
    OUTPUT_TOOLTIPS = ("The referred object's mask per image.", "The subject's attention blended over the image.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS,
                             "expression": ("STRING", {"multiline": True, "default": "the person on the left",
                                                       "tooltip": "A referring expression naming one object."}),
                             "tau": COMMON["tau"],
                             "timestep": ("INT", {"default": 100, "min": 0, "max": 999,
                                                  "tooltip": "Noise level of the forward; Ref-Diff reads it at low noise."}),
                             "seed": COMMON["seed"]},
                "optional": {**OPTIONAL,
                             "clip_vision": ("CLIP_VISION", {"tooltip": "Adds CLIP's score of each masked proposal against "
                                                                        "the expression (clip_vision_g with SDXL)."}),
                             "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                                 "tooltip": "Weight of the attention score against CLIP's (with clip_vision)."})}}

    def run(self, model, clip, vae, image, expression, tau, timestep, seed, resolution=0, clip_vision=None, alpha=0.5):
        from ..textmask.hosts.comfy import ComfyClipScorer
        from ..textmask.io import overlay

        masker = TextMasker(ComfyHost(model, clip, vae))
        scorer = ComfyClipScorer(clip_vision, clip) if clip_vision is not None else None
        res = masker.refer(image, expression, clip=scorer, alpha=alpha, tau=tau, timestep=timestep, seed=seed,
                           resolution=resolution or None)
        return res.masks.float(), overlay(image[..., :3].float().cpu(), res.heatmaps)
