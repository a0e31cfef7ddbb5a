"""OVDiff's features: cross-attention queries of chosen layers at t=200 under the empty prompt, upsampled
to 64×64 and concatenated; the same forward also yields DiffSeg's self-attention aggregate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import defaults, forward
from ..capture import AttentionLayer, Need
from ..hosts.contract import Conditioning, Host
from ..methods.attention import SelfAttentionAggregate

FEATURE_TIMESTEP = defaults.OVDIFF_TIMESTEP
FEATURE_SIZE = 64
# The reference's layers "0,6:13,15" of SD1's 16 cross-attention layers (1-based: 1, 7-13, 16): the first
# down layer, the mid layer, the up layers of the two middle levels and the last up layer.
SD1_CROSS_LAYERS = (1, 7, 8, 9, 10, 11, 12, 13, 16)


def feature_layer(layer: AttentionLayer, cross_layers: int) -> bool:
    """Whether a layer's queries are features: the reference's choice on 16-layer UNets, else every cross layer."""
    if layer.kind != "cross":
        return False
    return layer.kind_ordinal in SD1_CROSS_LAYERS if cross_layers == 16 else True


class QueriesInOrder:
    """Collector: each cross-attention layer's queries, with the layers in the order of the forward."""

    need = Need(kinds=("cross",), values="queries")

    def __init__(self):
        self.layers: list[AttentionLayer] = []
        self.queries: dict[str, torch.Tensor] = {}

    def __call__(self, layer: AttentionLayer, start: int, q: torch.Tensor) -> None:
        if layer.name not in self.queries:
            self.layers.append(layer)
        self.queries[layer.name] = q


@torch.inference_mode()
def extract(host: Host, latents: torch.Tensor, empty: Conditioning, seed: int, *,
            with_segments: bool = False, shared_noise: bool = False) -> tuple[torch.Tensor, SelfAttentionAggregate | None]:
    """Features [B, D, 64, 64] (float32, on the latents' device) of host-scaled ``latents``; with
    ``with_segments`` also the self-attention aggregate of the same forward, for DiffSeg. Row i draws noise
    seeded ``seed`` + i, or ``seed`` for every row with ``shared_noise`` (the windows of one image)."""
    b = latents.shape[0]
    x, sigma = forward.add_noise(host, latents, FEATURE_TIMESTEP, seed, shared=shared_noise)
    queries = QueriesInOrder()
    selfagg = SelfAttentionAggregate() if with_segments else None
    forward.eps(host, x, sigma, empty.select([0] * b), latents, [queries] + ([selfagg] if selfagg else []))
    parts = []
    cross_layers = len(queries.layers)
    for layer in queries.layers:
        if not feature_layer(layer, cross_layers):
            continue
        q = queries.queries[layer.name].float()  # [B, h*w, C]
        grid = q.transpose(1, 2).reshape(b, q.shape[-1], *layer.size)
        parts.append(F.interpolate(grid, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False))
    if not parts:
        raise RuntimeError("no cross-attention queries were captured")
    return torch.cat(parts, dim=1), selfagg
