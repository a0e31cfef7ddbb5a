"""The Forge adapter (stable-diffusion-webui-forge since its 2024-08 backend): textmask on ``shared.sd_model``.

Forge's engine keeps the webui's ``get_learned_conditioning`` and ``encode_first_stage`` and its prompt chunking
(see ``webui``). Its UNet is a ``KModel`` inside a ``UnetPatcher`` (``sd_model.forge_objects.unet``), already a
k-diffusion denoiser: ``sampling_prepare`` loads it with its LoRA and object patches, then ``apply_model`` takes
x = z + σ·ε and returns the denoised latent.

Forge's Flux (``ForgeFluxHost``) is the same ``KModel`` over ``backend.nn.flux``, whose blocks have ComfyUI's
layout and are read by ``comfy_dit.ComfyJointCapture``. Its predictor is flow matching ("const"): ``apply_model``
takes x_s = (1 − s)·x₀ + s·ε at s and returns x₀. As in the other DiT adapters, the core's x = x₀ + σ·ε is that
point scaled (s = σ / (1 + σ), x_s = x / (1 + σ)) and textmask's timestep t is read at SD's noise level for t.
Its text context is T5's alone (Forge's T5 engine: the prompt's tokens, EOS, padding to 256).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import CaptureError
from ..schedule import DDPMDenoiser, ddpm_alphas_cumprod, schedule_sigma
from ..tokens import TokenMap, token_map_from_streams
from .common import FLUX_GUIDANCE, encode_each, mmdit_refusal
from .contract import Conditioning, Geometry, HostDefaults
from .webui import WebuiHost, webui_interrupt


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


def is_forge_flux(sd_model: Any) -> bool:
    """Whether ``sd_model``'s KModel runs Forge's flow-matching predictor ("const": Flux, Chroma, SD3.5)."""
    return getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "") == "const"


class ForgeModel:
    """What Forge's UNet and Flux adapters share: the KModel's device and dtype, loading it, the VAE."""

    model: Any  # the ForgeDiffusionEngine

    def _bind(self, sd_model: Any) -> None:
        self.model = sd_model
        self.patcher = sd_model.forge_objects.unet  # UnetPatcher
        self.kmodel = self.patcher.model  # KModel: diffusion_model, predictor, computation_dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.kmodel.computation_dtype

    def load(self) -> None:
        """Load the model with its LoRA and object patches, as Forge does before it samples."""
        forge_backend("memory_management").load_model_gpu(self.patcher)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = encode_each(self.model.encode_first_stage, pixels.to(self.device, torch.float32) * 2 - 1,
                              self.device)  # Forge's VAE samples the posterior
        return latents.to(self.device, self.dtype)

    def _apply_model(self, x: torch.Tensor, sigma: torch.Tensor, **conds) -> torch.Tensor:
        """``apply_model`` as Forge's sampler calls it, after ``sampling_prepare`` (memory, online LoRAs)."""
        sampling = forge_backend("sampling.sampling_function")
        sampling.sampling_prepare(self.patcher, x)
        try:
            return self.kmodel.apply_model(x.float(), sigma.float(), **conds).float()
        finally:
            sampling.sampling_cleanup(self.patcher)


class ForgeHost(ForgeModel, WebuiHost):
    """Runs textmask on a Forge ``sd_model`` (a ForgeDiffusionEngine); never patches it."""

    def __init__(self, sd_model: Any):
        self._bind(sd_model)
        v_prediction = getattr(self.kmodel.predictor, "prediction_type", "") == "v_prediction"
        super().__init__(sd_model, self.kmodel.diffusion_model, bool(getattr(sd_model, "is_sdxl", False)), v_prediction)

    def attention_modules(self) -> list:
        self.load()
        return super().attention_modules()

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
        return self._apply_model(x, sigma, **kwargs)


def forge_flux_lineage():
    """Forge's Flux blocks for ``comfy_dit.ComfyJointCapture``."""
    from .comfy_dit import BlockLineage

    flux = forge_backend("nn.flux")
    return BlockLineage({flux.DoubleStreamBlock: "double", flux.SingleStreamBlock: "single"}, flux.apply_rope)


class ForgeFluxHost(ForgeModel, HostDefaults):
    """Runs textmask on Forge's Flux engine (``backend.diffusion_engine.flux``); never patches it."""

    def __init__(self, sd_model: Any):
        self._bind(sd_model)
        self.transformer = self.kmodel.diffusion_model
        if not (hasattr(self.transformer, "double_blocks") and hasattr(sd_model, "text_processing_engine_t5")):
            raise CaptureError(f"this Forge model ({type(sd_model).__name__}) is a flow-matching model other than "
                               "Flux; textmask reads Forge's Flux only")
        self.denoiser = DDPMDenoiser(ddpm_alphas_cumprod())  # SD's noise levels, for textmask's timesteps
        factor = int(getattr(sd_model.forge_objects.vae, "downscale_ratio", 8))
        channels = int(self.transformer.in_channels) // 4  # Forge counts Flux's 2x2-packed channels
        self.geometry = Geometry(factor, factor * 2, 1024, channels)
        # Flux.1-dev takes its guidance as an input (Forge's "Distilled CFG Scale"); schnell has none
        self.distilled = bool(getattr(self.transformer, "guidance_embed", False))

    def attention_capture(self, latent_size, collectors):
        from .comfy_dit import ComfyJointCapture

        self.load()
        return ComfyJointCapture(self.transformer, latent_size, collectors, lineage=forge_flux_lineage())

    def reads_text_as_keys(self) -> bool:
        return False

    def attention_modules(self) -> list:
        raise mmdit_refusal("traces")

    def transformer_modules(self) -> list:
        raise mmdit_refusal("ld-znet")

    def _t5_tokens(self, text: str) -> list[int]:
        """The context's token ids for ``text`` as Forge's T5 engine lays them out (emphasis parsed, EOS, padding)."""
        chunks, _ = self.model.text_processing_engine_t5.tokenize_line(text)
        if len(chunks) != 1:
            raise CaptureError("BREAK splits a Flux prompt into several T5 contexts; write the mask prompt without it")
        return list(chunks[0].tokens)

    def _token_map(self, tokens: list[int]) -> TokenMap:
        engine = self.model.text_processing_engine_t5
        special = {engine.id_end, engine.id_pad}
        pieces = engine.tokenizer.convert_ids_to_tokens(tokens)
        stream = [(tok, piece, i) for i, (tok, piece) in enumerate(zip(tokens, pieces)) if tok not in special]
        return token_map_from_streams([stream], len(tokens))

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        tokens = [self._t5_tokens(text) for text in prompts]
        if len({len(t) for t in tokens}) > 1:  # Forge's T5 engine stacks one context per prompt: equal lengths only
            raise CaptureError("prompts over 255 T5 tokens must all have the same length here; shorten the mask prompt")
        cond = self.model.get_learned_conditioning(prompts)
        context, pooled = cond["crossattn"], cond["vector"]
        maps = [self._token_map(t) for t in tokens]
        return Conditioning(context.to(self.device, self.dtype), maps, pooled.to(self.device, self.dtype))

    def sigma(self, timestep: int) -> torch.Tensor:
        return self.denoiser.sigma(timestep)  # SD's σ for t; the flow shift only moves a sampler's steps

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma)  # x_s = x / (1 + σ)

    def prepare(self, batch_shape: Sequence[int]) -> None:
        self.load()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        sig = sigma.float().to(x.device).view(-1, 1, 1, 1)
        kwargs = {"c_crossattn": cond.context, "y": cond.pooled}
        if self.distilled:
            kwargs["guidance"] = torch.full((x.shape[0],), FLUX_GUIDANCE, device=x.device)
        return self._apply_model(x.float() / (1 + sig), (sig / (1 + sig)).view(-1), **kwargs)  # x0 at x_s, s

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """DPM-Solver++(2M) through ``denoise`` (``textmask.sampling``); guidance-distilled Flux samples with its
        embedded guidance and no negative pass, as Forge samples it at CFG 1."""
        from .. import sampling

        return sampling.sample(self, prompt, negative, count, steps=steps, cfg=1.0 if self.distilled else cfg,
                               seed=seed, resolution=resolution)

    def check_interrupt(self) -> None:
        webui_interrupt()
