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


def test_presence_is_the_head_mean_maps_information_on_ref_diffs_grid():
    # Layers at 8×8, 4×4 (the coarsest outside the mid block), a mid-block 2×2 and a one-pixel grid, which says
    # nothing about where a phrase is and is left out, as a model whose every grid were one pixel would give None.
    import math

    from textmask.capture import AttentionLayer
    from textmask.methods import CrossAttentionMaps

    g = torch.Generator().manual_seed(2)
    groups = [[1, 2], [5]]
    maps, mean = CrossAttentionMaps(groups), CrossAttentionMaps(groups, heads="mean")
    layers = [("down.0", (8, 8)), ("down.1", (4, 4)), ("up.0", (4, 4)), ("mid_block.0", (2, 2)), ("down.2", (1, 1))]
    expected = []
    for i, (name, size) in enumerate(layers):
        n = size[0] * size[1]
        p = (torch.rand(2, 3, n, 10, generator=g) * 6).softmax(-1)  # [B, heads, N, keys]
        layer = AttentionLayer(name, "cross", i + 1, i + 1, size, 3)
        maps(layer, 0, p)
        mean(layer, 0, p.mean(1))
        if size == (4, 4):
            phrase = torch.stack([p[..., group].mean(-1) for group in groups], -1).mean(1)  # [B, N, P]
            dist = phrase / phrase.sum(1, keepdim=True)
            expected.append(1 + (dist * dist.log()).sum(1) / math.log(n))
    presence = maps.presence()
    torch.testing.assert_close(presence, torch.stack(expected).mean(0), atol=1e-6, rtol=0)
    assert presence.shape == (2, 2) and ((presence > 0) & (presence < 1)).all()
    assert mean.presence() is None
    alone = CrossAttentionMaps(groups)
    alone(AttentionLayer("down.0", "cross", 1, 1, (1, 1), 3), 0, torch.rand(2, 3, 1, 10).softmax(-1))
    assert alone.presence() is None


def test_min_presence_holds_for_a_fixed_threshold_and_on_video(shapes):
    image = make_scene(split_seeds("val", 1)[0]).image
    plain = shapes.mask(image, "green star AND NOT red circle", threshold=0.0)
    gate = (float(plain.presence["green star"][0]) + float(plain.presence["red circle"][0])) / 2
    assert plain.presence["green star"] > plain.presence["red circle"]
    # At threshold 0 every pixel passes "red circle" alone, so without the gate nothing is left of the star.
    assert not plain.masks.any()
    gated = shapes.mask(image, "green star AND NOT red circle", threshold=0.0, min_presence=gate)
    assert gated.masks.all() and not gated.terms["red circle"].any()  # NOT (nothing) leaves all of threshold 0
    frames = np.stack([image, np.full_like(image, 0.5), image])
    smoothed = shapes.mask(frames, "green star", temporal=1.0).presence["green star"]
    raw = shapes.mask(frames, "green star").presence["green star"]
    assert smoothed[1] > raw[1] and smoothed[0] < raw[0]  # the gray frame's score is pulled towards its neighbours'


def test_a_trace_measures_and_gates_presence_as_mask_does(shapes):
    image = make_scene(split_seeds("val", 1)[0]).image
    trace = shapes.trace(image)
    out = trace.mask("green star | red circle")
    assert list(out.presence) == ["green star", "red circle"]
    assert all(v.shape == (1,) and 0 < float(v[0]) < 1 for v in out.presence.values())
    assert out.masks.any() and not trace.mask("green star | red circle", min_presence=1.0).masks.any()
    assert trace.mask("green star", heads="mean").presence == {}
