"""DAAM parity inputs, shared by bench/parity/parity_daam.py (which runs castorini/daam's own aggregation) and
tests/test_parity.py: per-head cross-attention probabilities in SD1's layout at 512 px (cross-attention at sides
64, 32, 16 and 8 with 5, 5, 5 and 1 layers, 8 heads, 77 tokens), each a softmax over token logits that follow a
Shapes scene's objects, sharp enough that bicubic resizing undershoots at their edges."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textmask.capture import AttentionLayer

HEADS, TOKENS = 8, 77
ORDER = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]  # SD1's cross-attention, forward order
PROMPT = "a photo of a red circle and a blue square"
WORDS = ["circle", "square", "red"]


def layers(seed: int = 0) -> list[tuple[AttentionLayer, torch.Tensor]]:
    """[(layer, probabilities [1, HEADS, side², TOKENS])] for the conditional row."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    circle = (((yy - 0.4) ** 2 + (xx - 0.3) ** 2) < 0.04).float()
    square = ((yy - 0.6).abs() < 0.15).float() * ((xx - 0.7).abs() < 0.15).float()
    out = []
    for n, side in enumerate(ORDER):
        shapes = F.adaptive_avg_pool2d(torch.stack([circle, square])[None], side)[0].reshape(2, -1).T  # [s², 2]
        logits = torch.randn(HEADS, side * side, TOKENS, generator=g)
        for h in range(HEADS):
            gain = 6.0 + 2.0 * h + n % 3
            logits[h, :, [5, 6]] += gain * shapes[:, :1]  # "red circle"
            logits[h, :, [9, 10]] += gain * shapes[:, 1:]  # "blue square"
        layer = AttentionLayer(f"cross{n}", "cross", n + 1, n + 1, (side, side), HEADS)
        out.append((layer, logits.softmax(-1)[None]))
    return out


def textmask_maps(groups: list[list[int]], seed: int = 0) -> torch.Tensor:
    """textmask's DAAM collector over these layers, fed in query chunks as a capture would: [1, P, 64, 64]."""
    from textmask.methods.attention import DAAMHeatMaps

    daam = DAAMHeatMaps(groups, (64, 64))
    for layer, probs in layers(seed):
        half = probs.shape[2] // 2
        daam(layer, 0, probs[:, :, :half])
        daam(layer, half, probs[:, :, half:])
    return daam.result()
