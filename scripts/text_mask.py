"""AUTOMATIC1111 / Forge: "Text Mask" in the img2img script dropdown, and an always-visible accordion in the
inpaint section that replaces, adds to or subtracts from the painted mask. Masks come from the webui's
already-loaded model (``shared.sd_model``). Works through the API too: ``script_args`` / ``alwayson_scripts``
take the ``ui()`` values in order (see docs/webui.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from modules import processing, scripts, sd_models, shared

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

from textmask import defaults  # noqa: E402
from textmask import postprocess as pp  # noqa: E402
from textmask.errors import TextMaskError  # noqa: E402
from textmask.images import to_batch  # noqa: E402
from textmask.faces import FACE_METHODS, mask_any  # noqa: E402
from textmask.hosts.select import webui_host  # noqa: E402
from textmask.masker import TextMasker  # noqa: E402
from textmask.render import overlay  # noqa: E402


def mask_controls(script: scripts.Script):
    """The shared controls, in the order run() / process() receive them (new ones go last: API callers pass them
    by position)."""
    prompt = gr.Textbox(label="Mask prompt", placeholder="red car | truck AND NOT wheels, or: the man on the left",
                        lines=1, elem_id=script.elem_id("prompt"))
    negative = gr.Textbox(label="Negative mask prompt", lines=1, elem_id=script.elem_id("negative"))
    with gr.Row():
        method = gr.Dropdown(label="Method", choices=list(FACE_METHODS), value=defaults.METHOD,
                             elem_id=script.elem_id("method"))
        ldznet = gr.Textbox(label="LD-ZNet weights (.safetensors, for ld-znet)", elem_id=script.elem_id("ldznet"))
        refine = gr.Checkbox(label="Refine", value=defaults.REFINE, elem_id=script.elem_id("refine"))
    with gr.Row():
        threshold = gr.Textbox(label="Threshold ('auto', 'otsu' or 0-1)", value=defaults.THRESHOLD, elem_id=script.elem_id("threshold"))
        blur = gr.Slider(label="Blur (px)", minimum=0, maximum=64, step=0.5, value=0, elem_id=script.elem_id("blur"))
        grow = gr.Slider(label="Grow (px)", minimum=-64, maximum=64, step=1, value=0, elem_id=script.elem_id("grow"))
    with gr.Row():
        invert = gr.Checkbox(label="Invert", value=False, elem_id=script.elem_id("invert"))
        soft = gr.Checkbox(label="Soft mask", value=False, elem_id=script.elem_id("soft"))
        show = gr.Checkbox(label="Show mask in output", value=True, elem_id=script.elem_id("show"))
    with gr.Row():
        names = gr.Textbox(label="Other names in the picture (named segments, ovdiff)", placeholder="sky, road, tree",
                           lines=1, elem_id=script.elem_id("names"))
        support = gr.Slider(label="OVDiff support images per name", minimum=1, maximum=64, step=1,
                            value=defaults.OVDIFF_IMAGES, elem_id=script.elem_id("support"))
    # A fine step: the score's scale is the model's, and Shapes' present phrases score from about 0.03.
    min_presence = gr.Slider(label="Minimum presence (attention; 0 = off): a phrase scored below it selects nothing",
                             minimum=0, maximum=1, step=0.005, value=defaults.MIN_PRESENCE, elem_id=script.elem_id("min_presence"))
    return [prompt, negative, method, ldznet, refine, threshold, blur, grow, invert, soft, show, names, support,
            min_presence]


def webui_model():
    """The model this generation runs. Forge loads the selected checkpoint only once processing starts, after the
    scripts' ``run`` and ``before_process``; its reload is a no-op when that checkpoint is loaded already."""
    reload = getattr(sd_models, "forge_model_reload", None)
    model = reload()[0] if reload is not None else shared.sd_model
    if model is None:
        raise TextMaskError("Text Mask: no model is loaded; pick a checkpoint first")
    return model


def ovdiff_cache() -> str | None:
    """models/ovdiff inside the webui, so prototypes live beside the checkpoints they were made from."""
    try:
        from modules import paths
    except ImportError:
        return None
    root = getattr(paths, "models_path", None)
    return str(Path(root) / "ovdiff") if root else None


def compute_masks(p, prompt, negative, method, ldznet, refine, threshold, blur, grow, invert, soft, names="",
                  support=defaults.OVDIFF_IMAGES, min_presence=defaults.MIN_PRESENCE):
    """Masks [N, H, W] and heatmaps for p.init_images at their own size, from the webui's model."""
    if not getattr(p, "init_images", None):
        raise TextMaskError("Text Mask needs an init image: put one in img2img, or send init_images")
    if len(p.init_images) > 1:  # the webui inpaints every init image with its one image_mask
        raise TextMaskError(f"Text Mask makes one mask, and the webui would inpaint all {len(p.init_images)} init "
                            "images with it; send one init image per request (or use img2img's Batch tab)")
    # read as textmask reads any image: 16-bit, palette and gray images scaled, not clipped by convert("RGB")
    images = [to_batch(im)[0].permute(1, 2, 0).numpy() for im in p.init_images]
    masker = TextMasker(webui_host(webui_model()))
    kwargs = dict(method=method, negative=negative or None, names=names, ldznet=ldznet, refine=refine,
                  threshold=threshold, soft=soft, blur=blur, grow=grow, invert=invert,
                  seed=generation_seed(p), ovdiff_images=support, cache_dir=ovdiff_cache(),
                  min_presence=min_presence)
    masks, heats = [], []
    for img in images:  # init images may differ in size
        res = mask_any(masker, img, prompt, **kwargs)
        masks.append(res.masks[0])
        heats.append((torch.from_numpy(img), res.heatmaps[0]))
    return masks, heats


def generation_seed(p) -> int:
    """The seed of the generation's first image, which its masks share: A1111 and Forge fix a random seed (-1) into
    ``all_seeds`` before ``process()``, and ``run()`` fixes ``p.seed`` itself, so a mask remade with the seed the
    image's infotext shows is the same mask."""
    seeds = getattr(p, "all_seeds", None)
    seed = seeds[0] if seeds else getattr(p, "seed", 0)
    return int(seed or 0) % 2**31


def to_pil(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8), mode="L")


def from_pil(mask: Image.Image | None, size) -> torch.Tensor | None:
    """The painted mask [H, W] in [0, 1] at ``size``, read as the webui reads it (``create_binary_mask``): an RGBA
    mask that is not wholly opaque is its alpha channel (Gradio's sketch, API masks), any other its gray levels."""
    if mask is None:
        return None
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A")
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.NEAREST)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)


def previews(masks, heats) -> list[Image.Image]:
    out = [to_pil(m) for m in masks]
    for img, heat in heats:
        out.append(Image.fromarray((overlay(img[None], heat[None])[0].numpy() * 255 + 0.5).astype(np.uint8)))
    return out


def apply_mask(p, mask: torch.Tensor, soft: bool) -> None:
    """Hand the webui a mask at the init image's size: image_mask drives inpainting, latent_mask follows it.

    A mask that leaves nothing to inpaint, as the webui reads it (halved to 0 or 1 unless soft, inverted with
    "Inpaint not masked"), goes with the inpaint area set to the whole picture, whose path keeps every pixel: with
    "Only masked" the webui would find no region, switch to img2img and repaint everything."""
    image = to_pil(mask)
    read = np.asarray(image).astype(np.int16)
    if not soft:
        read = np.where(read > 128, 255, 0)
    if getattr(p, "inpainting_mask_invert", 0):
        read = 255 - read
    if not read.any():
        p.inpaint_full_res = False
    p.image_mask = image
    p.latent_mask = None
    if soft:
        p.mask_round = False


def refuse_generation(p, error: Exception) -> None:
    """Make this generation fail with ``error`` where it would sample. The webui catches an always-on script's
    exceptions and would inpaint the whole image instead; its sampler call is not caught, so the message reaches the
    UI's error box and the API's response, and nothing is generated."""
    def refuse(*args, **kwargs):
        raise error

    p.sample = refuse


class TextMaskScript(scripts.Script):
    """The img2img dropdown entry: masks p.init_images from words, then inpaints."""

    def title(self):
        return "Text Mask"

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        return mask_controls(self)

    def run(self, p, prompt, negative, method, ldznet, refine, threshold, blur, grow, invert, soft, show, names="",
            support=defaults.OVDIFF_IMAGES, min_presence=defaults.MIN_PRESENCE):
        fix_seed = getattr(processing, "fix_seed", None)
        if fix_seed is not None:  # a random seed (-1) chosen now, so the mask and the image share it
            fix_seed(p)
        masks, heats = compute_masks(p, prompt, negative, method, ldznet, refine, threshold, blur, grow, invert, soft,
                                     names, support, min_presence)
        apply_mask(p, masks[0], soft)
        processed = processing.process_images(p)
        if show:
            processed.images.extend(previews(masks[:1], heats[:1]))
        return processed


class TextMaskInpaint(scripts.Script):
    """Always visible in the inpaint section: combine words with the painted mask before processing."""

    section = "inpaint"

    def title(self):
        return "Text Mask (inpaint)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if is_img2img else False

    def ui(self, is_img2img):
        with gr.Accordion("Text Mask", open=False):
            enabled = gr.Checkbox(label="Enable", value=False, elem_id=self.elem_id("enabled"))
            mode = gr.Radio(label="Mode", choices=list(pp.COMBINE_MODES), value="replace",
                            elem_id=self.elem_id("mode"))
            controls = mask_controls(self)
        return [enabled, mode, *controls]

    # process(), not before_process(): the webui applies a request's override_settings (a checkpoint among them) and
    # Forge loads its model between the two, and both read image_mask only after process(), in p.init.
    def process(self, p, enabled, mode, prompt, negative, method, ldznet, refine, threshold, blur, grow, invert, soft,
                show, names="", support=defaults.OVDIFF_IMAGES, min_presence=defaults.MIN_PRESENCE):
        if not enabled or not getattr(p, "init_images", None):
            return
        try:
            pp.combine_mode(mode)  # before the masks are made
            masks, heats = compute_masks(p, prompt, negative, method, ldznet, refine, threshold, blur, grow, invert,
                                         soft, names, support, min_presence)
            combined = pp.combine(masks[0], from_pil(getattr(p, "image_mask", None), p.init_images[0].size), mode)
            apply_mask(p, combined, soft)
        except Exception as e:
            refuse_generation(p, e)
            raise
        self._previews = previews([combined], heats[:1]) if show else []

    def postprocess(self, p, processed, enabled, mode, *args):
        if enabled and getattr(self, "_previews", None):
            processed.images.extend(self._previews)
            self._previews = []
