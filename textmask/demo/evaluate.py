"""Scoring masks against Shapes ground truth: IoU, best-threshold IoU, ROC AUC, the pointing game, boundary F-score,
instance matching, and what is given for a phrase that names nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import rankdata

from .. import postprocess as pp
from .scenes import COLOURS, SHAPES, Scene

THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def roc_auc(scores: np.ndarray, gt: np.ndarray) -> float:
    """Pixel ROC AUC via the rank-sum statistic (ties averaged); 0.5 when a class is absent."""
    gt = gt.ravel().astype(bool)
    pos, neg = gt.sum(), (~gt).sum()
    if pos == 0 or neg == 0:
        return 0.5
    ranks = rankdata(scores.ravel())
    return float((ranks[gt].sum() - pos * (pos + 1) / 2) / (pos * neg))


def pointing(scores: np.ndarray, gt: np.ndarray) -> float:
    """1.0 if the heatmap's peak falls inside the object."""
    return float(gt.ravel()[int(np.argmax(scores.ravel()))])


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: inside pixels with a 4-neighbour outside (the image border counts as outside)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = 0.0075) -> float:
    """Boundary F-score (Perazzi et al., DAVIS): precision and recall of the boundary pixels that lie within
    ``tolerance`` × the image diagonal of the other mask's boundary; 1.0 when both masks are empty."""
    bp, bg = boundary(pred), boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    reach = max(1.0, tolerance * float(np.hypot(*gt.shape)))
    near_gt = ndimage.distance_transform_edt(~bg) <= reach
    near_pred = ndimage.distance_transform_edt(~bp) <= reach
    precision, recall = (bp & near_gt).sum() / bp.sum(), (bg & near_pred).sum() / bg.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def instance_matches(pred: list[np.ndarray], gt: list[np.ndarray], at: float = 0.5) -> int:
    """How many predicted instances match a ground-truth instance one to one at IoU above ``at`` (at 0.5 a match
    is unique, so greedy matching is optimal)."""
    used, hits = set(), 0
    for p in pred:
        for k, g in enumerate(gt):
            if k not in used and iou(p, g) > at:
                used.add(k)
                hits += 1
                break
    return hits


def absent_phrases(scene: Scene) -> list[str]:
    """One phrase per object phrase that names nothing in the scene (``wrong_phrase``)."""
    return [wrong_phrase(scene, p) for p in object_phrases(scene)]


def every_phrases(scene: Scene) -> list[tuple[str, list[int]]]:
    """("every star", [object indices]) for each shape the scene holds more than once."""
    shapes: dict[str, list[int]] = {}
    for i, o in enumerate(scene.objects):
        shapes.setdefault(o.shape, []).append(i)
    return [(f"every {shape}", idx) for shape, idx in shapes.items() if len(idx) > 1]


@dataclass
class Scores:
    """Accumulates per-sample scores for one method."""

    iou: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)
    by_threshold: list[np.ndarray] = field(default_factory=list)
    boundary_f: list[float] = field(default_factory=list)

    def add(self, heatmap: np.ndarray, mask: np.ndarray, gt: np.ndarray) -> None:
        self.iou.append(iou(mask > 0.5, gt))
        self.auc.append(roc_auc(heatmap, gt))
        self.pointing.append(pointing(heatmap, gt))
        self.by_threshold.append(np.array([iou(heatmap > t, gt) for t in THRESHOLDS]))
        self.boundary_f.append(boundary_f(mask > 0.5, gt))

    def subset(self, keep: list[bool]) -> "Scores":
        """The samples where ``keep`` (one flag per sample) is true, in order."""
        if len(keep) != len(self.iou):
            raise ValueError(f"{len(keep)} flags for {len(self.iou)} samples")
        rows = [i for i, k in enumerate(keep) if k]
        return Scores(*([xs[i] for i in rows]
                        for xs in (self.iou, self.auc, self.pointing, self.by_threshold, self.boundary_f)))

    def summary(self) -> dict[str, float]:
        best = float(np.mean(self.by_threshold, axis=0).max()) if self.by_threshold else float("nan")
        return {
            "iou": float(np.mean(self.iou)),
            "best_iou": best,
            "auc": float(np.mean(self.auc)),
            "pointing": float(np.mean(self.pointing)),
            "boundary_f": float(np.mean(self.boundary_f)) if self.boundary_f else float("nan"),
            "n": len(self.iou),
        }


def auto_mask(heatmap: torch.Tensor, phrase: str = "", method: str = "attention") -> torch.Tensor:
    """The binary mask ``method`` makes from one normalised heatmap [H, W] of ``phrase`` at threshold="auto"."""
    from ..methods import get_method

    auto = get_method(method).auto_threshold
    if auto is None:
        return pp.auto_regions(heatmap > pp.thresholds(heatmap, "auto"), heatmap, phrase).float()
    return (heatmap > pp.thresholds(heatmap, auto)).float()


def margin_heatmap(scores: torch.Tensor, label: int) -> torch.Tensor:
    """OVDiff's heatmap for one label of [1 + K, H, W] scores: its margin over the best other label, 0.5 at the tie."""
    rest = torch.cat([scores[:label], scores[label + 1:]]).max(0).values
    return 0.5 + 0.5 * (scores[label] - rest)


def object_phrases(scene: Scene) -> list[str]:
    return list(dict.fromkeys(o.phrase for o in scene.objects))


def phrase_groups(scenes: list[Scene]) -> dict[str, list[bool]]:
    """Which of the scenes' object phrases (in ``object_phrases`` order) fall in each difficulty group."""
    rows = []
    for scene in scenes:
        for p in object_phrases(scene):
            colour, shape = p.split()
            others = [o for o in scene.objects if o.phrase != p]
            rows.append((any(o.colour == colour or o.shape == shape for o in others), len(scene.objects) == 1,
                         float(scene.phrase_mask(p).mean())))
    if not rows:
        return {}
    small, large = np.quantile([r[2] for r in rows], [1 / 3, 2 / 3])
    return {
        "a word shared in the scene": [r[0] for r in rows],
        "no word shared": [not r[0] for r in rows],
        "only object in the scene": [r[1] for r in rows],
        "smallest third": [r[2] <= small for r in rows],
        "largest third": [r[2] > large for r in rows],
    }


def wrong_phrase(scene: Scene, phrase: str) -> str:
    """A phrase absent from the scene that shares neither colour nor shape with ``phrase``."""
    colour, shape = phrase.split()
    present = {o.phrase for o in scene.objects}
    for c in COLOURS:
        for s in SHAPES:
            if c != colour and s != shape and f"{c} {s}" not in present:
                return f"{c} {s}"
    raise ValueError("no wrong phrase available")


def centre_prior(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    return np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * (0.25 * size) ** 2)).astype(np.float32)


def ceiling_heatmap(gt: np.ndarray, grid: int) -> np.ndarray:
    """The GT mask area-downsampled to the attention grid and bilinearly upsampled back."""
    t = torch.from_numpy(gt.astype(np.float32))[None, None]
    small = torch.nn.functional.adaptive_avg_pool2d(t, grid)
    return pp.resize(small[0], gt.shape)[0].numpy()


def hungarian_miou(segments: np.ndarray, truths: list[np.ndarray]) -> float:
    """Mean IoU of ground-truth regions matched one-to-one to predicted segments (Hungarian on IoU)."""
    from scipy.optimize import linear_sum_assignment

    ious = np.array([[iou(seg, gt) for seg in segments] for gt in truths])
    rows, cols = linear_sum_assignment(-ious)
    matched = np.zeros(len(truths))
    matched[rows] = ious[rows, cols]
    return float(matched.mean())
