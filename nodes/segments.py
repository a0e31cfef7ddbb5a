"""ComfyUI nodes: Segment Everything (DiffCut or DiffSeg) and Named Segments."""

from __future__ import annotations

import torch

from ..textmask import defaults, options
from ..textmask.errors import TextMaskError
from ..textmask.hosts.comfy import ComfyHost
from ..textmask.masker import TextMasker
from ..textmask.render import colour_labels
from .text_mask import CATEGORY, EDGES

MODELS = {
    "model": ("MODEL", {"tooltip": "The diffusion model whose self-attention groups the pixels."}),
    "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
    "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image."}),
    "image": ("IMAGE", {"tooltip": "Images to segment; every item of the batch is processed."}),
}
COMMON = {
    "tau": ("FLOAT", {"default": defaults.TAU, "min": 0.05, "max": options.MAX_TAU, "step": 0.05,
                      "tooltip": "DiffSeg's KL merge threshold: lower splits into more segments."}),
    "timestep": ("INT", {"default": -1, "min": -1, "max": 999,
                         "tooltip": f"Noise level of the forward (0-999); -1: the segmenter's own "
                                    f"({defaults.DIFFCUT_TIMESTEP} for DiffCut, {defaults.TIMESTEP} for DiffSeg)."}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed; image i uses seed + i."}),
}
OPTIONAL = {"resolution": ("INT", {"default": 0, "min": 0, "max": options.MAX_RESOLUTION, "step": 64,
                                   "tooltip": "Working resolution in pixels; 0 = the model's native."})}
# After the older widgets, so workflows saved before them keep their values and take these defaults.
SEGMENTER = {
    "segmenter": (list(options.SEGMENTERS), {"default": defaults.SEGMENTER,
                  "tooltip": "DiffCut (normalised cuts, cut) or DiffSeg (KL merging, tau and kmeans)."}),
    "cut": ("FLOAT", {"default": defaults.CUT, "min": 0.05, "max": options.MAX_CUT, "step": 0.05,
                      "tooltip": "DiffCut's normalised-cut threshold: higher splits into more segments."}),
    "edges": EDGES,
}


def segment_settings(timestep: int, segmenter: str, cut: float, edges: bool) -> dict:
    """The node's widgets as the API's arguments."""
    return dict(timestep=None if timestep == -1 else timestep, segmenter=segmenter, cut=cut, pamr=edges)


class SegmentEverything:
    DESCRIPTION = ("Splits each image into segments from the model's own attention (DiffCut, or DiffSeg). Outputs one "
                   "MASK per segment (largest first, images in order) and a coloured label image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("segments", "labels")
    OUTPUT_TOOLTIPS = ("One mask per segment, largest first; the segments of each image follow each other.",
                       "Each segment in its own colour.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS, **COMMON,
                             "kmeans": ("BOOLEAN", {"default": False,
                                                    "tooltip": "Refine DiffSeg's segments with K-means (segmenter "
                                                               "diffseg)."})},
                "optional": {**OPTIONAL, **SEGMENTER}}

    def run(self, model, clip, vae, image, tau, timestep, seed, kmeans, resolution=0, segmenter=defaults.SEGMENTER,
            cut=defaults.CUT, edges=defaults.PAMR):
        masker = TextMasker(ComfyHost(model, clip, vae))
        res = masker.segments(image, tau=tau, kmeans=kmeans, seed=seed, resolution=resolution or None,
                              **segment_settings(timestep, segmenter, cut, edges))
        return torch.cat(res.masks).float().cpu(), colour_labels(res.labels)


class NamedSegments:
    DESCRIPTION = ("Labels the model's segments with your words: each segment goes to the name whose attention is "
                   "higher inside it than outside by the most, or to the background. Outputs one MASK per name, in "
                   "the names' order, and a label image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "labels")
    OUTPUT_TOOLTIPS = ("One mask per name (per image, names in order).", "Background and each name in its own colour.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS, "names": ("STRING", {"multiline": False, "default": "sky, person, road",
                                                            "tooltip": "Comma-separated names."}), **COMMON},
                "optional": {**OPTIONAL, **SEGMENTER}}

    def run(self, model, clip, vae, image, names, tau, timestep, seed, resolution=0, segmenter=defaults.SEGMENTER,
            cut=defaults.CUT, edges=defaults.PAMR):
        parts = [n.strip() for n in str(names).split(",") if n.strip()]
        if not parts:
            raise TextMaskError("give at least one name (comma-separated)")
        masker = TextMasker(ComfyHost(model, clip, vae))
        res = masker.named_segments(image, parts, tau=tau, seed=seed, resolution=resolution or None,
                                    **segment_settings(timestep, segmenter, cut, edges))
        return res.masks.reshape(-1, *res.masks.shape[-2:]).float().cpu(), colour_labels(res.labels)
