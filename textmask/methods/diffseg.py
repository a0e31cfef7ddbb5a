"""DiffSeg: unsupervised segments from merged self-attention maps (Tian et al., google/diffseg).

Each pixel's aggregated self-attention row is a distribution over the R×R grid. Anchors on a 16×16
grid pull in every pixel whose distribution lies within a symmetric KL distance τ; the merged maps are
merged again (3 iterations in all), and every pixel takes the label of the map it attends most to.
The symmetric KL of all anchor/pixel pairs is computed with two matrix products, so memory stays
O(anchors × pixels) instead of O(anchors × pixels²).
"""

from __future__ import annotations

import torch

from ..defaults import TAU

EPS = 1e-12


def symmetric_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise ½KL(x‖y) + ½KL(y‖x) between rows of x [M, N] and y [K, N] (distributions); returns [M, K]."""
    lx, ly = x.clamp_min(EPS).log(), y.clamp_min(EPS).log()
    hx = (x * lx).sum(-1, keepdim=True)  # Σ x log x
    hy = (y * ly).sum(-1, keepdim=True)
    return 0.5 * (hx + hy.T - x @ ly.T - lx @ y.T)


def anchor_grid(size: tuple[int, int], points: int = 16) -> torch.Tensor:
    """Flat indices of a points×points grid of anchors spread evenly over an (h, w) grid."""
    h, w = size
    rows = torch.linspace(0, h - 1, min(points, h)).round().long()
    cols = torch.linspace(0, w - 1, min(points, w)).round().long()
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def merge_once(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedily merge maps [M, N] whose symmetric KL to a not-yet-merged map is below ``threshold``."""
    # The greedy pass runs on the CPU (a GPU would sync on every step); the means are one product on the device.
    dist = (symmetric_kl(maps, maps) < threshold).cpu()
    taken = torch.zeros(len(maps), dtype=torch.bool)
    groups = []
    for i in range(len(maps)):
        if taken[i]:
            continue
        group = dist[i] & ~taken
        group[i] = True
        taken |= group
        groups.append(group)
    members = torch.stack(groups).to(maps.device, maps.dtype)  # [G, M]
    return (members @ maps) / members.sum(1, keepdim=True)


def diffseg(
    attention: torch.Tensor, size: tuple[int, int], threshold: float = TAU, iterations: int = 3, points: int = 16,
    kmeans_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment one image from its aggregated self-attention [N, N] on an ``size`` grid.

    Returns (labels [h, w] long, segment maps [K, N]); labels index the maps.
    """
    attention = attention.float()
    attention = attention / attention.sum(-1, keepdim=True).clamp_min(EPS)
    anchors = attention[anchor_grid(size, points).to(attention.device)]
    # First iteration: each anchor averages every pixel distribution close to it.
    close = (symmetric_kl(anchors, attention) < threshold).float()
    maps = (close @ attention) / close.sum(-1, keepdim=True).clamp_min(1.0)
    maps = maps[close.sum(-1) > 0]
    for _ in range(iterations - 1):
        maps = merge_once(maps, threshold)
    for _ in range(kmeans_steps):
        # K-means on pixel distributions, initialised from the merged maps, with KL as the distance.
        assign = symmetric_kl(attention, maps).argmin(-1)
        used = torch.unique(assign)
        maps = torch.stack([attention[assign == k].mean(0) for k in used])
    labels = symmetric_kl(attention, maps).argmin(-1) if kmeans_steps else maps.T.argmax(-1)
    # Relabel 0..K-1 in order of first appearance and drop empty maps.
    used, labels = torch.unique(labels, return_inverse=True)
    return labels.reshape(size), maps[used]
