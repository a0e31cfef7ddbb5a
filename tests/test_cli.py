"""The CLI end to end on a tiny single-file checkpoint, including bad input: one line, exit 2, no partial output."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textmask.cli import build_parser, load_masker, main

ROOT = Path(__file__).resolve().parent.parent


def write_image(path, w=45, h=31, seed=0):
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


@pytest.fixture
def model_args(tiny_checkpoint):
    d, _ = tiny_checkpoint
    return ["--checkpoint", str(d / "tiny.safetensors"), "--config", str(d / "config"), "--resolution", "64"]


def listing(path: Path) -> set:
    return {p.relative_to(path) for p in path.rglob("*")}


def shown(path: Path) -> list[str]:
    """A folder's entries as a file browser shows them: textmask's manifest (.textmask.json) is hidden."""
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def test_single_image(tmp_path, model_args):
    img = write_image(tmp_path / "photo.png")
    code = main(["mask", str(img), "red car | truck", "--out", str(tmp_path / "mask.png"),
                 "--heatmap", str(tmp_path / "heat.png"), *model_args])
    assert code == 0
    mask = Image.open(tmp_path / "mask.png")
    assert mask.size == (45, 31) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    heat = Image.open(tmp_path / "heat.png")
    assert heat.size == (45, 31) and heat.mode == "RGB"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".textmask-")]


def test_phone_photo_is_masked_upright(tmp_path, model_args):
    """A JPEG stored sideways with an EXIF orientation tag gets a mask that lines up with it as shown."""
    from PIL import ImageOps

    from textmask.images import load_image

    a = np.zeros((31, 45, 3), np.uint8)
    a[:, :15] = 255  # a white band on the stored image's left edge
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display", as phones write it
    img = tmp_path / "phone.jpg"
    Image.fromarray(a).save(img, exif=exif, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(img)), dtype=np.float32) / 255
    assert upright.shape == (45, 31, 3)
    assert np.array_equal(load_image(img), upright)  # the band is now along the top
    out = tmp_path / "mask.png"
    assert main(["mask", str(img), "cat", "--out", str(out), "--heatmap", str(tmp_path / "heat.png"), *model_args]) == 0
    assert Image.open(out).size == (31, 45) and Image.open(tmp_path / "heat.png").size == (31, 45)


def test_all_options(tmp_path, model_args):
    img = write_image(tmp_path / "photo.jpg")
    out = tmp_path / "m.png"
    code = main(["mask", str(img), "cat", "--out", str(out), "--method", "noise-diff", "--threshold", "0.4",
                 "--soft", "--blur", "1.5", "--grow", "-1", "--fill-holes", "--invert", "--timestep", "200",
                 "--seed", "3", "--negative", "dog", "--device", "cpu", "--dtype", "fp32", *model_args])
    assert code == 0 and Image.open(out).size == (45, 31)
    assert main(["mask", str(img), "cat", "--out", str(out), "--refine", "--prompt", "a cat on a mat", *model_args]) == 0



def test_offload_gives_the_same_mask(tmp_path, model_args):
    """--offload streams each layer to the device for its call (accelerate's sequential CPU offload); --offload model
    moves each component whole (accelerate's hooks, as diffusers' enable_model_cpu_offload)."""
    img = write_image(tmp_path / "photo.png")
    # Every run on the CPU: on a machine with a GPU, a run without --device would compute on it, in other kernels.
    runs = {"plain.png": ["--device", "cpu"], "sequential.png": ["--offload", "--device", "cpu"],
            "model.png": ["--offload", "model", "--device", "cpu"]}
    for name, extra in runs.items():
        assert main(["mask", str(img), "red car", "--out", str(tmp_path / name), "--soft", *extra, *model_args]) == 0
    plain, sequential, model = (np.asarray(Image.open(tmp_path / n)) for n in runs)
    assert plain.any() and np.array_equal(plain, sequential) and np.array_equal(plain, model)
    args = build_parser().parse_args(["mask", str(img), "x", "--out", "o.png", "--offload", "--device", "cpu", *model_args])
    host = load_masker(args).host
    assert next(host.unet.parameters()).device.type == "meta" and host.device.type == "cpu"  # weights parked, compute on cpu
    args = build_parser().parse_args(["mask", str(img), "x", "--out", "o.png", "--offload", "model", "--device", "cpu",
                                      *model_args])
    host = load_masker(args).host
    assert all(hasattr(m, "_hf_hook") for m in (host.unet, host.vae, host.text_encoder)) and host.device.type == "cpu"


def test_folder_in_folder_out(tmp_path, model_args, capsys):
    src = tmp_path / "frames"
    src.mkdir()
    for i, size in enumerate([(40, 30), (64, 48), (33, 77)]):
        write_image(src / f"f{i}.png", *size, seed=i)
    (src / "notes.txt").write_text("not an image")
    code = main(["mask", str(src), "sky", "--out", str(tmp_path / "masks"), "--heatmap", str(tmp_path / "heat"), *model_args])
    assert code == 0
    assert shown(tmp_path / "masks") == ["f0.png", "f1.png", "f2.png"]
    assert (tmp_path / "masks" / ".textmask.json").is_file()
    assert Image.open(tmp_path / "masks" / "f2.png").size == (33, 77)
    assert len(shown(tmp_path / "heat")) == 3
    assert "wrote 3 masks" in capsys.readouterr().out


def run_bad(tmp_path, capsys, argv):
    before = listing(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("textmask: error: ") and "\n" not in err and "Traceback" not in err
    assert listing(tmp_path) == before  # nothing written, nothing left behind
    return err


def test_bad_inputs(tmp_path, model_args, capsys, tiny_checkpoint):
    img = write_image(tmp_path / "photo.png")
    out = str(tmp_path / "mask.png")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    frames = tmp_path / "frames"
    frames.mkdir()
    write_image(frames / "a.png")
    (frames / "b.png").write_bytes(b"not a png")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "not found": ["mask", str(img), "cat", "--out", out, "--checkpoint", str(tmp_path / "missing.safetensors")],
        "is for SD3 and Flux single files": ["mask", str(img), "cat", "--out", out, *model_args,
                                             "--components", str(frames)],
        "complete a single checkpoint file": ["mask", str(img), "cat", "--out", out, "--checkpoint", str(frames),
                                              "--components", str(frames)],
        "not a valid safetensors": ["mask", str(img), "cat", "--out", out, "--checkpoint", str(corrupt)],
        "column 6": ["mask", str(img), "cat |", "--out", out, *model_args],
        "is not in the prompt": ["mask", str(img), "dog", "--prompt", "a cat", "--out", out, *model_args],
        "empty": ["mask", str(img), "   ", "--out", out, *model_args],
        "input not found": ["mask", str(tmp_path / "nope.png"), "cat", "--out", out, *model_args],
        "cannot read image": ["mask", str(frames), "cat", "--out", str(tmp_path / "masks"), *model_args],
        "no images": ["mask", str(empty), "cat", "--out", str(tmp_path / "masks"), *model_args],
        "must be a .png": ["mask", str(img), "cat", "--out", str(tmp_path / "mask.jpg"), *model_args],
        "must be a folder": ["mask", str(frames), "cat", "--out", str(tmp_path / "x.png"), *model_args],
    }
    for expected, argv in cases.items():
        assert expected in run_bad(tmp_path, capsys, argv)
    d, _ = tiny_checkpoint
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, foreign)
    assert "unknown architecture" in run_bad(tmp_path, capsys, ["mask", str(img), "cat", "--out", out, "--checkpoint", str(foreign)])
    if not torch.cuda.is_available():  # asking for a GPU this machine lacks, with or without offload
        for extra in ([], ["--offload"]):
            err = run_bad(tmp_path, capsys, ["mask", str(img), "cat", "--out", out, "--device", "cuda", *extra, *model_args])
            assert "device 'cuda' is not available" in err


def test_bad_option_values(tmp_path, model_args, capsys):
    img = write_image(tmp_path / "photo.png")
    assert main(["mask", str(img), "cat", "--out", str(tmp_path / "m.png"), "--threshold", "2", *model_args]) == 2
    err = capsys.readouterr().err
    assert "expected 'auto', 'otsu' or a number" in err and err.count("\n") == 1 and err.startswith("textmask: error: ")
    assert not (tmp_path / "m.png").exists()


def test_a_number_too_large_for_a_float_is_an_option_error():
    """A check that overflows on a whole number of hundreds of digits is argparse's one line naming the option, not
    an OverflowError (exit 1)."""
    import argparse

    from textmask.cli import checked, whole

    parse = checked(lambda v: v * 1.0, whole)
    with pytest.raises(argparse.ArgumentTypeError, match=r"number too large: 9{20}\.\.\. \(400 characters\)"):
        parse("9" * 400)


def test_entry_point_subprocess(tmp_path, model_args):
    img = write_image(tmp_path / "photo.png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ok = subprocess.run([sys.executable, "-m", "textmask", "mask", str(img), "cat", "--out", str(tmp_path / "m.png"),
                         *model_args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "textmask", "mask", str(img), "cat AND", "--out", str(tmp_path / "n.png"),
                          *model_args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["textmask: error: mask prompt syntax error at column 8: expected a phrase, got the end of the prompt"]
    assert not (tmp_path / "n.png").exists()


def test_old_segment_command_still_masks_with_a_one_line_notice(tmp_path, model_args, capsys):
    img = write_image(tmp_path / "photo.png")
    assert main(["segment", str(img), "cat", "--out", str(tmp_path / "old.png"), *model_args]) == 0
    assert main(["mask", str(img), "cat", "--out", str(tmp_path / "new.png"), *model_args]) == 0
    err = capsys.readouterr().err
    assert err.count("textmask: note: 'segment' is now 'mask'") == 1
    assert np.array_equal(np.asarray(Image.open(tmp_path / "old.png")), np.asarray(Image.open(tmp_path / "new.png")))


def test_segments_command(tmp_path, model_args, capsys):
    img = write_image(tmp_path / "photo.png", 45, 31)
    assert main(["segments", str(img), "--out", str(tmp_path / "seg"), "--tau", "0.5", *model_args]) == 0
    files = shown(tmp_path / "seg")
    assert files[0] == "labels.png" and files[1].startswith("segment-000")
    assert Image.open(tmp_path / "seg" / "segment-000.png").size == (45, 31)
    frames = tmp_path / "frames"
    frames.mkdir()
    write_image(frames / "a.png", 40, 30)
    write_image(frames / "b.png", 33, 50)
    assert main(["segments", str(frames), "--out", str(tmp_path / "segs"), *model_args]) == 0
    assert Image.open(tmp_path / "segs" / "b" / "labels.png").size == (33, 50)
    assert "bad" not in capsys.readouterr().err
    before = listing(tmp_path)
    assert main(["segments", str(img), "--out", str(tmp_path / "x"), "--tau", "0", *model_args]) == 2
    assert listing(tmp_path) == before


def test_refer_command(tmp_path, model_args, capsys):
    img = write_image(tmp_path / "photo.png", 45, 31)
    assert main(["refer", str(img), "the red car on the left", "--out", str(tmp_path / "m.png"),
                 "--heatmap", str(tmp_path / "h.png"), *model_args]) == 0
    assert Image.open(tmp_path / "m.png").size == (45, 31) and Image.open(tmp_path / "h.png").size == (45, 31)
    assert "'red car'" in capsys.readouterr().out
    for argv, expected in [(["refer", str(img), "bottom left", "--out", str(tmp_path / "x.png")], "no noun"),
                           (["refer", str(img), "the cat", "--out", str(tmp_path / "x.jpg")], "must be a .png"),
                           (["refer", str(img), "the cat", "--out", str(tmp_path / "x.png"), "--alpha", "3"], "alpha")]:
        assert expected in run_bad(tmp_path, capsys, argv + model_args)


def test_image_decoded_late_fails_cleanly(tmp_path, model_args, capsys):
    """A file that passes the header check but fails to decode leaves no output behind."""
    frames = tmp_path / "frames"
    frames.mkdir()
    write_image(frames / "a.png", 40, 30)
    good = (frames / "a.png").read_bytes()
    (frames / "b.png").write_bytes(good[: len(good) // 2])  # truncated pixel data, intact header
    tiny = tmp_path / "tiny.png"
    write_image(tiny, 4, 4)
    assert "too small" in run_bad(tmp_path, capsys, ["mask", str(tiny), "cat", "--out", str(tmp_path / "m.png"), *model_args])
    err = run_bad(tmp_path, capsys, ["mask", str(frames), "cat", "--out", str(tmp_path / "masks"), *model_args])
    assert "cannot read image" in err


def test_pamr_flag_reaches_the_api():
    from textmask.cli import mask_kwargs

    parser = build_parser()
    base = ["mask", "a.png", "x", "--out", "o.png", "--checkpoint", "model.safetensors"]
    assert mask_kwargs(parser.parse_args([*base, "--no-pamr"]))["pamr"] is False
    assert mask_kwargs(parser.parse_args(base))["pamr"] is True  # the default, as every face


def test_app_without_gradio_is_one_line(tmp_path, capsys, monkeypatch):
    """Gradio is an extra: without it `textmask app` says how to install it, before any model loads."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    err = run_bad(tmp_path, capsys, ["app", "--checkpoint", "shapes"])
    assert "needs Gradio" in err and "textmask[app]" in err
