"""Reading single-file checkpoints and detecting their architecture from the state dict alone."""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch

from .errors import CheckpointError
from .hosts.contract import native_resolution

ArchName = Literal["sd1", "sd2", "sdxl"]
UNET = "model.diffusion_model."
_CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint is: family, UNet input channels and its prediction type."""

    name: ArchName
    in_channels: int  # 4, or 9 for inpainting checkpoints
    prediction_type: Literal["epsilon", "v_prediction"]
    zero_snr: bool = False  # SD's schedule rescaled to zero terminal SNR (v-prediction SDXL finetunes mark it "ztsnr")
    edm: tuple[float, float, float] | None = None  # an EDM schedule's (σ_min, σ_max, σ_data): Playground v2.5, CosXL

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def resolution(self) -> int:
        """The side in pixels it was trained at (``hosts.contract.native_resolution``)."""
        return native_resolution(self.name == "sdxl", self.prediction_type == "v_prediction")


def check_file(path: Path, folder_hint: str = "") -> None:
    """A checkpoint file that exists; a folder is named as one, with ``folder_hint`` after it."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{folder_hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")


def read_pickled_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a pickled checkpoint (a bare one, or Lightning's ``state_dict`` entry), unpickled with
    ``weights_only=True`` only: a pickle that holds anything but tensors and plain containers is refused in
    textmask's own line (torch's advises weights_only=False, which would run the file's code)."""
    path = Path(path)
    check_file(path)
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol are two lines before ours
            warnings.simplefilter("ignore")
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (it would load {needs.group(1)})" if needs else ", or is not a checkpoint"
        raise CheckpointError(f"{path.name} holds more than tensors{what}; textmask reads only tensors from a pickle "
                              "and never runs its code: use a .safetensors file, or re-save the weights alone as a "
                              "state dict") from None
    except Exception as e:  # pickle raises many types for a corrupt file
        raise CheckpointError(f"cannot read {path.name} as a weights-only checkpoint ({type(e).__name__})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict of tensors")
    return dict(data)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file, or a pickle (.ckpt/.pt/.pth/.bin) with ``weights_only=True``."""
    path = Path(path)
    check_file(path, "; load a diffusers folder with TextMasker.from_pretrained (the CLI's --checkpoint takes either)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path.name} is not a valid safetensors file ({str(e).splitlines()[0]})") from None
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return read_pickled_state_dict(path)
    raise CheckpointError(f"unsupported checkpoint format '{path.suffix}'; use .safetensors (or .ckpt)")


def detect_architecture(
    state_dict: Mapping[str, torch.Tensor],
    prediction_type: str | None = None,
    context_dims: Mapping[int, ArchName] = _CONTEXT_DIMS,
) -> Architecture:
    """Identify SD1.x, SD2.x or SDXL (and inpainting variants) from key names and shapes."""
    first_conv = state_dict.get(UNET + "input_blocks.0.0.weight")
    if first_conv is None:
        raise CheckpointError("unknown architecture: no SD1/SD2/SDXL UNet weights (model.diffusion_model.*) found"
                              + _partial_file_hint(state_dict))
    widths = {int(v.shape[1]) for k, v in state_dict.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")}
    if len(widths) != 1:
        raise CheckpointError(f"unknown architecture: cross-attention context widths {sorted(widths) or 'none'}")
    dim = widths.pop()
    name = context_dims.get(dim)
    if name is None:
        hint = " (SDXL refiner checkpoints are not supported)" if dim == 1280 else ""
        raise CheckpointError(f"unknown architecture: cross-attention context width {dim}{hint}")
    if name == "sdxl" and UNET + "label_emb.0.0.weight" not in state_dict:
        raise CheckpointError("unknown architecture: 2048-wide context without SDXL's label embedding")
    edm = None  # the EDM schedules ComfyUI reads from these markers
    if "edm_mean" in state_dict:  # Playground v2.5: EDM, ε-parametrised
        edm, prediction_type = (0.002, 80.0, 0.5), prediction_type or "epsilon"
    elif "edm_vpred.sigma_max" in state_dict:  # CosXL: EDM v-prediction
        sigma_min = state_dict.get("edm_vpred.sigma_min")
        edm = (float(sigma_min) if sigma_min is not None else 0.002, float(state_dict["edm_vpred.sigma_max"]), 1.0)
        prediction_type = prediction_type or "v_prediction"
    in_channels = int(first_conv.shape[1])
    if in_channels not in (4, 9):
        raise CheckpointError(f"unsupported UNet with {in_channels} input channels (4, or 9 for inpainting)")
    if prediction_type is None:
        # SDXL v-pred finetunes carry a "v_pred" marker key; SD2 inpainting models are ε.
        v_pred = sd2_is_v_prediction(state_dict) if name == "sd2" and in_channels == 4 else "v_pred" in state_dict
        prediction_type = "v_prediction" if v_pred else "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"unknown prediction type {prediction_type!r}; use 'epsilon' or 'v_prediction'")
    return Architecture(name=name, in_channels=in_channels, prediction_type=prediction_type,
                        zero_snr="ztsnr" in state_dict, edm=edm)


def _partial_file_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'; this looks like a LoRA, ...' for files users often mistake for a checkpoint, else ''."""
    keys = list(state_dict)
    if any("lora" in k.lower() for k in keys):
        kind = "a LoRA"
    elif any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in keys):
        kind = "a VAE alone"
    elif any(k.startswith(("input_blocks.", "diffusion_model.input_blocks.", "down_blocks.")) for k in keys):
        kind = "a UNet alone"
    else:
        return ""
    return f"; this looks like {kind}, not a whole checkpoint (UNet, text encoder and VAE)"


def sd2_is_v_prediction(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether an SD2 checkpoint is the 768 px v-prediction kind, not the 512 px ε one (2.x-base), by ComfyUI's and
    Forge's test: the last transformer's first norm bias is spread out (std > 0.09) in v models only."""
    bias = state_dict.get(UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
    if bias is None or bias.is_meta:
        return True  # no values to read: SD2's flagship 768-v
    return float(bias.float().std(unbiased=False)) > 0.09
