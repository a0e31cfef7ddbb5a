"""The diffusers adapter: textmask on diffusers components (SD1.x, SD2.x, SDXL) for the CLI, the API and the app.

The UNet is a DDPM ε- or v-model (or an EDM one read at SD's noise levels), driven as a k-diffusion denoiser
through ``textmask.schedule.DDPMDenoiser``. Its loaders (single files, folders, pipelines) are in
``diffusers_loading``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..capture import find_attention_modules, find_transformer_modules, finest_attention_grid
from ..errors import CaptureError, CheckpointError
from ..schedule import DDPMDenoiser, EDMSchedule, ddpm_alphas_cumprod, image_noise
from ..tokenizer import clip_tokenizer, tokenize
from ..tokens import BOS, EOS, WINDOW, TokenMap, split_windows
from .common import pad_contexts
from .contract import Conditioning, Geometry, HostDefaults

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def quiet_diffusers() -> contextlib.ExitStack:
    """Silence diffusers' and transformers' info chatter and loading bars; the user's settings come back after."""
    stack = contextlib.ExitStack()
    for name in ("diffusers", "transformers"):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
        hf_logging = importlib.import_module(f"{name}.utils.logging")
        if getattr(hf_logging, "is_progress_bar_enabled", lambda: False)():
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
    return stack


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate offload hook's device (enable_model_cpu_offload, sequential offload,
    device maps keep the weights on the CPU or meta until the call), else its weights' device."""
    if hasattr(module, "_hf_hook"):  # accelerate hooks the top module whenever it offloads; diffusers asks first too
        for m in module.modules():  # as DiffusionPipeline._execution_device finds it
            device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next(module.parameters()).device


def vae_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the posterior mean's latents in the scale the pipeline samples in (its scaling and
    shift factors, or per-channel statistics), deterministically."""
    vdev, vdtype = execution_device(vae), next(vae.parameters()).dtype
    encoded = vae.encode(pixels.to(vdev, vdtype) * 2 - 1)
    posterior = getattr(encoded, "latent_dist", None)
    raw = posterior.mean if posterior is not None else encoded.latents  # AutoencoderTiny (TAESD): no distribution
    latents = raw * vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):  # SD3's and Flux's VAEs
        latents = latents - vae.config.shift_factor * vae.config.scaling_factor
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:  # Playground v2.5's per-channel statistics, as its pipeline does
        stats = [torch.tensor(v, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1) for v in (mean, std)]
        latents = (raw - stats[0]) * vae.config.scaling_factor / stats[1]
    if not torch.isfinite(latents).all():
        raise CheckpointError(f"the VAE produced non-finite latents in {vdtype}; use an fp16-fixed VAE or fp32")
    return latents


def sequential_offload(modules: Sequence[nn.Module | None], device: str | torch.device) -> None:
    """Keep each module's weights on the CPU and stream every layer to ``device`` for its call (accelerate)."""
    from accelerate import cpu_offload

    for m in modules:
        if m is not None:
            cpu_offload(m.to("cpu"), execution_device=torch.device(device))


def model_offload(modules: Sequence[nn.Module | None], device: str | torch.device) -> None:
    """Keep the modules on the CPU, each moved whole to ``device`` for its call and the one before it in ``modules``
    sent back (diffusers' model offload: less memory than resident, faster than sequential)."""
    from accelerate import cpu_offload_with_hook

    hook = None
    for m in modules:
        if m is not None:
            _, hook = cpu_offload_with_hook(m.to("cpu"), execution_device=torch.device(device), prev_module_hook=hook)


class DiffusersHost(HostDefaults):
    """Runs textmask on diffusers components; owns nothing it did not load."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer: Any = None,
        alphas_cumprod: torch.Tensor | None = None,
        edm: EDMSchedule | None = None,
        prediction_type: str = "epsilon",
        pad_ids: tuple[int, ...] | None = None,
        resolution: int | None = None,
        show_progress: bool = False,
    ):
        if unet is None or vae is None or text_encoder is None:
            missing = [n for n, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)) if m is None]
            raise CheckpointError(f"no {', '.join(missing)} in this model (an SDXL refiner has no text_encoder); "
                                  "textmask needs an SD1.x, SD2.x or SDXL base model's")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise CheckpointError(f"unsupported prediction type {prediction_type!r}")
        # A torch.compile'd UNet runs a graph that forward hooks never see: textmask's one forward runs its eager
        # module (the same weights) instead.
        unet = getattr(unet, "_orig_mod", unet)
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer = tokenizer if tokenizer is not None and getattr(tokenizer, "is_fast", False) else clip_tokenizer()
        self.edm = edm  # a continuous EDM schedule, read at SD's noise levels through its equivalent ᾱ_t
        self.prediction_type = prediction_type
        if edm is not None:
            log_sigmas = edm.sigmas().log()
            # EDM's c_noise = ¼·ln σ; its "epsilon" output F is −v of the equivalent DDPM schedule, its "v" output v
            self.denoiser = DDPMDenoiser(edm.alphas_cumprod(), "edm_epsilon" if prediction_type == "epsilon" else
                                         "v_prediction", time_input=lambda t: 0.25 * float(log_sigmas[t]))
        else:
            self.denoiser = DDPMDenoiser(alphas_cumprod if alphas_cumprod is not None else ddpm_alphas_cumprod(),
                                         prediction_type)
        self.alphas_cumprod = self.denoiser.alphas_cumprod
        self.is_sdxl = text_encoder_2 is not None
        # SD1 and SDXL's CLIP-L pad with EOS; OpenCLIP encoders (SD2, SDXL's second) pad with "!" (id 0).
        self.pad_ids = pad_ids or ((EOS, 0) if self.is_sdxl else (EOS,))
        cfg = unet.config
        latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.geometry = Geometry.of_unet(levels=len(cfg.down_block_types), in_channels=int(cfg.in_channels),
                                         resolution=resolution or int(cfg.sample_size) * latent_factor,
                                         latent_factor=latent_factor)
        self.show_progress = show_progress

    def to(self, device: str | torch.device) -> "DiffusersHost":
        """Move the components this host loaded itself."""
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device).eval()
        return self

    def enable_sequential_cpu_offload(self, device: str | torch.device) -> "DiffusersHost":
        """Keep the weights this host loaded on the CPU and stream each layer to ``device`` for its call (least memory)."""
        sequential_offload((self.unet, self.vae, self.text_encoder, self.text_encoder_2), device)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device) -> "DiffusersHost":
        """Keep the components this host loaded on the CPU, each moved whole to ``device`` for its call and the one
        before it in the chain sent back (diffusers' model offload: less memory than resident, faster than sequential)."""
        model_offload((self.text_encoder, self.text_encoder_2, self.vae, self.unet), device)  # the order textmask calls them
        return self

    # ---- the host contract ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return execution_device(self.unet)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        return find_attention_modules(self.unet)

    def self_attention_grid(self, latent_size: tuple[int, int]) -> tuple[int, int] | None:
        return finest_attention_grid(self.unet, latent_size)

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        return find_transformer_modules(self.unet)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = vae_latents(self.vae, pixels)
        if self.edm is not None:
            latents = latents / self.edm.sigma_data  # in units of σ_data (see EDMSchedule)
        return latents.to(self.device, self.dtype)

    def _windows(self, text: str) -> tuple[TokenMap, list[list[int]]]:
        tokens = tokenize(self.tokenizer, text)
        windows = split_windows(tokens)
        return TokenMap(tokens, windows), [[tokens.ids[i] for i in w] for w in windows]

    def _encode_windows(self, encoder: nn.Module, windows: list[list[int]], pad: int, penultimate: bool):
        ids = torch.tensor([[BOS] + w + [EOS] + [pad] * (WINDOW - len(w)) for w in windows],
                           device=execution_device(encoder))
        out = encoder(ids, output_hidden_states=penultimate)
        hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)
        return hidden.reshape(1, -1, hidden.shape[-1]), (pooled[:1] if pooled is not None else None)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        contexts, maps, pooled = [], [], []
        for text in prompts:
            token_map, windows = self._windows(text)
            ctx, _ = self._encode_windows(self.text_encoder, windows, self.pad_ids[0], penultimate=self.is_sdxl)
            if self.is_sdxl:
                ctx2, pool = self._encode_windows(self.text_encoder_2, windows, self.pad_ids[-1], penultimate=True)
                ctx = torch.cat([ctx.to(ctx2.dtype), ctx2], dim=-1)
                pooled.append(pool)
            contexts.append(ctx)
            maps.append(token_map)
        context = torch.cat(pad_contexts(contexts)).to(self.device, self.dtype)
        return Conditioning(context, maps, torch.cat(pooled).to(self.device, self.dtype) if self.is_sdxl else None)

    def sigma(self, timestep: int) -> torch.Tensor:
        return self.denoiser.sigma(timestep)

    def _unet(self, cond: Conditioning, image_latents: torch.Tensor, shape: Sequence[int]):
        """The UNet as a function of (x_t at SD's scale, time input), with this conditioning."""
        if getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":
            raise CaptureError("this UNet has an IP-Adapter loaded, whose forward needs image embeddings; mask before "
                               "loading it, or after pipe.unload_ip_adapter()")
        b, _, h, w = shape
        added = None
        if self.is_sdxl:
            f = self.geometry.latent_factor
            time_ids = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], device=self.device, dtype=self.dtype)
            added = {"text_embeds": cond.pooled, "time_ids": time_ids.expand(b, -1)}

        def call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = x_t.to(self.dtype)
            if self.geometry.in_channels == 9:
                # Inpainting UNets also see (mask, masked-image latents); an empty mask shows the whole image.
                x_in = torch.cat([x_in, torch.zeros_like(x_in[:, :1]), image_latents.to(x_in)], dim=1)
            return self.unet(x_in, t, encoder_hidden_states=cond.context, added_cond_kwargs=added, return_dict=False)[0]

        return call

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        return self.denoiser.denoise(self._unet(cond, image_latents, x.shape), x, sigma)

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """``count`` latents sampled with diffusers' DPM-Solver++ (2M) under classifier-free guidance.

        Image i starts from noise seeded seed + i, so results do not depend on the batch size.
        """
        from diffusers import DPMSolverMultistepScheduler

        a = self.alphas_cumprod.double()
        betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
        with quiet_diffusers():
            sched = DPMSolverMultistepScheduler(num_train_timesteps=len(a), trained_betas=betas.float().numpy(),
                                                algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon")
        sched.set_timesteps(steps)
        side = (resolution or self.geometry.resolution) // self.geometry.latent_factor
        channels = int(self.vae.config.latent_channels)
        x = image_noise((channels, side, side), seed, count).to(self.device, self.dtype) * sched.init_noise_sigma
        both = self.encode_prompts([negative, prompt]).select([0] * count + [1] * count)
        for t in sched.timesteps:
            self.check_interrupt()
            pair = torch.cat([x, x])
            eps = self.denoiser.eps(self._unet(both, pair, pair.shape), pair, int(t))
            uncond, cond = eps.chunk(2)
            x = sched.step(uncond + cfg * (cond - uncond), t, x).prev_sample
        return x
