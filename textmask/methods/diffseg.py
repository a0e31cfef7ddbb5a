"""DiffSeg: unsupervised segments from merged self-attention maps (Tian et al., google/diffseg@77ea596).

Each pixel's aggregated self-attention row is a distribution over the R×R grid. Anchors on a 16×16 grid (rows
and columns 1, 5, …, 61 of a 64 grid, as the reference places them) pull in every pixel whose distribution lies
within a symmetric KL distance τ; the merged maps are merged again (3 iterations in all), and every pixel takes
the label of the map it attends most to. As in the reference, the first iteration's distances are taken in fp16
(a map with an entry that fp16 rounds to zero is NaN-distant from everything, so it merges with nothing), and in
later iterations an unmerged map averages every map within τ, including maps an earlier group took. The symmetric
KL of all anchor/pixel pairs is computed with two matrix products, so memory stays O(anchors × pixels) instead of
the reference's O(anchors × pixels²).
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


def symmetric_kl_fp16(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``symmetric_kl`` as the reference's first iteration takes it: inputs and their logs rounded to fp16, the
    distance rounded to fp16; NaN where either row has an entry that fp16 rounds to zero (log 0)."""
    x16, y16 = x.half(), y.half()
    lx, ly = x16.float().log().half().float(), y16.float().log().half().float()
    xf, yf = x16.float(), y16.float()
    zero_x, zero_y = (x16 == 0).any(-1), (y16 == 0).any(-1)
    lx, ly = lx.nan_to_num(neginf=0.0), ly.nan_to_num(neginf=0.0)  # the pairs they touch are NaN below
    hx, hy = (xf * lx).sum(-1, keepdim=True), (yf * ly).sum(-1, keepdim=True)
    kl = (0.5 * (hx + hy.T - xf @ ly.T - lx @ yf.T)).half()
    return kl.masked_fill(zero_x[:, None] | zero_y[None, :], float("nan"))


def anchor_axis(length: int, points: int) -> torch.Tensor:
    """Anchor positions along one axis: evenly spaced by a whole step, centred (1, 5, …, 61 of 64 for 16)."""
    points = min(points, length)
    if points == 1:
        return torch.tensor([(length - 1) // 2])
    step = (length - 1) // (points - 1)
    start = (length - 1 - step * (points - 1)) // 2
    return start + step * torch.arange(points)


def anchor_grid(size: tuple[int, int], points: int = 16) -> torch.Tensor:
    """Flat indices of a points×points grid of anchors over an (h, w) grid, row-major."""
    h, w = size
    rows, cols = anchor_axis(h, points), anchor_axis(w, points)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def merge_once(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """One later merging iteration over maps [M, N]: in order, each map not yet taken averages every map within
    ``threshold`` of it (taken ones included) and takes them; a map within ``threshold`` of nothing, itself
    included (a NaN map), is dropped."""
    # Distances in float64, as the reference's merged maps are; the greedy pass runs on the CPU.
    close = (symmetric_kl(maps.double(), maps.double()) < threshold).cpu()
    taken = torch.zeros(len(maps), dtype=torch.bool)
    groups = []
    for i in range(len(maps)):
        if taken[i]:
            continue
        taken[i] = True
        if close[i].any():
            taken |= close[i]
            groups.append(close[i])
    if not groups:
        return maps[:0]
    members = torch.stack(groups).to(maps.device, maps.dtype)  # [G, M]
    return (members @ maps) / members.sum(1, keepdim=True)


def diffseg(
    attention: torch.Tensor, size: tuple[int, int], threshold: float = TAU, iterations: int = 3, points: int = 16,
    kmeans: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment one image from its aggregated self-attention [N, N] on an ``size`` grid.

    ``kmeans``: the reference's optional refinement, Euclidean K-means of the pixel distributions from the merged
    maps, to convergence (scikit-learn). Returns (labels [h, w] long, segment maps [K, N]); labels index the maps.
    """
    attention = attention.float()
    attention = attention / attention.sum(-1, keepdim=True).clamp_min(EPS)
    anchors = attention[anchor_grid(size, points).to(attention.device)]
    # First iteration: each anchor averages every pixel distribution close to it (fp16, with fp16's τ).
    close = symmetric_kl_fp16(anchors, attention) < torch.tensor(threshold).half()
    if not bool(close.any()):  # every anchor has an entry below fp16's range: the reference would fail; use fp32
        close = symmetric_kl(anchors, attention) < threshold
    close = close.float()
    maps = (close @ attention) / close.sum(-1, keepdim=True).clamp_min(1.0)
    maps = maps[close.sum(-1) > 0]
    for _ in range(iterations - 1):
        maps = merge_once(maps, threshold)
    if kmeans and len(maps) > 1:
        maps = kmeans_maps(attention, maps)
    labels = maps.T.argmax(-1)
    # Relabel 0..K-1 in order of first appearance and drop empty maps.
    used, labels = torch.unique(labels, return_inverse=True)
    return labels.reshape(size), maps[used]


def kmeans_maps(attention: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The mean distribution of each cluster of scikit-learn's K-means over the rows of ``attention`` [N, N],
    started from ``maps`` [K, N] (one run, Lloyd's algorithm to its convergence, in float64 as the reference)."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        from ..errors import TextMaskError

        raise TextMaskError("DiffSeg's K-means refinement needs scikit-learn: pip install scikit-learn") from None
    points = attention.double().cpu().numpy()
    clusters = KMeans(n_clusters=len(maps), init=maps.double().cpu().numpy(), n_init=1).fit(points).labels_
    clusters = torch.from_numpy(clusters).to(attention.device)
    return torch.stack([attention[clusters == k].mean(0) for k in torch.unique(clusters)])
