"""The forward engine: where a request becomes hooked denoiser forwards.

Every task composes the same steps: ``prepare_images`` (a batch at the model's working size), ``batches``
(progress and interrupt, once), ``encode`` and ``add_noise`` (x = z + σ·ε with per-image seeds), then ``eps``:
one host forward under the host's attention capture (``capture.AttentionCapture`` on a UNet, an MM-DiT's
``capture_mmdit.JointAttentionCapture``) that streams the layers its collectors read. ``halving_batches``
retries a batch with half as many rows when a GPU runs out of memory. ``encode_prompts``, ``encode`` and ``eps``
check that what the host returns is finite: NaN is an error with its likely cause, never an empty mask.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.nn.functional as F

from . import options
from .capture import Collector, check_self_attention_size
from .errors import NONFINITE_HINT, CaptureError, TextMaskError
from .hosts.contract import Conditioning, Host
from .images import ImageInput, to_batch, working_size
from .schedule import image_noise

T = TypeVar("T")


def check_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` if every entry is finite; else a TextMaskError naming ``what`` and the likely cause."""
    if not bool(torch.isfinite(values).all()):
        raise TextMaskError(f"{what} came out NaN or infinite; {NONFINITE_HINT}")
    return values


def encode_prompts(host: Host, prompts: list[str]) -> Conditioning:
    """The host's conditioning for ``prompts`` (each one readable text, ``options.readable``), checked to be
    finite."""
    for prompt in prompts:
        options.readable("the prompt", prompt)
    cond = host.encode_prompts(prompts)
    check_finite(cond.context, "the text encoder's conditioning")
    if cond.pooled is not None:
        check_finite(cond.pooled, "the text encoder's pooled embedding")
    return cond


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering range(n) in steps of ``size``."""
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + size))


@dataclass(frozen=True)
class Images:
    """A batch of images prepared for the model."""

    pixels: torch.Tensor  # [B, 3, H, W] float in [0, 1], on the CPU
    working: tuple[int, int]  # (h, w) in pixels the model sees: about its native area, sides a multiple of its grid

    @property
    def size(self) -> tuple[int, int]:
        """The images' own (H, W): every output is at this size."""
        return tuple(self.pixels.shape[-2:])

    def __len__(self) -> int:
        return self.pixels.shape[0]


def prepare_images(host: Host, images: ImageInput | list[ImageInput], resolution: int | None = None,
                   multiple: int | None = None, *, self_attention: bool = False) -> Images:
    """Images as a [B, 3, H, W] batch with the working size at ``resolution`` (default the host's native one).

    ``self_attention``: the forwards will read self-attention, so a working size whose map would not fit is refused
    here, before any image is encoded (the VAE at 2048 px takes minutes on a CPU).
    """
    pixels = to_batch(images)
    geometry = host.geometry
    resolution = options.resolution(resolution)
    working = working_size(*pixels.shape[-2:], resolution or geometry.resolution, multiple or geometry.size_multiple,
                           geometry.max_side)
    if self_attention:
        check_self_attention(host, (math.ceil(working[0] / geometry.latent_factor),
                                    math.ceil(working[1] / geometry.latent_factor)))
    return Images(pixels, working)


def check_self_attention(host: Host, latent_size: tuple[int, int]) -> None:
    """Refuse in one line, before any forward, latents of ``latent_size`` whose self-attention map would not fit,
    where the host knows its grid from the model's structure (the capture checks again at each layer)."""
    grid = host.self_attention_grid(latent_size)
    if grid is not None:
        check_self_attention_size(grid)


def check_square_side(host: Host, resolution: int | None) -> int:
    """The side in pixels of a square sample at ``resolution`` (default the host's native one), refused in one line
    past the model's position table."""
    side = resolution or host.geometry.resolution
    limit = host.geometry.max_side
    if limit is not None and side > limit:
        raise TextMaskError(f"resolution {side} is past what this model's positions cover ({limit} pixels a side); "
                            f"sample at {limit} or less")
    return side


def batches(host: Host, count: int, batch_size: int, desc: str) -> Iterator[slice]:
    """Row slices of ``batch_size`` over ``count`` items under the host's progress bar; the host's interrupt is
    checked before each."""
    with host.progress(count, desc) as bar:
        for rows in iter_chunks(count, batch_size):
            host.check_interrupt()
            yield rows
            bar.update(rows.stop - rows.start)


def halving_batches(host: Host, count: int, batch_size: int, step: Callable[[slice], T]) -> Iterator[tuple[slice, T]]:
    """``step`` over consecutive row slices of up to ``batch_size``; where a GPU runs out of memory the batch halves
    and the rows are retried, down to one row, before the error is raised. A slice is yielded only once its whole
    step succeeded, so nothing of a failed try is kept."""
    done, size = 0, max(1, batch_size)
    while done < count:
        host.check_interrupt()
        rows = slice(done, min(count, done + size))
        failed = False
        try:
            result = step(rows)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            failed = True
        if failed:  # outside the except, so its frames (and their tensors) are gone before the retry
            size //= 2
            torch.cuda.empty_cache()
            continue
        done = rows.stop
        yield rows, result


def encode(host: Host, pixels: torch.Tensor, working: tuple[int, int]) -> torch.Tensor:
    """Resize [B, 3, H, W] pixels to the working size (bicubic, antialiased) and encode them with the host's VAE."""
    x = F.interpolate(pixels, size=working, mode="bicubic", align_corners=False, antialias=True)
    return check_finite(host.encode_images(x.clamp(0, 1)).to(host.device, host.dtype), "the VAE's latents")


def add_noise(host: Host, latents: torch.Tensor, timestep: int, seed: int,
              shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, σ): x = z + σ·ε in float32 at the host's σ of ``timestep``, σ [B]. Row i draws noise seeded ``seed`` + i,
    or ``seed`` for every row with ``shared`` (the windows of one image)."""
    b = latents.shape[0]
    noise = image_noise(latents.shape[1:], seed, 1 if shared else b).expand(b, *latents.shape[1:])
    sigma = host.sigma(options.timestep(timestep)).float().to(latents.device)
    x = noise.to(latents.device).float() * sigma.view(-1, 1, 1, 1) + latents.float()
    return x, sigma.expand(b)


def without_noise(host: Host, latents: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, σ) whose model input is the clean latent itself under timestep t's embedding (DiffSeg's forward):
    x = z / c_in(σ), which the denoiser's input scaling c_in (``host.input_scale``: 1/√(1 + σ²) for SD's
    schedules, 1/(1 + σ) for flow matching) turns back into z. σ [B]."""
    b = latents.shape[0]
    sigma = host.sigma(options.timestep(timestep)).float().to(latents.device)
    return latents.float() / float(host.input_scale(sigma.double())), sigma.expand(b)


def eps(host: Host, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor,
        collectors: Iterable[Collector] = ()) -> torch.Tensor:
    """One host forward, ε = (x − denoised) / σ in float32 [B, C, h, w], with ``collectors`` fed the attention they
    read: ``x`` [B, C, h, w] is the noised latent, ``sigma`` [B] its noise level in the host's σ units.

    The hooks are read-only and come off when the forward returns or raises.
    """
    collectors = list(collectors)
    host.prepare(x.shape)
    capture = host.attention_capture(tuple(x.shape[-2:]), collectors) if collectors else contextlib.nullcontext()
    with capture:
        denoised = host.denoise(x, sigma, cond, image_latents)
    if collectors and not getattr(capture, "layers", True):
        raise CaptureError("the model ran but no attention layer was seen: it is compiled (torch.compile) or replayed "
                           "as a CUDA graph, which hooks cannot read; mask with the model uncompiled")
    # A non-finite forward poisons the attention it computed too; the maps' min-max would hide it as zeros.
    return check_finite((x - denoised.float()) / sigma.view(-1, 1, 1, 1), "the model's prediction")
