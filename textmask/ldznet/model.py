"""ZNet and LD-ZNet (PNVR et al., ICCV 2023): a text-conditioned segmenter over the VAE latent z.

ZNet has the host UNet's architecture (a diffusers ``UNet2DConditionModel`` built from its config) with one
output channel and an upsampling head. LD-ZNet adds the frozen host UNet's features from the spatial
transformers around the bottleneck (SD1/SD2 layers 6-10 of 16): each passes through an attention pool and
is read by an extra cross-attention (``attn3``) in the matching ZNet transformer block.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PRIOR_LOGIT = -2.0  # log-odds of a 12% foreground, about a referred object's share of a PhraseCut image
HEAD_GAIN = 2.0  # SiLU'(0) = 1/2, so a gain of 2 per stage keeps the head's slope at zero near 1
# The reference's attention-pool grids are sized for 384 px training crops; other sizes interpolate.
TRAIN_RESOLUTION = 384


def feature_positions(unet: nn.Module) -> tuple[list[str], list[int]]:
    """Names of a diffusers UNet's spatial transformers in execution order, and which of them LD-ZNet reads.

    The choice is the reference's (layers 6-10 of SD1's 16): the last down transformer of the deepest level
    with attention, the mid-block transformer, and every up transformer of that same level.
    """
    names: list[str] = []
    down_with_attn = [i for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")]
    for i, block in enumerate(unet.down_blocks):
        names += [f"down_blocks.{i}.attentions.{j}" for j in range(len(getattr(block, "attentions", [])))]
    if not down_with_attn or not hasattr(unet.mid_block, "attentions"):
        raise ValueError("LD-ZNet needs a UNet with cross-attention in its down blocks and its mid block")
    deepest = down_with_attn[-1]
    last_down = f"down_blocks.{deepest}.attentions.{len(unet.down_blocks[deepest].attentions) - 1}"
    names.append("mid_block.attentions.0")
    up_level = len(unet.up_blocks) - 1 - deepest
    for i, block in enumerate(unet.up_blocks):
        names += [f"up_blocks.{i}.attentions.{j}" for j in range(len(getattr(block, "attentions", [])))]
    picked = [last_down, "mid_block.attentions.0"]
    picked += [f"up_blocks.{up_level}.attentions.{j}" for j in range(len(getattr(unet.up_blocks[up_level], "attentions", [])))]
    return names, [names.index(n) for n in picked]


def resample_positions(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A pool's [C, side² + 1] positional embedding for an h×w grid: the square grid bicubic-resampled, mean token kept."""
    if pos.shape[-1] == h * w + 1:
        return pos
    c, side = pos.shape[0], int(math.isqrt(pos.shape[-1] - 1))
    grid = F.interpolate(pos[None, :, 1:].reshape(1, c, side, side), (h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.reshape(c, h * w)], dim=1)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool returning every token: [B, C, H, W] -> [B, HW + 1, C_out] (mean token first)."""

    def __init__(self, spatial: int, channels: int, head_channels: int, out_channels: int | None = None):
        super().__init__()
        # Layouts match the reference (1-d convolutions, [C, HW+1] embedding) so its weights copy over as-is.
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels or channels, 1)
        self.num_heads = channels // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        pos = resample_positions(self.positional_embedding, h, w)
        qkv = self.qkv_proj(x + pos[None].to(x.dtype))
        q, k, v = (t.reshape(b, self.num_heads, -1, h * w + 1).transpose(-1, -2) for t in qkv.chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, ch]
        out = self.c_proj(out.transpose(-1, -2).reshape(b, c, h * w + 1))
        return out.transpose(1, 2)


class FeatureSlot:
    """The pooled host features one ZNet transformer reads; set per forward (kept for checkpointed backward)."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None


class FeatureTransformerBlock(nn.Module):
    """A diffusers BasicTransformerBlock plus the reference's third attention over the host's features."""

    def __init__(self, block: nn.Module, slot: FeatureSlot):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.norm1, self.attn1, self.norm2, self.attn2 = block.norm1, block.attn1, block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        dim = block.norm1.normalized_shape[0]
        heads = block.attn1.heads
        self.norm_sd = nn.LayerNorm(dim)
        self.attn3 = Attention(query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim // heads)
        self.slot = slot

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
        if self.slot.tokens is None:
            raise RuntimeError("LD-ZNet block called without host features; call LDZNet.forward")
        x = hidden_states
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), encoder_hidden_states=encoder_hidden_states) + x
        x = self.attn3(self.norm_sd(x), encoder_hidden_states=self.slot.tokens.to(x.dtype)) + x
        return self.ff(self.norm3(x)) + x


def upsampling_head(steps: int, gain: float = HEAD_GAIN) -> nn.Sequential:
    """The reference's one-channel head: conv, then ``steps`` × (transposed conv ×2, conv), SiLU between.

    It starts as nearest-neighbour upsampling (centre taps ``gain``) rather than PyTorch's default init: a
    random one-channel chain of seven convolutions and six SiLUs shrinks the signal about a thousandfold, so
    the UNet barely moves the loss for thousands of steps. The last bias starts at a foreground prior's
    log-odds, so an untrained head finds nothing instead of everything. The layout is the reference's.
    """
    layers: list[nn.Module] = [nn.Conv2d(1, 1, 3, padding=1), nn.SiLU()]
    for i in range(steps):
        layers += [nn.ConvTranspose2d(1, 1, 2, stride=2), nn.SiLU(), nn.Conv2d(1, 1, 3, padding=1)]
        if i < steps - 1:
            layers.append(nn.SiLU())
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                layer.weight.zero_()
                layer.weight[0, 0, 1, 1] = gain
                layer.bias.zero_()
            elif isinstance(layer, nn.ConvTranspose2d):
                layer.weight.fill_(gain)
                layer.bias.zero_()
        layers[-1].bias.fill_(PRIOR_LOGIT)
    return nn.Sequential(*layers)


def znet_config(unet_config: dict[str, Any], latent_channels: int = 4) -> dict[str, Any]:
    """The ZNet config from a host UNet's: same blocks, latent in (no inpainting channels), one channel out."""
    cfg = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    cfg.update(in_channels=latent_channels, out_channels=1, addition_embed_type=None, addition_time_embed_dim=None,
               projection_class_embeddings_input_dim=None, class_embed_type=None, num_class_embeds=None,
               time_cond_proj_dim=None)
    return cfg


class LDZNet(nn.Module):
    """ZNet (``with_features=False``) or LD-ZNet: logits [B, 1, H, W] at the image resolution."""

    def __init__(self, config: dict[str, Any], *, with_features: bool = True, upsample_steps: int = 3,
                 train_resolution: int = TRAIN_RESOLUTION):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = dict(config)
        self.with_features = with_features
        self.upsample_steps = upsample_steps
        self.train_resolution = train_resolution
        self.unet = UNet2DConditionModel(**self.config)
        nn.init.zeros_(self.unet.conv_out.weight)  # the reference zero-initialises the output conv
        nn.init.zeros_(self.unet.conv_out.bias)
        self.head = upsampling_head(upsample_steps)
        self.transformer_names, picked = feature_positions(self.unet)
        self.feature_layers = picked if with_features else []
        self.slots: list[FeatureSlot] = []
        self.pools = nn.ModuleList()
        if with_features:
            latent = train_resolution // 2**upsample_steps
            for index in self.feature_layers:
                name = self.transformer_names[index]
                transformer = self.unet.get_submodule(name)
                level = self._level(name)
                channels = transformer.proj_in.in_features if isinstance(transformer.proj_in, nn.Linear) else transformer.proj_in.in_channels
                heads = transformer.transformer_blocks[0].attn1.heads
                slot = FeatureSlot()
                self.slots.append(slot)
                self.pools.append(AttentionPool2d(max(1, latent // 2**level), channels, channels // heads))
                transformer.transformer_blocks = nn.ModuleList(
                    FeatureTransformerBlock(b, slot) for b in transformer.transformer_blocks
                )

    @torch.no_grad()
    def set_train_resolution(self, resolution: int) -> None:
        """Resample the attention pools' positional grids to ``resolution`` px crops (a finer fine-tuning stage)."""
        latent = resolution // 2**self.upsample_steps
        for index, pool in zip(self.feature_layers, self.pools):
            side = max(1, latent // 2 ** self._level(self.transformer_names[index]))
            pos = pool.positional_embedding
            resized = resample_positions(pos, side, side)  # returns pos itself where the size is unchanged
            if resized is not pos:  # a new grid only where the size changes; keep the trainable flag
                pool.positional_embedding = nn.Parameter(resized, requires_grad=pos.requires_grad)
        self.train_resolution = resolution

    def _level(self, name: str) -> int:
        """Downsampling level of a transformer: its resolution is latent / 2**level."""
        n = len(self.unet.down_blocks)
        if name.startswith("mid_block"):
            return n - 1
        i = int(name.split(".")[1])
        return i if name.startswith("down_blocks") else n - 1 - i

    @classmethod
    def from_unet(cls, unet: nn.Module, *, latent_channels: int = 4, upsample_steps: int = 3,
                  with_features: bool = True, init_weights: bool = True,
                  train_resolution: int = TRAIN_RESOLUTION) -> "LDZNet":
        """Build from a diffusers host UNet's config; copy its weights wherever names and shapes match."""
        model = cls(znet_config(unet.config, latent_channels), with_features=with_features,
                    upsample_steps=upsample_steps, train_resolution=train_resolution)
        if init_weights:
            model.init_from_unet(unet)
        return model

    @torch.no_grad()
    def init_from_unet(self, unet: nn.Module) -> list[str]:
        """Copy the host UNet's weights where names and shapes match; returns the names copied."""
        own = self.unet.state_dict()
        copied = []
        for name, value in unet.state_dict().items():
            if name in own and own[name].shape == value.shape and not name.startswith("conv_out."):
                own[name].copy_(value.to(own[name].dtype))
                copied.append(name)
        return copied

    def forward(self, latents: torch.Tensor, context: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits for ``latents`` [B, C, h, w] under ``context`` [B, L, D], reading host ``features`` (LD-ZNet)."""
        if self.with_features:
            if features is None or len(features) != len(self.pools):
                raise ValueError(f"LD-ZNet reads {len(self.pools)} host feature maps, got {0 if features is None else len(features)}")
            for slot, pool, feat in zip(self.slots, self.pools, features):
                slot.tokens = pool(feat.to(latents.dtype))
        t = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)  # ZNet always runs at t = 0
        out = self.unet(latents, t, encoder_hidden_states=context, return_dict=False)[0]
        logits = self.head(F.silu(out))
        if not torch.is_grad_enabled():
            for slot in self.slots:
                slot.tokens = None
        return logits

    def trainable_parameters(self) -> int:
        """Number of trainable parameters (925.9M for SD1.4; the paper reports 925M, the LD-ZNet UNet alone)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def clone_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model, for safetensors metadata."""
        return {"unet": copy.deepcopy(self.config), "with_features": self.with_features,
                "upsample_steps": self.upsample_steps, "train_resolution": self.train_resolution}
