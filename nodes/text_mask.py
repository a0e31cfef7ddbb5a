"""ComfyUI node: Text Mask, masks from words with the graph's own MODEL, CLIP and VAE."""

from __future__ import annotations


from ..textmask.hosts.comfy import ComfyHost
from ..textmask.render import overlay
from ..textmask import defaults, options
from ..textmask.masker import TextMasker
from ..textmask.methods import ZERO_SHOT_METHODS

CATEGORY = "mask/textmask"
# What resolution 0 means, for the tooltips (textmask.hosts.contract.native_resolution; the MM-DiTs are 1024 px models).
NATIVE_SIZES = "512 SD1/SD2, 768 v-prediction, 1024 SDXL, SD3 and Flux"
# The edges switch every mask node shares: PAMR, on by default as in every face.
EDGES = ("BOOLEAN", {"default": defaults.PAMR,
                     "tooltip": "Make the mask follow the image's edges (PAMR) rather than the attention grid."})


class TextMask:
    DESCRIPTION = (
        "Masks what the words name, using the MODEL, CLIP and VAE already in the graph (no extra download). "
        "Combine phrases with | (or), AND, NOT and parentheses. Outputs a MASK at the IMAGE's exact size "
        "(1 = inpaint) and a heatmap preview."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "heatmap")
    OUTPUT_TOOLTIPS = ("Mask per image, [B,H,W], 1 = selected.", "The soft heatmap blended over the image.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model whose attention makes the mask."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
                "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image."}),
                "image": ("IMAGE", {"tooltip": "Images to mask; every item of the batch is processed."}),
                "mask_prompt": ("STRING", {"multiline": True, "default": "person",
                                           "tooltip": "What to mask, e.g. 'red car | truck AND NOT wheels'."}),
                "method": (list(ZERO_SHOT_METHODS), {"default": defaults.METHOD,
                                           "tooltip": "attention: cross-attention maps (DAAM); noise-diff: where the words change the predicted noise."}),
                "refine": ("BOOLEAN", {"default": defaults.REFINE, "tooltip": "Refine attention maps along self-attention (slower, cleaner)."}),
                "threshold": ("STRING", {"default": defaults.THRESHOLD, "tooltip": "'auto' (Otsu; a phrase naming one thing keeps its strongest regions), "
                                                                 "'otsu' (every region above Otsu's) or a value in 0..1."}),
                "blur": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.5, "tooltip": "Feather in pixels (Gaussian sigma)."}),
                "grow": ("INT", {"default": 0, "min": -512, "max": 512, "tooltip": "Grow the mask by pixels; negative shrinks."}),
                "invert": ("BOOLEAN", {"default": False, "tooltip": "Select everything else."}),
                "soft": ("BOOLEAN", {"default": False, "tooltip": "Soft mask instead of a binary one."}),
                "timestep": ("INT", {"default": defaults.TIMESTEP, "min": 0, "max": 999,
                                     "tooltip": "Noise level of the masking forward (0-999)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed; image i uses seed + i."}),
            },
            "optional": {
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "What to subtract from the mask."}),
                "latent": ("LATENT", {"tooltip": "The IMAGE's latent (from VAE Encode), used instead of encoding again."}),
                "fill_holes": ("BOOLEAN", {"default": False, "tooltip": "Fill holes inside masked regions."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": options.MAX_RESOLUTION, "step": 64,
                                       "tooltip": f"Working resolution in pixels; 0 = the model's native ({NATIVE_SIZES})."}),
                "edges": EDGES,
                "temporal": ("FLOAT", {"default": defaults.TEMPORAL, "min": 0.0, "max": options.MAX_TEMPORAL, "step": 0.5,
                                       "tooltip": "For video frames: smooth the maps over neighbouring frames of the "
                                                  "batch (Gaussian sigma in frames; 0 = off) so masks do not flicker."}),
                "min_presence": ("FLOAT", {"default": defaults.MIN_PRESENCE, "min": 0.0, "max": 1.0, "step": 0.005,
                                           "tooltip": "attention only: a phrase whose presence score is below this "
                                                      "selects nothing, so a phrase naming nothing in the image gives "
                                                      "an empty mask (0 = off). The score depends on the model and "
                                                      "on the other phrases: try a few images with and without the "
                                                      "thing."}),
            },
        }

    def run(self, model, clip, vae, image, mask_prompt, method, refine, threshold, blur, grow, invert, soft, timestep, seed,
            negative="", latent=None, fill_holes=False, resolution=0, edges=defaults.PAMR, temporal=defaults.TEMPORAL,
            min_presence=defaults.MIN_PRESENCE):
        host = ComfyHost(model, clip, vae)
        latents = None
        if latent is not None:  # a LATENT is a dict; its "samples" are checked by latents_in
            latents = host.latents_in(latent.get("samples") if isinstance(latent, dict) else latent)
        result = TextMasker(host).mask(
            image, mask_prompt, negative=negative or None, method=method, refine=refine,
            threshold=threshold, soft=soft, blur=blur, grow=grow, fill_holes=fill_holes,
            invert=invert, timestep=timestep, seed=seed, latents=latents, resolution=resolution or None, pamr=edges,
            temporal=temporal, min_presence=min_presence,
        )
        preview = overlay(image.float().cpu(), result.heatmaps)
        return (result.masks.float().cpu(), preview)
