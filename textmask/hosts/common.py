"""Helpers that several adapters share when they implement the contract."""

from __future__ import annotations

import contextlib
import importlib
import math
from typing import Callable, Iterator, Sequence

import torch

from ..errors import CaptureError

FLUX_GUIDANCE = 3.5  # the guidance input of guidance-distilled Flux models: their pipeline's, FluxGuidance's and Forge's default


def mmdit_refusal(what: str) -> CaptureError:
    """The one line for a method a Flux/SD3 model cannot run: ``what`` is "traces" or "ld-znet"."""
    if what == "traces":
        return CaptureError("this model is an MM-DiT (Flux or SD3): traces re-query UNet attention modules only")
    return CaptureError("LD-ZNet's weights are for SD1, SD2 and SDXL UNets; this model is an MM-DiT (Flux or SD3)")


def pad_contexts(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat each [1, L, D] context to a common length (the lcm), as ComfyUI does.

    Attention over repeated key/value pairs gives the same output as over one copy.
    """
    lengths = [c.shape[1] for c in contexts]
    target = math.lcm(*lengths)
    return [c.repeat(1, target // c.shape[1], 1) for c in contexts]


@contextlib.contextmanager
def fixed_draw(device: torch.device) -> Iterator[None]:
    """A forked global RNG seeded with 0: a host VAE that samples its posterior gives the same latents every time
    (same image, same mask), and the user's own seeds are untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


def encode_each(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """``encode`` of each image [1, ...] of ``pixels`` on its own, each under ``fixed_draw``: a host VAE that samples
    its posterior then draws an image's noise alike wherever it sits in a batch, so an image's mask does not change
    with the images beside it."""
    parts = []
    for i in range(pixels.shape[0]):
        with fixed_draw(device):
            parts.append(encode(pixels[i : i + 1]))
    return torch.cat(parts)


def comfy_module(name: str):
    """``comfy.<name>``, or Forge's copy of it (``ldm_patched.modules.<name>``), whichever this host ships."""
    for prefix in ("comfy", "ldm_patched.modules"):
        try:
            return importlib.import_module(f"{prefix}.{name}")
        except ImportError:
            continue
    raise ImportError(f"neither comfy.{name} nor ldm_patched.modules.{name} can be imported")
