"""The extension in a real webui (AUTOMATIC1111 or Forge), started headless and driven through its HTTP API.

Opt-in, against your own install: ``WEBUI_ROOT`` (A1111) or ``FORGE_ROOT`` (Forge), ``WEBUI_PYTHON`` (the python of
the webui's venv) and ``TEXTMASK_WEBUI_CHECKPOINT`` (an SD1.x .safetensors). The webui starts with a fresh
``--data-dir`` holding a copy of this extension in ``extensions/`` (so its launcher runs ``install.py``, as after
"Install from URL") and the checkpoint, so the install itself is untouched. On the CPU it takes minutes: every mask
runs a UNet forward at 512 px. See docs/development.md.
"""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WEBUI = os.environ.get("FORGE_ROOT") or os.environ.get("WEBUI_ROOT")
FORGE = bool(os.environ.get("FORGE_ROOT"))
PYTHON = os.environ.get("WEBUI_PYTHON")
CHECKPOINT = os.environ.get("TEXTMASK_WEBUI_CHECKPOINT")
SIZE = (200, 136)  # (width, height): multiples of 8, not of 64, and not square

pytestmark = pytest.mark.skipif(not (WEBUI and PYTHON and CHECKPOINT),
                                reason="set WEBUI_ROOT or FORGE_ROOT, WEBUI_PYTHON and TEXTMASK_WEBUI_CHECKPOINT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webui:
    def __init__(self, data: Path):
        self.port, self.data = free_port(), data
        flags = ["--always-cpu"] if FORGE else ["--use-cpu", "all", "--no-half", "--precision", "full"]
        args = [PYTHON, "launch.py", "--data-dir", str(data), "--api", "--nowebui", "--port", str(self.port),
                "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check",
                "--no-download-sd-model", "--ckpt", str(data / "models" / "Stable-diffusion" / Path(CHECKPOINT).name),
                *flags]
        self.log = open(data / "webui.log", "w")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS")}
        self.proc = subprocess.Popen(args, cwd=WEBUI, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 1800
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the webui exited: {self.tail()}")
            try:
                self.get("/sdapi/v1/sd-models")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    raise RuntimeError(f"the webui did not start: {self.tail()}")
                time.sleep(3)

    def tail(self) -> str:
        self.log.flush()
        return (self.data / "webui.log").read_text()[-4000:]

    def request(self, path: str, body=None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    data = tmp_path_factory.mktemp("webui-data")
    extension = data / "extensions" / "textmask"
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in names:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (extension / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, extension / name)
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Stable-diffusion" / Path(CHECKPOINT).name).symlink_to(Path(CHECKPOINT).resolve())
    server = Webui(data)
    try:
        yield server
    finally:
        server.close()


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1])))


def scene() -> Image.Image:
    img = np.full((SIZE[1], SIZE[0], 3), 180, np.uint8)
    img[40:100, 20:90] = (200, 30, 30)  # a red block
    img[30:120, 130:180] = (30, 60, 200)  # a blue one
    return Image.fromarray(img)


def painted() -> Image.Image:
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[:, :60] = 255
    return Image.fromarray(mask)


ARGS = dict(prompt="red block", negative="", method="attention", ldznet="", refine=True, threshold="auto", blur=0,
            grow=0, invert=False, soft=False, show=True, names="", support=2)


def img2img(**extra) -> dict:
    body = dict(init_images=[b64(scene())], prompt="a photo", steps=1, seed=1, width=SIZE[0], height=SIZE[1],
                denoising_strength=0.5, sampler_name="Euler", cfg_scale=5)
    body.update(extra)
    return body


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), np.float32) / 255


def test_scripts_are_listed(webui):
    scripts = webui.get("/sdapi/v1/scripts")
    assert "text mask" in scripts["img2img"] and "text mask (inpaint)" in scripts["img2img"]


PLAIN = dict(prompt="a photo of a red block", steps=2, seed=1, width=128, height=96, cfg_scale=5, sampler_name="Euler")


def test_masks_at_the_init_images_size_and_the_model_unchanged(webui):
    # txt2img, which is seeded end to end: img2img samples the VAE's posterior with the unseeded global RNG
    status, plain = webui.request("/sdapi/v1/txt2img", PLAIN)
    assert status == 200, plain
    runs = {}
    for method in ("attention", "refer", "named segments"):
        args = dict(ARGS, method=method, prompt="the red block on the left" if method == "refer" else "red block",
                    names="blue block")
        status, out = webui.request("/sdapi/v1/img2img", img2img(script_name="Text Mask",
                                                                 script_args=list(args.values())))
        assert status == 200, (method, out, webui.tail())
        result, mask = unb64(out["images"][0]), unb64(out["images"][1])
        assert result.size == SIZE and mask.size == SIZE and mask.mode == "L"
        runs[method] = as_array(mask)
    text_mask = runs["attention"]
    for mode in ("replace", "add", "subtract"):
        extra = {"mask": b64(painted())} if mode != "replace" else {}
        status, out = webui.request("/sdapi/v1/img2img", img2img(
            alwayson_scripts={"text mask (inpaint)": {"args": [True, mode, *ARGS.values()]}}, **extra))
        assert status == 200, (mode, out, webui.tail())
        combined = as_array(unb64(out["images"][1]))
        assert unb64(out["images"][0]).size == SIZE and combined.shape == (SIZE[1], SIZE[0])
        paint = as_array(painted())
        expected = {"replace": text_mask, "add": np.maximum(text_mask, paint),
                    "subtract": paint * (1 - text_mask)}[mode]
        assert np.abs(combined - expected).max() <= 1 / 255 + 1e-6, mode
    status, again = webui.request("/sdapi/v1/txt2img", PLAIN)
    assert status == 200
    assert np.array_equal(np.asarray(unb64(plain["images"][0])), np.asarray(unb64(again["images"][0])))


@pytest.mark.parametrize("prompt", ["red block AND (", ""])
def test_a_bad_mask_prompt_is_reported_and_nothing_is_generated(webui, prompt):
    args = list(dict(ARGS, prompt=prompt).values())
    for body in (img2img(script_name="Text Mask", script_args=args),
                 img2img(alwayson_scripts={"text mask (inpaint)": {"args": [True, "replace", *args]}})):
        status, out = webui.request("/sdapi/v1/img2img", body)
        assert status >= 400 and not out.get("images"), out
        message = json.dumps(out)
        assert ("syntax" in message.lower()) if prompt else ("type what to mask" in message), message
