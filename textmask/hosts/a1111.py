"""The AUTOMATIC1111 adapter: textmask on the webui's already-loaded ``shared.sd_model``.

A1111 runs Stability's ldm (SD1, SD2) and sgm (SDXL) model classes. Conditioning comes from the model's own
``get_learned_conditioning`` (see ``webui``), latents from ``encode_first_stage``, and the forward from
``apply_model``, a DDPM ε- or v-model driven as a denoiser under the ᾱ the webui samples with; inpainting
checkpoints get ``c_concat``. The webui replaces attention ``forward`` at class level for its optimisations;
textmask's instance hooks on ``to_q`` / ``to_k`` still fire.
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedule import DDPMDenoiser
from .common import encode_each
from .contract import Conditioning
from .webui import WebuiHost, webui_devices


def webui_alphas_cumprod(sd_model: Any) -> torch.Tensor:
    """ᾱ as the webui's next sampling uses it. Processing re-derives ``alphas_cumprod`` from its original and the
    settings (downcast, zero terminal SNR) just before it samples, after scripts have masked, so the model's own
    attribute still holds the last generation's settings."""
    original = getattr(sd_model, "alphas_cumprod_original", None)
    try:
        from modules import sd_models, shared
    except ImportError:
        original = None
    if original is None:
        return sd_model.alphas_cumprod
    opts = getattr(shared, "opts", None)
    alphas = original
    if getattr(opts, "use_downcasted_alpha_bar", False):
        alphas = alphas.half()
    if getattr(opts, "sd_noise_schedule", "Default") == "Zero Terminal SNR":
        alphas = sd_models.rescale_zero_terminal_snr_abar(alphas.clone())
    return alphas


class A1111Host(WebuiHost):
    """Runs textmask on an A1111 ``sd_model``; never patches it."""

    def __init__(self, sd_model: Any):
        is_sdxl = bool(getattr(sd_model, "is_sdxl", False)) or hasattr(sd_model, "conditioner")
        v_prediction = getattr(sd_model, "parameterization", "eps") == "v"
        super().__init__(sd_model, sd_model.model.diffusion_model, is_sdxl, v_prediction)
        self.denoiser = DDPMDenoiser(webui_alphas_cumprod(sd_model).detach().double().cpu(),
                                     "v_prediction" if v_prediction else "epsilon")
        self.alphas_cumprod = self.denoiser.alphas_cumprod

    # The webui's own settings, as its processing uses them: under --medvram/--lowvram the UNet and VAE wait on the
    # CPU until their forward moves them, with fp8 storage the UNet's weights are not its compute dtype, and under
    # --no-half-vae the VAE is float32 beside a half UNet.
    @property
    def device(self) -> torch.device:
        devices = webui_devices()
        return torch.device(devices.device) if devices is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        devices = webui_devices()
        return getattr(devices, "dtype_unet", None) or next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        devices = webui_devices()
        if getattr(devices, "dtype_vae", None) is not None:
            return devices.dtype_vae
        vae = getattr(self.model, "first_stage_model", None)
        return next(vae.parameters()).dtype if vae is not None else self.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        def encode(x: torch.Tensor) -> torch.Tensor:  # ldm's get_first_stage_encoding and sgm's encoder sample
            encoded = self.model.encode_first_stage(x)
            return encoded if torch.is_tensor(encoded) else self.model.get_first_stage_encoding(encoded)

        return encode_each(encode, pixels.to(self.device, self.vae_dtype) * 2 - 1, self.device).to(self.dtype)

    def sigma(self, timestep: int) -> torch.Tensor:
        return self.denoiser.sigma(timestep)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        concat = None
        if self.geometry.in_channels == 9:  # inpainting: (mask, masked-image latents); an empty mask shows the whole image
            concat = torch.cat([torch.zeros_like(x[:, :1]), image_latents.float()], dim=1).to(self.dtype)
        if self.is_sdxl:
            c = {"crossattn": cond.context, "vector": cond.pooled}
            if concat is not None:
                c["concat"] = concat
        else:
            c = {"c_crossattn": [cond.context]}
            if concat is not None:
                c["c_concat"] = [concat]
        return self.denoiser.denoise(lambda x_t, t: self.model.apply_model(x_t.to(self.dtype), t, c), x, sigma)
