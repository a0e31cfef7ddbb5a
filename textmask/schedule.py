"""Noise schedules in k-diffusion's frame, x = z + σ·ε, and the conversion of DDPM ε/v models to denoisers.

Every host is driven as a k-diffusion denoiser: ``sigma(t)`` gives the noise level of textmask's timestep t and
``denoise(x, σ, …)`` the denoised latent. ComfyUI and Forge models already are such denoisers; a DDPM UNet
(diffusers, A1111) is wrapped by ``DDPMDenoiser``, which reads x at SD's scale √ᾱ·x and t from σ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def ddpm_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, zero_snr: bool = False
) -> torch.Tensor:
    """SD's "scaled_linear" training schedule, ᾱ_t for t = 0..steps-1, optionally rescaled to zero terminal SNR."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    if zero_snr:
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """k-diffusion's σ_t = √((1 − ᾱ_t) / ᾱ_t) for each t (float64)."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


@dataclass(frozen=True)
class EDMSchedule:
    """A continuous EDM schedule (Playground v2.5, CosXL): the UNet takes c_in·x and c_noise = ¼·ln σ.

    textmask reads such a model at SD's noise levels: timestep t is the σ with SD's signal-to-noise ratio at t, in
    units of σ_data (as ``schedule_sigma``). With latents in units of σ_data, c_in·(x₀ + σ·ε) is then exactly SD's
    √ᾱ·x₀ + √(1−ᾱ)·ε under ᾱ = σ_data² / (σ² + σ_data²), so only the UNet's time input differs from DDPM's.
    """

    sigma_min: float
    sigma_max: float
    sigma_data: float

    def sigmas(self, steps: int = 1000) -> torch.Tensor:
        """σ for t = 0..steps-1: SD's noise levels in units of σ_data, within the model's range (float64)."""
        return (sigmas_from_alphas(ddpm_alphas_cumprod(steps)) * self.sigma_data).clamp(self.sigma_min, self.sigma_max)

    def alphas_cumprod(self, steps: int = 1000) -> torch.Tensor:
        """ᾱ_t of the DDPM schedule equivalent to reading the model at ``sigmas``."""
        return self.sigma_data**2 / (self.sigmas(steps) ** 2 + self.sigma_data**2)


def schedule_sigma(schedule: Any, timestep: int) -> torch.Tensor:
    """σ [1] for a textmask timestep under a host's schedule object (ComfyUI's model_sampling, Forge's predictor).

    A discrete schedule (SD's, zero-SNR, a ModelSamplingDiscrete patch) indexes its σ table by timestep and is read
    as it is. A continuous one (EDM: Playground v2.5, CosXL, ComfyUI's ModelSamplingContinuousEDM) takes log-σ
    "timesteps", where 300 means σ = e^1200; it gets the σ at which SD's schedule has the same signal-to-noise ratio,
    in units of its σ_data and within its range, so ``timestep`` names the same noise level on every model.
    """
    sigma = schedule.sigma(torch.tensor([float(timestep)])).detach().float().cpu()
    table = getattr(schedule, "sigmas", None)
    if table is not None and timestep < len(table) and torch.allclose(sigma, table[timestep].detach().float().cpu()):
        return sigma
    edm = EDMSchedule(float(schedule.sigma_min), float(schedule.sigma_max), float(getattr(schedule, "sigma_data", 1.0)))
    return edm.sigmas()[timestep : timestep + 1].float()


# A DDPM UNet call: (x_t at SD's scale, the UNet's time input [B]) -> its raw output (ε or v).
UNetCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DDPMDenoiser:
    """A discrete DDPM ε- or v-model as a k-diffusion denoiser over x = z + σ·ε (k-diffusion's DiscreteEpsDDPMDenoiser).

    ``time_input`` maps an integer timestep to what the UNet takes (the timestep itself, or EDM's ¼·ln σ).
    ``parametrisation`` names the raw output: "epsilon", "v_prediction", or "edm_epsilon" (EDM's ε-parametrised
    output F, which is −v of the equivalent DDPM schedule).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, parametrisation: str = "epsilon",
                 time_input: Callable[[int], float] | None = None):
        if parametrisation not in ("epsilon", "v_prediction", "edm_epsilon"):
            raise ValueError(f"unsupported parametrisation {parametrisation!r}")
        # a zero-terminal-SNR schedule ends at ᾱ = 0; keep the last step finite, as diffusers' samplers do
        self.alphas_cumprod = alphas_cumprod.double().cpu().clamp(min=2**-24)
        self.sigmas = sigmas_from_alphas(self.alphas_cumprod)
        self.parametrisation = parametrisation
        self.time_input = time_input

    def sigma(self, timestep: int) -> torch.Tensor:
        """σ [1] (float32) of an integer timestep."""
        return self.sigmas[timestep : timestep + 1].float()

    def timestep(self, sigma: float) -> int:
        """The integer timestep whose σ is nearest to ``sigma`` (exact for the σ that ``sigma`` returned)."""
        return int((self.sigmas.float() - float(sigma)).abs().argmin())

    def eps(self, unet: UNetCall, x_t: torch.Tensor, timestep: int) -> torch.Tensor:
        """ε for x_t at SD's scale (√ᾱ·z + √(1−ᾱ)·ε) at an integer timestep, from one UNet call."""
        a = float(self.alphas_cumprod[timestep])
        time = torch.full((x_t.shape[0],), timestep if self.time_input is None else self.time_input(timestep),
                          device=x_t.device, dtype=torch.long if self.time_input is None else torch.float32)
        out = unet(x_t, time).to(x_t.dtype)
        if self.parametrisation == "epsilon":
            return out
        v = -out if self.parametrisation == "edm_epsilon" else out  # EDM's ε-parametrised F is −v
        return (a**0.5) * v + ((1 - a) ** 0.5) * x_t

    def denoise(self, unet: UNetCall, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The denoised latent for x = z + σ·ε ([B, C, h, w], σ [B]): x read at SD's scale √ᾱ·x (c_in = 1/√(σ² + 1))."""
        t = self.timestep(sigma[0])
        return x - float(self.sigmas[t]) * self.eps(unet, x * float(self.alphas_cumprod[t]) ** 0.5, t)


def image_noise(shape: torch.Size, seed: int, count: int) -> torch.Tensor:
    """Noise for ``count`` latents of ``shape``: image i draws from its own CPU generator seeded seed + i,
    so results do not depend on batch size or device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) + i)) for i in range(count)])
