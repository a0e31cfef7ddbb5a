"""Loading diffusers hosts offline: original-layout single files, diffusers folders, and built pipelines.

Component configs ship in ``textmask/configs`` and the CLIP tokenizer is built from the BPE file in
``textmask/assets``, so nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import options
from ..checkpoint import detect_architecture, read_state_dict
from ..errors import CheckpointError, TextMaskError
from ..schedule import EDMSchedule, ddpm_alphas_cumprod
from ..tokens import EOS
from .diffusers import CONFIGS, DiffusersHost, quiet_diffusers


def no_ddpm_schedule(what: str) -> CheckpointError:
    """The one-line refusal for a schedule that is neither DDPM's ᾱ_t nor EDM's σ (flow matching)."""
    return CheckpointError(f"{what} has neither a DDPM noise schedule (alphas_cumprod) nor an EDM one (sigma_data), "
                           "which textmask's diffusers host needs")


def edm_schedule(class_name: str, config: Any) -> EDMSchedule | None:
    """The EDM schedule of a diffusers scheduler (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) from its class
    name and config mapping, or None for any other."""
    if "EDM" not in class_name or config.get("sigma_data") is None:
        return None
    return EDMSchedule(float(config.get("sigma_min", 0.002)), float(config.get("sigma_max", 80.0)),
                       float(config["sigma_data"]))


def _folder_schedule(directory: Path) -> tuple[torch.Tensor | None, EDMSchedule | None, str]:
    """(ᾱ_t, EDM schedule, prediction type) of the training schedule a diffusers folder's scheduler config describes
    (betas, zero-SNR rescaling, EDM's σ), read through DDPMScheduler whatever DDPM-family sampler the folder names."""
    import json

    from diffusers import DDPMScheduler

    config = directory / "scheduler" / "scheduler_config.json"
    try:
        data = json.loads(config.read_text())
        name = data.get("_class_name", "")
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not JSON, or not a JSON object
        raise CheckpointError(f"cannot read {config}: {str(e).splitlines()[0]}") from None
    if "EDM" in name:
        edm = edm_schedule(name, data)
        if edm is None:
            raise CheckpointError(f"cannot read {config}: {name} without sigma_data")
        return None, edm, data.get("prediction_type", "epsilon")
    if "FlowMatch" in name:
        raise no_ddpm_schedule(f"{directory.name}'s {name}")
    try:
        with quiet_diffusers():
            sched = DDPMScheduler.from_pretrained(directory, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:  # e.g. an unknown beta_schedule
        raise CheckpointError(f"cannot read {config}: {str(e).splitlines()[0]}") from None
    return sched.alphas_cumprod, None, sched.config.prediction_type


def config_family(config: str | Path) -> dict[int, str]:
    """{context width: family} for a diffusers-format config folder that overrides the shipped ones."""
    import json

    config = Path(config)
    try:
        unet = json.loads((config / "unet" / "config.json").read_text())
        text = json.loads((config / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"config folder {config} lacks a readable unet/ or text_encoder/ config ({e})") from None
    if (config / "text_encoder_2").is_dir():
        family = "sdxl"
    else:
        family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    return {int(unet["cross_attention_dim"]): family}


def upcast_sdxl_vae(vae: nn.Module, text_encoder_2: nn.Module | None) -> nn.Module:
    """A VAE this host loaded, in float32 where it is SDXL's in float16 and its config asks (``force_upcast``)."""
    # SDXL's VAE overflows in float16 (NaN latents); diffusers' SDXL pipelines run it in float32 for the same reason
    if text_encoder_2 is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return vae.float()
    return vae


# The keywords the loaders pass on to each host besides the model (checked here, so a typo is one line, not ignored).
UNET_HOST_OPTIONS = ("resolution", "show_progress", "prediction_type", "pad_ids", "alphas_cumprod", "edm", "tokenizer")
DIT_HOST_OPTIONS = ("resolution", "show_progress", "max_sequence_length")
MAX_T5_TOKENS = 512  # the longest T5 context SD3's and Flux's pipelines take


def host_options(kwargs: dict, allowed: tuple[str, ...]) -> dict:
    """``kwargs`` for a host, checked: an unknown keyword is one line naming those taken, and the working resolution
    is bounded as every face bounds it."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TextMaskError(f"unknown option {', '.join(unknown)} for this model; it takes {', '.join(allowed)}")
    if "resolution" in kwargs:
        kwargs["resolution"] = options.resolution(kwargs["resolution"])
    if kwargs.get("max_sequence_length") is not None:
        kwargs["max_sequence_length"] = options.count("max_sequence_length", kwargs["max_sequence_length"],
                                                      MAX_T5_TOKENS)
    return kwargs


def from_pipe(pipe: Any, **kwargs):
    """Wrap an already-built diffusers pipeline (its modules are shared, never modified): a ``DiffusersHost`` for
    SD1.x, SD2.x and SDXL, a ``DiffusersDiTHost`` for SD3 and Flux."""
    from .diffusers_dit import DiffusersDiTHost, is_mmdit_pipeline

    if is_mmdit_pipeline(pipe):
        return DiffusersDiTHost(pipe, **host_options(kwargs, DIT_HOST_OPTIONS))
    sched = getattr(pipe, "scheduler", None)
    alphas = getattr(sched, "alphas_cumprod", None)
    edm = edm_schedule(type(sched).__name__, getattr(sched, "config", {})) if sched is not None else None
    if sched is not None and alphas is None and edm is None:  # flow-matching schedulers have neither
        raise no_ddpm_schedule(f"this pipeline's {type(sched).__name__}")
    kwargs = host_options(kwargs, UNET_HOST_OPTIONS)
    pred = kwargs.pop("prediction_type", None) or getattr(getattr(sched, "config", None), "prediction_type", "epsilon")
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        raise CheckpointError(f"{type(pipe).__name__} runs a transformer textmask does not know; it reads SD1.x, "
                              "SD2.x, SDXL, SD3 and Flux pipelines")
    return DiffusersHost(
        getattr(pipe, "unet", None),
        getattr(pipe, "vae", None),
        getattr(pipe, "text_encoder", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer=getattr(pipe, "tokenizer", None),
        alphas_cumprod=None if edm is not None else alphas,
        edm=edm,
        prediction_type=pred,
        **kwargs,
    )


def from_pretrained(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    **kwargs) -> DiffusersHost:
    """Load from a diffusers-format folder (unet/, vae/, text_encoder/[, text_encoder_2/], scheduler/), or an SD3 or
    Flux one (transformer/, ``diffusers_dit.from_folder``)."""
    options.device(device)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    if (directory / "transformer").is_dir() and not (directory / "unet").is_dir():
        from .diffusers_dit import from_folder

        return from_folder(directory, device=device, dtype=dtype, **host_options(kwargs, DIT_HOST_OPTIONS))
    if not (directory / "unet").is_dir():
        raise CheckpointError(f"{directory} is not a diffusers model folder (no unet/ or transformer/ inside)")
    kwargs = host_options(kwargs, UNET_HOST_OPTIONS)
    opts = dict(local_files_only=True, torch_dtype=dtype)
    try:
        with quiet_diffusers():
            unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", **opts)
            vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", **opts)
            te = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", **opts)
            te2 = None
            if (directory / "text_encoder_2").is_dir():
                te2 = CLIPTextModelWithProjection.from_pretrained(directory, subfolder="text_encoder_2", **opts)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load diffusers folder {directory}: {str(e).splitlines()[0]}") from None
    pred = kwargs.pop("prediction_type", None)
    if (directory / "scheduler" / "scheduler_config.json").is_file():
        alphas, edm, folder_pred = _folder_schedule(directory)
        pred = pred or folder_pred
        kwargs.setdefault("alphas_cumprod", alphas)
        kwargs.setdefault("edm", edm)
    host = DiffusersHost(unet, upcast_sdxl_vae(vae, te2), te, text_encoder_2=te2, prediction_type=pred or "epsilon", **kwargs)
    return host.to(device)


def from_single_file(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    components: str | Path | None = None,
    **kwargs,
) -> DiffusersHost:
    """Load an original-layout SD1/SD2/SDXL checkpoint (``config`` overrides the shipped component configs), or an
    SD3/Flux one (``diffusers_dit_single_file``; ``components``: a diffusers folder for what the file lacks)."""
    options.device(device)
    from .diffusers_dit_single_file import dit_family

    state = read_state_dict(path)
    if dit_family(state) is not None:
        from .diffusers_dit import DiffusersDiTHost
        from .diffusers_dit_single_file import from_state_dict as dit_from_state_dict

        kwargs = host_options(kwargs, DIT_HOST_OPTIONS)
        pipe = dit_from_state_dict(state, components=components, dtype=dtype)
        return DiffusersDiTHost(pipe.to(device), **kwargs)
    if components is not None:
        raise CheckpointError("components= (--components) is for SD3 and Flux single files, which may lack parts; "
                              "this SD1/SD2/SDXL checkpoint holds every component itself")
    return from_state_dict(state, device=device, dtype=dtype, config=config, prediction_type=prediction_type, **kwargs)


def from_state_dict(
    state: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    **kwargs,
) -> DiffusersHost:
    """Build from an original-layout state dict (see ``from_single_file``)."""
    kwargs = host_options(kwargs, UNET_HOST_OPTIONS)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if config is not None:
        arch = detect_architecture(state, prediction_type, context_dims=config_family(config))
    else:
        arch = detect_architecture(state, prediction_type)
    config_dir = str(Path(config) if config else CONFIGS / arch.name)
    opts = dict(config=config_dir, local_files_only=True, torch_dtype=dtype)
    try:
        with quiet_diffusers():
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", in_channels=arch.in_channels, **opts)
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", **opts)
            te = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state, subfolder="text_encoder", config=config_dir, torch_dtype=dtype, local_files_only=True
            )
            te2 = None
            if arch.name == "sdxl":
                te2 = create_diffusers_clip_model_from_ldm(
                    CLIPTextModelWithProjection,
                    state,
                    subfolder="text_encoder_2",
                    config=config_dir,
                    torch_dtype=dtype,
                    local_files_only=True,
                )
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"checkpoint does not match the {arch.name} layout: {str(e).splitlines()[0][:200]}") from None
    pad = (EOS, 0) if arch.name == "sdxl" else ((0,) if arch.name == "sd2" else (EOS,))
    if arch.zero_snr:
        kwargs.setdefault("alphas_cumprod", ddpm_alphas_cumprod(zero_snr=True))
    if arch.edm is not None:
        kwargs.setdefault("edm", EDMSchedule(*arch.edm))
    if "edm_mean" in state and "edm_std" in state:  # Playground v2.5: per-channel latent statistics, scale 0.5
        vae.register_to_config(scaling_factor=0.5, latents_mean=state["edm_mean"].flatten().tolist(),
                               latents_std=state["edm_std"].flatten().tolist())
    if config is None:  # the shipped SD2 config says 768 px, which SD2's ε models (2.x-base, inpainting) are not
        kwargs.setdefault("resolution", arch.resolution)
    host = DiffusersHost(unet, upcast_sdxl_vae(vae, te2), te, text_encoder_2=te2, prediction_type=arch.prediction_type,
                         pad_ids=pad, **kwargs)
    host.architecture = arch
    return host.to(device)

