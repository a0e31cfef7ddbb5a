"""train/: PhraseCut data in its published format, the accelerate trainer (loss falls, resume is exact),
the CLIPSeg / RefCOCO metrics on hand-computed arrays, and evaluation end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.data import ReferringDataset, find_square_crop, load_phrasecut, load_refcoco, rasterise
from train.metrics import THRESHOLDS, FixedIntervalMetrics, refcoco_scores

ROOT = Path(__file__).resolve().parent.parent


def write_mini_phrasecut(root: Path, size=(40, 56)) -> Path:
    """Two images; one task with two instances (one of them two polygons), one task with one instance."""
    h, w = size
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for iid in (11, 12):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{iid}.jpg")
    square = [[2, 2], [12, 2], [12, 12], [2, 12]]
    tri_a, tri_b = [[30, 5], [40, 5], [30, 15]], [[44, 30], [54, 30], [54, 38]]
    tasks = [
        {"task_id": "11__0", "image_id": 11, "phrase": "red square", "Polygons": [[square], [tri_a, tri_b]]},
        {"task_id": "12__0", "image_id": 12, "phrase": "blue thing", "Polygons": [[[[5, 20], [25, 20], [25, 35], [5, 35]]]]},
    ]
    (root / "refer_train.json").write_text(json.dumps(tasks))
    (root / "refer_val.json").write_text(json.dumps(tasks[:1]))
    (root / "image_data_split.json").write_text(json.dumps(
        [{"image_id": i, "split": "train", "width": w, "height": h} for i in (11, 12)]))
    return root


def test_rasterise_ors_instances(tmp_path):
    root = write_mini_phrasecut(tmp_path / "pc")
    samples = load_phrasecut(root, "train")
    assert [s.phrase for s in samples] == ["red square", "blue thing"]
    m = rasterise(samples[0].polygons, samples[0].height, samples[0].width)
    assert m.shape == (40, 56)
    assert m[7, 7] and m[7, 32] and m[33, 52]  # inside the square, the first and the second triangle
    assert not m[25, 25]
    assert abs(int(m[:20, :20].sum()) - 121) <= 22  # 10x10 square (vertices inclusive) within edge rounding


def test_square_crop_keeps_target():
    mask = np.zeros((40, 100), bool)
    mask[10:30, 80:95] = True
    for seed in range(5):
        y, x, side = find_square_crop(mask, np.random.default_rng(seed))
        assert side == 40 and y == 0 and mask[:, x : x + side].sum() > 0.05 * mask.size


def test_dataset_items_and_determinism(tmp_path):
    root = write_mini_phrasecut(tmp_path / "pc")
    ds = ReferringDataset(load_phrasecut(root, "train"), size=32, train=True, seed=3)
    a, b = ds[0], ds[0]
    assert a["pixels"].shape == (3, 32, 32) and a["mask"].shape == (1, 32, 32)
    assert torch.equal(a["pixels"], b["pixels"]) and a["prompt"] == b["prompt"] and "red square" in a["prompt"]
    assert set(np.unique(a["mask"].numpy())) <= {0.0, 1.0} and a["mask"].sum() > 0
    ev = ReferringDataset(load_phrasecut(root, "train"), size=32, train=False)
    assert ev[1]["prompt"] == "a photo of a blue thing."


def test_refcoco_json_format(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 20}],
        "annotations": [{"id": 5, "image_id": 1, "segmentation": [[0, 0, 9, 0, 9, 9, 0, 9]]}]}))
    (tmp_path / "refs.json").write_text(json.dumps([{"ref_id": 0, "ann_id": 5, "image_id": 1, "split": "val",
                                                     "sentences": [{"sent": "left half"}, {"sent": "dark box"}]}]))
    samples = load_refcoco(tmp_path, "val")
    assert [s.phrase for s in samples] == ["left half", "dark box"]
    m = rasterise(samples[0].polygons, 10, 20)
    assert m[:, :9].all() and not m[:, 11:].any()


# ---- metrics --------------------------------------------------------------------------------------------
def test_thresholds_are_clipseg_s():
    assert len(THRESHOLDS) == 49 and THRESHOLDS[0] == pytest.approx(0.02) and THRESHOLDS[-1] == pytest.approx(0.98)


def test_metrics_match_hand_computation():
    m = FixedIntervalMetrics()
    # Sample 1: 4 pixels, target [1, 1, 0, 0], probabilities [0.9, 0.4, 0.35, 0.1].
    m.add(np.array([0.9, 0.4, 0.35, 0.1]), np.array([1, 1, 0, 0]))
    # Sample 2: target [1, 0], probabilities [0.2, 0.6].
    m.add(np.array([0.2, 0.6]), np.array([1, 0]))
    v = m.value()
    # At t=0.3: s1 predicts {0.9, 0.4, 0.35}: tp 2, fp 1, fn 0 -> IoU 2/3. s2 predicts {0.6}: tp 0, fp 1, fn 1 -> 0.
    assert v["miou_0.3"] == pytest.approx((2 / 3 + 0) / 2)
    # Cumulative at 0.3: tp 2, fp 2, fn 1 -> 2 / (1 + 5).
    assert v["fgiou_0.3"] == pytest.approx(2 / 6)
    # At t=0.5: s1 {0.9}: tp 1, fp 0, fn 1 -> 1/2; s2 {0.6}: 0. Cumulative tp 1, fp 1, fn 2 -> 1 / 5.
    assert v["miou_0.5"] == pytest.approx(0.25)
    assert v["fgiou_0.5"] == pytest.approx(1 / 5)
    # Best mIoU: for t in [0.1, 0.2) s1 predicts {0.9, 0.4, 0.35} (2/3) and s2 both pixels (1/2) -> 7/12; it beats
    # t < 0.1 (1/2, 1/2) and t in (0.35, 0.4) (1, 0). The first threshold attaining it is reported.
    assert v["miou_best"] == pytest.approx(7 / 12) and 0.1 <= v["miou_best_t"] <= 0.12
    assert 0 < v["ap"] <= 1 and v["samples"] == 2


def test_ap_of_a_perfect_ranking_is_high_and_of_a_reversed_one_low():
    good, bad = FixedIntervalMetrics(), FixedIntervalMetrics()
    rng = np.random.default_rng(0)
    for _ in range(5):
        target = rng.random(400) < 0.3
        good.add(np.where(target, 0.75, 0.25) + rng.normal(0, 0.05, 400).clip(-0.2, 0.2), target)
        bad.add(np.where(target, 0.25, 0.75), target)
    assert good.value()["ap"] > 0.6 > bad.value()["ap"]
    assert good.value()["fgiou_best"] > 0.95


def test_refcoco_miou_oiou():
    preds = [np.array([0.9, 0.9, 0.1, 0.1]), np.array([0.9, 0.1])]
    gts = [np.array([1, 0, 0, 0]), np.array([1, 1])]
    s = refcoco_scores(preds, gts)
    assert s["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert s["oiou"] == pytest.approx((1 + 1) / (2 + 2))


# ---- training -----------------------------------------------------------------------------------------
def write_shapes_phrasecut(root: Path, n: int = 2, tasks: int = 2) -> Path:
    from textmask.demo.phrasecut import export_phrasecut

    export_phrasecut(root, {"train": n, "val": 1})
    tasks = json.loads((root / "refer_train.json").read_text())[:tasks]  # two tasks: one batch
    (root / "refer_train.json").write_text(json.dumps(tasks))
    return root


def run_train(tmp_path, name, *extra):
    from train.train_ldznet import main

    data = tmp_path / "data"
    if not data.exists():
        write_shapes_phrasecut(data)
    out = tmp_path / name
    main(["--base", "shapes", "--data", str(data), "--out", str(out), "--batch-size", "2", "--resolution", "64",
          "--num-workers", "0", "--log-every", "1", "--ema", "0.9", *extra])
    return out


def test_training_lowers_the_loss(tmp_path):
    out = run_train(tmp_path, "run", "--steps", "14", "--lr", "1e-3", "--save-every", "100")
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 14
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert (out / "ldznet.safetensors").is_file()


def test_resume_is_bit_exact(tmp_path):
    # --deterministic: where a GPU trains, its fastest kernels are not (seen on an H100); on a CPU it changes nothing.
    common = ("--save-every", "2", "--lr", "1e-3", "--deterministic")
    straight = run_train(tmp_path, "a", "--steps", "4", *common)
    run_train(tmp_path, "b", "--steps", "2", *common)
    resumed = run_train(tmp_path, "b", "--steps", "4", *common, "--resume")
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is the caller's again
    a = load_file(straight / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = load_file(straight / "ldznet.safetensors"), load_file(resumed / "ldznet.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # the exported EMA weights too
    first = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # steps 3-4 did change the weights


def test_two_processes_train_and_resume_bit_exact(tmp_path):
    """Data-parallel training as on several GPUs, here two CPU processes over gloo under torchrun: one log of the
    ranks' mean loss, each rank's RNG state in the checkpoint, and a resume that continues bit-exactly."""
    import os
    import subprocess
    import sys

    data = write_shapes_phrasecut(tmp_path / "data", n=6, tasks=12)  # 3 batches of 2 per rank: resuming skips 2
    # No GPU for the ranks: on a machine with one, accelerate's barrier still names each rank's CUDA device (rank 1's
    # does not exist on a one-GPU machine).
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

    def launch(name, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train.train_ldznet", "--base", "shapes", "--data", str(data), "--out", str(tmp_path / name),
               "--batch-size", "2", "--resolution", "64", "--num-workers", "0", "--log-every", "1", "--ema", "0.9",
               "--lr", "1e-3", "--save-every", "2", "--deterministic", *extra]
        run = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                             timeout=300)
        # torchrun's summary comes last; a rank's own traceback, which names the cause, comes before it.
        assert run.returncode == 0, run.stderr[-8000:]
        return tmp_path / name, run.stdout

    straight, stdout = launch("a", "--steps", "4")
    assert stdout.count("wrote ") == 1  # the main process reports, once
    assert len((straight / "log.jsonl").read_text().splitlines()) == 4  # one log, written by the main process
    assert {f.name for f in (straight / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # two ranks really ran
    launch("b", "--steps", "2")
    resumed, _ = launch("b", "--steps", "4", "--resume")
    a = load_file(straight / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)


def test_evaluate_end_to_end(tmp_path, capsys):
    from train.evaluate import main as evaluate

    out = run_train(tmp_path, "run", "--steps", "2", "--save-every", "100")
    evaluate(["--base", "shapes", "--ldznet", str(out / "ldznet.safetensors"), "--data", str(tmp_path / "data"),
              "--split", "val", "--resolution", "64", "--json", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"miou_0.3", "fgiou_0.3", "fgiou_0.5", "ap", "miou_best", "fgiou_best"} <= scores.keys()
    assert scores["samples"] > 0 and 0 <= scores["miou_0.3"] <= 1
    assert "mIoU@0.3" in capsys.readouterr().out


def test_gradient_checkpointing_and_accumulation(tmp_path):
    plain = run_train(tmp_path, "plain", "--steps", "2", "--save-every", "100", "--ema", "0")
    ckpt = run_train(tmp_path, "ckpt", "--steps", "2", "--save-every", "100", "--ema", "0", "--gradient-checkpointing")
    a, b = load_file(plain / "ldznet.safetensors"), load_file(ckpt / "ldznet.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # recomputation reads the same host features
    accum = run_train(tmp_path, "accum", "--steps", "2", "--save-every", "100", "--batch-size", "1", "--grad-accum", "2")
    assert len((accum / "log.jsonl").read_text().splitlines()) == 2


def test_cosine_schedule_warms_up_then_decays_to_zero(tmp_path):
    from train.train_ldznet import lr_factor

    assert lr_factor(0, 4, 20, "cosine") == pytest.approx(0.25)
    assert lr_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, 4, 20, "constant") == 1.0
    out = run_train(tmp_path, "cos", "--steps", "4", "--save-every", "100", "--lr", "1e-3", "--schedule", "cosine")
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3 and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_init_from_a_lower_resolution_run(tmp_path):
    from textmask.ldznet import load_ldznet

    low = run_train(tmp_path, "low", "--steps", "2", "--save-every", "100", "--lr", "1e-3")
    first = load_ldznet(low / "ldznet.safetensors")
    high = run_train(tmp_path, "high", "--steps", "1", "--save-every", "100", "--resolution", "128", "--lr", "0",
                     "--ema", "0", "--init-from", str(low / "ldznet.safetensors"))
    second = load_ldznet(high / "ldznet.safetensors")
    assert second.train_resolution == 128
    for a, b in zip(first.pools, second.pools):  # every pool's grid is twice as wide, the mean token kept
        side_a, side_b = (int(round((p.positional_embedding.shape[1] - 1) ** 0.5)) for p in (a, b))
        assert side_b == 2 * side_a
        assert torch.equal(a.positional_embedding[:, 0], b.positional_embedding[:, 0])
    s1, s2 = first.state_dict(), second.state_dict()
    same = [k for k in s1 if "positional_embedding" not in k]
    assert all(torch.equal(s1[k], s2[k]) for k in same)  # lr 0: the weights came from the 64 px run
    with pytest.raises(SystemExit, match="not a ZNet"):
        run_train(tmp_path, "bad", "--steps", "1", "--znet", "--init-from", str(low / "ldznet.safetensors"))
    from textmask.ldznet import LDZNet, save_ldznet

    other = dict(first.config, cross_attention_dim=32)  # the same UNet layout over another text encoder
    save_ldznet(LDZNet(other, upsample_steps=first.upsample_steps, train_resolution=64), tmp_path / "other.safetensors")
    with pytest.raises(SystemExit, match="another base model"):
        run_train(tmp_path, "bad2", "--steps", "1", "--init-from", str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "bad2").exists()  # refused before the run folder is made
    with pytest.raises(SystemExit, match="not found"):
        run_train(tmp_path, "bad3", "--steps", "1", "--init-from", str(tmp_path / "missing.safetensors"))
    assert not (tmp_path / "bad3").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "steps must be in [1, 1000000000]"),
    (["--lr", "nan"], "lr must be"),
    (["--lr", "inf"], "lr must be"),
    (["--dice", "nan"], "dice must be"),
    (["--ema", "1"], "ema must be below 1"),
    (["--ema", "1.5"], "ema must be in [0, 1]"),
    (["--grad-accum", "0"], "grad-accum must be in [1, 4096]"),
    (["--save-every", "0"], "save-every must be in [1, "),
    (["--log-every", "0"], "log-every must be in [1, "),
    (["--batch-size", "0"], "batch-size must be in [1, 4096]"),
    (["--num-workers", "-1"], "num-workers must be in [0, 1024]"),
    (["--weight-decay", "-1"], "weight-decay must be in [0, 10]"),
    (["--resolution", "0"], "resolution must be in [64, 4096]"),
    (["--resolution", "72"], "--resolution must be a multiple of 16 for this base model"),
    (["--steps", "1.5"], "not a whole number: '1.5'"),
    (["--batch-size", "3"], "fewer than one batch of 3"),
])
def test_bad_settings_are_one_line_and_leave_no_run_folder(tmp_path, capsys, extra, message):
    from train.train_ldznet import main

    data = write_shapes_phrasecut(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--base", "shapes", "--data", str(data), "--out", str(out), "--batch-size", "2", "--resolution", "64",
              "--num-workers", "0", "--steps", "1", *extra])
    said = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in said and "Traceback" not in said
    assert not out.exists()


def test_bad_data_and_paths_are_one_line_and_leave_no_run_folder(tmp_path):
    from train.train_ldznet import main

    def train(data, out=None):
        out = out or tmp_path / "run"
        with pytest.raises(SystemExit) as e:
            main(["--base", "shapes", "--data", str(data), "--out", str(out), "--batch-size", "1", "--resolution", "64",
                  "--num-workers", "0", "--steps", "1"])
        assert not (tmp_path / "run").exists()
        return str(e.value.code)

    good = write_shapes_phrasecut(tmp_path / "data")
    tasks = json.loads((good / "refer_train.json").read_text())
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is not a folder" in train(a_file)
    assert "--out" in train(good, a_file) and "is a file" in train(good, a_file)
    for broken, message in [
        ([{k: v for k, v in tasks[0].items() if k != "Polygons"}], "an entry lacks 'Polygons'"),
        ([dict(tasks[0], image_id=987654)], "image 987654 of refer_train.json is not in image_data_split.json"),
        ({"tasks": tasks}, "do not follow PhraseCut's layout"),
    ]:
        (good / "refer_train.json").write_text(json.dumps(broken))
        said = train(good)
        assert message in said and said.startswith("train_ldznet: error:") and "\n" not in said


def test_evaluate_checks_its_settings_and_output_before_any_work(tmp_path, capsys):
    from train.evaluate import main as evaluate

    data = write_shapes_phrasecut(tmp_path / "data")
    args = ["--base", "shapes", "--ldznet", str(tmp_path / "missing.safetensors"), "--data", str(data)]
    for extra, message in [(["--resolution", "-8"], "resolution must be in [64, 4096]"),
                           (["--limit", "-1"], "limit must be in [1, "),
                           (["--json", str(tmp_path / "no" / "such" / "x.json")], "")]:
        with pytest.raises(SystemExit) as e:
            evaluate(args + extra)
        said = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
        assert message in said and "Traceback" not in said
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(SystemExit, match="--json .* is a folder"):  # refused before the weights are even looked for
        evaluate(args + ["--json", str(tmp_path / "folder.json")])
