"""Ref-Diff parity inputs, shared by bench/parity/parity_refdiff.py (which runs kodenii/Ref-Diff's own attention
code) and tests/test_parity.py: a shrunk SD1-layout ldm UNet (Stability's ``UNetModel``, which both Ref-Diff's copy
and stable-diffusion-sdkit's implement), its weights drawn from a recipe, and one forward's inputs: the same
latent for the unconditional and the conditional row, as Ref-Diff's DDIM step batches them."""

from __future__ import annotations

import torch


CONTEXT, LATENT, TIMESTEP, SUBJECT = 32, 32, 100, 5
UNET_ARGS = dict(image_size=LATENT, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=CONTEXT, legacy=False)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [2, 4, 32, 32], timesteps [2], context [2, 77, CONTEXT]): rows (uncond, cond) share the latent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, LATENT, LATENT, generator=g).expand(2, -1, -1, -1).contiguous()
    context = torch.randn(2, 77, CONTEXT, generator=g)
    return x, torch.full((2,), TIMESTEP), context


def textmask_attribution(unet: torch.nn.Module) -> torch.Tensor:
    """textmask's Ref-Diff attribution [h, w] from one captured forward of ``unet`` on the recipe's inputs."""
    from textmask.capture import AttentionCapture, find_attention_modules
    from textmask.methods.refdiff import SubjectColumn, attribution

    x, t, context = inputs()
    columns = SubjectColumn([SUBJECT])
    with torch.no_grad(), AttentionCapture(find_attention_modules(unet), (LATENT, LATENT), [columns]):
        unet(x, t, context=context)
    return attribution(columns)[0]
