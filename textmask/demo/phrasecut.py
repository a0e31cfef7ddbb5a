"""Export Shapes scenes in PhraseCut's published format, so ``train/`` can fit LD-ZNet on them.

    python -m textmask.demo.phrasecut OUT_DIR --train 2000 --val 200 --test 200

Writes ``refer_{split}.json`` (task_id, image_id, phrase, Polygons: instances -> polygons -> [x, y]),
``image_data_split.json`` and ``images/{image_id}.jpg``. Each object phrase ("red circle") becomes one task
with every matching instance; each relational phrase becomes one task with its single target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage.measure import find_contours

from .scenes import make_scene, split_seeds


def mask_polygons(mask: np.ndarray) -> list[list[list[float]]]:
    """Outline polygons ([x, y] lists) of a boolean mask, traced at the 0.5 level between pixel centres."""
    padded = np.pad(mask.astype(np.float32), 1)
    polys = []
    for contour in find_contours(padded, 0.5):
        if len(contour) < 3:
            continue
        yx = contour - 1  # undo padding
        polys.append([[round(float(x) + 0.5, 2), round(float(y) + 0.5, 2)] for y, x in yx])
    return polys


def scene_tasks(scene) -> list[dict]:
    tasks = []
    for phrase in dict.fromkeys(o.phrase for o in scene.objects):
        instances = [mask_polygons(m) for o, m in zip(scene.objects, scene.masks) if o.phrase == phrase and m.any()]
        if instances:
            tasks.append({"phrase": phrase, "Polygons": instances})
    for phrase, target in scene.relations:
        if scene.masks[target].any():
            tasks.append({"phrase": phrase, "Polygons": [mask_polygons(scene.masks[target])]})
    for i, t in enumerate(tasks):
        t.update(task_id=f"{scene.seed}__{i}", image_id=scene.seed)
    return tasks


def export_phrasecut(out: Path, counts: dict[str, int]) -> dict[str, int]:
    """Write the PhraseCut-format dataset; returns the number of tasks per split."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    split_info, totals = [], {}
    for split, count in counts.items():
        tasks = []
        for seed in split_seeds(split, count):
            scene = make_scene(seed)
            Image.fromarray((scene.image * 255 + 0.5).astype(np.uint8)).save(out / "images" / f"{seed}.jpg", quality=95)
            h, w = scene.image.shape[:2]
            split_info.append({"image_id": seed, "split": split, "width": w, "height": h})
            tasks += scene_tasks(scene)
        (out / f"refer_{split}.json").write_text(json.dumps(tasks))
        totals[split] = len(tasks)
    (out / "image_data_split.json").write_text(json.dumps(split_info))
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description="Export Shapes scenes in PhraseCut format.")
    ap.add_argument("out", type=Path)
    for split, default in (("train", 2000), ("val", 200), ("test", 200)):
        ap.add_argument(f"--{split}", type=int, default=default)
    args = ap.parse_args()
    print(export_phrasecut(args.out, {"train": args.train, "val": args.val, "test": args.test}))


if __name__ == "__main__":
    main()
