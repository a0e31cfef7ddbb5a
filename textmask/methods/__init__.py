"""The mask methods and their registry: ``TextMasker.mask`` looks a method up by name and runs its decoder on
each batch the forward engine prepares.

A method is a ``MaskMethod``: its default timestep, what the "auto" threshold means for its maps, and ``setup``,
which takes the request's phrases, caption and method options once and returns a ``Decoder``. A decoder turns one
batch of (clean latents, noised x, σ) into normalised maps [b, P, h, w] on the CPU, through the engine's hooked
forwards. Method settings are arguments of ``setup``, never module globals.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from ..errors import TextMaskError
from ..hosts.contract import Host
from .attention import CrossAttentionMaps, SelfAttentionAggregate, attention_prompt, refine_with_self_attention
from .noise_diff import noise_difference


class Decoder(Protocol):
    """One request's decoding: normalised maps [b, P, h, w] (CPU, float32) for a batch, one per phrase."""

    resolution: int | None  # the working resolution this method needs (None: the host's native one)
    size_multiple: int | None  # the multiple working sides need (None: the host's)
    measures_presence: bool  # whether its calls fill ``presence``
    reads_self_attention: bool  # whether its forwards read self-attention (bounded by ``capture.MAX_SELF_TOKENS``)
    presence: torch.Tensor | None  # [B, P] in [0, 1] over the calls so far: how surely each phrase is there

    def __call__(self, host: Host, latents: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


class MaskMethod(Protocol):
    name: str
    timestep: int  # the default noise level
    # what threshold="auto" means: Otsu per map keeping a one-thing phrase's strongest regions (None), Otsu per map
    # ("otsu"), or this fixed value
    auto_threshold: float | str | None
    needs_images: bool  # whether it encodes the images itself (refuses given latents)
    needs_weights: bool  # whether it needs trained weights besides the host model

    def setup(self, host: Host, phrases: Sequence[str], prompt: str | None, **options: Any) -> Decoder: ...


from ..ldznet.inference import LDZNetMethod  # noqa: E402  (the registry needs the protocols above)
from .attention import AttentionMethod  # noqa: E402
from .noise_diff import NoiseDiffMethod  # noqa: E402

REGISTRY: dict[str, MaskMethod] = {m.name: m for m in (AttentionMethod(), NoiseDiffMethod(), LDZNetMethod())}
METHODS = tuple(REGISTRY)
ZERO_SHOT_METHODS = tuple(name for name, m in REGISTRY.items() if not m.needs_weights)


def get_method(name: str) -> MaskMethod:
    """The registered method called ``name``; raises TextMaskError naming the choices otherwise."""
    if name not in REGISTRY:
        raise TextMaskError(f"unknown method '{name}'; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["CrossAttentionMaps", "Decoder", "METHODS", "MaskMethod", "SelfAttentionAggregate", "ZERO_SHOT_METHODS",
           "attention_prompt", "get_method", "noise_difference", "refine_with_self_attention"]
