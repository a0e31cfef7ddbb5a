"""What the AUTOMATIC1111 and Forge adapters share: the webui's prompt chunking and token maps, its CLIP
conditioning, its devices, its interrupt and its console progress."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..capture import find_attention_modules, find_transformer_modules, finest_attention_grid
from ..errors import CaptureError
from ..tokenizer import clip_tokenizer, tokenize
from ..tokens import BOS, EOS, TokenMap, split_windows, token_map_from_chunks
from .common import pad_contexts
from .contract import Conditioning, Geometry, HostDefaults, native_resolution


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


def webui_devices() -> Any:
    """The webui's ``modules.devices`` once it has chosen its device, else None (outside the webui)."""
    try:
        from modules import devices
    except ImportError:
        return None
    return devices if getattr(devices, "device", None) is not None else None


class WebuiHost(HostDefaults):
    """The base of the A1111 and Forge adapters; never patches the webui's model."""

    show_progress = True  # the webui's console

    def __init__(self, sd_model: Any, unet: nn.Module, is_sdxl: bool, v_prediction: bool):
        self.model, self.unet = sd_model, unet
        self.is_sdxl, self.v_prediction = is_sdxl, v_prediction
        self.geometry = Geometry.of_unet(levels=len(getattr(unet, "channel_mult", (1, 2, 4, 4))),
                                         in_channels=int(getattr(unet, "in_channels", 4)),
                                         resolution=native_resolution(is_sdxl, v_prediction))

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        check_capturable(self.unet)
        modules = find_attention_modules(self.unet)
        if not modules:
            raise CaptureError("this model has no attention modules textmask can hook")
        return modules

    def transformer_modules(self) -> list[tuple[str, nn.Module]]:
        return find_transformer_modules(self.unet)

    def self_attention_grid(self, latent_size: tuple[int, int]) -> tuple[int, int] | None:
        return finest_attention_grid(self.unet, latent_size) if self.reads_text_as_keys() else None

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
        pooled = torch.cat(vectors).to(self.device, self.dtype) if vectors else None
        return Conditioning(context, maps, pooled)

    def check_interrupt(self) -> None:
        webui_interrupt()


def webui_interrupt() -> None:
    """Raise the webui's InterruptedException when the user pressed Interrupt or Skip (a no-op outside a webui)."""
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
