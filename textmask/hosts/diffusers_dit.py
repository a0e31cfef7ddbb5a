"""The diffusers adapter for flow-matching MM-DiTs: SD3/SD3.5 and Flux.1 pipelines.

The transformer predicts the velocity v = ε − x₀ at x_s = (1 − s)·x₀ + s·ε. The core's k-diffusion form
x = x₀ + σ·ε is the same point scaled: σ = s / (1 − s) and x_s = x / (1 + σ), so ``denoise`` returns
x₀ = x_s − s·v and everything after (noising, ε, the methods) is the core's, unchanged. textmask's timestep t
is read at SD's noise level for t (the σ with the same signal-to-noise ratio), as for EDM models: t = 300 is
s ≈ 0.49 whatever the model's sampling shift, which only moves where a sampler spends its steps.

Attention is read with ``capture_mmdit.JointAttentionCapture``. A prompt's token map covers every text stream the
transformer reads: SD3's CLIP context (positions 1..75 after BOS) and its T5 context (from position 77), Flux's T5
context (from position 0); a phrase's tokens are all of its tokens in all of them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..capture_mmdit import JointAttentionCapture, find_joint_attention_modules
from ..errors import CheckpointError
from ..schedule import DDPMDenoiser, ddpm_alphas_cumprod
from ..tokenizer import clip_tokenizer, t5_tokenizer, tokenize
from ..tokens import CONTEXT, WINDOW, PromptTokens, TokenMap
from .common import FLUX_GUIDANCE, mmdit_refusal
from .contract import Conditioning, Geometry, HostDefaults
from .diffusers import execution_device, model_offload, sequential_offload, vae_latents



PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def from_folder(directory, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                **kwargs) -> "DiffusersDiTHost":
    """Load an SD3/SD3.5 or Flux.1 diffusers folder offline. The tokenizers ship with textmask, so a folder without
    tokenizer folders loads; SD3 without ``text_encoder_3/`` runs without T5, as its pipeline allows."""
    import json
    import warnings
    from pathlib import Path

    import diffusers

    from .diffusers import quiet_diffusers

    directory = Path(directory)
    try:
        name = json.loads((directory / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"{directory} has a transformer/ but no readable model_index.json naming its pipeline") from None
    if name not in PIPELINES:
        raise CheckpointError(f"{directory} is a {name}; textmask reads SD3 and Flux transformer folders")
    clip_slots = ("tokenizer", "tokenizer_2") if PIPELINES[name] == "sd3" else ("tokenizer",)
    t5_slot = "tokenizer_3" if PIPELINES[name] == "sd3" else "tokenizer_2"
    given = {slot: clip_pipeline_tokenizer() for slot in clip_slots if not (directory / slot).is_dir()}
    if not (directory / t5_slot).is_dir():
        given[t5_slot] = t5_tokenizer()
    if PIPELINES[name] == "sd3" and not (directory / "text_encoder_3").is_dir():
        given.update(text_encoder_3=None, tokenizer_3=None)
    try:
        with quiet_diffusers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers' torch_dtype -> dtype rename: not the user's concern
            pipe = getattr(diffusers, name).from_pretrained(directory, local_files_only=True, torch_dtype=dtype, **given)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"cannot load diffusers folder {directory}: {str(e).splitlines()[0]}") from None
    return DiffusersDiTHost(pipe.to(device), **kwargs)


def clip_pipeline_tokenizer():
    """CLIP's tokenizer as pipelines load it, with its 77-token limit (textmask's own windows prompts instead)."""
    from transformers import CLIPTokenizerFast

    from ..defaults import cache_dir
    from ..tokenizer import write_clip_vocab

    vocab, merges = write_clip_vocab(cache_dir() / "clip-bpe")
    return CLIPTokenizerFast(str(vocab), str(merges), model_max_length=77)


def is_mmdit_pipeline(pipe: Any) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


class DiffusersDiTHost(HostDefaults):
    """Runs textmask on an SD3 or Flux diffusers pipeline; shares its modules, never modifies them."""

    def __init__(self, pipe: Any, *, max_sequence_length: int | None = None, resolution: int | None = None,
                 show_progress: bool = False):
        if not is_mmdit_pipeline(pipe):
            raise CheckpointError(f"{type(pipe).__name__} is not an SD3 or Flux pipeline")
        if getattr(pipe, "vae", None) is None:
            raise CheckpointError("this pipeline has no vae; textmask encodes the images with it")
        # a torch.compile'd transformer runs a graph forward hooks never see: run its eager module (same weights)
        self.pipe, self.transformer, self.vae = pipe, getattr(pipe.transformer, "_orig_mod", pipe.transformer), pipe.vae
        self.is_flux = type(self.transformer).__name__ == "FluxTransformer2DModel"
        self._check_components()
        # Flux's T5 context is 512 tokens, SD3's 256 (each pipeline's default).
        self.max_sequence_length = int(max_sequence_length or (512 if self.is_flux else 256))
        self.denoiser = DDPMDenoiser(ddpm_alphas_cumprod())  # SD's noise levels, for textmask's timesteps
        latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        patch = 2 if self.is_flux else int(self.transformer.config.patch_size)  # Flux packs 2x2 latents per token
        sample = int(getattr(self.transformer.config, "sample_size", 128))
        table = getattr(self.transformer.config, "pos_embed_max_size", None)  # SD3's positions; Flux's are rotary
        self.geometry = Geometry(latent_factor, latent_factor * patch, int(resolution or sample * latent_factor),
                                 int(self.vae.config.latent_channels), latent_multiple=patch,
                                 max_side=table * patch * latent_factor if table else None)
        self.show_progress = show_progress

    def _check_components(self) -> None:
        """One line, at load, for a pipeline whose parts cannot work together: a text encoder or tokenizer missing,
        or components of different models (the VAE's channels, the text encoders' widths)."""
        pipe, config = self.pipe, self.transformer.config
        needed = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")  # SD3's T5 is optional
        missing = [n for n in needed if getattr(pipe, n, None) is None]
        if missing:
            raise CheckpointError(f"this pipeline has no {', '.join(missing)}; textmask encodes the prompts with them")
        channels = int(self.vae.config.latent_channels) * (4 if self.is_flux else 1)
        if int(config.in_channels) != channels:
            if self.is_flux and int(config.in_channels) > channels:  # Flux Fill, Depth, Canny: image inputs of their own
                raise CheckpointError(f"this transformer takes {config.in_channels} input channels, not the VAE's "
                                      f"{channels}: an image-conditioned model (Flux Fill, Depth or Canny) is read in "
                                      "ComfyUI only")
            raise CheckpointError(f"the VAE's latents ({channels} channels) do not fit the transformer's "
                                  f"{config.in_channels} inputs: the components come from different models")

        def width(module, *names):
            cfg = getattr(module, "config", None)
            return next((int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None), int)), None)

        t5 = getattr(pipe, "text_encoder_2" if self.is_flux else "text_encoder_3", None)
        if self.is_flux:
            pooled = width(pipe.text_encoder, "hidden_size")
        else:
            widths = [width(pipe.text_encoder, "projection_dim"), width(pipe.text_encoder_2, "projection_dim")]
            pooled = None if None in widths else sum(widths)
        for what, got, want in (("pooled text", pooled, getattr(config, "pooled_projection_dim", None)),
                                ("T5", width(t5, "d_model") if t5 is not None else None,
                                 getattr(config, "joint_attention_dim", None))):
            if got is not None and want is not None and got != int(want):
                raise CheckpointError(f"the text encoders give a {what} width of {got}, the transformer reads {want}: "
                                      "the components come from different models")

    def sampler_identity(self) -> str:
        """The pipeline's flow scheduler settings (its shift), which ``sample`` reads and ``denoise`` does not."""
        config = getattr(getattr(self.pipe, "scheduler", None), "config", {}) or {}
        keys = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        return repr({k: config.get(k) for k in keys})

    def _components(self) -> list[nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, nn.Module)]

    def enable_model_cpu_offload(self, device: str | torch.device) -> "DiffusersDiTHost":
        """Keep the pipeline's components on the CPU, each moved whole to ``device`` for its call."""
        model_offload(self._components(), device)
        return self

    def enable_sequential_cpu_offload(self, device: str | torch.device) -> "DiffusersDiTHost":
        """Keep the weights on the CPU and stream each layer to ``device`` for its call (least memory)."""
        sequential_offload(self._components(), device)
        return self

    # ---- the host contract ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return execution_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def attention_capture(self, latent_size, collectors):
        return JointAttentionCapture(self.transformer, latent_size, collectors,
                                     modules=find_joint_attention_modules(self.transformer))

    def reads_text_as_keys(self) -> bool:
        return False

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        raise mmdit_refusal("traces")

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        raise mmdit_refusal("ld-znet")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return vae_latents(self.vae, pixels).to(self.device, self.dtype)

    def _token_map(self, text: str) -> TokenMap:
        """Every text stream's tokens of ``text`` with their context positions (see the module docstring)."""
        ids, spans, positions = [], [], []
        t5 = tokenize(t5_tokenizer(), text)
        t5_offset, t5_limit = 0, self.max_sequence_length - 1  # T5 appends EOS within the window
        if not self.is_flux:
            clip = tokenize(clip_tokenizer(), text)
            keep = min(len(clip.ids), WINDOW)  # SD3's pipeline truncates CLIP at 77 with BOS and EOS
            ids += clip.ids[:keep]
            spans += clip.spans[:keep]
            positions += [1 + i for i in range(keep)]
            t5_offset = CONTEXT
            if getattr(self.pipe, "text_encoder_3", None) is None:
                t5_limit = 0  # SD3 without T5: zeros stand in for its context
        keep = min(len(t5.ids), t5_limit)
        ids += t5.ids[:keep]
        spans += t5.spans[:keep]
        positions += [t5_offset + j for j in range(keep)]
        return TokenMap(PromptTokens(text, tuple(ids), tuple(spans)), positions=positions,
                        context_length=t5_offset + self.max_sequence_length)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        if self.is_flux:
            context, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device, num_images_per_prompt=1,
                                                         max_sequence_length=self.max_sequence_length)
        else:
            context, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                            do_classifier_free_guidance=False,
                                                            max_sequence_length=self.max_sequence_length)
        return Conditioning(context.to(self.device, self.dtype), [self._token_map(p) for p in prompts],
                            pooled.to(self.device, self.dtype))

    def sigma(self, timestep: int) -> torch.Tensor:
        return self.denoiser.sigma(timestep)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma)  # x_s = x / (1 + σ)

    def velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's velocity v = ε − x₀ [B, C, h, w] (float32) at the flow point ``x_s`` [B, C, h, w] and flow
        time ``s`` [B] in [0, 1] (Flux's latents packed 2×2 and back, its guidance input for distilled models)."""
        b, c, h, w = x_s.shape
        x_s = x_s.to(self.dtype)
        if not self.is_flux:
            return self.transformer(hidden_states=x_s, timestep=(s * 1000).to(self.dtype),
                                    encoder_hidden_states=cond.context, pooled_projections=cond.pooled,
                                    return_dict=False)[0].float()
        packed = x_s.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x_s.device)
        ids[..., 1] = torch.arange(h // 2, device=x_s.device)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=x_s.device)[None, :]
        guidance = None
        if getattr(self.transformer.config, "guidance_embeds", False):
            guidance = torch.full((b,), FLUX_GUIDANCE, device=x_s.device, dtype=torch.float32)
        out = self.transformer(hidden_states=packed, timestep=s.to(self.dtype), guidance=guidance,
                               pooled_projections=cond.pooled, encoder_hidden_states=cond.context,
                               txt_ids=torch.zeros(cond.context.shape[1], 3, device=x_s.device),
                               img_ids=ids.reshape(-1, 3), return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        sig = sigma.float().to(x.device).view(-1, 1, 1, 1)
        s = sig / (1 + sig)  # the flow time of σ
        x_s = x.float() / (1 + sig)
        return x_s - s * self.velocity(x_s, s.view(-1), cond)

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """``count`` latents [count, C, s, s] from the pipeline's own flow-matching scheduler (a copy: the pipeline's
        is left as it was), with its shift (Flux: shifted by the image's token count, as its pipeline does). Image i
        starts from noise seeded seed + i. Guidance-distilled Flux models sample with their embedded guidance and no
        negative pass, as their pipeline does; other models under classifier-free guidance ``cfg``."""
        import copy

        import numpy as np

        from ..schedule import image_noise

        if getattr(self.pipe, "scheduler", None) is None:
            raise CheckpointError("this pipeline has no scheduler; OVDiff samples its support images with it")
        sched = copy.deepcopy(self.pipe.scheduler)
        side = (resolution or self.geometry.resolution) // self.geometry.latent_factor
        options = {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = sched.config
            options["mu"] = calculate_shift((side // 2) ** 2, c.get("base_image_seq_len", 256),
                                            c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                            c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, **options)
        x = image_noise((self.geometry.in_channels, side, side), seed, count).to(self.device, torch.float32)
        distilled = self.is_flux and getattr(self.transformer.config, "guidance_embeds", False)
        if distilled:
            cond = self.encode_prompts([prompt]).select([0] * count)
        else:
            both = self.encode_prompts([negative, prompt]).select([0] * count + [1] * count)
        for i, t in enumerate(sched.timesteps):
            self.check_interrupt()
            s = sched.sigmas[i].float().to(self.device).expand(count)
            if distilled:
                v = self.velocity(x, s, cond)
            else:
                uncond, text = self.velocity(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
                v = uncond + cfg * (text - uncond)
            x = sched.step(v, t, x, return_dict=False)[0].float()
        return x.to(self.dtype)
