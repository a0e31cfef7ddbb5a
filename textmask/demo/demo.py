"""``textmask demo``: the whole pipeline on the bundled Shapes model, no download and no GPU needed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..render import overlay, save_mask, save_rgb
from ..ovdiff.prototypes import default_cache_dir
from .evaluate import Scores, auto_mask, margin_heatmap, object_phrases
from .model import MODEL_DIR, load_demo_masker
from .scenes import Scene, make_scene, split_seeds

METHODS = {
    "attention": dict(method="attention", refine=False),
    "attention+refine": dict(method="attention", refine=True),
    "noise-diff": dict(method="noise-diff"),
}
LDZNET = "ldznet.safetensors"  # LD-ZNet fitted to Shapes through train/ (MODEL_CARD.md), shown when bundled
NAMED_SEGMENTS = "named-segments"
# Fewer, shorter support images than the bench's 8 of 30 scored as well (docs/quality.md) and keep the demo under a
# minute on 2 cores. Cached.
OVDIFF_SUPPORT = dict(images=6, steps=15)
BINARY = {NAMED_SEGMENTS}  # methods with no soft map: AUC and pointing say nothing about them


def _gray(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[..., None].astype(np.float32), 3, -1)


def _text(image: np.ndarray, text: str, xy: tuple[int, int]) -> np.ndarray:
    """Write ``text`` in white on a black box at ``xy`` of a [H, W, 3] float image."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray((image * 255 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    draw.rectangle(draw.textbbox(xy, text), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255))
    return np.asarray(pil).astype(np.float32) / 255


def _tile(img: np.ndarray, scale: int = 2, label: str | None = None) -> np.ndarray:
    """Upscale a [H, W, 3] image by pixel repetition, optionally label it, and add a white border."""
    big = img.repeat(scale, 0).repeat(scale, 1)
    if label:
        big = _text(big, label, (3, 3))
    return np.pad(big, ((2, 2), (2, 2), (0, 0)), constant_values=1.0)


def _header(names: list[str], tile_width: int, width: int) -> np.ndarray:
    """A white strip naming each column."""
    strip = np.ones((16, width, 3), np.float32)
    for i, name in enumerate(names):
        strip = _text(strip, name, (i * tile_width + 4, 2))
    return strip


def contact_sheet(rows: list[list[np.ndarray]], names: list[str], cells: list[list[np.ndarray]],
                  cell_names: list[str]) -> np.ndarray:
    """Rows of equal tiles under a header; below them, groups of ``cells`` packed side by side to the same width."""
    body = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    tile_w = rows[0][0].shape[1]
    parts = [_header(names, tile_w, body.shape[1]), body]
    if cells:
        per_row = max(1, body.shape[1] // (tile_w * len(cells[0])))
        blank = np.ones_like(cells[0][0])
        packed = []
        for i in range(0, len(cells), per_row):
            group = [t for cell in cells[i:i + per_row] for t in cell]
            group += [blank] * (len(names) - len(group))
            packed.append(np.concatenate(group, axis=1)[:, :body.shape[1]])
        parts += [_header(cell_names * per_row, tile_w, body.shape[1]), *packed]
    return np.concatenate(parts, axis=0)


def outlined(rgb: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """A copy of an [H, W, 3] image with the mask's outline drawn in white: one contact-sheet tile."""
    from skimage.segmentation import find_boundaries

    tile = rgb.numpy().copy()
    tile[find_boundaries(mask.numpy() > 0.5, mode="inner")] = 1.0
    return tile


def _scene_maps(masker, scene: Scene, methods: dict, prototypes) -> dict[str, dict[str, tuple]]:
    """Per method, each object phrase's (heatmap, mask) as the method itself thresholds it."""
    phrases = object_phrases(scene)
    maps = {}
    for m, kw in methods.items():
        res = masker.mask(scene.image, " | ".join(phrases), **kw)
        maps[m] = {p: (res.terms[p][0], auto_mask(res.terms[p][0], p, kw["method"])) for p in phrases}
    named = masker.named_segments(scene.image, phrases)
    maps[NAMED_SEGMENTS] = {p: (named.masks[0, i], named.masks[0, i]) for i, p in enumerate(phrases)}
    ov = masker.ovdiff(scene.image, prototypes, classes=phrases)
    maps["ovdiff"] = {p: (margin_heatmap(ov.scores[0], i + 1), ov.masks[0, i]) for i, p in enumerate(phrases)}
    return maps


def run_demo(out: Path, scenes: int = 4, model: Path = MODEL_DIR, echo=print) -> dict[str, dict]:
    """Mask the objects of a few test scenes with every method; write PNGs and a contact sheet; return scores."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    masker = load_demo_masker(model)
    methods = dict(METHODS)
    if (Path(model) / LDZNET).is_file():
        methods["ld-znet"] = dict(method="ld-znet", ldznet=masker.load_ldznet(Path(model) / LDZNET))
    shown = [*methods, NAMED_SEGMENTS, "ovdiff", "refer"]  # the order of _scene_maps, then refer
    scenes = [make_scene(seed) for seed in split_seeds("test", scenes)]
    vocabulary = sorted({p for scene in scenes for p in object_phrases(scene)})
    echo(f"OVDiff: prototypes for {len(vocabulary)} phrases, {OVDIFF_SUPPORT['images']} support images each, "
         f"sampled by the model once and cached in {default_cache_dir()}")
    masker.host.show_progress = True
    try:
        prototypes = masker.build_prototypes(vocabulary, **OVDIFF_SUPPORT)
    finally:
        masker.host.show_progress = False

    scores = {m: Scores() for m in shown}
    object_rows, refer_cells = [], []

    def score_and_save(scene: Scene, phrase: str, method: str, heat, mask, gt: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(scene.image)
        scores[method].add(heat.numpy(), mask.numpy(), gt)
        stem = f"scene{scene.seed}-{phrase.replace(' ', '_')}-{method.split()[0]}"
        shown_heat = overlay(image, heat)
        save_mask(mask, out / f"{stem}-mask.png")
        save_rgb(shown_heat, out / f"{stem}-heatmap.png")
        return _tile(outlined(shown_heat, mask))

    for scene in scenes:
        save_rgb(torch.from_numpy(scene.image), out / f"scene{scene.seed}.png")
        maps = _scene_maps(masker, scene, methods, prototypes)
        for p in object_phrases(scene):
            gt = scene.phrase_mask(p)
            tiles = [score_and_save(scene, p, m, *maps[m][p], gt) for m in maps]
            object_rows.append([_tile(scene.image, label=p), _tile(_gray(gt)), *tiles])
        for phrase, target in scene.relations:  # refer takes relational phrases: "the larger square"
            res = masker.refer(scene.image, phrase)
            gt = scene.masks[target]
            tile = score_and_save(scene, phrase, "refer", res.heatmaps[0], res.masks[0], gt)
            refer_cells.append([_tile(scene.image, label=phrase), _tile(_gray(gt)), tile])
    sheet = contact_sheet(object_rows, ["image", "exact mask", *maps], refer_cells, ["image", "target", "refer"])
    save_rgb(torch.from_numpy(sheet), out / "contact_sheet.png")
    summary = {m: s.summary() for m, s in scores.items() if s.iou}  # refer is absent when no scene has relations
    objects, relations = len(scores["attention"].iou), len(scores["refer"].iou)
    echo(f"{objects} object phrases and {relations} relational phrases in {len(scenes)} scenes, "
         f"{time.time() - t0:.1f}s")
    echo("contact sheet: each method's heatmap with its mask outlined in white; refer's relational phrases below")
    for m, s in summary.items():
        line = f"{m:<28} IoU {s['iou']:.2f}"
        echo(line if m in BINARY else f"{line}   AUC {s['auc']:.2f}   pointing {s['pointing']:.2f}")
    echo("refer is scored on the relational phrases, every other method on the object phrases")
    echo(f"wrote masks, heatmaps and contact_sheet.png to {out}")
    return summary
