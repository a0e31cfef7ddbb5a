"""A real Forge backend for tests: $FORGE_ROOT, a stable-diffusion-webui-forge checkout (its 2024-08+ ``backend``).

Tiny SD1.5- and SDXL-shaped engines are built from Forge's own classes: ``StableDiffusion`` and ``StableDiffusionXL``
over an ``IntegratedUNet2DConditionModel``, ``IntegratedCLIP`` and ``IntegratedAutoencoderKL`` built from small
configs, on the CPU (``--always-cpu``). Forge also needs ``gguf`` importable. The webui modules its text engine
reads (``modules.shared.opts``) and ``huggingface_guess`` come from small stand-ins.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

SD15_UNET = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 num_head_channels=8, use_spatial_transformer=True, transformer_depth=[1, 1],
                 transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=32,
                 use_linear_in_transformer=False)
SDXL_UNET = dict(SD15_UNET, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2], transformer_depth=[0, 1, 1],
                 transformer_depth_output=[0, 0, 1, 1, 1, 1], use_linear_in_transformer=True, context_dim=64,
                 num_classes="sequential", adm_in_channels=32 + 6 * 256, num_head_channels=16)


def forge_root() -> Path | None:
    root = os.environ.get("FORGE_ROOT")
    return Path(root) if root and (Path(root) / "backend" / "loader.py").exists() else None


def setup() -> None:
    """Make Forge's ``backend`` importable on the CPU, with the webui bits it reads stood in."""
    root = forge_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "--always-cpu" not in sys.argv:
        sys.argv.append("--always-cpu")  # backend.args parses the command line on import
    shared = sys.modules.get("modules.shared")
    if shared is None:
        import importlib

        try:
            shared = importlib.import_module("modules.shared")
        except ImportError:
            modules = sys.modules.setdefault("modules", types.ModuleType("modules"))
            shared = types.ModuleType("modules.shared")
            shared.state = types.SimpleNamespace(interrupted=False, skipped=False)
            modules.shared = shared
            sys.modules["modules.shared"] = shared
    shared.opts = types.SimpleNamespace(emphasis="Original", sdxl_crop_left=0, sdxl_crop_top=0)
    guess = sys.modules.setdefault("huggingface_guess", types.ModuleType("huggingface_guess"))
    guess.model_list = types.ModuleType("huggingface_guess.model_list")
    guess.model_list.__getattr__ = lambda name: object  # the engines only name their matched guesses
    sys.modules["huggingface_guess.model_list"] = guess.model_list


def text_encoder():
    """A tiny IntegratedCLIP, as Forge's loader wraps a transformers CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.clip import IntegratedCLIP

    text = IntegratedCLIP(CLIPTextModel, CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407), add_text_projection=True).eval()
    if not hasattr(text.transformer, "text_model"):  # transformers 5 flattened CLIPTextModel; Forge pins 4.x
        object.__setattr__(text.transformer, "text_model", text.transformer)  # an alias, not a submodule
    return text


@torch.no_grad()
def make_engine(kind: str = "sd15", seed: int = 0, in_channels: int = 4):
    """A tiny Forge SD1.5 or SDXL engine (Forge's own ``StableDiffusion`` / ``StableDiffusionXL``), seeded."""
    from diffusers import DDPMScheduler

    from backend import memory_management
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from textmask.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    config = SD15_UNET if kind == "sd15" else SDXL_UNET
    unet = IntegratedUNet2DConditionModel(**dict(config, in_channels=in_channels)).eval()
    cpu = memory_management.cpu
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.offload_device = unet.initial_device = cpu
    vae = IntegratedAutoencoderKL(block_out_channels=(32, 32, 32, 32), norm_num_groups=32,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4).eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    guess = types.SimpleNamespace(inpaint_model=lambda: in_channels == 9)
    components = dict(unet=unet, text_encoder=text_encoder(), tokenizer=clip_tokenizer(), vae=vae, scheduler=scheduler)
    if kind == "sd15":
        from backend.diffusion_engine.sd15 import StableDiffusion

        return StableDiffusion(guess, components)
    from backend.diffusion_engine.sdxl import StableDiffusionXL

    components.update(text_encoder_2=text_encoder(), tokenizer_2=clip_tokenizer())
    return StableDiffusionXL(guess, components)
