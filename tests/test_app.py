"""The web app in a real headless browser (Debian's chromium through selenium): upload an image, type a
prompt, click, and see a mask appear; plus the app's output files without a browser."""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textmask.errors import TextMaskError


@pytest.fixture(scope="module")
def shapes_masker():
    from textmask.demo.model import load_demo_masker

    return load_demo_masker()


def scene_png(path: Path) -> Path:
    from textmask.demo.scenes import make_scene, split_seeds

    scene = make_scene(split_seeds("test", 1)[0])
    Image.fromarray((scene.image * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def test_outputs_without_browser(shapes_masker, tmp_path):
    from textmask.app import make_outputs

    img = scene_png(tmp_path / "scene.png")
    masks, overlays, cutouts = make_outputs(shapes_masker, [str(img), str(img)], "circle | square", "noise-diff",
                                            True, "auto", False, False, root=tmp_path)
    assert len(masks) == len(overlays) == len(cutouts) == 2
    m, o, c = Image.open(masks[0]), Image.open(overlays[0]), Image.open(cutouts[0])
    assert m.size == o.size == c.size == Image.open(img).size
    assert m.mode == "L" and o.mode == "RGB" and c.mode == "RGBA"
    assert np.array_equal(np.asarray(c)[..., 3], np.asarray(m))  # the cutout's alpha is the mask
    with pytest.raises(TextMaskError, match="type what to mask"):
        make_outputs(shapes_masker, [str(img)], " ", "attention", True, "auto", False, False)
    # An upload's name may be as long as the file system allows: the outputs' names, longer by what they add, fit it
    long = scene_png(tmp_path / ("字" * 83 + ".png"))  # 253 bytes
    masks, overlays, cutouts = make_outputs(shapes_masker, [str(long)], "circle", "noise-diff", True, "auto", False,
                                            False, root=tmp_path)
    for path in (masks[0], overlays[0], cutouts[0]):
        assert Path(path).is_file() and len(os.fsencode(Path(path).name)) <= 255 and "字" * 20 in path


@pytest.mark.parametrize("method, prompt", [("refer", "the circle on the left"), ("named segments", "circle | square")])
def test_refer_and_named_segments_in_the_app(shapes_masker, tmp_path, method, prompt):
    from textmask.app import build_app, make_outputs
    from textmask.faces import mask_any
    from textmask.images import load_image

    img = scene_png(tmp_path / "scene.png")
    masks, _, _ = make_outputs(shapes_masker, [str(img)], prompt, method, True, "auto", False, False, root=tmp_path)
    expected = mask_any(shapes_masker, load_image(img), prompt, method=method).masks[0].numpy()
    assert np.array_equal(np.asarray(Image.open(masks[0])), (expected * 255 + 0.5).astype(np.uint8))
    app = build_app(shapes_masker)
    dropdown = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "method")
    assert method in [c[0] if isinstance(c, tuple) else c for c in dropdown.choices]
    app.textmask_cleanup()


def test_a_names_stuff_or_thing_kind_is_ovdiffs_and_named_segments_read_the_name(shapes_masker, tmp_path):
    """"yellow triangle:stuff" means yellow triangle to named segments (the kind is OVDiff's), in the selection and in the other
    names alike, and a kind with no name is one line."""
    from textmask.faces import mask_any
    from textmask.images import load_image

    image = load_image(scene_png(tmp_path / "scene.png"))
    plain = mask_any(shapes_masker, image, "yellow triangle | blue square", method="named segments", names="green star")
    kinds = mask_any(shapes_masker, image, "yellow triangle:stuff | blue square:thing", method="named segments",
                     names="green star:thing, yellow triangle")
    assert plain.masks.any() and torch.equal(kinds.masks, plain.masks) and list(kinds.terms) == list(plain.terms)
    with pytest.raises(TextMaskError, match="no empty names"):
        mask_any(shapes_masker, image, ":stuff", method="named segments")


APP_BAD = {
    "no images": (lambda img: [], "circle", {}, "upload at least one image"),
    "empty prompt": (lambda img: [img], " ", {}, "type what to mask"),
    "bad syntax": (lambda img: [img], "circle AND", {}, "syntax"),
    "bad threshold": (lambda img: [img], "circle", {"threshold": "2"}, "threshold"),
    "not an image": (lambda img: [img.with_suffix(".txt")], "circle", {}, "cannot read image"),
    "unknown method": (lambda img: [img], "circle", {"method": "magic"}, "unknown method"),
    "an upload without its file": (lambda img: [img, None], "circle", {}, "upload at least one image"),
    "prompt not text": (lambda img: [img], 5, {}, "type what to mask"),
    "refine as text": (lambda img: [img], "circle", {"refine": "no"}, "refine must be True or False"),
    "invert as text, named segments": (lambda img: [img], "circle", {"method": "named segments", "invert": "yes"},
                                       "invert must be True or False"),
    "a folder as an image": (lambda img: [img.parent], "circle", {}, "is a folder; pass an image file"),
    "prompt not UTF-8": (lambda img: [img], "circle \udcff", {}, "not UTF-8"),
}


@pytest.mark.parametrize("case", list(APP_BAD))
def test_bad_requests_are_one_line_and_leave_no_files(shapes_masker, tmp_path, case):
    from textmask.app import make_outputs

    img = scene_png(tmp_path / "scene.png")
    img.with_suffix(".txt").write_text("not an image")
    paths, prompt, extra, phrase = APP_BAD[case]
    kw = {**dict(method="attention", refine=True, threshold="auto", soft=False, invert=False), **extra}
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(TextMaskError, match=phrase) as e:
        make_outputs(shapes_masker, [p if p is None else str(p) for p in paths(img)], prompt, kw["method"],
                     kw["refine"], kw["threshold"], kw["soft"], kw["invert"], root=root)
    assert "\n" not in str(e.value)
    assert list(root.iterdir()) == []  # the failed request's folder is gone


def test_an_unexpected_failure_is_one_line_in_the_page(shapes_masker, monkeypatch):
    """A full disk or another system failure reaches the page as one line, as the CLI prints it, not Gradio's
    generic "Error"."""
    gr = pytest.importorskip("gradio")
    import textmask.app as app_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/tmp/textmask-app-x/000-a-mask.png")

    monkeypatch.setattr(app_module, "make_outputs", full)
    app = app_module.build_app(shapes_masker)
    run = next(f.fn for f in (app.fns.values() if isinstance(app.fns, dict) else app.fns) if f.fn.__name__ == "run")
    with pytest.raises(gr.Error) as e:
        run(["a.png"], "circle", "attention", True, "auto", False, False, None)
    assert e.value.message == "No space left on device: /tmp/textmask-app-x/000-a-mask.png"
    app.textmask_cleanup()


def test_the_app_keeps_its_files_in_one_folder_it_removes(shapes_masker):
    pytest.importorskip("gradio")
    from textmask.app import build_app

    app = build_app(shapes_masker)
    root = app.textmask_root
    assert root.is_dir() and root.name.startswith("textmask-app-")
    app.textmask_cleanup()  # registered with atexit: what happens when the app's process ends
    assert not root.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_in_headless_chromium(shapes_masker, tmp_path):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from textmask.app import build_app

    port = free_port()
    app = build_app(shapes_masker)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#images input[type=file]")))
        upload.send_keys(str(scene_png(tmp_path / "scene.png")))
        wait.until(lambda b: "scene" in b.find_element(By.ID, "images").text)
        box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        box.clear()
        box.send_keys("circle | square | star | triangle")
        browser.find_element(By.ID, "run").click()
        mask_img = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#masks img")))
        assert mask_img.get_attribute("src")
        time.sleep(0.5)
        shot = tmp_path / "app.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert len(browser.find_elements(By.CSS_SELECTOR, "#cutouts img")) >= 1
    finally:
        browser.quit()
        app.close()
