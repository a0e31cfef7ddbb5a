"""Running LD-ZNet on a host: its latents, its text encoding and its frozen UNet's features."""

from __future__ import annotations

from typing import Sequence

import torch

from ..capture import AttentionCapture
from ..errors import CheckpointError, TextMaskError
from ..hosts.base import Conditioning, Host
from ..latents import encode_and_noise
from .model import LDZNet
from .weights import architecture_of

# The reference's prompt engineering (LatentSeg.sample_prompts): one template drawn per training sample.
PROMPT_TEMPLATES = (
    "a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.", "a cropped photo of a {}.",
    "a good photo of a {}.", "a photo of one {}.", "a bad photo of a {}.", "a photo of the {}.",
)
DEFAULT_TEMPLATE = PROMPT_TEMPLATES[0]
# Fixed for deterministic masks; the reference draws t from [300, 500) for each forward.
DEFAULT_TIMESTEP = 400  # the middle of the reference's training range [300, 500)
TRAIN_TIMESTEPS = (300, 500)


def check_compatible(model: LDZNet, host: Host, context_dim: int) -> None:
    """A clear error when LD-ZNet weights were made for another base architecture than the host's."""
    want = int(model.config["cross_attention_dim"])
    if want != int(context_dim):
        raise CheckpointError(
            f"these LD-ZNet weights are for {architecture_of(want)} (text width {want}) but the loaded model is "
            f"{architecture_of(context_dim)} (text width {context_dim}); use LD-ZNet weights trained for this model"
        )
    count = len(host.transformer_modules())
    if count != len(model.transformer_names):
        raise CheckpointError(
            f"these LD-ZNet weights expect a UNet with {len(model.transformer_names)} spatial transformers, "
            f"the loaded model has {count}; use LD-ZNet weights trained for this model"
        )


def host_features(host: Host, model: LDZNet, noisy: torch.Tensor, latents: torch.Tensor, timestep: int,
                  cond: Conditioning) -> list[torch.Tensor]:
    """The frozen host UNet's spatial-transformer outputs that LD-ZNet reads, from one forward at ``timestep``."""
    transformers = host.transformer_modules()
    with AttentionCapture(host.attention_modules(), tuple(noisy.shape[-2:]), outputs=transformers) as cap:
        host.predict_noise(noisy, timestep, cond, latents)
    ordered = list(cap.outputs.values())  # first-call order: down, mid, up
    if len(ordered) != len(model.transformer_names):
        raise CheckpointError(f"captured {len(ordered)} transformer outputs, LD-ZNet expects {len(model.transformer_names)}")
    feats = [ordered[i] for i in model.feature_layers]
    for pool, f in zip(model.pools, feats):
        if f.shape[1] != pool.qkv_proj.in_channels:
            raise CheckpointError(
                f"host feature width {f.shape[1]} does not match LD-ZNet's {pool.qkv_proj.in_channels}; "
                "these weights were made for another base model"
            )
    return feats


def draw_timestep(timestep: int | None, seed: int) -> int:
    """``timestep``, or one drawn from the reference's training range [300, 500) with ``seed``."""
    if timestep is not None:
        if not 0 <= int(timestep) < 1000:
            raise TextMaskError(f"timestep must be in [0, 999], got {timestep}")
        return int(timestep)
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(*TRAIN_TIMESTEPS, (1,), generator=g))


def ldznet_logits(host: Host, model: LDZNet, pixels: torch.Tensor, prompts: Sequence[str], timestep: int, seed: int,
                  forward=None) -> torch.Tensor:
    """Logits [B, 1, H, W] for images already at the working size and one prompt each.

    The host's encoders and UNet run without gradients; ``forward`` (default ``model``) may be a wrapped copy
    of ``model`` (DDP, autocast) that training differentiates.
    """
    with torch.no_grad():
        cond = host.encode_prompts(list(prompts))
        check_compatible(model, host, cond.context.shape[-1])
        latents, noisy = encode_and_noise(host, pixels, tuple(pixels.shape[-2:]), timestep, seed)
        feats = host_features(host, model, noisy, latents, timestep, cond) if model.with_features else None
    param = next(model.parameters())
    cast = [f.to(param.device, param.dtype) for f in feats] if feats is not None else None
    return (forward or model)(latents.to(param.device, param.dtype), cond.context.to(param.device, param.dtype), cast)


@torch.inference_mode()
def ldznet_probabilities(host: Host, model: LDZNet, pixels: torch.Tensor, size: tuple[int, int],
                         phrases: Sequence[str], *, template: str = DEFAULT_TEMPLATE, timestep: int | None = DEFAULT_TIMESTEP,
                         seed: int = 0) -> torch.Tensor:
    """Sigmoid mask probabilities [B, P, H, W] (H, W = ``size``) for each image and phrase."""
    if "{}" not in template:
        raise TextMaskError(f"the prompt template needs a '{{}}' for the phrase, got {template!r}")
    t = draw_timestep(timestep, seed)
    b = pixels.shape[0]
    x = torch.nn.functional.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    # One batched pass per phrase; image i draws noise seed + i for every phrase, so phrases see the same latents.
    logits = torch.cat([ldznet_logits(host, model, x, [template.format(p)] * b, t, seed) for p in phrases], dim=1)
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"LD-ZNet produced non-finite values in {logits.dtype}; run it in float32 or check its weights")
    probs = torch.sigmoid(logits.float())
    if tuple(probs.shape[-2:]) != tuple(size):
        probs = torch.nn.functional.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs.cpu()
