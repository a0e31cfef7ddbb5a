"""Tiny SD-family components built from configs, for tests; nothing is downloaded."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

CTX = 32


def text_encoder(hidden: int = CTX, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    ).eval()


def unet_sd1(in_channels: int = 4, seed: int = 0, sample_size: int = 16) -> UNet2DConditionModel:
    """Two levels, cross-attention at both: the smallest SD1-shaped UNet."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_sd15_topology(seed: int = 0) -> UNet2DConditionModel:
    """SD1.5's block layout (4 levels, 2 layers per block) with narrow channels: 16 cross + 16 self layers."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=CTX,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_sdxl(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-shaped: no attention at the top level, text_time conditioning with pooled embeddings."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * CTX,
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=8, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=CTX + 6 * 8,
        use_linear_projection=True,
    ).eval()


class Pipe:
    """The attributes of a diffusers pipeline that textmask reads."""

    def __init__(self, unet, vae, text_encoder, text_encoder_2=None):
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer = None
        self.scheduler = None


def sd1_pipe(**kw) -> Pipe:
    return Pipe(unet_sd1(**kw), vae(), text_encoder())


def sdxl_pipe() -> Pipe:
    return Pipe(unet_sdxl(), vae(), text_encoder(), text_encoder(projection=True, seed=1))
