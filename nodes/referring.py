"""ComfyUI node: Referring Mask, the one object a referring expression names (its subject's instances, or
Ref-Diff with CLIP)."""

from __future__ import annotations

from ..textmask import defaults
from ..textmask.hosts.comfy import ComfyClipScorer, ComfyHost
from ..textmask.masker import TextMasker
from ..textmask.render import overlay
from .instances import instance_planes
from .segments import COMMON, MODELS, OPTIONAL
from .text_mask import CATEGORY


class ReferringMask:
    DESCRIPTION = ("Masks the one object a referring expression names: its subject ('red car') is masked and split "
                   "into instances. 'the man on the left', 'the larger cup', 'the second car from the right' or "
                   "'every chair' pick among them by the relation; other expressions ('black horse jumping') take the "
                   "instance the subject's attention favours, or, with clip_vision, go to Ref-Diff, where attention "
                   "and CLIP score DiffSeg proposals. Outputs a MASK, the heatmap and the candidate instances.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE", "MASK")
    RETURN_NAMES = ("mask", "heatmap", "instances")
    OUTPUT_TOOLTIPS = ("The referred object's mask per image.", "The subject's attention blended over the image.",
                       "The candidates, one mask each, largest first, image after image; an image without any adds "
                       "one empty mask.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS,
                             "expression": ("STRING", {"multiline": True, "default": "the person on the left",
                                                       "tooltip": "A referring expression naming one object."}),
                             "tau": (COMMON["tau"][0], {**COMMON["tau"][1], "tooltip": COMMON["tau"][1]["tooltip"]
                                                        + " (Ref-Diff's proposals, with clip_vision)"}),
                             "timestep": ("INT", {"default": defaults.REFER_TIMESTEP, "min": 0, "max": 999,
                                                  "tooltip": "Noise level of Ref-Diff's forward (with clip_vision), "
                                                             "which reads it at low noise; the subject's instances "
                                                             "use Text Mask's (300)."}),
                             "seed": COMMON["seed"]},
                "optional": {**OPTIONAL,
                             "clip_vision": ("CLIP_VISION", {"tooltip": "Sends an expression without a relation to "
                                                                        "Ref-Diff, which adds CLIP's score of each "
                                                                        "masked proposal against it (clip_vision_g "
                                                                        "with SDXL)."}),
                             "alpha": ("FLOAT", {"default": defaults.REFER_ALPHA, "min": 0.0, "max": 1.0, "step": 0.05,
                                                 "tooltip": "Weight of the attention score against CLIP's (with clip_vision)."})}}

    def run(self, model, clip, vae, image, expression, tau, timestep, seed, resolution=0, clip_vision=None,
            alpha=defaults.REFER_ALPHA):
        masker = TextMasker(ComfyHost(model, clip, vae))
        scorer = ComfyClipScorer(clip_vision, clip) if clip_vision is not None else None
        res = masker.refer(image, expression, clip=scorer, alpha=alpha, tau=tau, timestep=timestep, seed=seed,
                           resolution=resolution or None)
        instances = instance_planes(res.instances, *res.masks.shape[-2:])
        return res.masks.float().cpu(), overlay(image.float().cpu(), res.heatmaps), instances
