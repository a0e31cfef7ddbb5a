"""Tiny models of the webui's own classes: Stability's ``ldm`` UNetModel and first-stage Encoder (from
stable-diffusion-sdkit), under a stand-in of ``LatentDiffusion`` that mirrors the methods the webui and textmask
call (ldm/models/diffusion/ddpm.py: apply_model, encode_first_stage, get_first_stage_encoding,
get_learned_conditioning; the webui's FrozenCLIPEmbedderWithCustomWords.tokenize_line for chunks). The
real LatentDiffusion needs pytorch_lightning, which the tests do not install.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import tiny_models

CTX = tiny_models.CTX


@dataclass
class PromptChunk:
    """The webui's PromptChunk: 77 token ids (BOS ... EOS, padded), multipliers and textual-inversion fixes."""

    tokens: list = field(default_factory=list)
    multipliers: list = field(default_factory=list)
    fixes: list = field(default_factory=list)


class CLIPWithChunks(nn.Module):
    """tokenize_line(line) -> (chunks, token_count) as FrozenCLIPEmbedderWithCustomWords, 75 tokens per chunk."""

    def __init__(self, pad_id: int = 49407):
        super().__init__()
        from textmask.tokenizer import clip_tokenizer

        self.tokenizer = clip_tokenizer()
        self.transformer = tiny_models.text_encoder()
        self.id_start, self.id_end, self.id_pad = 49406, 49407, pad_id

    def tokenize_line(self, line):
        ids = self.tokenizer(line, add_special_tokens=False)["input_ids"]
        chunks = []
        for i in range(0, max(1, len(ids)), 75):
            part = ids[i : i + 75]
            tokens = [self.id_start] + part + [self.id_end] + [self.id_pad] * (75 - len(part))
            chunks.append(PromptChunk(tokens, [1.0] * 77, []))
        return chunks, len(ids)

    def forward(self, texts):
        out = []
        for t in texts:
            chunks, _ = self.tokenize_line(t)
            ids = torch.tensor([c.tokens for c in chunks])
            out.append(self.transformer(ids).last_hidden_state.reshape(1, -1, CTX))
        return torch.cat(out)


class FirstStage(nn.Module):
    """ldm's AutoencoderKL, encoder side: encode(x) -> its posterior."""

    def __init__(self):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Encoder

        self.encoder = Encoder(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 1, 1, 1),
                               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
        self.quant_conv = nn.Conv2d(8, 8, 1)

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))


class LatentDiffusionStandIn(nn.Module):
    def __init__(self, unet, conditioning_key="crossattn", parameterization="eps", pad_id=49407, sdxl=False):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.model.conditioning_key = conditioning_key
        self.parameterization = parameterization
        self.is_sdxl = sdxl
        self.vectors_seen = []
        self.scale_factor = 0.18215
        self.cond_stage_model = CLIPWithChunks(pad_id)
        self.first_stage_model = FirstStage()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.eval()

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        return self.scale_factor * encoder_posterior.sample()

    def get_learned_conditioning(self, c):
        ctx = self.cond_stage_model(c)
        if self.is_sdxl:  # the webui's SDXL: {"crossattn": ..., "vector": pooled + size embeddings}
            return {"crossattn": ctx, "vector": ctx[:, 0, :].repeat(1, 2)}
        return ctx

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        unet = self.model.diffusion_model
        if self.is_sdxl:  # sgm's OpenAIWrapper; sdkit's ldm UNet has no ADM input, so the vector is only checked
            assert cond["vector"].shape[0] == x_noisy.shape[0] and cond["vector"].dim() == 2
            self.vectors_seen.append(cond["vector"].shape)
            x = torch.cat([x_noisy, cond.get("concat", x_noisy[:, :0])], dim=1)
            return unet(x, t, context=cond["crossattn"])
        if not isinstance(cond, dict):
            cond = {"c_concat" if self.model.conditioning_key == "concat" else "c_crossattn": [cond]}
        cc = torch.cat(cond["c_crossattn"], 1)
        if self.model.conditioning_key == "hybrid":
            return unet(torch.cat([x_noisy] + cond["c_concat"], dim=1), t, context=cc)
        return unet(x_noisy, t, context=cc)


def ldm_unet(kind: str = "sd1", in_channels: int = 4, seed: int = 0):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    common = dict(image_size=16, in_channels=in_channels, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=[1, 2], channel_mult=(1, 2), use_spatial_transformer=True, transformer_depth=1,
                  legacy=False)
    if kind == "sd1":
        return UNetModel(num_heads=8, context_dim=CTX, **common).eval()
    if kind == "sd2":
        return UNetModel(num_head_channels=8, context_dim=CTX, use_linear_in_transformer=True, **common).eval()
    if kind == "sdxl":
        return UNetModel(num_head_channels=8, context_dim=CTX, use_linear_in_transformer=True, **common).eval()
    raise ValueError(kind)


def sd_model(kind: str = "sd1", in_channels: int = 4) -> LatentDiffusionStandIn:
    unet = ldm_unet(kind, in_channels)
    return LatentDiffusionStandIn(unet, conditioning_key="hybrid" if in_channels == 9 else "crossattn",
                                  parameterization="v" if kind == "sd2" else "eps", pad_id=0 if kind == "sd2" else 49407,
                                  sdxl=kind == "sdxl")
