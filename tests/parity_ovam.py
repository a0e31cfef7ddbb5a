"""OVAM parity inputs, shared by bench/parity/parity_ovam.py (which runs vpulab/ovam's own hooker and re-query) and
tests/test_parity.py: a tiny pipeline in SD1.5's block layout (16 cross-attention layers at latent sides 16, 8, 4 and
2) with 4, 2, 8 and 8 heads per level, so that OVAM's sum over heads weighs the layers neither equally (SD1, 8 heads
everywhere) nor by 1/side (SD2, 5, 10, 20 and 20 heads), its weights redrawn from a recipe; one 32 px image; and
textmask's trace of it under the empty prompt, re-queried with PROMPT's keys."""

from __future__ import annotations

from unittest import mock

import tiny_models
import torch
from diffusers import UNet2DConditionModel
from parity_recipe import Spec, spec_of, weights

from textmask.capture import AttentionLayer
from textmask.methods.attention import CrossAttentionMaps

RESOLUTION, SEED = 32, 0
PROMPT = "a photo of a red circle and a blue square"
WORDS = ["circle", "square", "red"]
PARTS = ("unet", "vae", "text_encoder")


def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=tiny_models.CTX,
        attention_head_dim=(4, 2, 8, 8), norm_num_groups=8,  # diffusers' legacy name: the heads per level
    ).eval()


def pipe(spec: Spec | None = None) -> tuple[tiny_models.Pipe, Spec]:
    """The pipeline with every weight redrawn from ``spec`` (default: its initial weights' spec), and the spec."""
    p = tiny_models.Pipe(unet(), tiny_models.vae(), tiny_models.text_encoder())
    spec = spec or spec_of({f"{part}.{k}": v for part in PARTS for k, v in getattr(p, part).state_dict().items()})
    drawn = weights(spec)
    for part in PARTS:
        getattr(p, part).load_state_dict({k[len(part) + 1:]: v for k, v in drawn.items() if k.startswith(part + ".")})
    return p, spec


def textmask_trace(masker):
    """textmask's trace of the recipe's image [1, 32, 32, 3] under the empty prompt, unrefined: OVAM keeps the
    queries of a generation's unconditional row, whose prompt is empty."""
    image = torch.rand(1, RESOLUTION, RESOLUTION, 3, generator=torch.Generator().manual_seed(SEED))
    return masker.trace(image, prompt="", refine=False)


def requery(trace, prompt: str = PROMPT) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What ``Trace.maps(WORDS, prompt)`` computes: each layer's head-averaged re-queried attention {name: [B, N, 77]}
    (read from its collector), and its maps [B, len(WORDS), 16, 16]."""
    chunks: dict[str, list[torch.Tensor]] = {}

    class Recorder(CrossAttentionMaps):
        def __call__(self, layer, start, probs):
            chunks.setdefault(layer.name, []).append(probs.clone())
            super().__call__(layer, start, probs)

    with mock.patch("textmask.trace.CrossAttentionMaps", Recorder):
        maps = trace.maps(WORDS, prompt=prompt, heads="mean")  # OVAM sums the heads
    return {name: torch.cat(c, dim=1) for name, c in chunks.items()}, maps


def ovam_weight(layer: AttentionLayer) -> float:
    """OVAM's layer weight: its heads (it sums them, where textmask averages), and none for the mid block, which its
    hooker leaves out by default."""
    return 0.0 if layer.name.startswith("mid_block") else float(layer.heads)


def ovam_aggregate(trace, layers: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """textmask's collector with OVAM's weights and bilinear resizing: one map per token, [B, len(tokens), 16, 16]."""
    cross = CrossAttentionMaps([[t] for t in tokens], ovam_weight, heads="mean")
    for name, probs in layers.items():
        cross(trace.layers[name], 0, probs)
    return cross.total(max(cross.sums), mode="bilinear")
