"""DiffCut: segments by recursive normalised cuts of a UNet encoder's features (Couairon et al., NeurIPS 2024;
PaulCouairon/DiffCut).

The features are the output of the encoder's last self-attention at its coarsest grid (1/32 of the image in
SD1.x and SDXL, where the reference reads them), from one forward at low noise under the empty prompt. Their
cosine affinities, min-max scaled and raised to α, form a graph that is cut in two (Shi & Malik's second
eigenvector, split at the best of 100 thresholds); each part is cut again while the cut's value stays under τ.
Each pixel of the output then takes the segment whose mean feature is closest to its bilinearly upsampled
feature (the reference's high-resolution concept assignment).

Checked against the reference's own code on the Shapes model's features (``bench/parity/parity_diffcut.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import CoarsestOutput
from ..errors import CaptureError

THRESHOLDS = 100  # candidate splits of the eigenvector, as the reference tries
# The reference's feature grid at 1024 px (1/32 of the image): features from larger working sizes, and the attention
# rows that stand in for them on an MM-DiT, are pooled to at most this side, which bounds the eigenproblems at 1 024
# nodes (a 4 096-node one takes tens of seconds on a CPU).
DIFFCUT_GRID = 32


def encoder_self_attention(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The self-attention modules (``attn1``) of a UNet's encoder (diffusers ``down_blocks``, ldm ``input_blocks``)."""
    return [(n, m) for n, m in modules
            if n.split(".", 1)[0] in ("down_blocks", "input_blocks") and n.rsplit(".", 1)[-1] == "attn1"]


def encoder_features(attention_modules: list[tuple[str, nn.Module]], latent_size: tuple[int, int]) -> CoarsestOutput:
    """The read-only hooks that keep DiffCut's features [B, N, C] from one forward: the output of the encoder's last
    self-attention at its coarsest grid. They sit on each encoder self-attention's output projection
    (``to_out[0]``), which every host calls, also where a patch replaces the attention itself."""
    targets = [(n, m.to_out[0]) for n, m in encoder_self_attention(attention_modules)]
    if not targets:
        raise CaptureError("DiffCut reads a UNet encoder's self-attention, and this model has none; use "
                           "segmenter='diffseg'")
    return CoarsestOutput(targets, latent_size)


def pooled_tokens(tokens: torch.Tensor, grid: tuple[int, int], most: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens [B, N, C] on ``grid`` averaged over blocks of the grid, so that neither side exceeds ``most``:
    ([B, n, C], the pooled grid). Unchanged where the grid is that small already."""
    h, w = grid
    if max(h, w) <= most:
        return tokens, grid
    f = -(-max(h, w) // most)
    out = (-(-h // f), -(-w // f))
    b, _, c = tokens.shape
    pooled = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(b, c, h, w).float(), out)
    return pooled.flatten(2).transpose(1, 2), out


def pooled_rows(attention: torch.Tensor, grid: tuple[int, int], most: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Attention [B, N, N] on ``grid`` averaged over blocks of queries and of keys alike (``pooled_tokens``):
    ([B, n, n], the pooled grid)."""
    if max(grid) <= most:
        return attention, grid
    rows, out = pooled_tokens(attention, grid, most)  # queries pooled: [B, n, N]
    keys, _ = pooled_tokens(rows.transpose(1, 2), grid, most)  # then keys: [B, n, n], keys first
    return keys.transpose(1, 2), out


def affinity(features: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cosine affinities of features [N, C], min-max scaled to [0, 1] and raised to ``alpha``: [N, N] in float32,
    as the reference computes them (so the same tiny affinities underflow to zero)."""
    f = F.normalize(features.float(), dim=1)
    a = f @ f.T
    return ((a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)) ** alpha


def bipartition(a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Shi & Malik's normalised cut of the graph a [n, n]: (the part [n] bool, the cut's value).

    The second-smallest eigenvector of the normalised Laplacian, its sign fixed by its largest entry, is split at the
    best of ``THRESHOLDS`` evenly spaced values by the Ncut criterion.
    """
    d = a.sum(1)
    d_isqrt = d.clamp_min(1e-12).rsqrt()
    laplacian = torch.diag(d) - a
    _, vectors = torch.linalg.eigh(d_isqrt[:, None] * laplacian * d_isqrt[None, :])
    y = d_isqrt * vectors[:, 1]
    y = y * torch.sign(y[y.abs().argmax()])
    cuts = torch.linspace(float(y.min()) * 0.99, float(y.max()) * 0.99, THRESHOLDS, dtype=y.dtype)
    x = (y[None] > cuts[:, None]).to(y.dtype) * 2 - 1  # [T, n] in {-1, 1}
    k = (d * (x > 0)).sum(1) / d.sum()
    b = k / (1 - k)
    z = (1 + x) - b[:, None] * (1 - x)
    ncut = ((z @ laplacian) * z).sum(1) / (z * z * d).sum(1)
    best = int(torch.nan_to_num(ncut, nan=float("inf")).argmin())
    return y > cuts[best], float(ncut[best])


def recursive_ncut(features: torch.Tensor, threshold: float, alpha: float) -> torch.Tensor:
    """Labels [N] (0..K-1, in the order the cuts leave them) of features [N, C]: cut while the Ncut is under
    ``threshold`` (the reference's τ) on the affinity graph of exponent ``alpha``.

    As in the reference, below the first cut a node with an affinity of exactly zero to any other (the least similar
    pair, and pairs that α underflows) takes part in no cut: it stays with the part each cut does not choose.
    """
    a = affinity(features, alpha)
    isolated = (a == 0).any(1)
    labels = torch.zeros(len(a), dtype=torch.long)
    pending, count = [(torch.arange(len(a)), 0)], 0
    while pending:
        idx, depth = pending.pop()
        cut = idx if depth == 0 else idx[~isolated[idx]]
        if len(cut) > 1:
            part, value = bipartition(a[cut][:, cut])
            if value < threshold and 0 < int(part.sum()) < len(cut):
                chosen = torch.zeros(len(a), dtype=torch.bool)
                chosen[cut[part]] = True
                # the unchosen part first, so the chosen one is cut first, as the reference recurses
                pending += [(idx[~chosen[idx]], depth + 1), (idx[chosen[idx]], depth + 1)]
                continue
        labels[idx] = count
        count += 1
    return labels


def concept_scores(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each segment's score [K, N]: the cosine of each normalised feature of [N, C] to the segment's mean one.

    The reference upsamples the features bilinearly to the output size and takes the argmax of the same products;
    upsampling is linear and a pixel's norm scales all of its K scores alike, so the argmax of these scores,
    upsampled bilinearly, is the same segment map without a [C, H, W] tensor."""
    f = F.normalize(features.float(), dim=1)
    centres = torch.stack([f[labels == k].mean(0) for k in range(int(labels.max()) + 1)])
    return centres @ f.T
