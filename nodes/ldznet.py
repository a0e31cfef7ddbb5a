"""ComfyUI nodes: Load LD-ZNet (from models/ldznet/) and Text Mask (LD-ZNet)."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..textmask.hosts.comfy import ComfyHost
from ..textmask.render import overlay
from ..textmask.ldznet import load_ldznet
from ..textmask import defaults, options
from ..textmask.masker import TextMasker
from .text_mask import CATEGORY, EDGES

FOLDER = "ldznet"


def register_folder() -> None:
    """models/ldznet/ (and extra_model_paths.yaml entries named ldznet), safetensors only."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


register_folder()


class LoadLDZNet:
    DESCRIPTION = "Loads LD-ZNet weights (textmask .safetensors; convert the official .ckpt with `textmask convert-ldznet`)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LDZNET",)
    RETURN_NAMES = ("ldznet",)
    OUTPUT_TOOLTIPS = ("The LD-ZNet segmenter, managed by ComfyUI's model memory like any model.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ldznet_name": (folder_paths.get_filename_list(FOLDER),
                                             {"tooltip": "A file in models/ldznet/."})}}

    def load(self, ldznet_name):
        path = folder_paths.get_full_path(FOLDER, ldznet_name)
        load_device = comfy.model_management.get_torch_device()
        offload_device = comfy.model_management.unet_offload_device()
        dtype = torch.float16 if comfy.model_management.should_use_fp16(load_device) else torch.float32
        model = load_ldznet(path, device=offload_device, dtype=dtype)
        return (comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device),)


class TextMaskLDZNet:
    DESCRIPTION = (
        "Masks what the words name with LD-ZNet, a trained segmenter that reads the VAE latent and the graph "
        "MODEL's own features. The LD-ZNet weights must be made for this MODEL's architecture."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "heatmap")
    OUTPUT_TOOLTIPS = ("Mask per image, [B,H,W], 1 = selected.", "The mask probability blended over the image.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model that supplies LD-ZNet's features."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
                "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image."}),
                "ldznet": ("LDZNET", {"tooltip": "From Load LD-ZNet."}),
                "image": ("IMAGE", {"tooltip": "Images to mask; every item of the batch is processed."}),
                "mask_prompt": ("STRING", {"multiline": True, "default": "person",
                                           "tooltip": "What to mask, e.g. 'red car | truck AND NOT wheels'."}),
                "threshold": ("STRING", {"default": defaults.THRESHOLD, "tooltip": "'auto' (0.5 on the probability), 'otsu' or 0..1."}),
                "blur": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 0.5, "tooltip": "Feather in pixels."}),
                "grow": ("INT", {"default": 0, "min": -512, "max": 512, "tooltip": "Grow the mask by pixels; negative shrinks."}),
                "invert": ("BOOLEAN", {"default": False, "tooltip": "Select everything else."}),
                "soft": ("BOOLEAN", {"default": False, "tooltip": "Soft mask instead of a binary one."}),
                "timestep": ("INT", {"default": defaults.LDZNET_TIMESTEP, "min": 0, "max": 999,
                                     "tooltip": "Noise level of the feature forward (trained on 300-500)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Noise seed; image i uses seed + i."}),
            },
            "optional": {
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "What to subtract from the mask."}),
                "template": ("STRING", {"default": defaults.LDZNET_TEMPLATE, "tooltip": "Prompt template; {} is the phrase."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": options.MAX_RESOLUTION, "step": 64,
                                       "tooltip": "Working resolution; 0 = LD-ZNet's training resolution (384)."}),
                "edges": EDGES,
            },
        }

    def run(self, model, clip, vae, ldznet, image, mask_prompt, threshold, blur, grow, invert, soft, timestep, seed,
            negative="", template=defaults.LDZNET_TEMPLATE, resolution=0, edges=defaults.PAMR):
        host = ComfyHost(model, clip, vae)
        comfy.model_management.load_models_gpu([model, ldznet])
        result = TextMasker(host).mask(
            image, mask_prompt, negative=negative or None, method="ld-znet", ldznet=ldznet.model,
            template=template or None, threshold=threshold, soft=soft, blur=blur, grow=grow,
            invert=invert, timestep=timestep, seed=seed, resolution=resolution or None, pamr=edges,
        )
        preview = overlay(image.float().cpu(), result.heatmaps)
        return (result.masks.float().cpu(), preview)
