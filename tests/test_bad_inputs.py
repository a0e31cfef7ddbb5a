"""Bad input, as a new user types it: every case ends in one line (no traceback), the right exit code or exception,
and exactly the files that should exist (no partial output, no staging, no stale file). On the bundled Shapes model.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textmask.cli import main
from textmask.demo.model import MODEL_DIR
from textmask.errors import TextMaskError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--checkpoint", str(MODEL_DIR)]


def write_image(path: Path, w: int = 48, h: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def files(root: Path) -> set[str]:
    """Everything under ``root`` but textmask's CLIP vocabulary, which the first tokenisation caches."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if "clip-bpe" not in p.parts}


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder with an image, a folder of images, an existing file and folder; the cache inside it."""
    monkeypatch.setenv("TEXTMASK_CACHE", str(tmp_path / "cache"))
    write_image(tmp_path / "photo.png")
    write_image(tmp_path / "frames" / "a.png", seed=1)
    write_image(tmp_path / "frames" / "b.png", seed=2)
    (tmp_path / "file.txt").write_text("not an image")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.png").mkdir()  # a folder named like a mask file
    (tmp_path / "cache").mkdir()
    return tmp_path


def run(place: Path, capsys, argv: list[str]) -> tuple[int, str]:
    code = main([a.replace("{t}", str(place)) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if not l.startswith("textmask: note:")]
    return code, "\n".join(lines)


MASK = ["mask", "{t}/photo.png", "red circle", "--out", "{t}/m.png", *MODEL]
SEGMENTS = ["segments", "{t}/photo.png", "--out", "{t}/seg", *MODEL]
REFER = ["refer", "{t}/photo.png", "the circle on the left", "--out", "{t}/r.png", *MODEL]
OVDIFF = ["ovdiff", "{t}/photo.png", "--classes", "red circle", "--out", "{t}/ov", "--images", "1", "--steps", "1",
          *MODEL]
PROTOS = ["prototypes", "build", "red circle", "--images", "1", "--steps", "1", *MODEL]
NOT_NUMBERS = ["nan", "inf", "-inf", "abc", ""]

# (command, flag, values that must be refused with a line naming the option)
NUMERIC = [
    (MASK, "--blur", [*NOT_NUMBERS, "-1", "1e9"]),
    (MASK, "--grow", [*NOT_NUMBERS, "1e6", "-1e6"]),
    (MASK, "--timestep", [*NOT_NUMBERS, "-1", "1000", "5000", "2.5", "9" * 400]),
    (MASK, "--seed", [*NOT_NUMBERS, "1.5"]),
    (MASK, "--resolution", [*NOT_NUMBERS, "-64", "0.5", "8", "100000"]),
    (MASK, "--threshold", ["nan", "2", "-0.1", "abc"]),
    (MASK, "--min-presence", [*NOT_NUMBERS, "-0.1", "1.5"]),
    (SEGMENTS, "--tau", [*NOT_NUMBERS, "0", "-1", "1e9"]),
    (SEGMENTS, "--cut", [*NOT_NUMBERS, "0", "-1", "2.5"]),
    (SEGMENTS, "--timestep", ["5000", "-1", "nan"]),
    (SEGMENTS, "--resolution", ["100000", "0.5"]),
    (REFER, "--timestep", ["5000", "-3", "inf", "9" * 400]),
    (REFER, "--alpha", ["nan", "2", "-1"]),
    (REFER, "--tau", ["nan", "0"]),
    (OVDIFF, "--cfg", ["nan", "inf", "-1", "1e9"]),
    (OVDIFF, "--images", ["0", "-1", "nan", "1e9"]),
    (OVDIFF, "--steps", ["0", "nan", "100000"]),
    (PROTOS, "--cfg", ["nan"]),
    (PROTOS, "--resolution", ["100000"]),
]
NUMERIC_CASES = [(cmd, flag, v) for cmd, flag, values in NUMERIC for v in values]


def with_option(cmd: list[str], flag: str, value: str) -> list[str]:
    return [*cmd, f"{flag}={value}"]  # "=" keeps "-1" and "" attached to the flag


@pytest.mark.parametrize("cmd, flag, value", NUMERIC_CASES,
                         ids=[f"{c[0]}{f}={v if len(v) < 20 else f'{len(v)}-digits'}" if v else f"{c[0]}{f}=empty"
                              for c, f, v in NUMERIC_CASES])
def test_numbers_out_of_bounds_are_one_line_before_any_work(place, capsys, cmd, flag, value):
    before = files(place)
    code, err = run(place, capsys, with_option(cmd, flag, value))
    assert code == 2, err
    assert err.startswith("textmask: error: ") and "\n" not in err and "Traceback" not in err
    assert flag.lstrip("-") in err or "number" in err or "auto" in err, err
    assert files(place) == before  # no output, no staging


# (argv, expected exit code, a phrase of the one line, files that exist afterwards besides the fixture's)
OUTPUT_CASES = {
    "out is an existing folder": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/folder.png", *MODEL],
                                  "is a folder"),
    "out is the input": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/photo.png", *MODEL], "is an input"),
    "out equals heatmap": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/m.png", "--heatmap", "{t}/m.png",
                            *MODEL], "give each output its own path"),
    "heatmap is a folder": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/m.png", "--heatmap",
                             "{t}/folder.png", *MODEL], "is a folder"),
    "out under a file": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/file.txt/m.png", *MODEL],
                         "is a file, not a folder"),
    "out in /proc": (["mask", "{t}/photo.png", "red circle", "--out", "/proc/textmask-test.png", *MODEL],
                     "not writable"),
    "folder run into a file": (["mask", "{t}/frames", "red circle", "--out", "{t}/file.txt", *MODEL], "is a file"),
    "folder run into a .png": (["mask", "{t}/frames", "red circle", "--out", "{t}/x.png", *MODEL], "must be a folder"),
    "single run into a folder name": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/out", *MODEL],
                                      "must be a .png"),
    "segments into a file": (["segments", "{t}/photo.png", "--out", "{t}/file.txt", *MODEL], "is a file"),
    "segments kmeans without diffseg": (["segments", "{t}/photo.png", "--out", "{t}/seg", "--kmeans", *MODEL],
                                        "--segmenter diffseg"),
    "segments of the input's folder": (["segments", "{t}/frames", "--out", "{t}/frames/a.png", *MODEL],
                                       "must be a folder"),
    "refer out is the input": (["refer", "{t}/photo.png", "the circle", "--out", "{t}/photo.png", *MODEL],
                               "is an input"),
    "refer heatmap is a folder": (["refer", "{t}/photo.png", "the circle", "--out", "{t}/r.png", "--heatmap",
                                   "{t}/folder.png", *MODEL], "is a folder"),
    "refer heatmap equals out": (["refer", "{t}/photo.png", "the circle", "--out", "{t}/r.png", "--heatmap",
                                  "{t}/r.png", *MODEL], "own path"),
    "ovdiff into a file": ([*OVDIFF[:4], "--out", "{t}/file.txt", *OVDIFF[6:]], "is a file"),
    "ovdiff cache is a file": ([*OVDIFF, "--cache", "{t}/file.txt"], "is a file"),
    "ovdiff class named labels": (["ovdiff", "{t}/photo.png", "--classes", "labels", "--out", "{t}/ov", *MODEL],
                                  "labels.png"),
    "ovdiff classes sharing a file": (["ovdiff", "{t}/photo.png", "--classes", "a/b,a_b", "--out", "{t}/ov", *MODEL],
                                      "share a file"),
    "prototypes cache is a file": ([*PROTOS, "--cache", "{t}/file.txt"], "is a file"),
    "demo into a file": (["demo", "--out", "{t}/file.txt"], "is a file"),
    "demo into /proc": (["demo", "--out", "/proc/textmask-demo"], "not writable"),
    "demo into a .png": (["demo", "--out", "{t}/demo.png"], "must be a folder"),
    "convert into a folder": (["convert-ldznet", "{t}/file.txt", "{t}/folder"], "safetensors"),
    "convert over its input": (["convert-ldznet", "{t}/x.safetensors", "{t}/x.safetensors"], None),
    "input missing": (["mask", "{t}/missing.png", "red circle", "--out", "{t}/m.png", *MODEL], "not found"),
    "input not an image": (["mask", "{t}/file.txt", "red circle", "--out", "{t}/m.png", *MODEL], "cannot read image"),
    "empty folder": (["mask", "{t}/folder", "red circle", "--out", "{t}/out", *MODEL], "no images"),
    "empty prompt": (["mask", "{t}/photo.png", "   ", "--out", "{t}/m.png", *MODEL], "empty"),
    "bad prompt syntax": (["mask", "{t}/photo.png", "car AND (", "--out", "{t}/m.png", *MODEL], "syntax"),
    "bad negative": (["mask", "{t}/photo.png", "car", "--negative", "NOT", "--out", "{t}/m.png", *MODEL], "syntax"),
    "empty expression": (["refer", "{t}/photo.png", " ", "--out", "{t}/r.png", *MODEL], "empty"),
    "no classes": (["ovdiff", "{t}/photo.png", "--classes", " , ", "--out", "{t}/ov", *MODEL], "at least one"),
    "missing checkpoint": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--checkpoint", "{t}/nope.ckpt"],
                           "not found"),
    "checkpoint not a model": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--checkpoint",
                                "{t}/file.txt"], "unsupported checkpoint format"),
    "ldznet empty path": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--method", "ld-znet", "--ldznet", "",
                           *MODEL], "not found"),
    "ldznet without weights": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--method", "ld-znet", *MODEL],
                               "go together"),
    "min-presence with noise-diff": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--method", "noise-diff",
                                      "--min-presence", "0.1", *MODEL], "--method attention"),
    "unknown device": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--device", "tpu9", *MODEL], "device"),
    "image over the pixel limit": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--max-pixels", "100",
                                    *MODEL], "over the limit"),
    "bad max-pixels": (["mask", "{t}/photo.png", "car", "--out", "{t}/m.png", "--max-pixels", "0", *MODEL],
                       "max-pixels"),
    "phrase not in the caption": (["mask", "{t}/photo.png", "red circle", "--prompt", "a blue square", "--out",
                                   "{t}/m.png", *MODEL], "not in the prompt"),
    "unknown command": (["paint", "x"], "invalid choice"),
    "app port out of range": (["app", "--checkpoint", "shapes", "--port", "70000"], "port"),
    "app host unresolvable": (["app", "--checkpoint", "shapes", "--host", "no-such-host.invalid"], "does not resolve"),
    "demo with no scenes": (["demo", "--out", "{t}/d", "--scenes", "0"], "scenes"),
    # No output over an input (the files' bytes are checked in test_no_output_is_ever_an_input)
    "folder run into its own folder": (["mask", "{t}/frames", "red circle", "--out", "{t}/frames", *MODEL],
                                       "--out {t}/frames holds the inputs"),
    "heatmap into the inputs' folder": (["mask", "{t}/frames", "red circle", "--out", "{t}/m", "--heatmap",
                                         "{t}/frames", *MODEL], "--heatmap {t}/frames holds the inputs"),
    "segments into the inputs' folder": (["segments", "{t}/frames", "--out", "{t}/frames", *MODEL],
                                         "holds the inputs"),
    "ovdiff into the image's folder": ([*OVDIFF[:4], "--out", "{t}", *OVDIFF[6:]], "holds the inputs"),
    # An empty path is the current folder to the OS: refused, never written into
    "folder run out empty": (["mask", "{t}/frames", "red circle", "--out", "", *MODEL], "--out is an empty path"),
    "folder run heatmap empty": (["mask", "{t}/frames", "red circle", "--out", "{t}/m", "--heatmap", "", *MODEL],
                                 "--heatmap is an empty path"),
    "single heatmap empty": ([*MASK, "--heatmap", ""], "--heatmap must be a .png"),
    "prototypes cache empty": ([*PROTOS, "--cache", ""], "cache path is empty"),
    "ovdiff cache empty": ([*OVDIFF, "--cache", ""], "cache path is empty"),
    "prototypes list cache is a file": (["prototypes", "list", "--cache", "{t}/file.txt"], "is a file"),
    "prototypes list cache empty": (["prototypes", "list", "--cache", ""], "cache path is empty"),
    # Names a file system cannot hold, found before the model loads
    "ovdiff class name too long": ([*OVDIFF[:2], "--classes", "x" * 300, *OVDIFF[4:]], "too long"),
    "out name too long": (["mask", "{t}/photo.png", "red circle", "--out", "{t}/" + "y" * 300 + "/m.png", *MODEL],
                          "over 255 bytes"),
    # --heatmap follows --out's rules
    "heatmap jpg": ([*MASK, "--heatmap", "{t}/h.jpg"], "--heatmap must be a .png file"),
    "heatmap webp": ([*MASK, "--heatmap", "{t}/h.webp"], "--heatmap must be a .png file"),
    "heatmap without a suffix": ([*MASK, "--heatmap", "{t}/heat"], "--heatmap must be a .png file"),
    "folder run heatmap png": (["mask", "{t}/frames", "red circle", "--out", "{t}/m", "--heatmap", "{t}/h.png",
                                *MODEL], "--heatmap must be a folder"),
    "refer heatmap jpg": ([*REFER, "--heatmap", "{t}/h.jpg"], "--heatmap must be a .png file"),
    # --clip is checked before the model loads, on every path
    "refer relation with missing clip": ([*REFER, "--clip", "{t}/nonexistent"], "--clip"),
    "refer clip is a file": ([*REFER[:2], "the circle", *REFER[3:], "--clip", "{t}/file.txt"], "not a folder"),
    "refer clip without config": ([*REFER, "--clip", "{t}/folder"], "config.json"),
    "ovdiff clip missing": ([*OVDIFF, "--clip", "{t}/nonexistent"], "--clip"),
    "meta device": ([*MASK, "--device", "meta"], "cannot compute on it"),
    # Text a tokenizer cannot read (a byte that was not UTF-8 arrives as a lone surrogate) and prompts too deep to
    # parse: one line before the model loads, never a TypeError or RecursionError
    "prompt not UTF-8": (["mask", "{t}/photo.png", "red \udcff circle", "--out", "{t}/m.png", *MODEL],
                         "the mask prompt holds a byte that is not UTF-8 text at column 5"),
    "negative not UTF-8": ([*MASK, "--negative", "\udcff"], "negative mask prompt holds a byte that is not UTF-8"),
    "caption not UTF-8": ([*MASK, "--prompt", "a red \udcff circle"], "--prompt holds a byte that is not UTF-8"),
    "refer expression not UTF-8": (["refer", "{t}/photo.png", "the \udcff circle", "--out", "{t}/r.png", *MODEL],
                                   "referring expression holds a byte that is not UTF-8"),
    "refer expression invisible": (["refer", "{t}/photo.png", "\u200b", "--out", "{t}/r.png", *MODEL], "empty"),
    "ovdiff class not UTF-8": ([*OVDIFF[:3], "sky,\udcff", *OVDIFF[4:]], "class names holds a byte"),
    "ovdiff duplicate classes": ([*OVDIFF[:3], "sky,Sky", *OVDIFF[4:]], "duplicate class names"),
    "prototypes class not UTF-8": ([*PROTOS[:2], "\udcff", *PROTOS[3:]], "class names holds a byte"),
    "prompt nested too deep": (["mask", "{t}/photo.png", "(" * 2000 + "a" + ")" * 2000, "--out", "{t}/m.png",
                                *MODEL], "nested more than 100 levels"),
    "prompt of zero-width characters": (["mask", "{t}/photo.png", "\u200b\ufeff", "--out", "{t}/m.png", *MODEL],
                                        "empty (only invisible characters)"),
    "input is a device": (["mask", "/dev/zero", "red circle", "--out", "{t}/m.png", *MODEL], "not a regular file"),
    "a device this torch lacks": ([*MASK, "--device", "xpu"], "device 'xpu' is not available"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_bad_paths_and_inputs_are_one_line_and_write_nothing(place, capsys, case):
    argv, phrase = OUTPUT_CASES[case]
    if case == "convert over its input":
        (place / "x.safetensors").write_bytes(b"")
        phrase = "is an input"
    if case.startswith("app") and pytest.importorskip("gradio") is None:
        return
    before = files(place)
    code, err = run(place, capsys, argv)
    assert code == 2, err
    assert err.startswith("textmask: error: ") and "\n" not in err and "Traceback" not in err, err
    if phrase is not None:
        assert phrase.replace("{t}", str(place)) in err, err
    assert files(place) == before


@pytest.mark.parametrize("argv", [
    ["mask", ".", "red circle", "--out", "."],
    ["mask", ".", "red circle", "--out", ""],
    ["mask", "{t}/frames", "red circle", "--out", "{t}/frames"],
    ["mask", "{t}/frames", "red circle", "--out", "{t}/m", "--heatmap", "."],
    ["segments", ".", "--out", "."],
    ["mask", "{t}/frames/a.png", "red circle", "--out", "{t}/frames/link.png"],  # a hard link of the input
    ["segments", "{t}/a", "--out", "{t}"],  # a/a.png's segments' labels.png would be the input a/labels.png
], ids=["dot into dot", "dot into empty", "into its folder", "heatmap into its folder", "segments into dot",
        "hard link", "segments over an input"])
def test_no_output_is_ever_an_input(place, capsys, monkeypatch, argv):
    """Whatever names the inputs' folder or an input (., "", a hard link, a group's file), the run is refused in one
    line before the model loads, and every input keeps its bytes."""
    os.link(place / "frames" / "a.png", place / "frames" / "link.png")
    write_image(place / "a" / "a.png", seed=4)
    write_image(place / "a" / "labels.png", seed=5)
    monkeypatch.chdir(place / "frames")
    before = {p: p.read_bytes() for p in place.rglob("*") if p.is_file() and "clip-bpe" not in p.parts}
    code, err = run(place, capsys, [*argv, *MODEL])
    assert code == 2, err
    assert err.startswith("textmask: error: ") and "\n" not in err, err
    assert "holds the inputs" in err or "is an input" in err or "empty path" in err, err
    assert {p: p.read_bytes() for p in place.rglob("*") if p.is_file() and "clip-bpe" not in p.parts} == before


def test_a_failure_after_the_model_loaded_leaves_no_folder(place, capsys, monkeypatch):
    """Folders made for outputs go again when nothing was committed into them, whatever failed."""
    import textmask.render

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(textmask.render, "save_overlay", fail)
    before = files(place)
    code, err = run(place, capsys, ["mask", "{t}/photo.png", "red circle", "--out", "{t}/new/deeper/m.png",
                                    "--heatmap", "{t}/new/h.png", *MODEL])
    assert code == 1 and "No space left on device" in err and "\n" not in err, err
    assert files(place) == before


@pytest.mark.parametrize("command", [["mask", "{t}/f", "red circle", "--out", "{t}/out", "--heatmap", "{t}/heat"],
                                     ["segments", "{t}/f", "--out", "{t}/out"]])
@pytest.mark.parametrize("bad", ["truncated jpg", "NaN tiff"])
def test_a_bad_image_late_in_a_folder_stops_it_before_any_output(place, capsys, command, bad):
    """Each image is decoded and checked before the model loads, so a file that only fails when its pixels are read
    (a cut-off JPEG, a float TIFF of NaN) stops the run before the good images before it are written."""
    write_image(place / "f" / "a.png")
    if bad == "truncated jpg":
        Image.open(place / "f" / "a.png").save(place / "src.jpg", quality=95)
        data = (place / "src.jpg").read_bytes()
        (place / "src.jpg").unlink()
        (place / "f" / "b.jpg").write_bytes(data[: len(data) * 2 // 3])
        name = "b.jpg"
    else:
        Image.fromarray(np.full((40, 48), np.nan, np.float32), mode="F").save(place / "f" / "b.tif")
        name = "b.tif"
    before = files(place)
    code, err = run(place, capsys, [*command, *MODEL])
    assert code == 2 and name in err and "\n" not in err, err
    assert files(place) == before


def test_a_hostile_checkpoint_is_one_line_without_unsafe_advice(place):
    """torch's warnings stay quiet, and its advice to rerun with weights_only=False (which runs the file's code) is
    not passed on."""
    import pickle

    (place / "hostile.ckpt").write_bytes(pickle.dumps(print))
    (place / "noise.ckpt").write_bytes(np.random.default_rng(0).bytes(1000))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("hostile.ckpt", "noise.ckpt"):
        done = subprocess.run([sys.executable, "-m", "textmask", "mask", "photo.png", "red circle", "--out", "m.png",
                               "--checkpoint", name], cwd=place, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"textmask: error: {name} holds more than tensors"), lines
        assert "weights_only=False" not in lines[0] and "`weights_only`" not in lines[0]
    assert not (place / "m.png").exists()


def test_a_port_in_use_is_one_line(place, capsys):
    import socket

    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run(place, capsys, ["app", "--checkpoint", "shapes", "--port", str(port)])
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "\n" not in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_as_input_is_one_line_not_a_hang(place, capsys):
    """A named pipe named like an image would block its read until a writer came (forever, in a script); it is
    refused from its file type alone, alone or in a folder (where only regular files are images)."""
    os.mkfifo(place / "pipe.png")
    before = files(place)
    code, err = run(place, capsys, ["mask", "{t}/pipe.png", "red circle", "--out", "{t}/m.png", *MODEL])
    assert code == 2 and "pipe.png is not a regular file" in err and "\n" not in err, err
    assert files(place) == before
    os.mkfifo(place / "frames" / "c.png")
    code, err = run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])
    assert code == 0, err
    assert sorted(p.name for p in (place / "masks").glob("*.png")) == ["a.png", "b.png"]


def test_inputs_sharing_a_stem_keep_their_suffix(place, capsys):
    write_image(place / "frames" / "a.jpg", seed=3)
    code, err = run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])
    assert code == 0, err
    assert sorted(p.name for p in (place / "masks").iterdir()) == [".textmask.json", "a.jpg.png", "a.png.png", "b.png"]


def test_gif_is_an_image_in_a_folder_too(place, capsys):
    Image.open(place / "photo.png").save(place / "frames" / "c.gif")
    code, err = run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])
    assert code == 0, err
    assert (place / "masks" / "c.png").is_file()


@pytest.mark.parametrize("suffix", ["gif", "png", "tiff", "webp"])
def test_an_animation_is_one_line_not_its_first_frame(place, capsys, suffix):
    """An animated GIF/PNG/WebP or a multi-page TIFF is refused before the model loads, alone or in a folder: a mask
    of its first frame alone would lose the rest without a word."""
    frames = [Image.open(place / "photo.png").convert("RGB"), Image.open(place / "frames" / "a.png").convert("RGB")]
    frames[1] = frames[1].resize(frames[0].size)
    frames[0].save(place / f"anim.{suffix}", save_all=True, append_images=frames[1:])
    before = files(place)
    for target, out in ((f"{{t}}/anim.{suffix}", "{t}/out.png"), ("{t}", "{t}/out")):
        code, err = run(place, capsys, ["mask", target, "red circle", "--out", out, *MODEL])
        assert code == 2 and "holds 2 frames" in err and "\n" not in err, err
        assert files(place) == before


def test_a_folder_run_resumes_and_replaces_its_earlier_files_as_a_set(place, capsys):
    out = place / "masks"
    assert run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])[0] == 0
    (out / "mine.txt").write_text("the user's own file")
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # The same settings again: both masks are there and whole, so nothing is redone.
    code, _ = run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])
    assert code == 0 and {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == first
    # A lost mask is made again, the other kept.
    (out / "a.png").unlink()
    assert run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])[0] == 0
    assert (out / "a.png").is_file() and (out / "b.png").stat().st_mtime_ns == first["b.png"]
    # An input changed or replaced since (here by a picture of another size) is masked again, the other kept.
    kept = (out / "a.png").stat().st_mtime_ns
    write_image(place / "frames" / "b.png", 40, 24, seed=9)
    assert run(place, capsys, ["mask", "{t}/frames", "red circle", "--out", "{t}/masks", *MODEL])[0] == 0
    assert Image.open(out / "b.png").size == (40, 24) and (out / "a.png").stat().st_mtime_ns == kept
    # Another folder's inputs of the same names are masked again too.
    for name in ("a.png", "b.png"):
        write_image(place / "elsewhere" / name, 32, 32, seed=5)
    assert run(place, capsys, ["mask", "{t}/elsewhere", "red circle", "--out", "{t}/masks", *MODEL])[0] == 0
    assert Image.open(out / "a.png").size == (32, 32) and (out / "a.png").stat().st_mtime_ns != kept
    # Other settings redo every mask; an input that went away takes its mask with it; the user's file stays.
    (place / "frames" / "b.png").unlink()
    assert run(place, capsys, ["mask", "{t}/frames", "blue square", "--out", "{t}/masks", *MODEL])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [".textmask.json", "a.png", "mine.txt"]


def test_two_processes_share_a_folder_run(place):
    """A folder run sharded over two CPU processes (torchrun, as accelerate launch starts them): every image gets
    exactly one mask, one process reports, and a second run with the same settings redoes nothing."""
    frames = place / "many"
    for i in range(5):
        write_image(frames / f"f{i}.png", seed=i)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "textmask",
           "mask", str(frames), "red circle", "--out", str(place / "masks"), "--device", "cpu", *MODEL]
    first = subprocess.run(cmd, env=env, cwd=place, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stdout.count("wrote ") == 1 and "wrote 5 masks" in first.stdout and "2 processes" in first.stdout
    assert sorted(p.name for p in (place / "masks").iterdir()) == [".textmask.json"] + [f"f{i}.png" for i in range(5)]
    again = subprocess.run(cmd, env=env, cwd=place, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "wrote 0 masks" in again.stdout and "5 already there" in again.stdout


def test_segments_leave_no_stale_segment_files(place, capsys):
    diffseg = ["segments", "{t}/photo.png", "--out", "{t}/seg", "--segmenter", "diffseg", *MODEL]
    many = run(place, capsys, [*diffseg, "--tau", "0.01"])
    assert many[0] == 0
    count = len(list((place / "seg").glob("segment-*.png")))
    assert run(place, capsys, [*diffseg, "--tau", "50"])[0] == 0
    labels = np.asarray(Image.open(place / "seg" / "labels.png"))
    kept = sorted(p.name for p in (place / "seg").glob("segment-*.png"))
    assert count > len(kept) and len(kept) == len(np.unique(labels.reshape(-1, 3), axis=0))


def test_interrupted_by_sigterm_leaves_no_staging_and_says_so(place):
    frames = place / "many"
    for i in range(12):
        write_image(frames / f"f{i:02d}.png", 96, 96, seed=i)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "textmask", "mask", str(frames), "red circle", "--out",
                             str(place / "masks"), *MODEL], stderr=subprocess.PIPE, text=True, env=env, cwd=place)
    deadline = time.time() + 60
    while time.time() < deadline and not list((place / "masks").glob("*.png")):  # the run is writing masks
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "textmask: interrupted" and "Traceback" not in err
    assert not [p for p in place.rglob(".textmask-*")]  # no staging folder
    for mask in (place / "masks").glob("*.png"):  # whatever was written is whole
        assert Image.open(mask).size == (96, 96)


def test_ctrl_c_during_start_up_is_one_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "textmask", "demo", "--out", "/tmp/textmask-never"],
                            stderr=subprocess.PIPE, text=True, env=env)
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        proc.kill()
        pytest.skip("needs /proc to see when Python has taken over SIGINT")
    deadline = time.time() + 30
    while time.time() < deadline:  # until Python handles SIGINT (before that, the signal just ends the process)
        caught = [l for l in status.read_text().splitlines() if l.startswith("SigCgt:")]
        if caught and int(caught[0].split()[1], 16) & (1 << (signal.SIGINT - 1)):
            break
        time.sleep(0.01)
    time.sleep(0.3)  # into start-up: importing torch
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip() == "textmask: interrupted"


# ---- the Python API ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masker():
    from textmask.demo.model import load_demo_masker

    return load_demo_masker()


IMAGE = np.random.default_rng(0).random((40, 48, 3)).astype(np.float32)
API_CASES = {
    "prompt not text": (lambda m: m.mask(IMAGE, 5), "must be text"),
    "prompt empty": (lambda m: m.mask(IMAGE, ""), "empty"),
    "prompt syntax": (lambda m: m.mask(IMAGE, "a AND"), "syntax"),
    "negative syntax": (lambda m: m.mask(IMAGE, "a", negative="("), "syntax"),
    "negative not text": (lambda m: m.mask(IMAGE, "a", negative=5), "negative mask prompt must be text"),
    "unknown method": (lambda m: m.mask(IMAGE, "a", method="magic"), "unknown method"),
    "option of another method": (lambda m: m.mask(IMAGE, "a", method="noise-diff", template="{}"), "takes no option"),
    "ldznet without weights": (lambda m: m.mask(IMAGE, "a", method="ld-znet"), "needs LD-ZNet weights"),
    "ldznet empty path": (lambda m: m.mask(IMAGE, "a", method="ld-znet", ldznet=""), "no LD-ZNet weights"),
    "ldznet bad template": (lambda m: m.mask(IMAGE, "a", method="ld-znet", ldznet=MODEL_DIR / "ldznet.safetensors",
                                             template="no slot"), "template"),
    "refine mode": (lambda m: m.mask(IMAGE, "a", refine_mode="sideways"), "refine_mode"),
    "head weighting": (lambda m: m.mask(IMAGE, "a", heads="max"), "heads must be one of information, mean"),
    "trace head weighting": (lambda m: m.trace(IMAGE).mask("a", heads=None), "heads must be one of"),
    "refine steps": (lambda m: m.mask(IMAGE, "a", refine_steps=0), "refine_steps"),
    "grow huge soft": (lambda m: m.mask(IMAGE, "a", grow=1e6, soft=True), "grow"),
    "blur huge": (lambda m: m.mask(IMAGE, "a", blur=1e9), "blur"),
    "blur nan": (lambda m: m.mask(IMAGE, "a", blur=float("nan")), "blur"),
    "blur negative": (lambda m: m.mask(IMAGE, "a", blur=-2), "blur"),
    "temporal negative": (lambda m: m.mask(IMAGE, "a", temporal=-1), "temporal"),
    "temporal huge": (lambda m: m.mask(IMAGE, "a", temporal=1e6), "temporal"),
    "temporal text": (lambda m: m.mask(IMAGE, "a", temporal="smooth"), "temporal"),
    "grow inf": (lambda m: m.mask(IMAGE, "a", grow=float("inf")), "grow"),
    "min presence negative": (lambda m: m.mask(IMAGE, "a", min_presence=-0.1), "min_presence"),
    "min presence above one": (lambda m: m.mask(IMAGE, "a", min_presence=1.5), "min_presence"),
    "min presence text": (lambda m: m.mask(IMAGE, "a", min_presence="high"), "min_presence"),
    "min presence nan": (lambda m: m.mask(IMAGE, "a", min_presence=float("nan")), "min_presence"),
    "min presence noise-diff": (lambda m: m.mask(IMAGE, "a", method="noise-diff", min_presence=0.1),
                                "needs a presence score"),
    "min presence mean heads": (lambda m: m.mask(IMAGE, "a", heads="mean", min_presence=0.1),
                                "needs a presence score"),
    "trace min presence mean heads": (lambda m: m.trace(IMAGE).mask("a", heads="mean", min_presence=0.1),
                                      "needs a presence score"),
    "trace min presence text": (lambda m: m.trace(IMAGE).mask("a", min_presence="x"), "min_presence"),
    "timestep high": (lambda m: m.mask(IMAGE, "a", timestep=5000), "timestep"),
    "timestep negative": (lambda m: m.mask(IMAGE, "a", timestep=-1), "timestep"),
    "timestep fraction": (lambda m: m.mask(IMAGE, "a", timestep=2.5), "timestep"),
    "timestep text": (lambda m: m.mask(IMAGE, "a", timestep="soon"), "timestep"),
    "seed fraction": (lambda m: m.mask(IMAGE, "a", seed=0.5), "seed"),
    "seed nan": (lambda m: m.mask(IMAGE, "a", seed=float("nan")), "seed"),
    "resolution huge": (lambda m: m.mask(IMAGE, "a", resolution=100000), "resolution"),
    "resolution tiny": (lambda m: m.mask(IMAGE, "a", resolution=3), "resolution"),
    "batch size zero": (lambda m: m.mask(IMAGE, "a", batch_size=0), "batch_size"),
    "threshold high": (lambda m: m.mask(IMAGE, "a", threshold=2), "threshold"),
    "threshold text": (lambda m: m.mask(IMAGE, "a", threshold="half"), "threshold"),
    "phrase not in caption": (lambda m: m.mask(IMAGE, "red circle", prompt="a blue square"), "not in the prompt"),
    "image nan": (lambda m: m.mask(np.full((20, 20, 3), np.nan, np.float32), "a"), "NaN"),
    "image too small": (lambda m: m.mask(np.zeros((4, 4, 3), np.float32), "a"), "too small"),
    "image five channels": (lambda m: m.mask(np.zeros((20, 20, 5), np.float32), "a"), "channels"),
    "image of strings": (lambda m: m.mask(np.array([["a"]]), "a"), "data type"),
    "image object": (lambda m: m.mask(object(), "a"), "unsupported image type"),
    "no images": (lambda m: m.mask([], "a"), "no images"),
    "mixed sizes": (lambda m: m.mask([np.zeros((20, 20, 3)), np.zeros((24, 20, 3))], "a"), "share a size"),
    "missing file": (lambda m: m.mask("/nonexistent/x.png", "a"), "not found"),
    "latents wrong count": (lambda m: m.mask(np.zeros((3, 32, 32, 3), np.float32), "a",
                                             latents=torch.zeros(2, 4, 8, 8)), "latents"),
    "latents for ld-znet": (lambda m: m.mask(IMAGE, "a", method="ld-znet", ldznet=MODEL_DIR / "ldznet.safetensors",
                                             latents=torch.zeros(1, 4, 8, 8)), "latents"),
    "segments tau nan": (lambda m: m.segments(IMAGE, tau=float("nan")), "tau"),
    "segments tau zero": (lambda m: m.segments(IMAGE, tau=0), "tau"),
    "segments timestep": (lambda m: m.segments(IMAGE, timestep=5000), "timestep"),
    "segments negative timestep": (lambda m: m.segments(IMAGE, timestep=-1), "timestep"),
    "segments seed": (lambda m: m.segments(IMAGE, seed="x"), "seed"),
    "segments cut": (lambda m: m.segments(IMAGE, cut=-0.5), "cut"),
    "segments segmenter": (lambda m: m.segments(IMAGE, segmenter="sam"), "segmenter"),
    "segments kmeans with diffcut": (lambda m: m.segments(IMAGE, segmenter="diffcut", kmeans=True), "kmeans"),
    "named segments cut": (lambda m: m.named_segments(IMAGE, ["sky"], cut="x"), "cut"),
    "named segments no names": (lambda m: m.named_segments(IMAGE, []), "at least one name"),
    "named segments empty name": (lambda m: m.named_segments(IMAGE, ["sky", " "]), "no empty names"),
    "named segments invisible name": (lambda m: m.named_segments(IMAGE, ["sky", "\u200b"]), "only invisible characters"),
    "named segments duplicates": (lambda m: m.named_segments(IMAGE, ["sky", "Sky"]), "duplicate"),
    "named segments a string": (lambda m: m.named_segments(IMAGE, "sky"), "list of words"),
    "named segments tau": (lambda m: m.named_segments(IMAGE, ["sky"], tau=-1), "tau"),
    "refer empty": (lambda m: m.refer(IMAGE, ""), "empty"),
    "refer not text": (lambda m: m.refer(IMAGE, None), "empty"),
    "refer alpha": (lambda m: m.refer(IMAGE, "the circle", alpha=3), "alpha"),
    "refer timestep": (lambda m: m.refer(IMAGE, "the circle", timestep=5000), "timestep"),
    "refer negative timestep": (lambda m: m.refer(IMAGE, "the circle", timestep=-5), "timestep"),
    "refer tau": (lambda m: m.refer(IMAGE, "the circle", tau=float("inf")), "tau"),
    "prototypes no classes": (lambda m: m.build_prototypes([]), "at least one class"),
    "prototypes duplicates": (lambda m: m.build_prototypes(["cat", "Cat"]), "duplicate"),
    "prototypes images": (lambda m: m.build_prototypes(["cat"], images=0), "images"),
    "prototypes steps": (lambda m: m.build_prototypes(["cat"], steps=10**9), "steps"),
    "prototypes cfg": (lambda m: m.build_prototypes(["cat"], cfg=float("nan")), "cfg"),
    "prototypes resolution": (lambda m: m.build_prototypes(["cat"], resolution=100000), "resolution"),
    "prototypes cache file": (lambda m: m.build_prototypes(["cat"], cache_dir=__file__), "is a file"),
    "prototypes cache empty": (lambda m: m.build_prototypes(["cat"], cache_dir=""), "cache path is empty"),
    "list cache empty": (lambda m: __import__("textmask.ovdiff").ovdiff.list_cache(""), "cache path is empty"),
    "list cache file": (lambda m: __import__("textmask.ovdiff").ovdiff.list_cache(__file__), "is a file"),
    "empty image batch": (lambda m: m.mask(torch.zeros(0, 40, 48, 3), "a"), "batch is empty"),
    "segments of an empty batch": (lambda m: m.segments(torch.zeros(0, 40, 48, 3)), "batch is empty"),
    "refer on an empty batch": (lambda m: m.refer(torch.zeros(0, 40, 48, 3), "the circle"), "batch is empty"),
    "trace of an empty batch": (lambda m: m.trace(torch.zeros(0, 40, 48, 3)), "batch is empty"),
    "complex tensor image": (lambda m: m.mask(torch.zeros(40, 48, 3, dtype=torch.complex64), "a"), "data type"),
    "PIL mode without RGB": (lambda m: m.mask(Image.new("La", (48, 40)), "a"), "cannot read this PIL image"),
    "timestep of 400 digits": (lambda m: m.mask(IMAGE, "a", timestep=10**400), "sensible size"),
    "prompt not text": (lambda m: m.mask(IMAGE, "a", prompt=5), "prompt must be text"),
    "refine steps beyond reason": (lambda m: m.mask(IMAGE, "a", refine_steps=10**9), "refine_steps"),
    "latents of another model": (lambda m: m.mask(IMAGE, "a", latents=torch.zeros(1, 16, 10, 12)), "latent space"),
    "latents as an array": (lambda m: m.mask(IMAGE, "a", latents=np.zeros((1, 4, 10, 12))), "must be a float tensor"),
    "complex latents": (lambda m: m.mask(IMAGE, "a", latents=torch.ones(1, 4, 10, 12, dtype=torch.complex64)),
                        "must be a float tensor"),
    "integer latents": (lambda m: m.mask(IMAGE, "a", latents=torch.ones(1, 4, 10, 12, dtype=torch.int64)),
                        "must be a float tensor"),
    "refine as text": (lambda m: m.mask(IMAGE, "a", refine="no"), "refine must be True or False"),
    "soft as text": (lambda m: m.mask(IMAGE, "a", soft="false"), "soft must be True or False"),
    "pamr of two": (lambda m: m.segments(IMAGE, pamr=2), "pamr must be True or False"),
    "named segments pamr as None": (lambda m: m.named_segments(IMAGE, ["a"], pamr=None), "pamr must be"),
    "trace mask invert as text": (lambda m: m.trace(IMAGE).mask("a", invert="yes"), "invert must be"),
    "nested latents": (lambda m: m.mask(IMAGE, "a", latents=torch.nested.nested_tensor([torch.ones(4, 10, 12)])),
                       "must be a float tensor"),
    "meta tensor image": (lambda m: m.mask(torch.zeros(40, 48, 3, device="meta"), "a"), "meta tensor holds no pixels"),
    "sparse tensor image": (lambda m: m.mask(torch.ones(40, 48, 3).to_sparse(), "a"), "sparse_coo tensor"),
    "nested tensor image": (lambda m: m.mask(torch.nested.nested_tensor([torch.ones(40, 48, 3)]), "a"),
                            "nested tensor"),
    "latents beyond the size limit": (lambda m: m.mask(IMAGE, "a", latents=torch.zeros(1, 4, 600, 600)), "over 2048"),
    "ld-znet template with two fields": (lambda m: m.mask(IMAGE, "a", method="ld-znet", template="{} and {}",
                                                          ldznet=MODEL_DIR / "ldznet.safetensors"), "exactly one"),
    "named segments of None": (lambda m: m.named_segments(IMAGE, None), "list of words"),
    "prototypes of a string": (lambda m: m.build_prototypes("cat"), "list of words"),
    "prototypes overrides not a dict": (lambda m: m.build_prototypes(["cat"], overrides="yes"), "overrides"),
    "ovdiff without prototypes": (lambda m: m.ovdiff(IMAGE, None), "prototypes must be"),
    "one-box face, refer with a bad threshold": (lambda m: __import__("textmask.faces").faces.mask_any(
        m, IMAGE, "the circle", method="refer", threshold="abc"), "threshold"),
    # Third sweep: switches in every task, text a tokenizer cannot read, nesting, images in another convention
    "one-box face, refer with soft as text": (lambda m: __import__("textmask.faces").faces.mask_any(
        m, IMAGE, "the circle", method="refer", soft="x"), "soft must be True or False"),
    "one-box face, named segments invert of two": (lambda m: __import__("textmask.faces").faces.mask_any(
        m, IMAGE, "circle", method="named segments", invert=2), "invert must be True or False"),
    "one-box face, refine as text": (lambda m: __import__("textmask.faces").faces.mask_any(
        m, IMAGE, "circle", method="named segments", refine="no"), "refine must be True or False"),
    "one-box face, names a number": (lambda m: __import__("textmask.faces").faces.mask_any(
        m, IMAGE, "circle", method="named segments", names=5), "names must be comma-separated text"),
    "one-box face, negative a number": (lambda m: __import__("textmask.faces").faces.mask_any(
        m, IMAGE, "the circle", method="refer", negative=5), "negative mask prompt must be text"),
    "trace refine as text": (lambda m: m.trace(IMAGE, refine="no"), "refine must be True or False"),
    "segments kmeans as text": (lambda m: m.segments(IMAGE, segmenter="diffseg", kmeans="yes"), "kmeans must be"),
    "refer clip missing": (lambda m: m.refer(IMAGE, "the circle", clip="/no/such/clip"), "is not a folder"),
    "refer relation, clip missing": (lambda m: m.refer(IMAGE, "the circle on the left", clip="/no/such"),
                                     "is not a folder"),
    "refer clip is a number": (lambda m: m.refer(IMAGE, "the circle", clip=3), "clip must be a local"),
    "refer use_spacy as text": (lambda m: m.refer(IMAGE, "the circle", use_spacy="no"), "use_spacy must be"),
    "prompt not UTF-8": (lambda m: m.mask(IMAGE, "red \udcff circle"), "not UTF-8 text at column 5"),
    "caption not UTF-8": (lambda m: m.mask(IMAGE, "a", prompt="a \ud800"), "prompt holds a byte that is not UTF-8"),
    "negative not UTF-8": (lambda m: m.mask(IMAGE, "a", negative="\ud800"), "negative mask prompt holds a byte"),
    "names not UTF-8": (lambda m: m.named_segments(IMAGE, ["sky", "\ud800"]), "names holds a byte"),
    "refer not UTF-8": (lambda m: m.refer(IMAGE, "the \ud800 circle"), "referring expression holds a byte"),
    "refer zero-width": (lambda m: m.refer(IMAGE, "\u200b"), "referring expression is empty"),
    "trace prompt not UTF-8": (lambda m: m.trace(IMAGE, prompt="a \ud800"), "prompt holds a byte"),
    "trace mask not UTF-8": (lambda m: m.trace(IMAGE).mask("a \ud800"), "mask prompt holds a byte"),
    "prompt nested too deep": (lambda m: m.mask(IMAGE, "(" * 5000 + "a" + ")" * 5000), "nested more than 100"),
    "NOT chain too deep": (lambda m: m.mask(IMAGE, "NOT " * 5000 + "a"), "nested more than 100"),
    "phrase of zero-width characters": (lambda m: m.mask(IMAGE, "a | \u200b"), "only invisible characters"),
    "float image of 0-255": (lambda m: m.mask(IMAGE * 255, "a"), "divide 0-255 values by 255"),
    "float image of [-1, 1]": (lambda m: m.mask(torch.from_numpy(IMAGE * 2 - 1), "a"), "(x + 1) / 2"),
    "channels first": (lambda m: m.mask(np.zeros((3, 40, 48), np.float32), "a"), "got (3, 40, 48); channels go last"),
    "batch channels first": (lambda m: m.mask(torch.zeros(2, 3, 40, 48), "a"), "x.permute(0, 2, 3, 1)"),
    "image path is a folder": (lambda m: m.mask(ROOT, "a"), "is a folder; pass an image file"),
    "image path is a device": (lambda m: m.mask("/dev/zero", "a"), "not a regular file"),
    "latents smaller than the minimum": (lambda m: m.mask(IMAGE, "a", latents=torch.zeros(1, 4, 1, 1)), "under 32"),
    # Fourth sweep: a trace's maps given no list, a device torch names but this build lacks
    "trace maps of nothing": (lambda m: m.trace(IMAGE).maps([]), "give at least one phrase"),
    "trace maps of a number": (lambda m: m.trace(IMAGE).maps([5]), "phrases must be a list of words"),
    "trace maps of a string": (lambda m: m.trace(IMAGE).maps("red square"), "phrases must be a list of words"),
    "a device this torch lacks": (lambda m: __import__("textmask").TextMasker.from_pretrained(MODEL_DIR, device="xpu"),
                                  "device 'xpu' is not available"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_input_is_one_line(masker, case):
    call, phrase = API_CASES[case]
    with pytest.raises(TextMaskError) as e:
        call(masker)
    message = str(e.value)
    assert "\n" not in message and phrase in message, message


def test_api_accepts_what_it_can_use(masker):
    """Seeds beyond the generator's range, integer arrays of every range, float arrays a filter overshot a little,
    flat prompts of a thousand phrases, thin images, and switches given as numpy booleans or 0/1 are used, not
    refused; each mask at its image's size."""
    overshoot = masker.mask(np.clip(IMAGE * 1.2 - 0.1, -0.1, 1.1), "red circle", refine=False)
    assert overshoot.masks.shape == (1, 40, 48)
    wide = masker.mask(IMAGE, " | ".join(["red circle", *(f"w{i}" for i in range(1000))]), refine=False)
    assert wide.masks.shape == (1, 40, 48)
    thin = masker.mask(np.random.default_rng(1).random((8, 1500, 3)), "red circle", refine=False)
    assert thin.masks.shape == (1, 8, 1500)
    assert masker.segments(IMAGE, segmenter="diffseg", kmeans=np.bool_(False)).labels.shape == (1, 40, 48)
    assert torch.equal(masker.mask(IMAGE, "red circle", refine=np.bool_(False), soft=1).masks,
                       masker.mask(IMAGE, "red circle", refine=False, soft=True).masks)
    a = masker.mask(IMAGE, "red circle", seed=2**70, refine=False)
    b = masker.mask(IMAGE, "red circle", seed=2**70 % 2**63, refine=False)
    assert torch.equal(a.heatmaps, b.heatmaps)
    huge = masker.mask(IMAGE, "red circle", seed=10**400, refine=False)  # taken modulo 2⁶³ exactly, not as a float
    assert torch.equal(huge.heatmaps, masker.mask(IMAGE, "red circle", seed=10**400 % 2**63, refine=False).heatmaps)
    int16 = (IMAGE * 32767).astype(np.int16)
    uint16 = (IMAGE * 65535).astype(np.uint16)
    for array in (int16, uint16, (IMAGE * 255).astype(np.uint8), torch.from_numpy((IMAGE * 255).astype(np.uint8))):
        res = masker.mask(array, "red circle", refine=False)
        assert res.masks.shape == (1, 40, 48)
        assert (res.heatmaps - a.heatmaps).abs().max() < 0.1  # the same picture, not a white one


def test_quantized_tensors_and_32_bit_integer_images_are_read_as_pictures(masker):
    """A quantized tensor is its float values; a PIL "I" image past 16 bits is scaled by the 32 bits' range, as an
    int32 array is, not refused as floats out of [0, 1]."""
    from textmask.images import to_batch

    q = torch.quantize_per_tensor(torch.from_numpy(IMAGE).float(), 1 / 255, 0, torch.quint8)
    assert masker.mask(q, "red circle", refine=False).masks.shape == (1, 40, 48)
    assert torch.allclose(to_batch(q), to_batch(torch.from_numpy(IMAGE).float()), atol=1 / 255)
    big = np.full((40, 48), 2**30, np.int32)
    assert float(to_batch(Image.fromarray(big, mode="I")).max()) == pytest.approx(float(to_batch(big[..., None]).max()))
    sixteen = to_batch(Image.fromarray(np.full((40, 48), 60000, np.int32), mode="I"))
    assert float(sixteen.max()) == pytest.approx(60000 / 65535)
    # A dark 16-bit picture says its depth (mode I;16): it is dark, as the same uint16 array is, not 257 times brighter
    dark = np.full((40, 48), 200, np.uint16)
    assert Image.fromarray(dark).mode == "I;16"
    assert float(to_batch(Image.fromarray(dark)).max()) == pytest.approx(float(to_batch(dark[..., None]).max()))
    assert float(to_batch(Image.fromarray(dark)).max()) == pytest.approx(200 / 65535)


def test_a_phrase_missing_from_a_long_caption_is_a_short_line(masker):
    with pytest.raises(TextMaskError) as e:
        masker.mask(IMAGE, "car", prompt="a photo " * 1000)
    assert "not in the prompt" in str(e.value) and len(str(e.value)) < 300 and str(e.value).endswith("...'")


def test_float_tiff_and_images_over_the_limit(place, monkeypatch):
    from textmask.errors import ImageError
    from textmask.images import load_image

    Image.fromarray(np.full((20, 30), 0.25, np.float32), mode="F").save(place / "half.tif")
    Image.fromarray(np.full((20, 30), 4000.0, np.float32), mode="F").save(place / "bright.tif")
    assert load_image(place / "half.tif").mean() == pytest.approx(0.25)
    assert load_image(place / "bright.tif").max() == pytest.approx(1.0)
    monkeypatch.setenv("TEXTMASK_MAX_PIXELS", "500")
    with pytest.raises(ImageError, match="over the limit of 500"):
        load_image(place / "half.tif")
    monkeypatch.setenv("TEXTMASK_MAX_PIXELS", "lots")
    with pytest.raises(ImageError, match="TEXTMASK_MAX_PIXELS"):
        load_image(place / "half.tif")


def test_a_failed_move_puts_everything_back(tmp_path, monkeypatch):
    """commit moves a set of files; when the second move fails, the first file's old content comes back and no
    staging is left."""
    from textmask import outputs as out_module
    from textmask.outputs import OutputError, Outputs

    (tmp_path / "a.png").write_bytes(b"old a")
    with Outputs() as outputs:
        a, b = outputs.file(tmp_path / "a.png"), outputs.file(tmp_path / "b.png")
        outputs.stage(a).write_bytes(b"new a")
        outputs.stage(b).write_bytes(b"new b")
        real, calls = os.replace, []

        def flaky(src, dst):
            calls.append(dst)
            if Path(dst) == b:
                raise OSError(28, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(out_module.os, "replace", flaky)
        with pytest.raises(OutputError, match="No space left on device; nothing was changed"):
            outputs.commit()
        monkeypatch.setattr(out_module.os, "replace", real)
    assert (tmp_path / "a.png").read_bytes() == b"old a" and not (tmp_path / "b.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_commit_refuses_an_input_and_unused_folders_go(tmp_path):
    """The last guard: a destination that is an input (by any name) is refused before anything moves; folders made
    for outputs that never came are removed on exit."""
    from textmask.outputs import OutputError, Outputs

    (tmp_path / "in.png").write_bytes(b"input")
    os.link(tmp_path / "in.png", tmp_path / "same.png")
    with Outputs(inputs=[tmp_path / "in.png"]) as outputs:
        outputs.stage(tmp_path / "new" / "x.png").write_bytes(b"x")
        outputs.stage(tmp_path / "same.png").write_bytes(b"over")
        with pytest.raises(OutputError, match="same.png is an input; nothing was written over it"):
            outputs.commit()
    assert (tmp_path / "in.png").read_bytes() == b"input"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "same.png"]
    with Outputs() as outputs:  # a name near the limit is staged, and moved into place, whole
        long = outputs.file(tmp_path / ("n" * 251 + ".png"))
        outputs.stage(long).write_bytes(b"long")
        outputs.commit()
    assert long.read_bytes() == b"long"


@pytest.mark.parametrize("where", ["conditioning", "latents", "forward"])
def test_non_finite_values_stop_the_mask_with_their_cause(masker, monkeypatch, where):
    """NaN conditioning (Forge's emphasis dividing by a zero mean), NaN latents or a NaN forward is an error naming
    the likely cause, never an all-zero mask."""
    host = masker.host
    if where == "conditioning":
        real = host.encode_prompts

        def nan_prompts(prompts):
            cond = real(prompts)
            cond.context = cond.context * float("nan")
            return cond

        monkeypatch.setattr(host, "encode_prompts", nan_prompts)
    elif where == "latents":
        real_images = host.encode_images
        monkeypatch.setattr(host, "encode_images", lambda px: real_images(px) * float("nan"))
    else:
        real_denoise = host.denoise
        monkeypatch.setattr(host, "denoise", lambda *a: real_denoise(*a) * float("nan"))
    for method in ("attention", "noise-diff"):
        with pytest.raises(TextMaskError, match="NaN or infinite.*emphasis") as e:
            masker.mask(IMAGE, "red circle", method=method)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("call", ["refine", "segments", "refer"])
def test_self_attention_too_large_to_read_is_one_line(sd1_pipe, monkeypatch, call):
    """A working size whose self-attention map would not fit is refused before any image is encoded (the VAE at
    2048 px takes minutes on a CPU), from the UNet's structure alone, and the model's forward is unchanged;
    cross-attention alone (refine off) still masks. Where the structure cannot tell, the capture refuses at the
    first such layer, before any allocation."""
    from conftest import unet_untouched
    from textmask import TextMasker, capture

    masker = TextMasker.from_pipe(sd1_pipe, resolution=64)
    monkeypatch.setattr(capture, "MAX_SELF_TOKENS", 15)  # the tiny model's 8x8 latent has 64 cells
    encoded = []
    encode = masker.host.encode_images
    monkeypatch.setattr(masker.host, "encode_images", lambda pixels: encoded.append(1) or encode(pixels))
    run = {"refine": lambda: masker.mask(IMAGE, "a", refine=True),
           "segments": lambda: masker.segments(IMAGE, segmenter="diffseg"),
           "refer": lambda: masker.refer(IMAGE, "the circle on the left")}[call]
    for structure_known in (True, False):
        if not structure_known:
            monkeypatch.setattr(masker.host, "self_attention_grid", lambda latent_size: None)
        with unet_untouched(sd1_pipe.unet):
            with pytest.raises(TextMaskError) as e:
                run()
        assert "\n" not in str(e.value) and "too large to read" in str(e.value)
        assert bool(encoded) is not structure_known
    assert masker.mask(IMAGE, "a", refine=False).masks.shape == (1, 40, 48)


def test_the_finest_attention_grid_is_read_from_the_unet_structure(sd1_pipe):
    """SD1's first attention runs at the latent's own grid; a UNet whose first level has none (SDXL's layout) at
    half of it: what the up-front self-attention check reads."""
    from textmask.capture import finest_attention_grid
    from diffusers import UNet2DConditionModel

    assert finest_attention_grid(sd1_pipe.unet, (8, 9)) == (8, 9)
    xl_like = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                   attention_head_dim=2, norm_num_groups=4)
    assert finest_attention_grid(xl_like, (8, 9)) == (4, 5)
    assert finest_attention_grid(torch.nn.Linear(2, 2), (8, 8)) is None
