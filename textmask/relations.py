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
ORDINALS = {w: i for i, w in enumerate("first second third fourth fifth sixth seventh eighth ninth tenth eleventh "
                                        "twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth "
                                        "nineteenth twentieth".split())}
NUMERAL = re.compile(r"(\d+)(?:st|nd|rd|th)")  # "12th": rank 11
EVERY = set("every all each both".split())
# "on the left", "from the right", "in the middle", "at the top": a position attached to the noun phrase.
POSITION_PREPOSITIONS = set("on at in from to towards toward".split())
POSITIONS = {"left", "right", "top", "bottom", "middle"}
# "on the left of the picture" still places the object in the image; "on the left of the car" relates it to another.
FRAME_WORDS = set("picture image photo photograph frame scene screen".split())
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


def _attached_positions(words: list[str]) -> list[str]:
    """The positions that phrases such as "on the left" or "from the far right" in ``words`` give, where nothing
    but the image follows them ("on top of the box" relates to another object and gives none)."""
    found = []
    for i, w in enumerate(words):
        if w not in POSITION_PREPOSITIONS:
            continue
        j = i + 1
        while j < len(words) and words[j] in ("the", "far", "very"):
            j += 1
        position = ORDER_WORDS.get(words[j]) if j < len(words) else None
        if position not in POSITIONS:
            continue
        after = words[j + 1 : j + 4]
        if after[:1] == ["of"] and not FRAME_WORDS & set(after[1:]):
            continue
        found.append(position)
    return found


def parse(expression: str) -> Relation | None:
    """The relation an expression states, or None when it states none.

    Only the first noun phrase ("the second red car") and positions attached to it ("… from the right") count, so
    "the man holding a small dog" or "the man who left" state none."""
    from .subject import BOUNDARIES, VERBS

    words = WORD.findall(expression.lower())
    end = next((i for i, w in enumerate(words) if i > 0 and (w in BOUNDARIES or w in VERBS)), len(words))
    phrase = words[:end]
    if any(w in EVERY for w in phrase):
        return Relation(every=True)
    order = [ORDER_WORDS[w] for w in phrase if w in ORDER_WORDS] + _attached_positions(words[end:])
    order = tuple(dict.fromkeys(order))
    if not order:
        return None
    rank = next((ORDINALS[w] if w in ORDINALS else max(0, int(NUMERAL.fullmatch(w)[1]) - 1)
                 for w in phrase if w in ORDINALS or NUMERAL.fullmatch(w)), 0)
    if "last" in phrase:  # "the last car on the right" is the rightmost: last from the other side, first from this
        rank = 0
    return Relation(order=order, rank=rank)


def instances(mask: torch.Tensor, min_share: float = MIN_SHARE) -> torch.Tensor:
    """The connected components of a mask [h, w] (8-connected, at 0.5), largest first, without fragments smaller
    than ``min_share`` of the largest. Returns bool [K, h, w]; K = 0 for an empty mask."""
    labels, count = ndimage.label(mask.cpu().numpy() > 0.5, structure=np.ones((3, 3)))
    if count == 0:
        return torch.zeros(0, *mask.shape, dtype=torch.bool)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    keep = [k + 1 for k in np.argsort(-areas, kind="stable") if areas[k] >= min_share * areas.max()]
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
