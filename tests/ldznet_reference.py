"""A state dict in the reference LD-ZNet's key layout (koutilya-pnvr/LD-ZNet, ``LatentSeg``), built for tests.

The UNet part comes from Stability's ``ldm`` UNetModel (sdkit), so its keys are the real ldm names. The
reference's additions are written out from its source (ldm_seg/modules/ldznet_attention.py and
ldm_seg/modules/diffusionmodules/ldznet_UNet.py): in each feature transformer block ``attn3`` and
``norm_sd``, per feature transformer ``attentionpool2D`` (positional_embedding [C, s²+1], 1-d qkv_proj and
c_proj), and the ``final`` head. Around them sit the EMA copy (LitEma: dots removed), the VAE, the CLIP
text encoder, the frozen SD copy and the DDPM buffers, as in a Lightning checkpoint's ``state_dict``.
"""

from __future__ import annotations

import torch

import tiny_models

UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                   down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2,
                   cross_attention_dim=tiny_models.CTX, attention_head_dim=8, norm_num_groups=32)
# ldm prefixes of the feature transformers for this two-level UNet, and their channels and pool grids (384 px)
FEATURE_TRANSFORMERS = {"input_blocks.3.1": (64, 24), "middle_block.1": (64, 24), "output_blocks.0.1": (64, 24),
                        "output_blocks.1.1": (64, 24)}


def reference_state_dict(seed: int = 0, ema: bool = True) -> dict[str, torch.Tensor]:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNetModel(image_size=16, in_channels=4, model_channels=32, out_channels=1, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=(1, 2), num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=tiny_models.CTX, legacy=False)
    znet = dict(unet.state_dict())
    for prefix, (c, s) in FEATURE_TRANSFORMERS.items():
        block = f"{prefix}.transformer_blocks.0"
        for proj in ("to_q", "to_k", "to_v"):
            znet[f"{block}.attn3.{proj}.weight"] = 0.05 * torch.randn(c, c, generator=g)
        znet[f"{block}.attn3.to_out.0.weight"] = 0.05 * torch.randn(c, c, generator=g)
        znet[f"{block}.attn3.to_out.0.bias"] = 0.05 * torch.randn(c, generator=g)
        znet[f"{block}.norm_sd.weight"] = 1 + 0.05 * torch.randn(c, generator=g)
        znet[f"{block}.norm_sd.bias"] = 0.05 * torch.randn(c, generator=g)
        znet[f"{prefix}.attentionpool2D.positional_embedding"] = 0.05 * torch.randn(c, s * s + 1, generator=g)
        znet[f"{prefix}.attentionpool2D.qkv_proj.weight"] = 0.05 * torch.randn(3 * c, c, 1, generator=g)
        znet[f"{prefix}.attentionpool2D.qkv_proj.bias"] = 0.05 * torch.randn(3 * c, generator=g)
        znet[f"{prefix}.attentionpool2D.c_proj.weight"] = 0.05 * torch.randn(c, c, 1, generator=g)
        znet[f"{prefix}.attentionpool2D.c_proj.bias"] = 0.05 * torch.randn(c, generator=g)
    for i in (0, 4, 8, 12):
        znet[f"final.{i}.weight"] = torch.randn(1, 1, 3, 3, generator=g)
        znet[f"final.{i}.bias"] = torch.randn(1, generator=g)
    for i in (2, 6, 10):
        znet[f"final.{i}.weight"] = torch.randn(1, 1, 2, 2, generator=g)
        znet[f"final.{i}.bias"] = torch.randn(1, generator=g)
    sd = {f"model.diffusion_model.{k}": v.detach().clone() for k, v in znet.items()}
    if ema:
        sd.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v.detach() + 0.001 for k, v in znet.items()})
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(tiny_models.CTX)
    sd["sd_features_stage_model.model.model.diffusion_model.out.2.weight"] = torch.randn(4, 32, 3, 3, generator=g)
    sd["betas"] = torch.linspace(0.00085, 0.012, 1000)
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
    return sd
