"""The Forge adapter (stable-diffusion-webui-forge since its 2024-08 backend): textmask on ``shared.sd_model``.

Forge's engine keeps the webui's ``get_learned_conditioning`` and ``encode_first_stage`` and its prompt chunking
(see ``webui``). Its UNet is a ``KModel`` inside a ``UnetPatcher`` (``sd_model.forge_objects.unet``), already a
k-diffusion denoiser: ``sampling_prepare`` loads it with its LoRA and object patches, then ``apply_model`` takes
x = z + σ·ε and returns the denoised latent.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..schedule import schedule_sigma
from .common import fixed_draw
from .contract import Conditioning
from .webui import WebuiHost


def forge_backend(name: str):
    """``backend.<name>`` from Forge, imported only when a Forge model is in use."""
    import importlib

    return importlib.import_module(f"backend.{name}")


def zero_terminal_snr(sd_model: Any) -> bool:
    """Whether Forge samples this model with zero terminal SNR: its noise-schedule setting, or a ztsnr checkpoint."""
    try:
        from modules import shared
    except ImportError:
        shared = None
    setting = getattr(getattr(shared, "opts", None), "sd_noise_schedule", "Default")
    return setting == "Zero Terminal SNR" or bool(getattr(getattr(sd_model, "model_config", None), "ztsnr", False))


class ForgeHost(WebuiHost):
    """Runs textmask on a Forge ``sd_model`` (a ForgeDiffusionEngine); never patches it."""

    def __init__(self, sd_model: Any):
        self.patcher = sd_model.forge_objects.unet  # UnetPatcher
        self.kmodel = self.patcher.model  # KModel: diffusion_model, predictor, computation_dtype
        v_prediction = getattr(self.kmodel.predictor, "prediction_type", "") == "v_prediction"
        super().__init__(sd_model, self.kmodel.diffusion_model, bool(getattr(sd_model, "is_sdxl", False)), v_prediction)

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.kmodel.computation_dtype

    def load(self) -> None:
        """Load the UNet with its LoRA and object patches, as Forge does before it samples."""
        forge_backend("memory_management").load_model_gpu(self.patcher)

    def attention_modules(self) -> list:
        self.load()
        return super().attention_modules()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with fixed_draw(self.device):  # Forge's VAE samples the posterior
            latents = self.model.encode_first_stage(pixels.to(self.device, torch.float32) * 2 - 1)
        return latents.to(self.device, self.dtype)

    def sigma(self, timestep: int) -> torch.Tensor:
        self.load()  # the predictor may be an object patch, which loading applies
        predictor = self.kmodel.predictor
        if zero_terminal_snr(self.model):  # Forge rescales the σ table only while it samples, then restores it
            rescale = forge_backend("modules.k_prediction").rescale_zero_terminal_snr_sigmas
            return rescale(predictor.sigmas.detach().float().cpu().clone())[timestep : timestep + 1]
        return schedule_sigma(predictor, timestep)

    def prepare(self, batch_shape: Sequence[int]) -> None:
        self.load()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        kwargs = {"c_crossattn": cond.context}
        if self.is_sdxl:
            kwargs["y"] = cond.pooled
        if self.geometry.in_channels == 9:  # inpainting: (mask, masked-image latents); an empty mask shows the whole image
            kwargs["c_concat"] = torch.cat([torch.zeros_like(x[:, :1]), image_latents.to(x.dtype)], dim=1)
        sampling = forge_backend("sampling.sampling_function")
        sampling.sampling_prepare(self.patcher, x)  # reserves the forward's memory and moves online LoRAs
        try:
            return self.kmodel.apply_model(x.float(), sigma.float(), **kwargs)
        finally:
            sampling.sampling_cleanup(self.patcher)
