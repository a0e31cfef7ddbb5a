"""Running LD-ZNet on a host: its latents, its text encoding and its frozen UNet's features, and the registered
``ld-znet`` mask method."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .. import defaults, forward, options
from ..capture import OutputCapture
from ..errors import CheckpointError, TextMaskError
from ..hosts.contract import Conditioning, Host
from .model import LDZNet
from .weights import architecture_of, load_ldznet

# The reference's prompt engineering (LatentSeg.sample_prompts): one template drawn per training sample.
PROMPT_TEMPLATES = (
    defaults.LDZNET_TEMPLATE, "a photograph of a {}.", "an image of a {}.", "{}.", "a cropped photo of a {}.",
    "a good photo of a {}.", "a photo of one {}.", "a bad photo of a {}.", "a photo of the {}.",
)
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


def host_features(host: Host, model: LDZNet, x: torch.Tensor, sigma: torch.Tensor, latents: torch.Tensor,
                  cond: Conditioning) -> list[torch.Tensor]:
    """The frozen host UNet's spatial-transformer outputs that LD-ZNet reads, from one forward at σ."""
    with OutputCapture(host.transformer_modules()) as cap:
        forward.eps(host, x, sigma, cond, latents)
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


def run_ldznet(host: Host, model: LDZNet, latents: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
               cond: Conditioning, forward_fn=None) -> torch.Tensor:
    """Logits [B, 1, h, w] for clean latents, their noised x at σ and one conditioning row each.

    The host runs without gradients; ``forward_fn`` (default ``model``) may be a wrapped copy of ``model`` (DDP,
    autocast) that training differentiates.
    """
    with torch.no_grad():
        feats = host_features(host, model, x, sigma, latents, cond) if model.with_features else None
    param = next(model.parameters())
    cast = [f.to(param.device, param.dtype) for f in feats] if feats is not None else None
    return (forward_fn or model)(latents.to(param.device, param.dtype), cond.context.to(param.device, param.dtype), cast)


def draw_timestep(timestep: int | None, seed: int) -> int:
    """``timestep``, or one drawn from the reference's training range [300, 500) with ``seed``."""
    if timestep is not None:
        return options.timestep(timestep)
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(*TRAIN_TIMESTEPS, (1,), generator=g))


def ldznet_logits(host: Host, model: LDZNet, pixels: torch.Tensor, prompts: Sequence[str], timestep: int, seed: int,
                  forward=None) -> torch.Tensor:
    """Logits [B, 1, H, W] for images already at the working size and one prompt each (training, evaluation)."""
    from .. import forward as engine

    with torch.no_grad():
        cond = engine.encode_prompts(host, list(prompts))
        check_compatible(model, host, cond.context.shape[-1])
        latents = engine.encode(host, pixels, tuple(pixels.shape[-2:]))
        x, sigma = engine.add_noise(host, latents, timestep, seed)
    return run_ldznet(host, model, latents, x, sigma, cond, forward)


class LDZNetDecoder:
    """Sigmoid probabilities of LD-ZNet, one batched pass per phrase over the same noised latents."""

    size_multiple = 64  # LD-ZNet's own UNet downsamples the latent three times more
    measures_presence = False
    reads_self_attention = False
    presence = None

    def __init__(self, model: LDZNet, conds: list[Conditioning]):
        self.model, self.conds = model, conds
        self.resolution = model.train_resolution

    def __call__(self, host: Host, latents: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        logits = torch.cat([run_ldznet(host, self.model, latents, x, sigma, c.select([0] * b)) for c in self.conds], 1)
        if not torch.isfinite(logits).all():
            raise CheckpointError(f"LD-ZNet produced non-finite values in {logits.dtype}; run it in float32 or check its weights")
        probs = torch.sigmoid(logits.float())
        working = tuple(s * host.geometry.latent_factor for s in latents.shape[-2:])
        if tuple(probs.shape[-2:]) != working:
            probs = torch.nn.functional.interpolate(probs, size=working, mode="bilinear", align_corners=False)
        return probs.cpu()


class LDZNetMethod:
    """``ld-znet``: LD-ZNet, a trained segmenter over the VAE latent and the host UNet's features."""

    name = "ld-znet"
    timestep = defaults.LDZNET_TIMESTEP  # fixed for deterministic masks; training draws from TRAIN_TIMESTEPS
    auto_threshold = 0.5  # calibrated probabilities, not attention scores
    needs_images = True
    needs_weights = True
    options = ("ldznet", "template")

    def setup(self, host: Host, phrases: Sequence[str], prompt: str | None, *, ldznet=None,
              template: str | None = None) -> LDZNetDecoder:
        if ldznet is None:
            raise TextMaskError("method 'ld-znet' needs LD-ZNet weights (ldznet=..., --ldznet PATH)")
        template = template or defaults.LDZNET_TEMPLATE
        if not isinstance(template, str) or template.count("{}") != 1 or template.replace("{}", "").count("{") \
                or template.replace("{}", "").count("}"):
            raise TextMaskError(f"the prompt template needs exactly one '{{}}' for the phrase and no other braces, "
                                f"got {template!r}")
        if not isinstance(ldznet, (str, Path, LDZNet)):
            raise TextMaskError(f"ldznet must be an LD-ZNet or the path of its .safetensors, got "
                                f"{type(ldznet).__name__}")
        host.transformer_modules()  # a model LD-ZNet cannot read (an MM-DiT) is refused before its weights are judged
        model = load_on_host(ldznet, host) if isinstance(ldznet, (str, Path)) else ldznet
        conds = [forward.encode_prompts(host, [template.format(p)]) for p in phrases]
        check_compatible(model, host, conds[0].context.shape[-1])
        return LDZNetDecoder(model, conds)


def load_on_host(path: str | Path, host: Host) -> LDZNet:
    """LD-ZNet weights (textmask safetensors) on the host's device, in its dtype off the CPU."""
    dtype = host.dtype if host.device.type != "cpu" else torch.float32
    return load_ldznet(path, device=host.device, dtype=dtype)
