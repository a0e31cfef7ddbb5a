"""Segmentation metrics under the CLIPSeg protocol (which LD-ZNet reports), and RefCOCO's mIoU / oIoU."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.integrate import simpson

THRESHOLDS = np.linspace(0.0, 1.0, 51)[1:-1]  # 49 values, 0.02 ... 0.98


@dataclass
class FixedIntervalMetrics:
    """Accumulates per-sample confusion counts at 49 thresholds; ``value()`` gives the protocol's numbers.

    - mIoU@t: mean over samples of tp / (tp + fp + fn) (1 when prediction and target are both empty);
    - IoU_FG@t: cumulative over the dataset, tp / (1 + tp + fp + fn) as CLIPSeg smooths it;
    - AP: Simpson's rule over the dataset-level precision-recall points, one per threshold;
    - ``best_*``: the best value over the thresholds.
    """

    thresholds: np.ndarray = field(default_factory=lambda: THRESHOLDS.copy())
    counts: list[np.ndarray] = field(default_factory=list)  # per sample: [T, 4] = tp, fp, fn, tn

    def add(self, probs: np.ndarray, target: np.ndarray) -> None:
        """Add one sample: probabilities in [0, 1] and a binary target of the same shape."""
        p = np.asarray(probs, dtype=np.float64).ravel()
        g = np.asarray(target).ravel() > 0.5
        if p.shape != g.shape:
            raise ValueError(f"prediction {np.shape(probs)} and target {np.shape(target)} differ in size")
        above = p[None, :] > self.thresholds[:, None]  # [T, N]
        tp = (above & g).sum(1)
        fp = (above & ~g).sum(1)
        fn = g.sum() - tp
        tn = (~g).sum() - fp
        self.counts.append(np.stack([tp, fp, fn, tn], axis=1))

    def index(self, t: float) -> int:
        return int(np.argmin(np.abs(self.thresholds - t)))

    def value(self) -> dict[str, float]:
        if not self.counts:
            raise ValueError("no samples were added")
        c = np.stack(self.counts).astype(np.float64)  # [S, T, 4]
        tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
        union = tp + fp + fn
        per_sample = np.where(union > 0, tp / np.maximum(union, 1), 1.0)  # [S, T]
        miou = per_sample.mean(0)
        stp, sfp, sfn = tp.sum(0), fp.sum(0), fn.sum(0)
        fgiou = stp / (1 + stp + sfp + sfn)
        made = (stp + sfp) > 0
        precision = stp[made] / (1 + stp[made] + sfp[made])
        recall = stp[made] / (1 + stp[made] + sfn[made])
        pairs = sorted(set(zip(recall.tolist(), precision.tolist())))
        ap = float(simpson([p for _, p in pairs], x=[r for r, _ in pairs])) if len(pairs) > 1 else 0.0
        return {
            "miou_0.3": float(miou[self.index(0.3)]),
            "miou_0.5": float(miou[self.index(0.5)]),
            "miou_best": float(miou.max()),
            "miou_best_t": float(self.thresholds[miou.argmax()]),
            "fgiou_0.3": float(fgiou[self.index(0.3)]),
            "fgiou_0.5": float(fgiou[self.index(0.5)]),
            "fgiou_best": float(fgiou.max()),
            "fgiou_best_t": float(self.thresholds[fgiou.argmax()]),
            "ap": ap,
            "samples": len(self.counts),
        }


def refcoco_scores(preds: list[np.ndarray], targets: list[np.ndarray], threshold: float = 0.5) -> dict[str, float]:
    """RefCOCO's mIoU (mean per-sample IoU) and oIoU (total intersection over total union) at ``threshold``."""
    inter = union = 0
    ious = []
    for p, g in zip(preds, targets):
        pb, gb = np.asarray(p) > threshold, np.asarray(g) > 0.5
        i, u = int((pb & gb).sum()), int((pb | gb).sum())
        inter, union = inter + i, union + u
        ious.append(i / u if u else 1.0)
    return {"miou": float(np.mean(ious)) if ious else 0.0, "oiou": inter / union if union else 0.0, "samples": len(ious)}
