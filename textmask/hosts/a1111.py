"""The AUTOMATIC1111 / Forge host: textmask on the webui's already-loaded ``shared.sd_model``.

A1111 runs Stability's ldm (SD1, SD2) and sgm (SDXL) model classes. Conditioning comes from the model's
own ``get_learned_conditioning`` (SDXL's is a dict of ``crossattn`` and ``vector``), latents from
``encode_first_stage``, noise from ``alphas_cumprod``, and the forward from ``apply_model``; inpainting
checkpoints get ``c_concat``. The webui replaces attention ``forward`` at class level for its optimisations;
textmask's instance hooks on ``to_q`` / ``to_k`` still fire. ``make_host`` sends Forge's backend (since 2024-08)
to the Forge adapter, and Forge's first release, whose ``forge_objects`` are ComfyUI's, to the ComfyUI adapter.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..capture import find_attention_modules, find_transformer_modules
from ..errors import CaptureError
from ..tokenizer import clip_tokenizer, tokenize
from ..tokens import TokenMap, split_windows, token_map_from_chunks
from .base import Conditioning, ddpm_noise, epsilon_from_v, fixed_draw, pad_contexts, tqdm_progress

BOS, EOS = 49406, 49407


def make_host(sd_model: Any):
    """The right adapter for the webui's model: Forge's patcher objects, or A1111's ldm/sgm model."""
    objects = getattr(sd_model, "forge_objects", None)
    if objects is not None and hasattr(getattr(objects.unet, "model", None), "predictor"):
        from .forge import ForgeHost  # Forge's own backend (since 2024-08): the UNet is a KModel

        return ForgeHost(sd_model)
    if objects is not None:  # Forge's first release: ComfyUI's model management as ldm_patched
        try:
            from .comfy import ComfyHost
        except ImportError as e:
            raise CaptureError(f"this Forge version's model objects are not supported ({e})") from None
        return ComfyHost(objects.unet, objects.clip, objects.vae)
    return A1111Host(sd_model)


def check_capturable(unet: nn.Module) -> None:
    """A clear message when the webui runs a UNet textmask cannot hook (TensorRT, ToMe)."""
    try:
        from modules import sd_unet  # the webui's custom-UNet switch (TensorRT and similar)

        if getattr(sd_unet, "current_unet", None) is not None:
            raise CaptureError("a custom UNet (e.g. TensorRT) is active; set the SD UNet option to None or Automatic "
                               "without it to make masks")
    except ImportError:
        pass
    if getattr(unet, "_tome_info", None) is not None:
        raise CaptureError("Token Merging (ToMe) is patched into the UNet; set its ratio to 0 to make masks")


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


def webui_devices() -> Any:
    """The webui's ``modules.devices`` once it has chosen its device, else None (outside the webui)."""
    try:
        from modules import devices
    except ImportError:
        return None
    return devices if getattr(devices, "device", None) is not None else None


class A1111Host:
    """Runs textmask on an A1111 ``sd_model``; never patches it."""

    def __init__(self, sd_model: Any):
        self.model = sd_model
        self.unet = sd_model.model.diffusion_model
        self.is_sdxl = bool(getattr(sd_model, "is_sdxl", False)) or hasattr(sd_model, "conditioner")
        self.v_prediction = getattr(sd_model, "parameterization", "eps") == "v"
        self._set_geometry()
        self.alphas_cumprod = webui_alphas_cumprod(sd_model).detach().double().cpu()

    def _set_geometry(self) -> None:
        self.latent_factor = 8
        levels = len(getattr(self.unet, "channel_mult", (1, 2, 4, 4)))
        self.size_multiple = self.latent_factor * 2 ** (levels - 1)
        self.resolution = 1024 if self.is_sdxl else (768 if self.v_prediction else 512)
        self.in_channels = int(getattr(self.unet, "in_channels", 4))

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

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        check_capturable(self.unet)
        modules = find_attention_modules(self.unet)
        if not modules:
            raise CaptureError("this model has no attention modules textmask can hook")
        return modules

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        return find_transformer_modules(self.unet)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, self.vae_dtype) * 2 - 1
        encoded = self.model.encode_first_stage(x)
        if torch.is_tensor(encoded):  # sgm (SDXL) returns scaled latents
            return encoded.to(self.dtype)
        with fixed_draw(self.device):  # ldm's get_first_stage_encoding samples the posterior
            return self.model.get_first_stage_encoding(encoded).to(self.dtype)

    def _word_embedder(self):
        """The webui's CLIP wrapper with ``tokenize_line`` (FrozenCLIPEmbedderWithCustomWords, its SDXL twin, or
        Forge's text processing engine, which chunks the same way)."""
        stage = getattr(self.model, "cond_stage_model", None)
        forge = [getattr(self.model, name, None) for name in ("text_processing_engine", "text_processing_engine_l")]
        for part in [stage, *getattr(stage, "embedders", []), *forge]:
            if hasattr(part, "tokenize_line"):
                return part
        return None

    def _token_map(self, text: str) -> TokenMap:
        embedder = self._word_embedder()
        tok = clip_tokenizer()
        if embedder is None:
            tokens = tokenize(tok, text)
            return TokenMap(tokens, split_windows(tokens))
        chunks, _ = embedder.tokenize_line(text)
        rows = []
        for chunk in chunks:
            ids = list(chunk.tokens)
            fixes = {f.offset + 1 for f in getattr(chunk, "fixes", [])}  # textual-inversion vectors start here
            row = []
            for j, t in enumerate(ids):
                if t in (BOS, EOS) or (t == 0 and j > 0):
                    row.append((t, None))
                elif j in fixes:
                    row.append((t, "<embedding></w>"))
                else:
                    row.append((t, tok.convert_ids_to_tokens(int(t))))
            rows.append(row)
        return token_map_from_chunks(rows)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        contexts, vectors, maps = [], [], []
        for text in prompts:
            c = self.model.get_learned_conditioning([text])
            if isinstance(c, dict):  # SDXL: {"crossattn": [1, L, 2048], "vector": [1, 2816]}
                contexts.append(c["crossattn"])
                vectors.append(c["vector"])
            else:
                contexts.append(c)
            maps.append(self._token_map(text))
        context = torch.cat(pad_contexts(contexts)).to(self.device, self.dtype)
        extra = {"vector": torch.cat(vectors).to(self.device, self.dtype)} if vectors else {}
        return Conditioning(context, maps, extra)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        return ddpm_noise(self.alphas_cumprod, latents, noise, timestep)

    def predict_noise(self, noisy: torch.Tensor, timestep: int, cond: Conditioning, image_latents: torch.Tensor) -> torch.Tensor:
        b = noisy.shape[0]
        t = torch.full((b,), timestep, device=noisy.device, dtype=torch.long)
        concat = None
        if self.in_channels == 9:  # inpainting: (mask, masked-image latents); an empty mask shows the whole image
            concat = torch.cat([torch.zeros_like(noisy[:, :1]), image_latents.to(noisy.dtype)], dim=1)
        if self.is_sdxl:
            c = {"crossattn": cond.context, "vector": cond.extra["vector"]}
            if concat is not None:
                c["concat"] = concat
        else:
            c = {"c_crossattn": [cond.context]}
            if concat is not None:
                c["c_concat"] = [concat]
        out = self.model.apply_model(noisy, t, c)
        return epsilon_from_v(self.alphas_cumprod, out, noisy, timestep) if self.v_prediction else out

    def sample(self, prompt: str, negative: str, count: int, *, steps: int, cfg: float, seed: int,
               resolution: int | None = None) -> torch.Tensor:
        raise CaptureError("OVDiff prototypes are built in ComfyUI or with the diffusers CLI/API, not in the webui yet")

    def check_interrupt(self) -> None:
        try:
            from modules import shared
        except ImportError:
            return
        if getattr(shared.state, "interrupted", False) or getattr(shared.state, "skipped", False):
            try:
                from modules.sd_samplers_common import InterruptedException
            except ImportError:
                InterruptedException = KeyboardInterrupt  # noqa: N806
            raise InterruptedException

    def progress(self, total: int, desc: str):
        return tqdm_progress(total, desc)
