"""Deterministic self-attention inputs for the DiffSeg parity fixture (bench/parity/parity_diffseg.py writes it;
tests/test_parity.py reads it): SD1.5's layout at 512 px (self-attention at 64, 32, 16 and 8 with 5, 5, 5 and 1
layers), each layer's maps a softmax over colour-and-position distances of a Shapes scene, with its own
sharpness per layer and head, so the maps have the structure of real attention (objects, background, edges)
and every layer differs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from textmask.capture import AttentionLayer

LAYERS = {64: 5, 32: 5, 16: 5, 8: 1}  # SD1's self-attention layers per side at 512 px
HEADS = 2
FLOOR = 2e-3  # share of each map spread uniformly
SCENES = [3, 11, 19, 27, 35, 43]  # Shapes test-split scene indices


def scene_image(index: int) -> torch.Tensor:
    from textmask.demo.scenes import make_scene, split_seeds

    image = make_scene(split_seeds("test", max(SCENES) + 1)[index]).image
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()  # [1, 3, H, W]


def layer_probs(index: int) -> list[tuple[int, torch.Tensor]]:
    """[(side, probabilities [HEADS, side², side²] float64)] in SD1's forward order (down, mid, up)."""
    image = scene_image(index)
    out = []
    order = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    for n, side in enumerate(order):
        pooled = F.adaptive_avg_pool2d(image, side)[0]  # [3, s, s]
        yy, xx = torch.meshgrid(torch.linspace(0, 1, side, dtype=torch.float64),
                                torch.linspace(0, 1, side, dtype=torch.float64), indexing="ij")
        feats = torch.cat([pooled * 4.0, torch.stack([yy, xx]) * (1.0 + 0.25 * n)]).reshape(5, -1).T  # [s², 5]
        d2 = torch.cdist(feats, feats).square()
        d2 = d2 / d2.max()
        # Peaked maps over a small uniform floor: every entry stays within fp16's range after aggregation, as in
        # SD (the reference's fp16 step drops any map with an entry that fp16 rounds to zero).
        heads = [(1 - FLOOR) * torch.softmax(-d2 * (20.0 + 10 * (n % 4) + 10 * h), dim=-1) + FLOOR / side**2
                 for h in range(HEADS)]
        out.append((side, torch.stack(heads)))
    assert [sum(1 for s, _ in out if s == side) for side in LAYERS] == list(LAYERS.values())
    return out


def per_resolution(probs: list[tuple[int, torch.Tensor]]) -> dict[int, np.ndarray]:
    """The reference's input: per side, the mean of that side's layers, heads kept: [HEADS, s², s²]."""
    return {side: torch.stack([p for s, p in probs if s == side]).mean(0).numpy() for side in LAYERS}


def aggregate(probs: list[tuple[int, torch.Tensor]], weighting: str = "resolution") -> torch.Tensor:
    """textmask's aggregate [64², 64²] of these layers, fed through SelfAttentionAggregate as a capture would
    (head-averaged probabilities, each layer in two query chunks)."""
    from textmask.methods.attention import SelfAttentionAggregate

    agg = SelfAttentionAggregate(weighting=weighting)
    for n, (side, p) in enumerate(probs):
        layer = AttentionLayer(f"layer{n}", "self", n + 1, n + 1, (side, side), HEADS)
        mean = p.mean(0).float()[None]  # [1, s², s²]
        half = mean.shape[1] // 2
        agg(layer, 0, mean[:, :half])
        agg(layer, half, mean[:, half:])
    return agg.result()[0]
