"""LD-ZNet weights: our safetensors files (config in the metadata) and conversion of the official .ckpt."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_pickled_state_dict
from ..errors import CheckpointError, first_line
from .model import LDZNet, znet_config

FORMAT = "textmask-ldznet"
FORMAT_VERSION = "1"

# What the reference's LatentSeg checkpoint holds besides the segmenter: the VAE, its CLIP text encoder (frozen in
# the published code, so the host's own encoder is the same one), the frozen SD copy that supplies the features
# (the host's UNet here), and the DDPM schedule buffers.
REFERENCE_IGNORED_PREFIXES = ("first_stage_model.", "cond_stage_model.", "sd_features_stage_model.")
REFERENCE_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}
UNET_PREFIX = "model.diffusion_model."


def architecture_of(context_dim: int) -> str:
    """The SD family a cross-attention width belongs to (``custom-N`` for anything else)."""
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(context_dim), f"custom-{int(context_dim)}")


def save_ldznet(model: LDZNet, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``model`` as safetensors with its config and base architecture in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture_of(model.config["cross_attention_dim"]),
        "config": json.dumps(model.clone_config(), sort_keys=True),
    }
    meta.update(extra or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def require_diffusers() -> None:
    """LD-ZNet builds its UNet with diffusers; where the environment lacks a working one (a webui whose pins it does
    not fit), one line says so. attention and noise-diff never need it."""
    try:
        import diffusers.models.unets  # noqa: F401  (the import is the check)
    except ImportError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"ld-znet needs the diffusers package, which this environment cannot import ({first}); "
                              "install diffusers>=0.27 where it fits, or use attention or noise-diff") from None


def load_ldznet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LDZNet:
    """Read an LD-ZNet safetensors file written by textmask (see ``convert_reference``); clear errors otherwise."""
    from safetensors import SafetensorError, safe_open

    if not str(path).strip():
        raise CheckpointError("no LD-ZNet weights given; name a textmask LD-ZNet .safetensors file")
    require_diffusers()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LD-ZNet weights not found: {path}")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path.name} is a pickle; convert it first: textmask convert-ldznet {path} OUT.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path.name} is not an LD-ZNet file written by textmask (no '{FORMAT}' metadata)")
            spec = json.loads(meta["config"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"cannot read LD-ZNet weights {path.name}: {str(e).splitlines()[0]}") from None
    try:
        model = LDZNet(spec["unet"], with_features=spec["with_features"], upsample_steps=spec["upsample_steps"],
                       train_resolution=spec.get("train_resolution", 384))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        # a config that no LD-ZNet fits, or tensors of other shapes: written by something else, or damaged
        raise CheckpointError(f"{path.name} does not hold a valid LD-ZNet ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not match its own config: {_key_summary(missing, unexpected)}")
    model.architecture = meta.get("architecture", "unknown")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _key_summary(missing, unexpected, limit: int = 8) -> str:
    parts = []
    for label, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label} key(s): {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def read_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a reference LatentSeg .ckpt, unpickled with ``weights_only=True`` only."""
    return read_pickled_state_dict(path)


def _reference_ema(sd: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The EMA weights the reference infers with (LitEma flattens names: dots removed)."""
    flat = {"model_ema." + ("diffusion_model." + k[len(UNET_PREFIX):]).replace(".", ""): k for k in keys}
    if not all(f in sd for f in flat):
        return None
    return {k: sd[f] for f, k in flat.items()}


def convert_reference(sd: dict[str, torch.Tensor], unet_config: dict[str, Any], *, use_ema: bool = True,
                      upsample_steps: int = 3) -> LDZNet:
    """Map a reference LatentSeg state dict (ldm key layout) onto a textmask LD-ZNet; clear errors list bad keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_keys, unexpected = [], []
    for k in sd:
        if k.startswith(UNET_PREFIX):
            unet_keys.append(k)
        elif k.startswith("model_ema.") or k.startswith(REFERENCE_IGNORED_PREFIXES) or k in REFERENCE_SCHEDULE_BUFFERS:
            continue
        else:
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(f"not an LD-ZNet LatentSeg checkpoint: {_key_summary([], unexpected)}")
    if not unet_keys:
        raise CheckpointError(f"not an LD-ZNet LatentSeg checkpoint: no '{UNET_PREFIX}*' keys")
    weights = (_reference_ema(sd, unet_keys) if use_ema else None) or {k: sd[k] for k in unet_keys}

    try:
        model = LDZNet(znet_config(unet_config), with_features=True, upsample_steps=upsample_steps)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"the UNet config is not an SD UNet's diffusers config ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    ldm_to_ours = _ldm_transformer_names(model)
    extras, unet_part = {}, {}
    for k, v in weights.items():
        rest = k[len(UNET_PREFIX):]
        m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.attentionpool2D\.(.+)", rest)
        if m and m.group(1) in ldm_to_ours:
            extras[f"pools.{ldm_to_ours[m.group(1)]}.{m.group(2)}"] = v
        elif rest.startswith("final."):
            extras["head." + rest[len("final."):]] = v
        else:
            unet_part[k] = v
    converted = convert_ldm_unet_checkpoint(unet_part, {**model.config, "layers_per_block": model.config["layers_per_block"]})
    state = {f"unet.{k}": v for k, v in converted.items()}
    state.update(extras)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    surplus = [k for k in state if k not in own]
    dropped = sorted({k for k in unet_part} - _consumed(unet_part, converted))
    if missing or surplus or dropped:
        raise CheckpointError(f"reference checkpoint does not map onto LD-ZNet: {_key_summary(missing, surplus + dropped)}")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"shape mismatch for {len(bad)} key(s), e.g. {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
    model.load_state_dict(state, strict=True)
    model.architecture = architecture_of(model.config["cross_attention_dim"])
    return model


def _consumed(ldm: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> set[str]:
    """The ldm keys whose storage appears in the converted dict, to catch keys the converter dropped silently."""
    seen = {v.data_ptr() for v in converted.values()}
    return {k for k, v in ldm.items() if v.data_ptr() in seen}


def _ldm_transformer_names(model: LDZNet) -> dict[str, int]:
    """ldm-layout prefixes (input_blocks.i.1, middle_block.1, output_blocks.i.1) of LD-ZNet's feature transformers."""
    cfg = model.config
    per = cfg["layers_per_block"]
    levels = len(cfg["down_block_types"])
    mapping = {}
    for k, index in enumerate(model.feature_layers):
        name = model.transformer_names[index]
        parts = name.split(".")
        if parts[0] == "mid_block":
            mapping["middle_block.1"] = k
        elif parts[0] == "down_blocks":
            level, j = int(parts[1]), int(parts[3])
            mapping[f"input_blocks.{1 + level * (per + 1) + j}.1"] = k
        else:
            level, j = int(parts[1]), int(parts[3])
            mapping[f"output_blocks.{level * (per + 1) + j}.1"] = k
    assert len(mapping) == len(model.feature_layers) and levels > 0
    return mapping
