"""The diffusers host: SD1.x, SD2.x and SDXL from a single file, a diffusers folder, or a built pipeline.

Loading never touches the network: component configs ship in ``textmask/configs`` and the CLIP
tokenizer is built from the BPE file in ``textmask/assets``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..capture import find_attention_modules, find_transformer_modules
from ..latents import image_noise
from ..checkpoint import detect_architecture, read_state_dict
from ..errors import CaptureError, CheckpointError
from ..tokenizer import clip_tokenizer, tokenize
from ..tokens import TokenMap, split_windows
from .base import Conditioning, EDMSchedule, ddpm_alphas_cumprod, ddpm_noise, epsilon_from_v, pad_contexts, tqdm_progress

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BOS, EOS = 49406, 49407


def _quiet_diffusers():
    """Silence diffusers' and transformers' info chatter and loading bars; the user's settings come back after."""
    import importlib

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


def no_ddpm_schedule(what: str) -> CheckpointError:
    """The one-line refusal for a schedule that is neither DDPM's ᾱ_t nor EDM's σ (flow matching)."""
    return CheckpointError(f"{what} has neither a DDPM noise schedule (alphas_cumprod) nor an EDM one (sigma_data), "
                           "which textmask's diffusers host needs")


def edm_schedule(class_name: str, config: Any) -> EDMSchedule | None:
    """The EDM schedule of a diffusers scheduler (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) from its class
    name and config mapping, or None for any other."""
    if "EDM" not in class_name or config.get("sigma_data") is None:
        return None
    return EDMSchedule(float(config.get("sigma_min", 0.002)), float(config.get("sigma_max", 80.0)),
                       float(config["sigma_data"]))


def _folder_schedule(directory: Path) -> tuple[torch.Tensor | None, EDMSchedule | None, str]:
    """(ᾱ_t, EDM schedule, prediction type) of the training schedule a diffusers folder's scheduler config describes
    (betas, zero-SNR rescaling, EDM's σ), read through DDPMScheduler whatever DDPM-family sampler the folder names."""
    import json

    from diffusers import DDPMScheduler

    config = directory / "scheduler" / "scheduler_config.json"
    try:
        data = json.loads(config.read_text())
        name = data.get("_class_name", "")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, or not a JSON object
        raise CheckpointError(f"cannot read {config}: {str(e).splitlines()[0]}") from None
    if "EDM" in name:
        edm = edm_schedule(name, data)
        if edm is None:
            raise CheckpointError(f"cannot read {config}: {name} without sigma_data")
        return None, edm, data.get("prediction_type", "epsilon")
    if "FlowMatch" in name:
        raise no_ddpm_schedule(f"{directory.name}'s {name}")
    try:
        with _quiet_diffusers():
            sched = DDPMScheduler.from_pretrained(directory, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:  # e.g. an unknown beta_schedule
        raise CheckpointError(f"cannot read {config}: {str(e).splitlines()[0]}") from None
    return sched.alphas_cumprod, None, sched.config.prediction_type


def config_family(config: str | Path) -> dict[int, str]:
    """{context width: family} for a diffusers-format config folder that overrides the shipped ones."""
    import json

    config = Path(config)
    try:
        unet = json.loads((config / "unet" / "config.json").read_text())
        text = json.loads((config / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"config folder {config} lacks a readable unet/ or text_encoder/ config ({e})") from None
    if (config / "text_encoder_2").is_dir():
        family = "sdxl"
    else:
        family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    return {int(unet["cross_attention_dim"]): family}


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate offload hook's device (enable_model_cpu_offload, sequential offload,
    device maps keep the weights on the CPU or meta until the call), else its weights' device."""
    if hasattr(module, "_hf_hook"):  # accelerate hooks the top module whenever it offloads; diffusers asks first too
        for m in module.modules():  # as DiffusionPipeline._execution_device finds it
            device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next(module.parameters()).device


def upcast_sdxl_vae(vae: nn.Module, text_encoder_2: nn.Module | None) -> nn.Module:
    """A VAE this host loaded, in float32 where it is SDXL's in float16 and its config asks (``force_upcast``)."""
    # SDXL's VAE overflows in float16 (NaN latents); diffusers' SDXL pipelines run it in float32 for the same reason
    if text_encoder_2 is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return vae.float()
    return vae


class DiffusersHost:
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
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer = tokenizer if tokenizer is not None and getattr(tokenizer, "is_fast", False) else clip_tokenizer()
        self.edm = edm  # a continuous EDM schedule, read at SD's noise levels through its equivalent ᾱ_t
        if edm is not None:
            alphas_cumprod = edm.alphas_cumprod()
            self._edm_log_sigmas = edm.sigmas().log()
        alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else ddpm_alphas_cumprod()
        # a zero-terminal-SNR schedule ends at ᾱ = 0; keep the last step finite, as diffusers' samplers do
        self.alphas_cumprod = alphas_cumprod.double().cpu().clamp(min=2**-24)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise CheckpointError(f"unsupported prediction type {prediction_type!r}")
        self.prediction_type = prediction_type
        self.is_sdxl = text_encoder_2 is not None
        # SD1 and SDXL's CLIP-L pad with EOS; OpenCLIP encoders (SD2, SDXL's second) pad with "!" (id 0).
        self.pad_ids = pad_ids or ((EOS, 0) if self.is_sdxl else (EOS,))
        cfg = unet.config
        self.in_channels = int(cfg.in_channels)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.latent_factor * 2 ** (len(cfg.down_block_types) - 1)
        self.resolution = resolution or int(cfg.sample_size) * self.latent_factor
        self.show_progress = show_progress

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipe: Any, **kwargs) -> "DiffusersHost":
        """Wrap an already-built diffusers pipeline (its modules are shared, never modified)."""
        sched = getattr(pipe, "scheduler", None)
        alphas = getattr(sched, "alphas_cumprod", None)
        edm = edm_schedule(type(sched).__name__, getattr(sched, "config", {})) if sched is not None else None
        if sched is not None and alphas is None and edm is None:  # flow-matching schedulers have neither
            raise no_ddpm_schedule(f"this pipeline's {type(sched).__name__}")
        pred = kwargs.pop("prediction_type", None) or getattr(getattr(sched, "config", None), "prediction_type", "epsilon")
        if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
            raise CheckpointError(f"{type(pipe).__name__} runs a transformer, not a UNet; textmask needs an SD1.x, SD2.x "
                                  "or SDXL pipeline")
        return cls(
            getattr(pipe, "unet", None),
            getattr(pipe, "vae", None),
            getattr(pipe, "text_encoder", None),
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            tokenizer=getattr(pipe, "tokenizer", None),
            alphas_cumprod=None if edm is not None else alphas,
            edm=edm,
            prediction_type=pred,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> "DiffusersHost":
        """Load from a diffusers-format folder (unet/, vae/, text_encoder/[, text_encoder_2/], scheduler/)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        directory = Path(directory)
        if not (directory / "unet").is_dir():
            raise CheckpointError(f"{directory} is not a diffusers model folder (no unet/ inside)")
        opts = dict(local_files_only=True, torch_dtype=dtype)
        try:
            with _quiet_diffusers():
                unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", **opts)
                vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", **opts)
                te = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", **opts)
                te2 = None
                if (directory / "text_encoder_2").is_dir():
                    te2 = CLIPTextModelWithProjection.from_pretrained(directory, subfolder="text_encoder_2", **opts)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load diffusers folder {directory}: {str(e).splitlines()[0]}") from None
        pred = kwargs.pop("prediction_type", None)
        if (directory / "scheduler" / "scheduler_config.json").is_file():
            alphas, edm, folder_pred = _folder_schedule(directory)
            pred = pred or folder_pred
            kwargs.setdefault("alphas_cumprod", alphas)
            kwargs.setdefault("edm", edm)
        host = cls(unet, upcast_sdxl_vae(vae, te2), te, text_encoder_2=te2, prediction_type=pred or "epsilon", **kwargs)
        return host.to(device)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: str | Path | None = None,
        prediction_type: str | None = None,
        **kwargs,
    ) -> "DiffusersHost":
        """Load an original-layout SD1/SD2/SDXL checkpoint; ``config`` overrides the shipped component configs."""
        state = read_state_dict(path)
        return cls.from_state_dict(state, device=device, dtype=dtype, config=config, prediction_type=prediction_type, **kwargs)

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: str | Path | None = None,
        prediction_type: str | None = None,
        **kwargs,
    ) -> "DiffusersHost":
        """Build from an original-layout state dict (see ``from_single_file``)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if config is not None:
            arch = detect_architecture(state, prediction_type, context_dims=config_family(config))
        else:
            arch = detect_architecture(state, prediction_type)
        config_dir = str(Path(config) if config else CONFIGS / arch.name)
        opts = dict(config=config_dir, local_files_only=True, torch_dtype=dtype)
        try:
            with _quiet_diffusers():
                unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", in_channels=arch.in_channels, **opts)
                vae = AutoencoderKL.from_single_file(state, subfolder="vae", **opts)
                te = create_diffusers_clip_model_from_ldm(
                    CLIPTextModel, state, subfolder="text_encoder", config=config_dir, torch_dtype=dtype, local_files_only=True
                )
                te2 = None
                if arch.name == "sdxl":
                    te2 = create_diffusers_clip_model_from_ldm(
                        CLIPTextModelWithProjection,
                        state,
                        subfolder="text_encoder_2",
                        config=config_dir,
                        torch_dtype=dtype,
                        local_files_only=True,
                    )
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise CheckpointError(f"checkpoint does not match the {arch.name} layout: {str(e).splitlines()[0][:200]}") from None
        pad = (EOS, 0) if arch.name == "sdxl" else ((0,) if arch.name == "sd2" else (EOS,))
        if arch.zero_snr:
            kwargs.setdefault("alphas_cumprod", ddpm_alphas_cumprod(zero_snr=True))
        if arch.edm is not None:
            kwargs.setdefault("edm", EDMSchedule(*arch.edm))
        if "edm_mean" in state and "edm_std" in state:  # Playground v2.5: per-channel latent statistics, scale 0.5
            vae.register_to_config(scaling_factor=0.5, latents_mean=state["edm_mean"].flatten().tolist(),
                                   latents_std=state["edm_std"].flatten().tolist())
        if config is None:  # the shipped SD2 config says 768 px, which SD2's ε models (2.x-base, inpainting) are not
            kwargs.setdefault("resolution", arch.resolution)
        host = cls(unet, upcast_sdxl_vae(vae, te2), te, text_encoder_2=te2, prediction_type=arch.prediction_type, pad_ids=pad,
                   **kwargs)
        host.architecture = arch
        return host.to(device)

    def to(self, device: str | torch.device) -> "DiffusersHost":
        """Move the components this host loaded itself."""
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device).eval()
        return self

    def enable_sequential_cpu_offload(self, device: str | torch.device) -> "DiffusersHost":
        """Keep the weights this host loaded on the CPU and stream each layer to ``device`` for its call (least memory)."""
        from accelerate import cpu_offload

        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                cpu_offload(m.to("cpu"), execution_device=torch.device(device))
        return self

    def enable_model_cpu_offload(self, device: str | torch.device) -> "DiffusersHost":
        """Keep the components this host loaded on the CPU, each moved whole to ``device`` for its call and the one
        before it in the chain sent back (diffusers' model offload: less memory than resident, faster than sequential)."""
        from accelerate import cpu_offload_with_hook

        hook = None
        for m in (self.text_encoder, self.text_encoder_2, self.vae, self.unet):  # the order textmask calls them
            if m is not None:
                _, hook = cpu_offload_with_hook(m.to("cpu"), execution_device=torch.device(device), prev_module_hook=hook)
        return self

    # ---- Host protocol ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return execution_device(self.unet)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        return find_attention_modules(self.unet)

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        return find_transformer_modules(self.unet)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        vdev, vdtype = execution_device(vae), next(vae.parameters()).dtype
        encoded = vae.encode(pixels.to(vdev, vdtype) * 2 - 1)
        posterior = getattr(encoded, "latent_dist", None)
        raw = posterior.mean if posterior is not None else encoded.latents  # AutoencoderTiny (TAESD): no distribution
        latents = raw * vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            latents = latents - vae.config.shift_factor * vae.config.scaling_factor
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:  # Playground v2.5's per-channel statistics, as its pipeline does
            stats = [torch.tensor(v, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1) for v in (mean, std)]
            latents = (raw - stats[0]) * vae.config.scaling_factor / stats[1]
        if self.edm is not None:
            latents = latents / self.edm.sigma_data  # in units of σ_data (see EDMSchedule)
        if not torch.isfinite(latents).all():
            raise CheckpointError(f"the VAE produced non-finite latents in {vdtype}; use an fp16-fixed VAE or fp32")
        return latents.to(self.device, self.dtype)

    def _windows(self, text: str) -> tuple[TokenMap, list[list[int]]]:
        tokens = tokenize(self.tokenizer, text)
        windows = split_windows(tokens)
        return TokenMap(tokens, windows), [[tokens.ids[i] for i in w] for w in windows]

    def _encode_windows(self, encoder: nn.Module, windows: list[list[int]], pad: int, penultimate: bool):
        ids = torch.tensor([[BOS] + w + [EOS] + [pad] * (75 - len(w)) for w in windows], device=execution_device(encoder))
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
        extra = {"text_embeds": torch.cat(pooled).to(self.device, self.dtype)} if self.is_sdxl else {}
        return Conditioning(context, maps, extra)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        return ddpm_noise(self.alphas_cumprod, latents, noise, timestep)

    def predict_noise(
        self, noisy: torch.Tensor, timestep: int, cond: Conditioning, image_latents: torch.Tensor
    ) -> torch.Tensor:
        if getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":
            raise CaptureError("this UNet has an IP-Adapter loaded, whose forward needs image embeddings; mask before "
                               "loading it, or after pipe.unload_ip_adapter()")
        x = noisy
        if self.in_channels == 9:
            # Inpainting UNets also see (mask, masked-image latents); an empty mask shows the whole image.
            mask = torch.zeros_like(noisy[:, :1])
            x = torch.cat([noisy, mask, image_latents], dim=1)
        added = None
        if self.is_sdxl:
            h, w = noisy.shape[-2] * self.latent_factor, noisy.shape[-1] * self.latent_factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=x.device, dtype=x.dtype).expand(x.shape[0], -1)
            added = {"text_embeds": cond.extra["text_embeds"], "time_ids": time_ids}
        if self.edm is None:
            t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
        else:  # EDM's c_noise = ¼·ln σ; its c_in·x is already the DDPM-noised latent (see EDMSchedule)
            t = torch.full((x.shape[0],), 0.25 * float(self._edm_log_sigmas[timestep]), device=x.device)
        out = self.unet(x, t, encoder_hidden_states=cond.context, added_cond_kwargs=added, return_dict=False)[0]
        if self.edm is not None and self.prediction_type == "epsilon":
            # EDM's "epsilon" output F is −v of the equivalent DDPM schedule (c_out = +σ·σ_data/√(σ² + σ_data²)),
            # and its "v_prediction" output is v.
            return epsilon_from_v(self.alphas_cumprod, -out, noisy, timestep)
        return epsilon_from_v(self.alphas_cumprod, out, noisy, timestep) if self.prediction_type == "v_prediction" else out

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """``count`` latents sampled with diffusers' DPM-Solver++ (2M) under classifier-free guidance.

        Image i starts from noise seeded seed + i, so results do not depend on the batch size.
        """
        from diffusers import DPMSolverMultistepScheduler

        a = self.alphas_cumprod.double()
        betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
        with _quiet_diffusers():
            sched = DPMSolverMultistepScheduler(num_train_timesteps=len(a), trained_betas=betas.float().numpy(),
                                                algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon")
        sched.set_timesteps(steps)
        side = (resolution or self.resolution) // self.latent_factor
        channels = int(self.vae.config.latent_channels)
        x = image_noise((channels, side, side), seed, count).to(self.device, self.dtype) * sched.init_noise_sigma
        both = self.encode_prompts([negative, prompt]).select([0] * count + [1] * count)
        for t in sched.timesteps:
            self.check_interrupt()
            eps = self.predict_noise(torch.cat([x, x]), int(t), both, torch.cat([x, x]))
            uncond, cond = eps.chunk(2)
            x = sched.step(uncond + cfg * (cond - uncond), t, x).prev_sample
        return x

    def check_interrupt(self) -> None:
        return None

    def progress(self, total: int, desc: str):
        return tqdm_progress(total, desc, self.show_progress)
