"""``textmask demo``: the whole pipeline on the bundled Shapes model, no download and no GPU needed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..io import overlay, save_mask, save_overlay
from .evaluate import Scores, object_phrases, otsu_mask
from .model import MODEL_DIR, load_demo_masker
from .scenes import make_scene, split_seeds

METHODS = {
    "attention": dict(method="attention"),
    "attention+refine": dict(method="attention", refine=True),
    "noise-diff": dict(method="noise-diff"),
}
LDZNET = "ldznet.safetensors"  # LD-ZNet fitted to Shapes through train/ (MODEL_CARD.md), shown when bundled


def _tile(img: np.ndarray, scale: int = 2) -> np.ndarray:
    """Upscale a [H, W, 3] image by pixel repetition and add a white border."""
    big = img.repeat(scale, 0).repeat(scale, 1)
    return np.pad(big, ((2, 2), (2, 2), (0, 0)), constant_values=1.0)


def run_demo(out: Path, scenes: int = 4, model: Path = MODEL_DIR, echo=print) -> dict[str, dict]:
    """Mask every object of a few test scenes with each method; write PNGs and a contact sheet; return scores."""
    from PIL import Image

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    masker = load_demo_masker(model)
    methods = dict(METHODS)
    if (Path(model) / LDZNET).is_file():
        methods["ld-znet"] = dict(method="ld-znet", ldznet=masker.load_ldznet(Path(model) / LDZNET))
    scores = {m: Scores() for m in methods}
    sheet_rows = []
    for seed in split_seeds("test", scenes):
        scene = make_scene(seed)
        image = torch.from_numpy(scene.image)
        Image.fromarray((scene.image * 255 + 0.5).astype(np.uint8)).save(out / f"scene{seed}.png")
        phrases = object_phrases(scene)
        results = {m: masker.mask(scene.image, " | ".join(phrases), **kw) for m, kw in methods.items()}
        for p in phrases:
            gt = scene.phrase_mask(p)
            row = [scene.image, np.repeat(gt[..., None].astype(np.float32), 3, -1)]
            for m, res in results.items():
                heat = res.terms[p][0]
                # the phrase's own mask as mask() thresholds it: Otsu, or 0.5 on LD-ZNet's probability
                mask = (heat > 0.5).float() if m == "ld-znet" else otsu_mask(heat)
                scores[m].add(heat.numpy(), mask.numpy(), gt)
                stem = f"scene{seed}-{p.replace(' ', '_')}-{m}"
                save_mask(mask, out / f"{stem}-mask.png")
                save_overlay(image, heat, out / f"{stem}-heatmap.png")
                row += [overlay(image, heat).numpy(), np.repeat(mask.numpy()[..., None], 3, -1)]
            sheet_rows.append(np.concatenate([_tile(t) for t in row], axis=1))
    sheet = np.concatenate(sheet_rows, axis=0)
    Image.fromarray((sheet * 255 + 0.5).astype(np.uint8)).save(out / "contact_sheet.png")
    summary = {m: s.summary() for m, s in scores.items()}
    echo(f"{sum(s['n'] for s in summary.values()) // len(summary)} phrases in {scenes} scenes, {time.time() - t0:.1f}s")
    echo("columns: image | ground truth | " + " | ".join(f"{m} heatmap | {m} mask" for m in methods))
    for m, s in summary.items():
        echo(f"{m:<18} IoU {s['iou']:.2f}   AUC {s['auc']:.2f}   pointing {s['pointing']:.2f}")
    echo(f"wrote masks, heatmaps and contact_sheet.png to {out}")
    return summary

