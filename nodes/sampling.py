"""ComfyUI nodes: masks from the sampling run itself (no extra UNet forward).

Text Mask Capture encodes the positive prompt (as CLIPTextEncode does) and patches a clone of the MODEL so the
sampler's own forwards are captured; Text Mask from Sampling turns the captured attention into masks for words of
that prompt, or any other words (OVAM), on the images decoded from the run.
"""

from __future__ import annotations

from ..textmask import defaults
from ..textmask.hosts.comfy import ComfyHost, capturing_model
from ..textmask.render import overlay
from ..textmask.sampling_capture import SamplingCapture
from .text_mask import CATEGORY, TextMask

CAPTURE = "TEXTMASK_CAPTURE"


class TextMaskCapture:
    DESCRIPTION = ("Captures the attention of a sampling run for masks afterwards, at almost no cost: connect its "
                   "MODEL and conditioning to a KSampler (as the positive), and its capture to Text Mask from "
                   "Sampling. Other samplers using the same model are unaffected.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", CAPTURE)
    RETURN_NAMES = ("model", "positive", "capture")
    OUTPUT_TOOLTIPS = ("The MODEL whose sampling is captured (a clone; the input MODEL is untouched).",
                       "The prompt encoded as CLIPTextEncode encodes it: the sampler's positive.",
                       "The captured attention of this MODEL's last sampling run with this prompt.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model that samples."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "a photo of a cat on a sofa",
                                "tooltip": "The positive prompt; its words can be masked after sampling."}),
        }}

    def run(self, model, clip, text):
        host = ComfyHost(model, clip, None)
        comfy_cond, cond = host.prompt_conditioning(text)
        capture = SamplingCapture(host, cond, float(host.sigma(defaults.TIMESTEP)))
        return capturing_model(host, capture), comfy_cond, capture


class TextMaskFromSampling:
    DESCRIPTION = ("Masks words from the attention a Text Mask Capture kept while sampling: no extra UNet forward. "
                   "Words of the prompt use every step's attention; other words are re-queried from one step (OVAM, "
                   "an approximation). Outputs a MASK at each IMAGE's exact size and a heatmap preview.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "heatmap")
    OUTPUT_TOOLTIPS = TextMask.OUTPUT_TOOLTIPS
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        common = TextMask.INPUT_TYPES()
        req, opt = common["required"], common["optional"]
        return {"required": {
            "capture": (CAPTURE, {"tooltip": "From Text Mask Capture, after its sampler ran."}),
            "image": ("IMAGE", {"tooltip": "The images decoded from that sampling run, one per latent."}),
            "mask_prompt": (req["mask_prompt"][0], {**req["mask_prompt"][1], "default": "cat"}),
            **{k: req[k] for k in ("refine", "threshold", "blur", "grow", "invert", "soft")},
        }, "optional": {k: opt[k] for k in ("negative", "fill_holes", "edges", "temporal")}}

    def run(self, capture, image, mask_prompt, refine, threshold, blur, grow, invert, soft, negative="",
            fill_holes=False, edges=defaults.PAMR, temporal=defaults.TEMPORAL):
        result = capture.mask(image, mask_prompt, negative=negative or None, refine=refine, threshold=threshold,
                              soft=soft, blur=blur, grow=grow, fill_holes=fill_holes, invert=invert, pamr=edges,
                              temporal=temporal)
        return result.masks.float().cpu(), overlay(image.float().cpu(), result.heatmaps)
