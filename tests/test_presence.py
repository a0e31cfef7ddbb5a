"""Each phrase's presence score (``MaskResult.presence``) and the ``min_presence`` gate, on the Shapes model."""

import numpy as np
import pytest
import torch

from textmask.demo.evaluate import absent_phrases, object_phrases, roc_auc
from textmask.demo.scenes import make_scene, split_seeds


@pytest.fixture(scope="module")
def shapes():
    from textmask.demo.model import load_demo_masker

    return load_demo_masker()


def test_presence_tells_present_phrases_from_absent_ones(shapes):
    # Each phrase asked alone, as the bench's absent-phrase rows ask it: ROC AUC 0.836 on 150 val scenes.
    scores, present = [], []
    for seed in split_seeds("val", 20):
        scene = make_scene(seed)
        for phrases, is_present in ((object_phrases(scene), True), (absent_phrases(scene), False)):
            for phrase in phrases:
                out = shapes.mask(scene.image, phrase)
                assert set(out.presence) == {phrase} and out.presence[phrase].shape == (1,)
                scores.append(float(out.presence[phrase][0]))
                present.append(is_present)
    scores, present = np.array(scores), np.array(present)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert roc_auc(scores, present) > 0.75
    # A featureless image is the easy case: its map spreads over the whole image.
    gray = shapes.mask(np.full((128, 128, 3), 0.5, np.float32), "red circle").presence["red circle"][0]
    assert gray < np.quantile(scores[present], 0.05)


def test_presence_follows_each_image_through_batches(shapes):
    images = np.stack([make_scene(s).image for s in split_seeds("val", 3)])
    together = shapes.mask(images, "red circle | blue square", batch_size=3).presence
    alone = shapes.mask(images, "red circle | blue square", batch_size=1).presence
    assert list(together) == ["red circle", "blue square"]
    for phrase in together:
        assert together[phrase].shape == (3,) and torch.allclose(together[phrase], alone[phrase], atol=1e-5)
    assert not torch.allclose(together["red circle"], together["red circle"][:1].expand(3))  # not one value for all


def test_min_presence_empties_the_terms_below_it(shapes):
    image = make_scene(split_seeds("val", 1)[0]).image
    prompt = "green star | red circle"  # the scene holds two green stars and no red circle
    plain = shapes.mask(image, prompt)
    assert torch.equal(shapes.mask(image, prompt, min_presence=0.0).masks, plain.masks)  # 0 is off
    low, high = sorted(plain.presence.values(), key=float)
    gone = next(p for p, v in plain.presence.items() if v is low)
    kept = next(p for p, v in plain.presence.items() if v is high)
    gated = shapes.mask(image, prompt, min_presence=(float(low) + float(high)) / 2)
    assert not gated.terms[gone].any() and torch.equal(gated.terms[kept], plain.terms[kept])
    assert gated.masks.any() and not (gated.masks.bool() & ~plain.masks.bool()).any()
    assert gated.presence.keys() == plain.presence.keys()
    # Nothing passes a gate of 1: an all-zero mask at the input's size, whatever else is asked.
    for soft in (False, True):
        none = shapes.mask(image[:100, :90], prompt, min_presence=1.0, soft=soft, blur=2.0)
        assert none.masks.shape == (1, 100, 90) and not none.masks.any()
    assert shapes.mask(image, prompt, min_presence=1.0, invert=True).masks.all()


def test_methods_without_a_presence_measure_none(shapes):
    image = make_scene(split_seeds("val", 1)[0]).image
    assert shapes.mask(image, "red circle", method="noise-diff").presence == {}
    assert shapes.mask(image, "red circle", heads="mean").presence == {}
    assert shapes.mask(image, "red circle", aggregation="daam").presence == {}


def test_the_cli_gate(tmp_path):
    from PIL import Image

    from textmask.cli import main
    from textmask.demo.model import MODEL_DIR

    image = make_scene(split_seeds("val", 1)[0]).image
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "scene.png")
    for gate, name in (("0", "open.png"), ("1", "shut.png")):
        args = ["mask", str(tmp_path / "scene.png"), "green star", "--out", str(tmp_path / name),
                "--min-presence", gate, "--checkpoint", str(MODEL_DIR), "--device", "cpu"]
        assert main(args) == 0
    assert np.asarray(Image.open(tmp_path / "open.png")).any()
    assert not np.asarray(Image.open(tmp_path / "shut.png")).any()
