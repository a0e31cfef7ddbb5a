"""Write a full-size SD1.5 checkpoint with random weights, in the original LDM key layout, for running a real webui
where no real checkpoint may be downloaded: ``python tests/sd15_checkpoint.py OUT.safetensors``.

The shapes are SD1.5's (v1-inference.yaml: UNet 320 channels, VAE 128, CLIP ViT-L/14's text encoder), so a webui
detects and loads it as SD1.5; its images are noise. The UNet and VAE are Stability's own ``ldm`` modules.
"""

from __future__ import annotations

import sys

import torch


def sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd = {}
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=768, legacy=False)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    del unet
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    quant = torch.nn.Conv2d(8, 8, 1)
    with torch.no_grad():  # a trained VAE's posterior is nearly a point: the webuis' img2img samples it unseeded
        quant.weight[4:] = 0
        quant.bias[4:] = -30.0
    parts = [("encoder", Encoder(**ddconfig)), ("decoder", Decoder(**ddconfig)),
             ("quant_conv", quant), ("post_quant_conv", torch.nn.Conv2d(4, 4, 1))]
    for name, module in parts:
        sd.update({f"first_stage_model.{name}.{k}": v for k, v in module.state_dict().items()})
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    text = CLIPTextModel(config)
    for k, v in text.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers >= 5.6 flattened the wrapper
        sd[f"cond_stage_model.transformer.{k}"] = v
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file(sd15_state_dict(), sys.argv[1])
