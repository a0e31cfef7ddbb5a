"""The public result types. Every tensor is on the CPU, at the input images' exact size [H, W]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MaskResult:
    """``TextMasker.mask``: one mask per image."""

    masks: torch.Tensor  # [B, H, W] in [0, 1], 1 = selected (inpaint)
    heatmaps: torch.Tensor  # [B, H, W], the combined soft map before thresholding
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # phrase -> [B, H, W] normalised heatmap
    # phrase -> [B] in [0, 1]: how surely it is in each image (``attention`` with its default heads and
    # aggregation; empty otherwise)
    presence: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def instances(self) -> list[torch.Tensor]:
        """Per image, the mask's instances [K, H, W] (bool): its connected parts, largest first, without fragments
        (``relations.instances``); their union is the mask up to those fragments."""
        from .relations import instances

        return [instances(m) for m in self.masks]


@dataclass
class SegmentsResult:
    """``TextMasker.segments`` (DiffCut or DiffSeg): per image, a label map and one mask per segment, largest first."""

    labels: torch.Tensor  # [B, H, W] long, 0..K_b-1 in order of decreasing area
    masks: list[torch.Tensor]  # per image [K_b, H, W] float in {0, 1}


@dataclass
class LabelsResult:
    """Labels over names (named segments, OVDiff): label 0 is background, i + 1 is names[i]."""

    names: list[str]
    labels: torch.Tensor  # [B, H, W] long
    masks: torch.Tensor  # [B, len(names), H, W] float in {0, 1}, in the names' order
    scores: torch.Tensor | None = None  # [B, 1 + len(names), H, W] per-label scores (background first), if any


@dataclass
class ReferResult:
    """``TextMasker.refer``: the one object a referring expression names, per image: one of its subject's instances
    (picked by a relation or by attention), or Ref-Diff's proposal where a CLIP model scores them."""

    masks: torch.Tensor  # [B, H, W] in {0, 1}
    heatmaps: torch.Tensor  # [B, H, W] the subject's map (Ref-Diff's attribution, or its attention), in [0, 1]
    subject: str  # what the expression names, whose attention was read: "red car" (Ref-Diff: the head noun)
    instances: list[torch.Tensor] = field(default_factory=list)  # per image [K, H, W] bool: the subject's
    # instances (the candidates), or the parts of Ref-Diff's chosen proposal
