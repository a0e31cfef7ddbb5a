"""ComfyUI nodes: OVDiff Prototypes (built once per vocabulary, cached) and OVDiff Segment."""

from __future__ import annotations

import os

import folder_paths
import torch

from ..textmask import defaults, options
from ..textmask.errors import TextMaskError
from ..textmask.hosts.comfy import ComfyHost
from ..textmask.render import colour_labels
from ..textmask.ovdiff import build_prototypes, label
from ..textmask.ovdiff.prototypes import default_cache_dir
from .text_mask import CATEGORY, NATIVE_SIZES


def cache_dir() -> str:
    """models/ovdiff/ inside ComfyUI, so prototypes live beside the models they were made from."""
    models = getattr(folder_paths, "models_dir", None)
    return os.path.join(models, "ovdiff") if models else str(default_cache_dir())


def class_list(text: str) -> list[str]:
    return [c.strip() for c in text.replace("\n", ",").split(",") if c.strip()]


class OVDiffPrototypes:
    DESCRIPTION = (
        "Builds OVDiff prototypes for comma-separated class names by sampling support images with this MODEL "
        "(\"A good picture of a {class}\"). Cached in models/ovdiff/ by the model's weights, so a class is built "
        "once; 'sky:stuff' or 'tree:thing' overrides the built-in stuff list."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOTYPES",)
    RETURN_NAMES = ("prototypes",)
    OUTPUT_TOOLTIPS = ("Per-class prototypes plus the model that made them.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model that samples the support images."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
                "vae": ("VAE", {"tooltip": "The model's VAE."}),
                "classes": ("STRING", {"multiline": True, "default": "cat, dog, grass, sky",
                                       "tooltip": "Comma-separated class names."}),
                "images": ("INT", {"default": defaults.OVDIFF_IMAGES, "min": 1, "max": options.MAX_SUPPORT_IMAGES, "tooltip": "Support images per class (fewer is faster)."}),
                "steps": ("INT", {"default": defaults.OVDIFF_STEPS, "min": 1, "max": options.MAX_STEPS, "tooltip": "DPM-Solver++ steps per support image."}),
                "cfg": ("FLOAT", {"default": defaults.OVDIFF_CFG, "min": 0.0, "max": options.MAX_CFG, "step": 0.5, "tooltip": "Guidance scale."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the support set."}),
            },
            "optional": {
                "resolution": ("INT", {"default": 0, "min": 0, "max": options.MAX_RESOLUTION, "step": 64,
                                       "tooltip": f"Support image size in pixels; 0 = the model's native ({NATIVE_SIZES})."}),
            },
        }

    def build(self, model, clip, vae, classes, images, steps, cfg, seed, resolution=0):
        host = ComfyHost(model, clip, vae)
        with torch.inference_mode():
            protos = build_prototypes(host, class_list(classes), images=images, steps=steps, cfg=cfg, seed=seed,
                                      cache_dir=cache_dir(), resolution=resolution or None)
        return (protos,)


class OVDiffSegment:
    DESCRIPTION = "Segments images with OVDiff prototypes: a MASK per class (in class order), one chosen class's MASK, and a label image."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("masks", "class_mask", "labels")
    OUTPUT_TOOLTIPS = ("Every class's mask: [B*C,H,W], image-major, classes in order.",
                       "The mask of the chosen class, [B,H,W].", "Coloured label image (black = background).")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prototypes": ("PROTOTYPES", {"tooltip": "From OVDiff Prototypes."}),
                "image": ("IMAGE", {"tooltip": "Images to segment."}),
                "class_name": ("STRING", {"default": "", "tooltip": "Which class goes to class_mask (empty: the first)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed of the feature forward."}),
            }
        }

    def run(self, prototypes, image, class_name, seed):
        names = [str(n).lower() for n in getattr(prototypes, "names", None) or []]  # label() refuses non-prototypes
        wanted = class_name.strip().lower() or (names[0] if names else "")
        if names and wanted not in names:
            raise TextMaskError(f"'{class_name}' is not among the prototypes' classes: {', '.join(prototypes.names)}")
        with torch.inference_mode():
            res = label(prototypes, image, seed=seed)
        b, c, h, w = res.masks.shape
        labels = torch.stack([colour_labels(lab) * (lab > 0)[..., None] for lab in res.labels]).float().cpu()
        masks = res.masks.float().cpu()  # ComfyUI's MASKs: float32, on the CPU
        return (masks.reshape(b * c, h, w), masks[:, names.index(wanted)].contiguous(), labels)
