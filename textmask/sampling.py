"""Sampling over the host contract, for hosts that expose no sampler of their own to textmask (the webuis).

A sampler is a plain function over ``denoise(x, σ)``, as in k-diffusion: ``dpmpp_2m`` is k-diffusion's
``sample_dpmpp_2m`` (DPM-Solver++(2M), the webuis' default sampler), and ``sample`` drives it with the host's own
forward, σ table and classifier-free guidance. OVDiff's support images come from here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import forward
from .schedule import image_noise

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, C, h, w], σ [B]) -> denoised latent


def timestep_sigmas(host, steps: int) -> torch.Tensor:
    """σ [steps + 1] (float32, CPU): the host's σ at ``steps`` timesteps spaced evenly from 999 down (diffusers'
    "linspace" spacing), then 0.

    Every σ is one the host's schedule holds, so a discrete model is never asked for a timestep between two.
    """
    ts = torch.linspace(0, 999, int(steps) + 1).round().long().flip(0)[:-1].tolist()
    return torch.cat([torch.cat([host.sigma(int(t)) for t in ts]).float(), torch.zeros(1)])


def dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) from x at σ = sigmas[0] down the decreasing ``sigmas`` (the last may be 0); x is float32."""
    old = None
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma * s_in)
        if callback is not None:
            callback(i)
        if nxt == 0:
            x = denoised  # the exponential step's limit at σ = 0
        else:
            h = math.log(sigma / nxt)  # step in t = −ln σ
            d = denoised
            if old is not None:
                r = math.log(float(sigmas[i - 1]) / sigma) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (nxt / sigma) * x - math.expm1(-h) * d
        old = denoised
    return x


def sample(host, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
           resolution: int | None = None) -> torch.Tensor:
    """``count`` square latents [count, C, s, s] (host-scaled, ``resolution`` px, default native) sampled with
    DPM-Solver++(2M) through ``host.denoise`` under classifier-free guidance (none at ``cfg`` 1: one pass, as the
    webuis skip the negative there); image i starts from noise seeded seed + i, so results do not depend on the
    batch size."""
    g = host.geometry
    side = (resolution or g.resolution) // g.latent_factor
    sigmas = timestep_sigmas(host, steps)
    x = image_noise((g.in_channels, side, side), seed, count).to(host.device, torch.float32) * sigmas[0]
    both = forward.encode_prompts(host, [negative, prompt]).select([0] * count + [1] * count)
    cond_only = both.select(range(count, 2 * count))

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        host.check_interrupt()
        if cfg == 1:
            return host.denoise(x, sigma.to(x.device), cond_only, x).float()
        pair = torch.cat([x, x])
        out = host.denoise(pair, torch.cat([sigma, sigma]).to(x.device), both, pair).float()
        uncond, cond = out.chunk(2)
        return uncond + cfg * (cond - uncond)

    return forward.check_finite(dpmpp_2m(guided, x, sigmas), "the sampled latents").to(host.dtype)
