"""The host contract: what textmask needs from a loaded model, written as one Protocol, and its defaults.

A host is a k-diffusion denoiser over x = z + σ·ε plus its encoders:

- ``geometry``: latent factor, size multiple, native resolution and UNet input channels (frozen);
- ``device`` and ``dtype``: where and in what the UNet computes;
- ``attention_modules()`` / ``transformer_modules()``: the UNet's modules to hook (read-only), and
  ``attention_capture(latent_size, collectors)``, the capture a forward runs under (an MM-DiT's joint attention);
- ``encode_prompts(prompts)``: a ``Conditioning`` (context, one token map per row, the pooled embedding);
- ``encode_images(pixels)``: scaled latents, deterministically (the same image gives the same latents);
- ``sigma(t)``: the noise level of textmask's timestep t under the schedule the host samples with;
- ``denoise(x, σ, cond, image_latents)``: the denoised latent, through the host's own forward (LoRA patches,
  low-VRAM casting and v-prediction all take the host's path).

Noising (x = z + σ·ε) and ε = (x − denoised) / σ live in the core (``textmask.forward``), once. The optional
services (``prepare``, ``attention_capture``, ``reads_text_as_keys``, ``input_scale``, ``self_attention_grid``,
``progress``, ``check_interrupt``, ``latent_region``, ``sample``, ``sampler_identity``) have their defaults in
``HostDefaults``, which every adapter inherits; nothing outside this contract is asked of a host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from ..tokens import TokenMap


@dataclass
class Conditioning:
    """Encoded prompts: a batch of cross-attention contexts, one token map per row, and the pooled embedding."""

    context: torch.Tensor  # [N, L, D]
    token_maps: list[TokenMap]  # one per row
    pooled: torch.Tensor | None = None  # [N, P]: the host's pooled text input (SDXL's), None where it takes none

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, rows: Sequence[int]) -> "Conditioning":
        """Rows of this conditioning, in the given order (repeats allowed)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.context.device)
        pooled = None if self.pooled is None else self.pooled.index_select(0, idx.to(self.pooled.device))
        return Conditioning(self.context.index_select(0, idx), [self.token_maps[i] for i in rows], pooled)


def native_resolution(is_sdxl: bool, v_prediction: bool) -> int:
    """The side a UNet model was trained at, in pixels: SDXL 1024, a v-prediction model 768 (SD2's 768-v), else
    512. Every face reads it here, and it asks only what every host can tell (not SD1 from SD2)."""
    return 1024 if is_sdxl else (768 if v_prediction else 512)


@dataclass(frozen=True)
class Geometry:
    """The fixed shape facts of a loaded model."""

    latent_factor: int  # pixels per latent cell (8 for SD)
    size_multiple: int  # working sizes are multiples of this, in pixels: every UNet level halves the latent
    resolution: int  # native working resolution in pixels (512 for SD1)
    in_channels: int  # UNet input channels: 4, or 9 for inpainting UNets
    latent_multiple: int = 1  # given latents' sides must be multiples of this (diffusers' SD3 and Flux: their patch)
    max_side: int | None = None  # the most pixels a side the model's position table covers (SD3's), else no limit

    @classmethod
    def of_unet(cls, *, levels: int, in_channels: int, resolution: int, latent_factor: int = 8) -> "Geometry":
        """The geometry of a UNet with ``levels`` resolution levels under a VAE of ``latent_factor``."""
        return cls(int(latent_factor), int(latent_factor) * 2 ** (int(levels) - 1), int(resolution), int(in_channels))


class Host(Protocol):
    """A loaded SD-family model that textmask can run on (see the module docstring)."""

    geometry: Geometry

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        """The UNet's attention modules, (qualified name, module)."""

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        """The UNet's spatial transformers, (qualified name, module)."""

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts (long ones in 75-token windows, as the host does) with their token maps."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> scaled latents [B, C, H/f, W/f] on ``device`` in ``dtype``; deterministic."""

    def sigma(self, timestep: int) -> torch.Tensor:
        """σ [1] (float32, CPU) of the integer timestep 0..999 under the schedule the host samples with."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        """One forward: the denoised latent [B, C, h, w] (float32) for x = z + σ·ε (float32), σ [B] on x's device;
        ``image_latents`` (clean latents) feed inpainting UNets."""

    # ---- optional services: HostDefaults implements each ----
    def prepare(self, batch_shape: Sequence[int]) -> None:
        """Make room for a forward of ``batch_shape`` latents (load the model, reserve memory)."""

    def attention_capture(self, latent_size: tuple[int, int], collectors: Sequence[Any]) -> Any:
        """A context manager that feeds ``collectors`` the attention of the forwards run inside it (read-only)."""

    def reads_text_as_keys(self) -> bool:
        """Whether the model reads the text only through cross-attention's keys and values (a UNet), so prompts
        encoded apart can be joined along the tokens; False where the text runs through every block (MM-DiT)."""

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_in(σ): the factor the model's input is of x = z + σ·ε (1/√(1 + σ²) for SD, 1/(1 + σ) for flow matching)."""

    def self_attention_grid(self, latent_size: tuple[int, int]) -> tuple[int, int] | None:
        """(h, w) of the finest self-attention grid a forward at ``latent_size`` runs, known before any forward; None
        where the host cannot tell (then the capture checks it at the layer)."""

    def progress(self, total: int, desc: str) -> Any:
        """A progress bar with ``update(n)``, used as a context manager."""

    def check_interrupt(self) -> None:
        """Raise the host's own interrupt exception if the user cancelled."""

    def latent_region(self, image_size: tuple[int, int], latent_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the image pixels that given latents cover; latents of another image are refused in
        one line."""

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """``count`` square latents (host-scaled, ``resolution`` px, default native) from the host's own sampler
        (default: DPM-Solver++(2M) through ``denoise``)."""

    def sampler_identity(self) -> str:
        """What besides the model's forward changes ``sample``'s images (a flow model's shift), for the caches of
        what was sampled; "" where ``denoise`` already shows all of it."""


class HostDefaults:
    """The optional services' defaults; adapters inherit them and override what their host provides."""

    show_progress: bool = False  # console bars (the CLI turns them on)

    def prepare(self, batch_shape: Sequence[int]) -> None:
        return None

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_in(σ): what the model's input is of x = z + σ·ε, 1/√(1 + σ²) under SD's schedules (k-diffusion's)."""
        return (1 + sigma**2).rsqrt()

    def attention_capture(self, latent_size: tuple[int, int], collectors: Sequence[Any]):
        """The read-only capture one forward runs under: the UNet's attention modules (``capture.AttentionCapture``);
        MM-DiT hosts return ``capture_mmdit.JointAttentionCapture``."""
        from ..capture import AttentionCapture

        return AttentionCapture(self.attention_modules(), latent_size, collectors)

    def reads_text_as_keys(self) -> bool:
        return True

    def self_attention_grid(self, latent_size: tuple[int, int]) -> tuple[int, int] | None:
        return None

    def progress(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        # hidden for one step, and the delay keeps fast work (cached OVDiff classes) from flashing a bar
        return tqdm(total=total, desc=desc, disable=not self.show_progress or total <= 1, leave=False, delay=0.5)

    def check_interrupt(self) -> None:
        return None

    def latent_region(self, image_size: tuple[int, int], latent_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The whole image, for latents of it at any scale (``options.latents_fit``)."""
        from ..options import latents_fit

        latents_fit(image_size, latent_size, self.geometry.latent_factor)
        return (0, 0, *image_size)

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """DPM-Solver++(2M) through this host's ``denoise`` (``textmask.sampling``)."""
        from ..sampling import sample

        return sample(self, prompt, negative, count, steps=steps, cfg=cfg, seed=seed, resolution=resolution)

    def sampler_identity(self) -> str:
        return ""
