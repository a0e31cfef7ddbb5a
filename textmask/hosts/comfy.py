"""The ComfyUI host: textmask on a graph's own MODEL (ModelPatcher), CLIP and VAE.

The forward goes through ``model.model.apply_model`` with the conds that ``extra_conds`` builds, so
LoRA patches, low-VRAM casting, v-prediction, SDXL's pooled ``y`` and 9-channel inpainting models all
take ComfyUI's own path. We run our own single forward (no CFG batching): ComfyUI pads cond and uncond
to a common key length, which would shift token positions.

Flux and SD3 MODELs (flow matching: model sampling of type ``CONST``) take x_s = (1 − s)·x₀ + s·ε with ComfyUI's
"sigma" s, and ``apply_model`` returns x₀. The core's x = x₀ + σ·ε is the same point scaled (s = σ / (1 + σ),
x_s = x / (1 + σ)), and textmask's timestep t is read at SD's noise level for t, as in ``diffusers_dit``. Their
attention is read by ``comfy_dit.ComfyJointCapture``; a prompt's token map covers every text stream the model
reads (Flux: T5 from position 0; SD3: CLIP-L/G's 77-token windows, then T5).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import options
from ..capture import (AttentionCapture, default_chunk_bytes, find_attention_modules, find_transformer_modules,
                       finest_attention_grid)
from ..clip import masked_crops
from ..errors import CaptureError, TextMaskError
from ..schedule import DDPMDenoiser, ddpm_alphas_cumprod, schedule_sigma
from ..tokens import TokenMap, token_map_from_chunks, token_map_from_streams
from .common import FLUX_GUIDANCE, comfy_module, encode_each, mmdit_refusal, pad_contexts
from .contract import Conditioning, Geometry, HostDefaults, native_resolution

model_management = comfy_module("model_management")
comfy_utils = comfy_module("utils")




COMPILED = ("this MODEL is torch.compile'd (TorchCompileModel), and a compiled graph never calls the hooks textmask "
            "reads attention with; give textmask the MODEL from before TorchCompileModel")


class ComfyProgress:
    """ComfyUI's ProgressBar as the context manager the core expects."""

    def __init__(self, total: int):
        self.bar = comfy_utils.ProgressBar(total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, n: int = 1) -> None:
        self.bar.update(n)


class ComfyHost(HostDefaults):
    """Runs textmask on ComfyUI objects; never patches or keeps a reference to a clone."""

    def __init__(self, model, clip, vae):
        self.patcher, self.clip, self.vae = model, clip, vae
        self.base = model.model  # comfy.model_base.BaseModel
        unet = self.base.diffusion_model
        self.dit = self._dit_kind()
        if self.dit is not None:
            self.denoiser = DDPMDenoiser(ddpm_alphas_cumprod())  # SD's noise levels, for textmask's timesteps
            patch = getattr(unet, "patch_size", 2)
            patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
            factor = int(getattr(vae, "downscale_ratio", 8))
            channels = int(getattr(self.base.latent_format, "latent_channels", 16))
            table = getattr(unet, "pos_embed_max_size", None)  # SD3's positions; Flux's are rotary, unbounded
            self.geometry = Geometry(factor, factor * patch, 1024, channels,  # Flux and SD3 are 1024 px models
                                     max_side=table * patch * factor if table else None)
            return
        v_prediction = getattr(self.base.model_type, "name", "") == "V_PREDICTION"  # SD2's 768-v checkpoints
        self.geometry = Geometry.of_unet(levels=len(getattr(unet, "channel_mult", (1, 2, 4, 4))),
                                         in_channels=int(getattr(unet, "in_channels", 4)),
                                         resolution=native_resolution(self.is_sdxl, v_prediction),
                                         latent_factor=int(getattr(vae, "downscale_ratio", 8)))

    def _dit_kind(self) -> str | None:
        """"flux" or "sd3" for a flow-matching MM-DiT MODEL whose blocks ``comfy_dit`` reads, else None (a UNet)."""
        if not self.is_flow:
            return None
        from .comfy_dit import find_comfy_joint_blocks

        bases = {cls.__name__ for cls in type(self.base).__mro__}  # Flux Fill/Kontext subclass Flux
        kinds = {kind for _, _, kind in find_comfy_joint_blocks(self.base.diffusion_model)}
        if "SD3" in bases and "joint" in kinds:
            return "sd3"
        if "Flux" in bases and kinds & {"double", "single"}:  # Chroma is a Flux with blocks of its own: refused
            return "flux"
        raise CaptureError(f"this flow-matching MODEL ({type(self.base).__name__}) is not Flux or SD3; textmask "
                           "reads only their attention blocks")

    @property
    def is_flow(self) -> bool:
        """ComfyUI's flow-matching convention (Flux, SD3): x_s = s·ε + (1 − s)·x₀ and ``apply_model`` gives x₀."""
        try:
            const = getattr(comfy_module("model_sampling"), "CONST", None)
        except ImportError:  # older copies (Forge's) have no flow models
            return False
        return const is not None and isinstance(self.base.model_sampling, const)

    @property
    def is_sdxl(self) -> bool:
        return any(cls.__name__ == "SDXL" for cls in type(self.base).__mro__)  # SDXL_instructpix2pix too

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device  # where load_models_gpu puts this MODEL, as ComfyUI's samplers ask

    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_dtype()

    def load(self, batch_shape: Sequence[int] | None = None) -> None:
        """Load this MODEL as ComfyUI's samplers do, with its weight patches (LoRA) and object patches
        (ModelSamplingDiscrete) in place, and room for a forward of ``batch_shape`` latents."""
        memory = 0
        if batch_shape is not None:
            # A sampler's own reservation (its cond and uncond rows: noise-diff and refer run two rows per image too)
            # plus the capture's score chunks, doubled by the softmax: so ComfyUI can free other models, or load this
            # one partly (low VRAM), before the forward rather than run out of memory in it.
            rows = [2 * int(batch_shape[0]), *(int(n) for n in batch_shape[1:])]
            memory = self.patcher.memory_required(rows) + 2 * default_chunk_bytes(torch.device(self.device))
        model_management.load_models_gpu([self.patcher], memory_required=memory)

    def prepare(self, batch_shape: Sequence[int]) -> None:
        self.load(batch_shape)

    def compiled(self, sampling: bool = False) -> bool:
        """Whether this MODEL's forwards run a torch.compile'd graph, which hooks added later never see.

        TorchCompileModel patches the compiled model in as an object (older ComfyUI: every forward), or adds an
        ``apply_model`` wrapper (current ComfyUI: the sampler's forwards only; textmask's own calls skip it)."""
        patched = getattr(self.patcher, "object_patches", {}).get("diffusion_model")
        if hasattr(patched, "_orig_mod") or hasattr(self.base.diffusion_model, "_orig_mod"):
            return True
        return sampling and "torch_compile_kwargs" in getattr(self.patcher, "model_options", {})

    def attention_capture(self, latent_size: tuple[int, int], collectors: Sequence):
        """The UNet's ``AttentionCapture``, or for a Flux/SD3 MODEL ``comfy_dit.ComfyJointCapture`` on its blocks."""
        if self.compiled():
            raise CaptureError(COMPILED)
        if self.dit is None:
            return super().attention_capture(latent_size, collectors)
        from .comfy_dit import ComfyJointCapture

        self.load()
        return ComfyJointCapture(self.base.diffusion_model, latent_size, collectors)

    def reads_text_as_keys(self) -> bool:
        return self.dit is None

    def self_attention_grid(self, latent_size: tuple[int, int]) -> tuple[int, int] | None:
        return None if self.dit is not None else finest_attention_grid(self.base.diffusion_model, latent_size)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.dit is None:
            return super().input_scale(sigma)
        return 1 / (1 + sigma)  # x_s = x / (1 + σ)

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        if self.dit is not None:
            raise mmdit_refusal("traces")
        self.load()
        modules = find_attention_modules(self.base.diffusion_model)
        if not modules:
            raise CaptureError("this MODEL has no attention modules textmask can hook (is it a UNet?)")
        return modules

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        if self.dit is not None:
            raise mmdit_refusal("ld-znet")
        self.load()
        return find_transformer_modules(self.base.diffusion_model)

    def latents_in(self, samples: torch.Tensor) -> torch.Tensor:
        """A LATENT's samples [B, C, h, w] (VAE Encode's scale) in the model's own scale, under its loaded latent
        format; anything else is refused in one line (``options.latents`` checks the rest against the images)."""
        if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.dim() != 4:
            got = tuple(samples.shape) if isinstance(samples, torch.Tensor) and not samples.is_nested else \
                type(samples).__name__
            raise TextMaskError(f"the LATENT's samples must be a tensor [B, C, h, w], got {got}; connect a VAE "
                                "Encode of the image")
        self.load(samples.shape)  # the latent format may be an object patch (Playground v2.5's), which loading applies
        return self.base.process_latent_in(samples.to(self.device)).to(self.dtype)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # IMAGE layout in, un-scaled latents out; older ComfyUIs' VAE encode samples the posterior
        raw = encode_each(lambda one: self.vae.encode(one.movedim(1, -1).cpu()), pixels, self.device)
        return self.latents_in(raw)

    def latent_region(self, image_size: tuple[int, int], latent_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the pixels a LATENT covers: VAE Encode centre-crops the image to whole cells; a LATENT
        of the image at another scale (an upscale's) covers all of it, and one of another image is refused."""
        f = self.geometry.latent_factor
        if tuple(latent_size) != (image_size[0] // f, image_size[1] // f):
            return super().latent_region(image_size, latent_size)
        h, w = int(latent_size[0]) * f, int(latent_size[1]) * f
        return (image_size[0] - h) // 2, (image_size[1] - w) // 2, h, w

    def _token_map(self, tokens: dict) -> TokenMap:
        """Token map from ComfyUI's own chunking (every clip of a model, l and g, shares the positions).

        The text is rebuilt from the BPE tokens themselves ("</w>" ends a word): ComfyUI's word ids group
        whole weighted segments in newer versions, and weights syntax "(red car:1.2)" must still match.
        """
        chunks = next(iter(tokens.values()))
        hf = self._hf_tokenizer()
        rows = []
        for chunk in chunks:
            row = []
            for tok, _weight, word in chunk:
                if not word:  # 0 marks start, end and padding tokens
                    row.append((0, None))
                elif torch.is_tensor(tok):  # a textual-inversion embedding vector
                    row.append((0, "<embedding></w>"))
                else:
                    row.append((int(tok), hf.convert_ids_to_tokens(int(tok)) if hf is not None else f"t{int(tok)}</w>"))
            rows.append(row)
        return token_map_from_chunks(rows)

    def _hf_tokenizer(self):
        """The transformers tokenizer inside CLIP's SD1/SDXL tokenizer wrapper (for reading tokens back)."""
        for part in vars(self.clip.tokenizer).values():
            inner = getattr(part, "tokenizer", None)
            if inner is not None and hasattr(inner, "decode"):
                return inner
        return None

    def _stream_pieces(self, key: str, chunks: list, offset: int) -> list[tuple[int, str, int]]:
        """(token id, piece, context position) of one text stream's content tokens, chunks laid end to end."""
        part = getattr(self.clip.tokenizer, {"l": "clip_l", "g": "clip_g"}.get(key, key), None)
        hf = getattr(part, "tokenizer", None)
        out, position = [], offset
        for chunk in chunks:
            for tok, _weight, word in chunk:
                if word:  # 0 marks start, end and padding tokens
                    piece = "<embedding>" if torch.is_tensor(tok) else (
                        hf.convert_ids_to_tokens(int(tok)) if hf is not None else f"t{int(tok)}")
                    out.append((0 if torch.is_tensor(tok) else int(tok), piece, position))
                position += 1
        return out

    def _dit_token_map(self, tokens: dict, context_length: int) -> TokenMap:
        """Every text stream's tokens with their context positions (see the module docstring)."""
        encoder = self.clip.cond_stage_model
        t5 = tokens.get("t5xxl") or []
        t5_length = sum(len(c) for c in t5) if getattr(encoder, "t5xxl", None) is not None else 0
        streams = []
        if self.dit == "sd3":
            clip_key = next((k for k in ("l", "g") if tokens.get(k) and getattr(encoder, f"clip_{k}", None) is not None), None)
            if clip_key is not None:
                streams.append(self._stream_pieces(clip_key, tokens[clip_key], 0))
        if t5_length:  # T5 ends the context (SD3: after CLIP's windows; Flux: all of it)
            streams.append(self._stream_pieces("t5xxl", t5, context_length - t5_length))
        registers = int(getattr(self.base.diffusion_model, "register_length", 0) or 0)  # SD3 puts these first
        return token_map_from_streams(streams, context_length, offset=registers)

    def _pad_t5(self, batch: list[dict]) -> None:
        """Pad every prompt's T5 tokens with T5's pad token, as its tokenizer pads short prompts, so that every
        prompt's whole context (SD3: its CLIP windows, then T5) is as long as the longest. Repeating contexts to a
        common length (``pad_contexts``) would change an MM-DiT's joint softmax, and prompts of different CLIP window
        counts would repeat to their lengths' least common multiple, tens of thousands of tokens."""
        if not all(tokens.get("t5xxl") for tokens in batch):
            return  # SD3 without T5: its contexts are CLIP's windows alone

        def length(tokens: dict, keys: tuple[str, ...]) -> int:
            return max((sum(len(c) for c in tokens.get(k) or []) for k in keys), default=0)

        clip_keys = ("l", "g") if self.dit == "sd3" else ()  # Flux's context is T5's alone (CLIP gives the pooled)
        longest = max(length(tokens, clip_keys) + length(tokens, ("t5xxl",)) for tokens in batch)
        pad = getattr(getattr(self.clip.tokenizer, "t5xxl", None), "pad_token", 0)
        for tokens in batch:
            chunks = tokens["t5xxl"]
            missing = longest - length(tokens, clip_keys) - length(tokens, ("t5xxl",))
            chunks[-1] = list(chunks[-1]) + [(pad, 1.0, 0)] * missing

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        if self.dit is not None:
            return self._encode_dit_prompts(prompts)
        contexts, maps, pooled = [], [], []
        for text in prompts:
            tokens = self.clip.tokenize(text, return_word_ids=True)
            maps.append(self._token_map(tokens))
            plain = {k: [[(t, w) for t, w, _ in chunk] for chunk in v] for k, v in tokens.items()}
            cond, pool = self.clip.encode_from_tokens(plain, return_pooled=True)
            contexts.append(cond)
            pooled.append(pool if pool is not None else torch.zeros(1, 1))
        context = torch.cat(pad_contexts(contexts)).to(self.device)
        return Conditioning(context, maps, torch.cat(pooled).to(self.device))

    def _encode_dit_prompts(self, prompts: Sequence[str]) -> Conditioning:
        batch = [self.clip.tokenize(text, return_word_ids=True) for text in prompts]
        self._pad_t5(batch)
        contexts, maps, pooled = [], [], []
        for tokens in batch:
            plain = {k: [[(t, w) for t, w, _ in chunk] for chunk in v] for k, v in tokens.items()}
            cond, pool = self.clip.encode_from_tokens(plain, return_pooled=True)
            maps.append(self._dit_token_map(tokens, int(cond.shape[1])))
            contexts.append(cond)
            pooled.append(pool if pool is not None else torch.zeros(1, 1))
        if len({c.shape[1] for c in contexts}) > 1:  # CLIP windows of different counts (SD3's long prompts)
            contexts = pad_contexts(contexts)
        context = torch.cat(contexts).to(self.device)
        return Conditioning(context, maps, torch.cat(pooled).to(self.device))

    def sigma(self, timestep: int) -> torch.Tensor:
        if self.dit is not None:
            return self.denoiser.sigma(timestep)  # SD's σ for t; a flow model's shift only moves a sampler's steps
        self.load()  # the schedule may be an object patch, which loading applies
        return schedule_sigma(self.base.model_sampling, timestep)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        device = self.device
        f = self.geometry.latent_factor
        if self.dit is not None:
            sig = sigma.float().to(x.device).view(-1, 1, 1, 1)
            s = sig / (1 + sig)  # ComfyUI's flow "sigma" for σ
            image = {}
            config = getattr(self.base, "model_config", None)
            channels = getattr(config, "unet_config", {}) if config is not None else {}
            if image_latents is not None and channels.get("in_channels", 0) > 2 * channels.get("out_channels", 16):
                # Flux Fill: the image with an empty mask (nothing to repaint), as SD's inpainting UNets get it
                image = {"concat_latent_image": self.base.process_latent_out(image_latents.float()),
                         "concat_mask": torch.zeros(b, 1, h * f, w * f, device=device)}
            extra = self.base.extra_conds(cross_attn=cond.context, pooled_output=cond.pooled, guidance=FLUX_GUIDANCE,
                                          device=device, noise=x, width=w * f, height=h * f, **image)
            conds = {k: v.process_cond(batch_size=b, device=device, area=(h, w, 0, 0)).cond for k, v in extra.items()}
            return self.base.apply_model(x.float() / (1 + sig), s.view(-1), **conds).float()  # x0 at x_s = x / (1 + σ)
        extra = self.base.extra_conds(
            cross_attn=cond.context, pooled_output=cond.pooled, width=w * f, height=h * f,
            target_width=w * f, target_height=h * f, device=device, noise=x,
            latent_image=image_latents, denoise_mask=torch.zeros(b, 1, h, w, device=device),  # inpaint nothing
        )
        conds = {k: v.process_cond(batch_size=b, device=device, area=(h, w, 0, 0)).cond for k, v in extra.items()}
        return self.base.apply_model(x.float(), sigma.float(), **conds)  # ComfyUI's own c_in, c_out and parametrisation

    def _comfy_conditioning(self, text: str) -> list:
        """``text``'s CONDITIONING as CLIPTextEncode makes it (scheduled, where this ComfyUI has hooks)."""
        tokens = self.clip.tokenize(text)
        if hasattr(self.clip, "encode_from_tokens_scheduled"):
            return self.clip.encode_from_tokens_scheduled(tokens)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    def prompt_conditioning(self, text: str) -> tuple[list, Conditioning]:
        """``text`` as a CONDITIONING for the graph's samplers, and as the core's Conditioning with its token map
        (the same context tensor, so a sampler's rows of it can be recognised)."""
        if not isinstance(text, str):
            raise TextMaskError(f"the prompt must be text, got {type(text).__name__}")
        comfy_cond = self._comfy_conditioning(options.readable("the prompt", text))
        context, extra = comfy_cond[0][0], comfy_cond[0][1]
        tokens = self.clip.tokenize(text, return_word_ids=True)
        token_map = self._token_map(tokens) if self.dit is None else self._dit_token_map(tokens, int(context.shape[1]))
        return comfy_cond, Conditioning(context, [token_map], extra.get("pooled_output"))

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        """``count`` latents from ComfyUI's own sampler (dpmpp_2m, normal schedule) on this MODEL."""
        sampling = comfy_module("sample")
        side = (resolution or self.geometry.resolution) // self.geometry.latent_factor
        channels = int(getattr(self.base.latent_format, "latent_channels", 4))
        empty = torch.zeros(count, channels, side, side)
        noise = sampling.prepare_noise(empty, seed)
        samples = sampling.sample(
            self.patcher, noise, steps, cfg, "dpmpp_2m", "normal", self._comfy_conditioning(prompt),
            self._comfy_conditioning(negative), empty, callback=lambda *a: self.check_interrupt(), disable_pbar=True,
            seed=seed,
        )
        return self.latents_in(samples)

    def check_interrupt(self) -> None:
        model_management.throw_exception_if_processing_interrupted()

    def sampler_identity(self) -> str:
        """ComfyUI's sampler reads the MODEL's model_sampling (ModelSamplingSD3/Flux's shift), which a flow MODEL's
        ``denoise`` at SD's noise levels does not show (a UNet's reads the schedule it samples with)."""
        if self.dit is None:
            return ""
        self.load()  # ModelSamplingSD3/Flux are object patches, which loading applies
        sampling = self.base.model_sampling
        return repr((type(sampling).__name__, getattr(sampling, "shift", None), getattr(sampling, "multiplier", None)))

    def progress(self, total: int, desc: str) -> ComfyProgress:
        return ComfyProgress(total)  # the node's bar in ComfyUI's frontend


def capturing_model(host: "ComfyHost", capture):
    """A clone of the host's MODEL whose sampler forwards feed ``capture`` (a ``SamplingCapture``).

    The clone's model function wrapper (chained after any wrapper the MODEL already has) installs the capture's
    read-only hooks for each denoiser call and removes them when the call returns, raises or is interrupted, so the
    shared modules are hooked only while this clone samples: other samplers on the same MODEL are untouched.
    """
    if host.compiled(sampling=True):
        raise CaptureError(COMPILED)
    clone = host.patcher.clone()
    previous = clone.model_options.get("model_function_wrapper")
    diffusion_model = clone.model.diffusion_model
    found: list = []  # the UNet's attention modules, found at the first call

    def capture_for(latent_size, collectors):
        if host.dit is not None:
            from .comfy_dit import ComfyJointCapture

            return ComfyJointCapture(diffusion_model, latent_size, collectors)
        if not found:
            found.extend(find_attention_modules(diffusion_model))
        return AttentionCapture(found, latent_size, collectors)

    def wrapper(apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]
        schedule = (c.get("transformer_options") or {}).get("sample_sigmas")  # newer ComfyUI passes the run's σ table
        chunks = args.get("cond_or_uncond")  # one entry per conditioning batched in this call: 0 positive, 1 negative
        positive = None
        if chunks and x.shape[0] % len(chunks) == 0:
            per = x.shape[0] // len(chunks)
            positive = [chunk == 0 for chunk in chunks for _ in range(per)]
        with capture.forward(capture_for, x, sigma, c.get("c_crossattn"), schedule, positive):
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(x, sigma, **c)

    clone.set_model_unet_function_wrapper(wrapper)
    return clone


class ComfyClipScorer:
    """Ref-Diff's discriminative score in ComfyUI: CLIP_VISION image embeddings of masked proposal crops against
    the graph CLIP's pooled text embedding. Meaningful when both share CLIP's joint space (SDXL's clip_g with
    clip_vision_g); SD1 checkpoints usually lack CLIP-L's text projection, which weakens the score."""

    def __init__(self, clip_vision, clip):
        self.clip_vision, self.clip = clip_vision, clip

    def scores(self, image: torch.Tensor, props: torch.Tensor, texts: list[str]) -> torch.Tensor:
        import torch.nn.functional as F

        pooled = [self.clip.encode_from_tokens(self.clip.tokenize(t), return_pooled=True)[1] for t in texts]
        text = F.normalize(torch.cat(pooled).float(), dim=-1).mean(0)
        crops = masked_crops(image, props, 224).movedim(1, -1)  # IMAGE layout; ComfyUI preprocesses to 224
        embeds = self.clip_vision.encode_image(crops)["image_embeds"].float()
        if embeds.shape[-1] != text.shape[-1]:
            raise TextMaskError(
                f"this CLIP_VISION ({embeds.shape[-1]}-d) does not share an embedding space with the model's text "
                f"encoder ({text.shape[-1]}-d); use the CLIP vision model that matches it (clip_vision_g for SDXL)"
            )
        return (F.normalize(embeds, dim=-1) @ F.normalize(text.to(embeds.device), dim=0)).cpu()
