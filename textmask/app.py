"""The standalone web app: ``textmask app --checkpoint PATH`` (Gradio, diffusers host, 127.0.0.1 by default).

Upload one image or many, type a mask prompt, pick a method; see the masks, the heatmap overlays and the
cutouts, and download them as PNGs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from . import defaults
from .errors import TextMaskError
from .methods import METHODS, ZERO_SHOT_METHODS


def make_outputs(masker, paths, prompt, method, refine, threshold, soft, invert, ldznet=None):
    """(mask PNGs, overlay PNGs, cutout PNGs) for each uploaded image, in a fresh temporary folder."""
    from PIL import Image

    from .images import load_image
    from .render import overlay

    if not paths:
        raise TextMaskError("upload at least one image")
    if not prompt or not prompt.strip():
        raise TextMaskError("type what to mask")
    out = Path(tempfile.mkdtemp(prefix="textmask-app-"))
    masks, overlays, cutouts = [], [], []
    for i, path in enumerate(paths):
        path = Path(getattr(path, "name", path))
        image = load_image(path)
        kwargs = dict(method=method, refine=bool(refine), threshold=threshold, soft=soft, invert=invert)
        if method == "ld-znet":
            kwargs["ldznet"] = ldznet
        res = masker.mask(image, prompt, **kwargs)
        mask = res.masks[0].numpy()
        stem = f"{i:03d}-{path.stem}"
        Image.fromarray((mask * 255 + 0.5).astype(np.uint8), "L").save(out / f"{stem}-mask.png")
        heat = overlay(torch.from_numpy(image)[None], res.heatmaps[:1])[0].numpy()
        Image.fromarray((heat * 255 + 0.5).astype(np.uint8)).save(out / f"{stem}-overlay.png")
        rgba = np.concatenate([image, mask[..., None]], axis=-1)
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(out / f"{stem}-cutout.png")
        masks.append(str(out / f"{stem}-mask.png"))
        overlays.append(str(out / f"{stem}-overlay.png"))
        cutouts.append(str(out / f"{stem}-cutout.png"))
    return masks, overlays, cutouts


def build_app(masker, ldznet=None):
    """The Gradio Blocks of the app around a TextMasker."""
    import gradio as gr

    methods = list(METHODS) if ldznet is not None else list(ZERO_SHOT_METHODS)

    def run(files, prompt, method, refine, threshold, soft, invert):
        try:
            masks, overlays, cutouts = make_outputs(masker, [f if isinstance(f, str) else f.name for f in files or []],
                                                    prompt, method, refine, threshold, soft, invert, ldznet)
        except TextMaskError as e:
            raise gr.Error(str(e)) from None
        return masks, overlays, cutouts, masks + overlays + cutouts

    with gr.Blocks(title="textmask") as app:
        gr.Markdown("## textmask\nMasks from words, made by the loaded Stable Diffusion model. "
                    "Combine phrases with `|`, `AND`, `NOT` and parentheses.")
        with gr.Row():
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
            with gr.Column():
                prompt = gr.Textbox(label="Mask prompt", placeholder="red car | truck AND NOT wheels", elem_id="prompt")
                method = gr.Dropdown(label="Method", choices=methods, value=methods[0], elem_id="method")
                with gr.Row():
                    refine = gr.Checkbox(label="Refine", value=defaults.REFINE)
                    soft = gr.Checkbox(label="Soft mask", value=False)
                    invert = gr.Checkbox(label="Invert", value=False)
                threshold = gr.Textbox(label="Threshold ('auto' or 0-1)", value="auto")
                button = gr.Button("Make masks", variant="primary", elem_id="run")
        with gr.Row():
            masks = gr.Gallery(label="Masks", elem_id="masks", columns=4)
            overlays = gr.Gallery(label="Heatmap overlay", elem_id="overlays", columns=4)
            cutouts = gr.Gallery(label="Cutout", elem_id="cutouts", columns=4)
        downloads = gr.File(label="Download PNGs", file_count="multiple", elem_id="downloads")
        button.click(run, [files, prompt, method, refine, threshold, soft, invert], [masks, overlays, cutouts, downloads])
    return app
