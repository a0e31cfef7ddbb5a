"""What the core needs from a host: encode images and prompts, noise a latent, run one forward."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import nn

from ..tokens import TokenMap


@dataclass
class Conditioning:
    """Encoded prompts: a batch of cross-attention contexts plus host-specific extras."""

    context: torch.Tensor  # [N, L, D]
    token_maps: list[TokenMap]  # one per row
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # batched like context (e.g. SDXL pooled)

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, rows: Sequence[int]) -> "Conditioning":
        """Rows of this conditioning, in the given order (repeats allowed)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.context.device)
        return Conditioning(
            self.context.index_select(0, idx),
            [self.token_maps[i] for i in rows],
            {k: v.index_select(0, idx.to(v.device)) for k, v in self.extra.items()},
        )


def pad_contexts(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat each [1, L, D] context to a common length (the lcm), as ComfyUI does.

    Attention over repeated key/value pairs gives the same output as over one copy.
    """
    lengths = [c.shape[1] for c in contexts]
    target = math.lcm(*lengths)
    return [c.repeat(1, target // c.shape[1], 1) for c in contexts]


class Host(Protocol):
    """A loaded SD-family model that textmask can run on."""

    device: torch.device
    dtype: torch.dtype
    resolution: int  # default working resolution in pixels (512 for SD1)
    size_multiple: int  # working sizes are multiples of this, in pixels
    latent_factor: int  # pixels per latent cell (8 for SD)

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        """The UNet's attention modules, (qualified name, module)."""

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        """The UNet's spatial transformers, (qualified name, module)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> scaled latents [B, C, H/f, W/f]."""

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts (long ones in 75-token windows) with their token maps."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """Forward diffusion q(z_t | z_0) at the integer timestep."""

    def predict_noise(
        self, noisy: torch.Tensor, timestep: int, cond: Conditioning, image_latents: torch.Tensor
    ) -> torch.Tensor:
        """One UNet forward returning ε (v-prediction converted); image_latents feed inpainting UNets."""

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """Generate ``count`` square latents (host-scaled; ``resolution`` px, default native) with the host's own DPM-Solver++."""

    def check_interrupt(self) -> None:
        """Raise the host's own interrupt exception if the user cancelled."""

    def progress(self, total: int, desc: str) -> Any:
        """A progress bar with ``update(n)`` used as a context manager."""


def tqdm_progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A console bar that clears itself when done; hidden for one step and for work that ends within half a second."""
    from tqdm.auto import tqdm

    # the delay keeps fast work (every OVDiff class already cached) from flashing a bar before the next print
    return tqdm(total=total, desc=desc, disable=not enabled or total <= 1, leave=False, delay=0.5)


@contextlib.contextmanager
def fixed_draw(device: torch.device) -> Iterator[None]:
    """A forked global RNG seeded with 0: a host VAE that samples its posterior gives the same latents every time
    (same image, same mask), and the user's own seeds are untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


class NullProgress(contextlib.AbstractContextManager):
    """A progress bar that shows nothing."""

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering range(n) in steps of ``size``."""
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + size))


def ddpm_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, zero_snr: bool = False
) -> torch.Tensor:
    """SD's "scaled_linear" training schedule, ᾱ_t for t = 0..steps-1, optionally rescaled to zero terminal SNR."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    if zero_snr:
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


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


@dataclass(frozen=True)
class EDMSchedule:
    """A continuous EDM schedule (Playground v2.5, CosXL): the UNet takes c_in·x and c_noise = ¼·ln σ.

    textmask reads such a model at SD's noise levels: timestep t is the σ with SD's signal-to-noise ratio at t, in
    units of σ_data (as ``schedule_sigma``). With latents in units of σ_data, c_in·(x₀ + σ·ε) is then exactly SD's
    √ᾱ·x₀ + √(1−ᾱ)·ε under ᾱ = σ_data² / (σ² + σ_data²), so noising stays DDPM's and only the forward differs.
    """

    sigma_min: float
    sigma_max: float
    sigma_data: float

    def sigmas(self, steps: int = 1000) -> torch.Tensor:
        """σ for t = 0..steps-1: SD's noise levels in units of σ_data, within the model's range (float64)."""
        a = ddpm_alphas_cumprod(steps)
        return (((1 - a) / a).sqrt() * self.sigma_data).clamp(self.sigma_min, self.sigma_max)

    def alphas_cumprod(self, steps: int = 1000) -> torch.Tensor:
        """ᾱ_t of the DDPM schedule equivalent to reading the model at ``sigmas``."""
        return self.sigma_data**2 / (self.sigmas(steps) ** 2 + self.sigma_data**2)


def ddpm_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0) = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε under a discrete DDPM schedule."""
    a = float(alphas_cumprod[timestep])
    return (a**0.5) * latents + ((1 - a) ** 0.5) * noise


def epsilon_from_v(alphas_cumprod: torch.Tensor, v: torch.Tensor, noisy: torch.Tensor, timestep: int) -> torch.Tensor:
    """ε from a v-prediction: ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t."""
    a = float(alphas_cumprod[timestep])
    return (a**0.5) * v + ((1 - a) ** 0.5) * noisy
