"""Referring-segmentation datasets in their published layouts: PhraseCut, and RefCOCO as JSON.

PhraseCut (``--data DIR``): ``refer_{train,val,test}.json`` (task_id, image_id, phrase, Polygons: instances
-> polygons -> [x, y]), ``image_data_split.json`` (image_id, width, height) and ``images/{image_id}.jpg``.
RefCOCO (``--format refcoco``): ``refs.json`` (ref_id, ann_id, image_id, split, sentences[].sent),
``instances.json`` (COCO: images[].file_name, annotations[].segmentation as flat polygons) and ``images/``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.draw import polygon2mask

from textmask.ldznet.inference import PROMPT_TEMPLATES

# Images the reference drops from PhraseCut (broken annotations).
INVALID_IMAGE_IDS = {150417, 285665, 498246, 61564, 285743, 498269, 498010, 150516, 150344, 286093, 61530,
                     150333, 286065, 285814, 498187, 285761, 498042}


@dataclass
class Sample:
    image: Path
    phrase: str
    polygons: list[list[list[float]]]  # every instance's polygons, flattened to one list of [x, y] lists
    height: int
    width: int


def rasterise(polygons: list[list[list[float]]], height: int, width: int) -> np.ndarray:
    """OR of the polygons' masks ([x, y] vertices) as a bool [H, W] array."""
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        if len(poly) >= 3:
            mask |= polygon2mask((height, width), [(y, x) for x, y in poly])
    return mask


def find_square_crop(mask: np.ndarray, rng: np.random.Generator, tries: int = 50, min_frac: float = 0.05):
    """The reference's crop: a random square of the short side that keeps > min_frac of the image as target,
    else the try that kept the most."""
    h, w = mask.shape
    side = min(h, w)
    need = h * w * min_frac
    best = (-1, 0, 0)
    for _ in range(tries):
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        kept = int(mask[y : y + side, x : x + side].sum())
        if kept > need:
            return y, x, side
        if kept > best[0]:
            best = (kept, y, x)
    return best[1], best[2], side


@contextlib.contextmanager
def layout(files: str, what: str):
    """A dataset's files that do not hold what its layout says, as one line naming them and what was amiss."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"{files} do not follow {what}'s layout: an entry lacks {e}") from None
    except (TypeError, IndexError, AttributeError, ValueError) as e:
        raise ValueError(f"{files} do not follow {what}'s layout ({type(e).__name__}: {e})") from None


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None


def load_phrasecut(root: str | Path, split: str) -> list[Sample]:
    """PhraseCut tasks of one split, in file order, skipping the reference's invalid images."""
    root = Path(root)
    tasks = read_json(root / f"refer_{split}.json", "PhraseCut")
    with layout(f"refer_{split}.json and image_data_split.json", "PhraseCut"):
        info = {int(d["image_id"]): d for d in read_json(root / "image_data_split.json", "PhraseCut")}
        samples = []
        for t in tasks:
            iid = int(t["image_id"])
            if iid in INVALID_IMAGE_IDS:
                continue
            if iid not in info:
                raise ValueError(f"image {iid} of refer_{split}.json is not in image_data_split.json")
            d = info[iid]
            polys = [poly for instance in t["Polygons"] for poly in instance]
            samples.append(Sample(root / "images" / f"{iid}.jpg", t["phrase"], polys, int(d["height"]),
                                  int(d["width"])))
    return samples


def load_refcoco(root: str | Path, split: str) -> list[Sample]:
    """RefCOCO-format JSON: one sample per referring sentence of the split."""
    root = Path(root)
    refs = read_json(root / "refs.json", "RefCOCO")
    coco = read_json(root / "instances.json", "RefCOCO")
    with layout("refs.json and instances.json", "RefCOCO"):
        images = {int(i["id"]): i for i in coco["images"]}
        anns = {int(a["id"]): a for a in coco["annotations"]}
        samples = []
        for ref in refs:
            if ref["split"] != split:
                continue
            ann, img = anns[int(ref["ann_id"])], images[int(ref["image_id"])]
            polys = [[[seg[i], seg[i + 1]] for i in range(0, len(seg) - 1, 2)] for seg in ann["segmentation"]]
            for s in ref["sentences"]:
                samples.append(Sample(root / "images" / img["file_name"], s["sent"], polys, int(img["height"]),
                                      int(img["width"])))
    return samples


class ReferringDataset(torch.utils.data.Dataset):
    """Samples as (pixels [3, S, S] in [0, 1], mask [1, S, S], prompt), augmented like the reference.

    Training draws a square crop and one of the 9 templates from a generator seeded by (seed, epoch, index),
    so every run and every resume sees the same data. Evaluation resizes the whole image, template 0.
    """

    def __init__(self, samples: list[Sample], size: int = 384, train: bool = True, seed: int = 0):
        if not samples:
            raise ValueError("the dataset split is empty")
        self.samples, self.size, self.train, self.seed, self.epoch = samples, size, train, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        s = self.samples[i]
        with Image.open(s.image) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        mask = rasterise(s.polygons, s.height, s.width)
        if img.shape[:2] != mask.shape:
            raise ValueError(f"{s.image.name} is {img.shape[1]}x{img.shape[0]}, its annotation {s.width}x{s.height}")
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            y, x, side = find_square_crop(mask, rng)
            img, mask = img[y : y + side, x : x + side], mask[y : y + side, x : x + side]
            template = PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))]
        else:
            template = PROMPT_TEMPLATES[0]
        pixels = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels, (self.size, self.size), mode="bilinear", align_corners=True)[0]
        target = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
        target = F.interpolate(target, (self.size, self.size), mode="nearest")[0]
        return {"pixels": pixels.clamp(0, 1), "mask": target, "prompt": template.format(s.phrase), "phrase": s.phrase}


def load_split(root: str | Path, split: str, fmt: str = "phrasecut") -> list[Sample]:
    """Samples of one split in either layout."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data {root} is not a folder; give the dataset's folder")
    if fmt == "phrasecut":
        return load_phrasecut(root, split)
    if fmt == "refcoco":
        return load_refcoco(root, split)
    raise ValueError(f"unknown dataset format {fmt!r}; use phrasecut or refcoco")
