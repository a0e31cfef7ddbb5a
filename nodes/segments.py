"""ComfyUI nodes: Segment Everything (DiffSeg) and Named Segments."""

from __future__ import annotations

import torch

from ..textmask import defaults
from ..textmask.errors import TextMaskError
from ..textmask.hosts.comfy import ComfyHost
from ..textmask.masker import TextMasker
from ..textmask.render import colour_labels
from .text_mask import CATEGORY

MODELS = {
    "model": ("MODEL", {"tooltip": "The diffusion model whose self-attention groups the pixels."}),
    "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
    "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image."}),
    "image": ("IMAGE", {"tooltip": "Images to segment; every item of the batch is processed."}),
}
COMMON = {
    "tau": ("FLOAT", {"default": defaults.TAU, "min": 0.05, "max": 10.0, "step": 0.05,
                      "tooltip": "KL merge threshold: lower splits into more segments."}),
    "timestep": ("INT", {"default": defaults.TIMESTEP, "min": 0, "max": 999, "tooltip": "Noise level of the forward (0-999)."}),
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
        res = masker.named_segments(image, parts, tau=tau, timestep=timestep, seed=seed, resolution=resolution or None)
        return res.masks.reshape(-1, *res.masks.shape[-2:]).float(), colour_labels(res.labels)
