"""iSeg parity inputs, shared by bench/parity/parity_iseg.py (which runs linsun449/iseg.code's own walk) and
tests/test_parity.py: self-attention logits on the 64×64 grid the reference hard-codes (SD at 512 px), a peaked
softmax's over the colour-and-position distances of a Shapes test scene, and textmask's iSeg refinement of cross
maps along them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIDE = 64
SCENE = 0  # Shapes test-split index
SHARPNESS = 30.0


def self_attention_logits(index: int = SCENE) -> torch.Tensor:
    """Pre-softmax scores [SIDE², SIDE²] float32 (a query per row): −SHARPNESS × the squared distance over colour
    (×4) and position, normalised to a maximum of 1. Distances without matrix products, so every machine rebuilds
    the same values."""
    from textmask.demo.scenes import make_scene, split_seeds

    image = torch.from_numpy(np.ascontiguousarray(make_scene(split_seeds("test", index + 1)[index]).image))
    pooled = F.adaptive_avg_pool2d(image.permute(2, 0, 1)[None].double(), SIDE)[0]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIDE, dtype=torch.float64),
                            torch.linspace(0, 1, SIDE, dtype=torch.float64), indexing="ij")
    feats = torch.cat([pooled * 4.0, torch.stack([yy, xx])]).reshape(5, -1).T
    d2 = torch.cdist(feats, feats, compute_mode="donot_use_mm_for_euclid_dist").square()
    return (-SHARPNESS * d2 / d2.max()).float()


def textmask_refined(logits: torch.Tensor, cross: torch.Tensor, steps: int) -> torch.Tensor:
    """``refine_mode="iseg"`` of cross maps [P, SIDE, SIDE] along softmax(``logits``): [P, SIDE, SIDE]."""
    from textmask.methods.attention import refine_with_self_attention

    return refine_with_self_attention(cross[None], logits.softmax(-1)[None], (SIDE, SIDE), mode="iseg", steps=steps)[0]
