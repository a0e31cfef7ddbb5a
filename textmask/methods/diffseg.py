"""DiffSeg: unsupervised segments from merged self-attention maps (Tian et al., google/diffseg@77ea596).

Each pixel's aggregated self-attention row is a distribution over the R×R grid. Anchors on a 16×16 grid (rows
and columns 1, 5, …, 61 of a 64 grid, as the reference places them) pull in every pixel whose distribution lies
within a symmetric KL distance τ; the merged maps are merged again (3 iterations in all), and every pixel takes
the label of the map it attends most to. As in the reference, the first iteration's distances are taken in fp16,
added in the order its TensorFlow adds them on a CPU (a map with an entry that fp16 rounds to zero is NaN-distant
from everything, so it merges with nothing), and in later iterations an unmerged map averages every map within τ,
including maps an earlier group took. The symmetric KL of all anchor/pixel pairs is estimated with two matrix
products and only the pairs near τ are redone in fp16, so memory stays O(anchors × pixels) instead of the
reference's O(anchors × pixels²).
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


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to fp16 and keep them in float32: each fp16 operation is a float32 one, then this."""
    return t.half().float()


def fp16_sum(values: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis of fp16 values [P, n] (held in float32), added in the order and precision of the
    reference's TensorFlow on a CPU: Eigen halves the row (at a multiple of 8) until a part has at most 1600 values,
    sums each part in four 8-lane fp16 accumulators, and rounds every addition to fp16. Returns [P]."""
    n = values.shape[-1]
    if n > 8 * 200:
        split = 8 * -(-((n + 1) // 2) // 8)
        return _fp16(fp16_sum(values[:, :split]) + fp16_sum(values[:, split:]))
    whole = n // 32 * 32
    lanes = torch.zeros(len(values), 4, 8, device=values.device)
    for block in values[:, :whole].reshape(len(values), -1, 4, 8).unbind(1):
        lanes = _fp16(lanes + block)
    packet = lanes[:, 0]
    for k in (1, 2, 3):
        packet = _fp16(packet + lanes[:, k])
    for start in range(whole, n // 8 * 8, 8):
        packet = _fp16(packet + values[:, start:start + 8])
    rest = torch.zeros(len(values), device=values.device)
    for j in range(n // 8 * 8, n):
        rest = _fp16(rest + values[:, j])
    half = packet[:, :4] + packet[:, 4:]  # the packet's own sum is in float32, rounded once
    return _fp16(rest + _fp16((half[:, 0] + half[:, 2]) + (half[:, 1] + half[:, 3])))


def symmetric_kl_fp16_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's first-iteration distance for row pairs x [P, N], y [P, N], operation by operation in fp16:
    q = log x − log y, then ½Σ x·q − ½Σ y·q (sums as ``fp16_sum``). Returns [P] (fp16 values in float32); NaN
    where a row has an entry that fp16 rounds to zero."""
    x, y = x.half().float(), y.half().float()
    q = _fp16(_fp16(x.log()) - _fp16(y.log()))
    return _fp16(_fp16(fp16_sum(_fp16(x * q)) / 2) - _fp16(fp16_sum(_fp16(y * q)) / 2))


# How far from τ (relative to max(1, τ)) the fp32 estimate of an fp16 distance is redone operation by operation:
# 1/128 is 8 fp16 steps; on 120 000 pairs sampled from the parity scenes the estimate was at most 1.8 steps off.
RECHECK = 1 / 128


def close_fp16(anchors: torch.Tensor, attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """The reference's first-iteration decisions, symmetric KL < τ in fp16, for anchors [M, N] against every row of
    attention [K, N]; returns bool [M, K].

    Two matrix products estimate every distance in fp32 from fp16-rounded inputs; the pairs within ``RECHECK`` of
    τ are recomputed as the reference adds fp16 (``symmetric_kl_fp16_pairs``), so the decisions are the reference's
    own at a fraction of its cost. A row with an entry that fp16 rounds to zero is close to nothing."""
    x16, y16 = anchors.half(), attention.half()
    lx, ly = x16.float().log().half().float(), y16.float().log().half().float()
    xf, yf = x16.float(), y16.float()
    zero = (x16 == 0).any(-1)[:, None] | (y16 == 0).any(-1)[None, :]
    lx, ly = lx.nan_to_num(neginf=0.0), ly.nan_to_num(neginf=0.0)  # the pairs they touch are masked below
    hx, hy = (xf * lx).sum(-1, keepdim=True), (yf * ly).sum(-1, keepdim=True)
    estimate = 0.5 * (hx + hy.T - xf @ ly.T - lx @ yf.T)
    tau = _fp16(torch.tensor(float(threshold)))
    close = (estimate < tau) & ~zero
    rows, cols = ((estimate - tau).abs() <= RECHECK * max(1.0, float(tau))).logical_and(~zero).nonzero(as_tuple=True)
    for start in range(0, len(rows), 4096):  # 4096 pairs hold 64 MB per temporary at N = 4096
        i, j = rows[start:start + 4096], cols[start:start + 4096]
        close[i, j] = symmetric_kl_fp16_pairs(anchors[i], attention[j]) < tau
    return close


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
    close = close_fp16(anchors, attention, threshold)
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
