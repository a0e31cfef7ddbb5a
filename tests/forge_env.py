"""A real Forge backend for tests: $FORGE_ROOT, a stable-diffusion-webui-forge checkout (its 2024-08+ ``backend``).

Tiny SD1.5-, SDXL- and Flux-shaped engines are built from Forge's own classes: ``StableDiffusion``,
``StableDiffusionXL`` and ``Flux`` over an ``IntegratedUNet2DConditionModel`` or ``IntegratedFluxTransformer2DModel``,
``IntegratedCLIP``, ``IntegratedT5`` and ``IntegratedAutoencoderKL`` built from small configs, on the CPU
(``--always-cpu``). Forge also needs ``gguf`` importable. The webui modules its text engine
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
    _forge_pinned_time_shift()
    guess = sys.modules.setdefault("huggingface_guess", types.ModuleType("huggingface_guess"))
    guess.model_list = types.ModuleType("huggingface_guess.model_list")
    guess.model_list.__getattr__ = lambda name: object  # the engines only name their matched guesses
    sys.modules["huggingface_guess.model_list"] = guess.model_list


FLUX = dict(in_channels=4, vec_in_dim=32, context_in_dim=32, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=1,
            depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=True)
T5 = dict(num_layers=1, d_model=32, d_ff=64, dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, num_heads=2,
          model_type="t5", vocab_size=32128)


def _forge_pinned_time_shift() -> None:
    """Forge's Flux predictor calls ``FlowMatchEulerDiscreteScheduler.time_shift(None, mu, 1.0, t)``, as the
    diffusers Forge pins allows; newer diffusers read ``self.config`` there. Give Forge's module the pinned form."""
    import math

    from backend.modules import k_prediction

    class PinnedFlowMatch:
        @staticmethod
        def time_shift(_self, mu, sigma, t):
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    k_prediction.FlowMatchEulerDiscreteScheduler = PinnedFlowMatch


def text_encoder():
    """A tiny IntegratedCLIP, as Forge's loader wraps a transformers CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.clip import IntegratedCLIP

    text = IntegratedCLIP(CLIPTextModel, CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407), add_text_projection=True).eval()
    if not hasattr(text.transformer, "text_model"):  # transformers 5 flattened CLIPTextModel; Forge pins 4.x
        object.__setattr__(text.transformer, "text_model", text.transformer)  # an alias, not a submodule
    # Layer norms as a trained CLIP has them: at their initial bias of 0 every token's output has mean 0, and Forge's
    # emphasis normalisation, which divides by the conditioning's mean, turns some prompts to NaN.
    for module in text.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.1)
            torch.nn.init.normal_(module.bias, 0.0, 0.1)
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


def _on_cpu(model):
    model.storage_dtype = model.computation_dtype = torch.float32
    from backend import memory_management

    model.load_device = model.offload_device = model.initial_device = memory_management.cpu
    return model


@torch.no_grad()
def make_flux_engine(seed: int = 0, distilled: bool = True):
    """A tiny Forge Flux engine (Forge's own ``Flux`` over ``IntegratedFluxTransformer2DModel``), seeded: dev-like
    (guidance-distilled, shifted schedule) or schnell-like."""
    from backend.diffusion_engine.flux import Flux
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from textmask.tokenizer import clip_tokenizer, t5_tokenizer

    torch.manual_seed(seed)
    transformer = _on_cpu(IntegratedFluxTransformer2DModel(**dict(FLUX, guidance_embed=distilled)).eval())
    vae = IntegratedAutoencoderKL(block_out_channels=(32, 32, 32, 32), norm_num_groups=32,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4).eval()
    repo = "black-forest-labs/FLUX.1-dev" if distilled else "black-forest-labs/FLUX.1-schnell"
    guess = types.SimpleNamespace(inpaint_model=lambda: False, huggingface_repo=repo)
    t5 = IntegratedT5(T5).eval()
    for param in t5.parameters():  # Forge's T5 leaves its norms uninitialised (its loader fills every weight)
        torch.nn.init.normal_(param, std=0.1) if param.dim() > 1 else param.fill_(1.0)
    components = dict(transformer=transformer, text_encoder=text_encoder(), tokenizer=clip_tokenizer(),
                      text_encoder_2=t5, tokenizer_2=t5_tokenizer(), vae=vae)
    return Flux(guess, components)
