"""The standalone web app: ``textmask app --checkpoint PATH`` (Gradio, diffusers host, 127.0.0.1 by default).

Upload one image or many, type a mask prompt (or a referring expression, with ``refer``), pick a method; see the masks, the heatmap overlays and the
cutouts, and download them as PNGs. Each request's files live in the app's temporary folder until the same browser
session asks again or leaves, and the folder goes when the app stops.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import defaults
from .errors import TextMaskError, describe
from .faces import NAMED, REFER, mask_any
from .methods import METHODS, ZERO_SHOT_METHODS


def make_outputs(masker, paths, prompt, method, refine, threshold, soft, invert, ldznet=None, root=None):
    """(mask PNGs, overlay PNGs, cutout PNGs) for each uploaded image, in a fresh folder under ``root`` (default: the
    system's temporary folder); on any error the folder goes and the error is raised."""
    if not paths or any(not isinstance(p, (str, Path)) and not hasattr(p, "name") for p in paths):
        raise TextMaskError("upload at least one image")
    if not isinstance(prompt, str) or not prompt.strip():
        raise TextMaskError("type what to mask")
    out = Path(tempfile.mkdtemp(prefix="textmask-app-", dir=root))
    try:
        return _write_outputs(masker, paths, prompt, method, refine, threshold, soft, invert, ldznet, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_outputs(masker, paths, prompt, method, refine, threshold, soft, invert, ldznet, out: Path):
    from PIL import Image

    from .images import load_image
    from .outputs import fit_stem
    from .render import overlay

    masks, overlays, cutouts = [], [], []
    for i, path in enumerate(paths):
        path = Path(getattr(path, "name", path))
        image = load_image(path)
        res = mask_any(masker, image, prompt, method=method, refine=refine, threshold=threshold, soft=soft,
                       invert=invert, ldznet=ldznet)
        mask = res.masks[0].numpy()
        stem = fit_stem(f"{i:03d}-{path.stem}", "-overlay.png")  # the longest of the three names
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

    # OVDiff's prototypes take minutes to sample per class: the CLI and ComfyUI build them once, ahead
    methods = [*(METHODS if ldznet is not None else ZERO_SHOT_METHODS), REFER, NAMED]
    root = Path(tempfile.mkdtemp(prefix="textmask-app-"))
    cleanup = functools.partial(shutil.rmtree, root, True)
    atexit.register(cleanup)
    sessions: dict[str, Path] = {}  # browser session -> the folder of its last request

    def forget(request: gr.Request = None) -> None:  # Gradio passes the request by its annotation
        folder = sessions.pop(getattr(request, "session_hash", None) or "", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def run(files, prompt, method, refine, threshold, soft, invert, request: gr.Request):
        try:
            masks, overlays, cutouts = make_outputs(masker, [f if isinstance(f, str) else f.name for f in files or []],
                                                    prompt, method, refine, threshold, soft, invert, ldznet, root)
        except TextMaskError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001  (the file system, memory: one line in the page, as the CLI prints)
            raise gr.Error(describe(e)) from None
        forget(request)  # Gradio has served the last request's files from its own copies
        if masks:
            sessions[getattr(request, "session_hash", None) or ""] = Path(masks[0]).parent
        return masks, overlays, cutouts, masks + overlays + cutouts

    with gr.Blocks(title="textmask", delete_cache=(3600, 3600)) as app:  # Gradio's own copies go after an hour
        gr.Markdown("## textmask\nMasks from words, made by the loaded Stable Diffusion model. "
                    "Combine phrases with `|`, `AND`, `NOT` and parentheses.")
        with gr.Row():
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
            with gr.Column():
                prompt = gr.Textbox(label="Mask prompt", placeholder="red car | truck AND NOT wheels", elem_id="prompt")
                method = gr.Dropdown(label="Method", choices=methods, value=defaults.METHOD, elem_id="method")
                with gr.Row():
                    refine = gr.Checkbox(label="Refine", value=defaults.REFINE)
                    soft = gr.Checkbox(label="Soft mask", value=False)
                    invert = gr.Checkbox(label="Invert", value=False)
                threshold = gr.Textbox(label="Threshold ('auto', 'otsu' or 0-1)", value=defaults.THRESHOLD)
                button = gr.Button("Make masks", variant="primary", elem_id="run")
        with gr.Row():
            masks = gr.Gallery(label="Masks", elem_id="masks", columns=4)
            overlays = gr.Gallery(label="Heatmap overlay", elem_id="overlays", columns=4)
            cutouts = gr.Gallery(label="Cutout", elem_id="cutouts", columns=4)
        downloads = gr.File(label="Download PNGs", file_count="multiple", elem_id="downloads")
        button.click(run, [files, prompt, method, refine, threshold, soft, invert], [masks, overlays, cutouts, downloads])
        app.unload(forget)
    app.textmask_root, app.textmask_cleanup = root, cleanup  # where its requests' files live, and their removal
    return app
