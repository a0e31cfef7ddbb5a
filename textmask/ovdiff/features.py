"""OVDiff's features: cross-attention queries of chosen layers at t=200 under the empty prompt, upsampled
to 64×64 and concatenated; the same forward also yields DiffSeg's self-attention aggregate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capture import AttentionCapture, AttentionLayer
from ..hosts.base import Conditioning, Host
from ..latents import image_noise
from ..methods.attention import SelfAttentionAggregate

FEATURE_TIMESTEP = 200
FEATURE_SIZE = 64
# The reference's layers "0,6:13,15" of SD1's 16 cross-attention layers (1-based: 1, 7-13, 16): the first
# down layer, the mid layer, the up layers of the two middle levels and the last up layer.
SD1_CROSS_LAYERS = (1, 7, 8, 9, 10, 11, 12, 13, 16)


def feature_layer(layer: AttentionLayer, cross_layers: int) -> bool:
    """Whether a layer's queries are features: the reference's choice on 16-layer UNets, else every cross layer."""
    if layer.kind != "cross":
        return False
    return layer.kind_ordinal in SD1_CROSS_LAYERS if cross_layers == 16 else True


@torch.inference_mode()
def extract(host: Host, latents: torch.Tensor, empty: Conditioning, seed: int, *,
            with_segments: bool = False, shared_noise: bool = False) -> tuple[torch.Tensor, SelfAttentionAggregate | None]:
    """Features [B, D, 64, 64] (float32, on the latents' device) of host-scaled ``latents``; with
    ``with_segments`` also the self-attention aggregate of the same forward, for DiffSeg. Row i draws noise
    seeded ``seed`` + i, or ``seed`` for every row with ``shared_noise`` (the windows of one image)."""
    b = latents.shape[0]
    noise = image_noise(latents.shape[1:], seed, 1 if shared_noise else b).expand(b, *latents.shape[1:])
    noise = noise.to(latents.device, latents.dtype)
    noisy = host.add_noise(latents, noise, FEATURE_TIMESTEP)
    selfagg = SelfAttentionAggregate() if with_segments else None
    with AttentionCapture(host.attention_modules(), tuple(latents.shape[-2:]), queries=lambda l: l.kind == "cross",
                          probs=(lambda l: l.kind == "self") if with_segments else None, sink=selfagg) as cap:
        host.predict_noise(noisy, FEATURE_TIMESTEP, empty.select([0] * b), latents)
    parts = []
    cross_layers = sum(layer.kind == "cross" for layer in cap.layers)
    for layer in cap.layers:
        if not feature_layer(layer, cross_layers):
            continue
        q = cap.queries[layer.name].float()  # [B, h*w, C]
        grid = q.transpose(1, 2).reshape(b, q.shape[-1], *layer.size)
        parts.append(F.interpolate(grid, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False))
    if not parts:
        raise RuntimeError("no cross-attention queries were captured")
    return torch.cat(parts, dim=1), selfagg
