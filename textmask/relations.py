"""Instances of a mask, and choosing among them by the words of a referring expression.

"the triangle on the left" -> the leftmost instance, "the larger square" -> the larger one, "the second car from
the right" -> the second from the right, "the top left star" -> the one nearest the top-left corner, "every
chair" / "all chairs" / "both cups" -> every instance. An expression with none of these words has no relation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

# Words that order instances, each with the signed coordinate it sorts by (smallest first).
ORDER_WORDS = {
    **dict.fromkeys("left leftmost far-left".split(), "left"),
    **dict.fromkeys("right rightmost far-right".split(), "right"),
    **dict.fromkeys("top upper topmost uppermost".split(), "top"),
    **dict.fromkeys("bottom lower bottommost lowest".split(), "bottom"),
    **dict.fromkeys("middle center centre central".split(), "middle"),
    **dict.fromkeys("large larger largest big bigger biggest huge".split(), "larger"),
    **dict.fromkeys("small smaller smallest little tiny".split(), "smaller"),
}
ORDINALS = {w: i for i, ws in enumerate(["first 1st", "second 2nd", "third 3rd", "fourth 4th", "fifth 5th"])
            for w in ws.split()}
EVERY = set("every all each both".split())
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# A component smaller than this share of the largest one is a fragment, not an instance.
MIN_SHARE = 0.1


@dataclass(frozen=True)
class Relation:
    """What an expression asks for among instances: ``every`` one, or the one at ``rank`` (0 = first) when they
    are sorted by ``order`` (words of ``ORDER_WORDS``' values, combined: "top left" sorts by x + y)."""

    order: tuple[str, ...] = ()
    rank: int = 0
    every: bool = False


def parse(expression: str) -> Relation | None:
    """The relation an expression states, or None when it states none."""
    words = WORD.findall(expression.lower())
    if any(w in EVERY for w in words):
        return Relation(every=True)
    order = tuple(dict.fromkeys(ORDER_WORDS[w] for w in words if w in ORDER_WORDS))
    if not order:
        return None
    rank = next((ORDINALS[w] for w in words if w in ORDINALS), 0)
    if "last" in words:  # "the last car on the right" is the rightmost: last from the other side, first from this
        rank = 0
    return Relation(order=order, rank=rank)


def instances(mask: torch.Tensor) -> torch.Tensor:
    """The connected components of a mask [h, w] (8-connected), largest first, without fragments smaller than
    ``MIN_SHARE`` of the largest. Returns bool [K, h, w]; K = 0 for an empty mask."""
    labels, count = ndimage.label(mask.cpu().numpy() > 0.5, structure=np.ones((3, 3)))
    if count == 0:
        return torch.zeros(0, *mask.shape, dtype=torch.bool)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    keep = [k + 1 for k in np.argsort(-areas, kind="stable") if areas[k] >= MIN_SHARE * areas.max()]
    return torch.from_numpy(np.stack([labels == k for k in keep]))


def _sort_keys(masks: torch.Tensor, order: tuple[str, ...]) -> torch.Tensor:
    """One key per instance [K]: the sum of its coordinates in each direction of ``order``, in units of the
    image's side (area in units of the image), smallest first."""
    k, h, w = masks.shape
    m = masks.float()
    area = m.flatten(1).sum(1).clamp_min(1)
    cy = (m.sum(2) * torch.arange(h)).sum(1) / area / max(h - 1, 1)
    cx = (m.sum(1) * torch.arange(w)).sum(1) / area / max(w - 1, 1)
    coordinate = {"left": cx, "right": -cx, "top": cy, "bottom": -cy,
                  "middle": ((cx - 0.5) ** 2 + (cy - 0.5) ** 2).sqrt(),
                  "larger": -area / (h * w), "smaller": area / (h * w)}
    return sum(coordinate[o] for o in order)


def choose(masks: torch.Tensor, relation: Relation) -> torch.Tensor:
    """The mask [h, w] (bool) of the instances [K, h, w] that ``relation`` picks: all of them for ``every``,
    else the one at its rank (the last one when there are fewer). An empty mask when there is no instance."""
    if len(masks) == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.bool)
    if relation.every:
        return masks.any(0)
    ranked = torch.argsort(_sort_keys(masks, relation.order), stable=True)
    return masks[ranked[min(relation.rank, len(masks) - 1)]]
