"""LD-ZNet parity inputs, shared by bench/parity/parity_ldznet.py (which runs the reference) and tests/test_parity.py
(which checks textmask against the reference's stored outputs): a shrunk SD1-layout LD-ZNet (the reference only
builds the SD1 layout: 4 levels, feature transformers at level 2 and the middle), its weights drawn per key from
a fixed recipe, and the inputs (latents, text context, the 5 host feature maps) at the 384 px training size.
"""

from __future__ import annotations

import torch


CHANNELS, CONTEXT, HEADS = 32, 32, 8
LATENT = 48  # 384 px
# The reference's UNetModel arguments (configs/ldznet/phrasecut.yaml, shrunk); image_size[5:8] are the pools' grids.
REFERENCE_ARGS = dict(image_size=[0, 0, 0, 0, 0, LATENT // 4, LATENT // 8, LATENT // 4], in_channels=4,
                      model_channels=CHANNELS, out_channels=1, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                      channel_mult=[1, 2, 4, 4], num_heads=HEADS, use_spatial_transformer=True, transformer_depth=1,
                      context_dim=CONTEXT, use_checkpoint=False, legacy=False)
# The same UNet as a diffusers config, for textmask's converter.
UNET_CONFIG = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=[CHANNELS, 2 * CHANNELS, 4 * CHANNELS, 4 * CHANNELS],
                   down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                   up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=CONTEXT,
                   attention_head_dim=HEADS, norm_num_groups=32)
FEATURES = [(4 * CHANNELS, LATENT // 4), (4 * CHANNELS, LATENT // 8)] + [(4 * CHANNELS, LATENT // 4)] * 3


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(latents [1, 4, 48, 48], context [1, 77, CONTEXT], the 5 feature maps [1, C, s, s])."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=g)
    context = torch.randn(1, 77, CONTEXT, generator=g)
    features = [torch.randn(1, c, s, s, generator=g) for c, s in FEATURES]
    return latents, context, features


def lightning_state_dict(unet: dict[str, torch.Tensor], ema_offset: float = 0.01) -> dict[str, torch.Tensor]:
    """The reference's Lightning ``state_dict`` around a UNet state dict: raw weights, and an EMA copy (LitEma's
    dot-free names) offset by ``ema_offset`` so that a converter taking the wrong copy shows."""
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v + ema_offset for k, v in unet.items()})
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return sd


def textmask_logits(unet: dict[str, torch.Tensor], use_ema: bool) -> torch.Tensor:
    """textmask's converter and forward on the recipe's weights and inputs: logits [1, 1, 384, 384]."""
    from textmask.ldznet.weights import convert_reference

    model = convert_reference(lightning_state_dict(unet), UNET_CONFIG, use_ema=use_ema).eval()
    latents, context, features = inputs()
    with torch.no_grad():
        return model(latents, context, features)
