"""The Forge host (stable-diffusion-webui-forge since its 2024-08 backend): textmask on ``shared.sd_model``.

Forge's engine keeps the webui's ``get_learned_conditioning`` and ``encode_first_stage`` and its prompt chunking,
so prompts and images go through the A1111 adapter's code. Its UNet is a ``KModel`` inside a ``UnetPatcher``
(``sd_model.forge_objects.unet``) and runs the way Forge's sampler runs it: ``sampling_prepare`` loads it with its
LoRA and object patches, then ``apply_model`` takes k-diffusion's x = z + σ·ε and returns the denoised latent.
"""

from __future__ import annotations

from typing import Any

import torch

from .a1111 import A1111Host
from .base import fixed_draw, schedule_sigma


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


class ForgeHost(A1111Host):
    """Runs textmask on a Forge ``sd_model`` (a ForgeDiffusionEngine); never patches it."""

    def __init__(self, sd_model: Any):
        self.model = sd_model
        self.patcher = sd_model.forge_objects.unet  # UnetPatcher
        self.kmodel = self.patcher.model  # KModel: diffusion_model, predictor, computation_dtype
        self.unet = self.kmodel.diffusion_model
        self.is_sdxl = bool(getattr(sd_model, "is_sdxl", False))
        self.v_prediction = getattr(self.kmodel.predictor, "prediction_type", "") == "v_prediction"
        self._set_geometry()

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.kmodel.computation_dtype

    def attention_modules(self) -> list:
        self.load()
        return super().attention_modules()

    def load(self) -> None:
        """Load the UNet with its LoRA and object patches, as Forge does before it samples."""
        forge_backend("memory_management").load_model_gpu(self.patcher)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with fixed_draw(self.device):  # Forge's VAE samples the posterior
            latents = self.model.encode_first_stage(pixels.to(self.device, torch.float32) * 2 - 1)
        return latents.to(self.device, self.dtype)

    def _sigma(self, timestep: int) -> torch.Tensor:
        self.load()  # the predictor may be an object patch, which loading applies
        predictor = self.kmodel.predictor
        if zero_terminal_snr(self.model):  # Forge rescales the σ table only while it samples, then restores it
            rescale = forge_backend("modules.k_prediction").rescale_zero_terminal_snr_sigmas
            return rescale(predictor.sigmas.detach().float().cpu().clone())[timestep : timestep + 1].to(self.device)
        return schedule_sigma(predictor, timestep).to(self.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        return self.kmodel.predictor.noise_scaling(self._sigma(timestep), noise.float(), latents.float())

    def predict_noise(self, noisy: torch.Tensor, timestep: int, cond, image_latents: torch.Tensor) -> torch.Tensor:
        b = noisy.shape[0]
        sigma = self._sigma(timestep).expand(b)
        kwargs = {"c_crossattn": cond.context}
        if self.is_sdxl:
            kwargs["y"] = cond.extra["vector"]
        if self.in_channels == 9:  # inpainting: (mask, masked-image latents); an empty mask shows the whole image
            kwargs["c_concat"] = torch.cat([torch.zeros_like(noisy[:, :1]), image_latents.to(noisy.dtype)], dim=1)
        sampling = forge_backend("sampling.sampling_function")
        sampling.sampling_prepare(self.patcher, noisy)  # reserves the forward's memory and moves online LoRAs
        try:
            denoised = self.kmodel.apply_model(noisy.float(), sigma, **kwargs)
        finally:
            sampling.sampling_cleanup(self.patcher)
        return (noisy.float() - denoised.float()) / sigma.view(-1, 1, 1, 1)  # ε, whatever the prediction type
