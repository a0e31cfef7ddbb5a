"""Write a tiny SD1-style single-file checkpoint in the original LDM key layout, plus matching configs.

The UNet and VAE are Stability's own ``ldm`` modules (from stable-diffusion-sdkit), so the keys are
exactly those of a real SD1.x .safetensors file; the text encoder sits under ``cond_stage_model.transformer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import tiny_models

CTX = tiny_models.CTX


def ldm_state_dict(seed: int = 0, in_channels: int = 4) -> dict[str, torch.Tensor]:
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=16, in_channels=in_channels, model_channels=32, out_channels=4, num_res_blocks=1,
        attention_resolutions=[1, 2], channel_mult=(1, 2), num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=CTX, legacy=False,
    )
    ddconfig = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    encoder, decoder = Encoder(**ddconfig), Decoder(**ddconfig)
    quant, post_quant = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(4, 4, 1)
    text = tiny_models.text_encoder(seed=seed)
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    for name, mod in [("encoder", encoder), ("decoder", decoder), ("quant_conv", quant), ("post_quant_conv", post_quant)]:
        sd.update({f"first_stage_model.{name}.{k}": v for k, v in mod.state_dict().items()})
    for k, v in text.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers >= 5.6 flattened the wrapper
        sd[f"cond_stage_model.transformer.{k}"] = v
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_configs(directory: Path) -> Path:
    """Diffusers-format component configs describing the tiny checkpoint."""
    unet = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D"] * 2,
                up_block_types=["CrossAttnUpBlock2D"] * 2, cross_attention_dim=CTX, attention_head_dim=8, norm_num_groups=32)
    vae = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], latent_channels=4,
               layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.18215)
    text = tiny_models.text_encoder().config.to_dict()
    for sub, cfg in [("unet", unet), ("vae", vae), ("text_encoder", text)]:
        (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / sub / "config.json").write_text(json.dumps(cfg))
    return directory
