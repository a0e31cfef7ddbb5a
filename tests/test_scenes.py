"""Shapes scenes: determinism, exact masks, captions, relations and the PhraseCut export."""

import json
import math

import numpy as np
import pytest
from skimage.draw import polygon2mask

from textmask.demo.phrasecut import export_phrasecut
from textmask.demo.scenes import SHAPES, ShapeObject, make_scene, split_seeds


def test_deterministic():
    a, b = make_scene(123), make_scene(123)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.caption == b.caption and a.relations == b.relations
    assert not np.array_equal(a.image, make_scene(124).image)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("radius", [9.0, 17.5, 30.0])
def test_mask_area_matches_analytic(shape, radius):
    obj = ShapeObject(shape, "red", 64.3, 61.7, radius, 0.4)
    area = obj.raster(128).sum()
    perimeter_px = 2 * math.pi * radius * (1.6 if shape == "star" else 1.0)
    assert abs(area - obj.area()) <= 0.5 * perimeter_px  # rasterisation error lives on the boundary
    fine = obj.raster(128, 8).sum() / 64  # finer grids converge to the analytic area
    assert abs(fine - obj.area()) < abs(area - obj.area()) + 1 and abs(fine - obj.area()) / obj.area() < 0.02


def test_scene_contents():
    scenes = [make_scene(s) for s in split_seeds("test", 200)]
    counts = [len(s.objects) for s in scenes]
    assert min(counts) == 1 and max(counts) == 4
    for s in scenes:
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.float32
        assert 0 <= s.image.min() and s.image.max() <= 1
        assert s.masks.shape == (len(s.objects), 128, 128)
        assert not (s.masks.sum(0) > 1).any()  # visible masks never overlap
        for o in s.objects:
            assert o.phrase in s.caption
    # colours or shapes repeat within a scene often enough that one word does not identify an object
    repeats = sum(any(len({getattr(o, a) for o in s.objects}) < len(s.objects) for a in ("shape", "colour"))
                  for s in scenes if len(s.objects) > 1)
    assert repeats > 0.3 * sum(len(s.objects) > 1 for s in scenes)
    relational = [r for s in scenes for r in s.relations]
    assert len(relational) > 40
    for s in scenes:
        for phrase, target in s.relations:
            shape = phrase.split()[-1] if "larger" in phrase or "smaller" in phrase else phrase.split()[1]
            assert s.objects[target].shape == shape


def test_relations_are_right():
    for seed in split_seeds("val", 300):
        s = make_scene(seed)
        for phrase, target in s.relations:
            others = [i for i, o in enumerate(s.objects) if o.shape == s.objects[target].shape and i != target]
            (other,) = others
            if phrase.endswith("on the left"):
                assert s.objects[target].cx < s.objects[other].cx
            if phrase.endswith("on the right"):
                assert s.objects[target].cx > s.objects[other].cx
            if "larger" in phrase:
                assert s.masks[target].sum() > s.masks[other].sum()


def test_splits_are_disjoint():
    train, val, test = (set(split_seeds(s, 1000)) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)


def test_phrasecut_export(tmp_path):
    totals = export_phrasecut(tmp_path, {"train": 6, "val": 2, "test": 2})
    assert set(totals) == {"train", "val", "test"}
    tasks = json.loads((tmp_path / "refer_train.json").read_text())
    assert len(tasks) == totals["train"]
    split = json.loads((tmp_path / "image_data_split.json").read_text())
    assert len(split) == 10 and {e["split"] for e in split} == {"train", "val", "test"}
    for t in tasks:
        assert set(t) == {"task_id", "image_id", "phrase", "Polygons"}
        assert (tmp_path / "images" / f"{t['image_id']}.jpg").exists()
        scene = make_scene(t["image_id"])
        # Rasterising the exported polygons (OR over instances) gives back the scene's mask.
        raster = np.zeros((128, 128), bool)
        for instance in t["Polygons"]:
            for poly in instance:
                xy = np.asarray(poly) - 0.5
                raster ^= polygon2mask((128, 128), xy[:, ::-1])
        if t["phrase"] in {o.phrase for o in scene.objects}:
            truth = scene.phrase_mask(t["phrase"])
        else:
            truth = scene.masks[dict(scene.relations)[t["phrase"]]]
        inter, union = (raster & truth).sum(), (raster | truth).sum()
        assert inter / union > 0.9


def test_metrics_on_known_arrays():
    from textmask.demo.evaluate import hungarian_miou, iou, pointing, roc_auc

    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert iou(a, b) == 4 / 12 and iou(a, a) == 1.0 and iou(~a & a, ~a & a) == 1.0
    scores = np.arange(16, dtype=float).reshape(4, 4)
    assert roc_auc(scores, scores >= 8) == 1.0 and roc_auc(scores, scores < 8) == 0.0
    assert roc_auc(np.ones((4, 4)), a) == 0.5  # ties
    assert pointing(scores, scores == 15) == 1.0 and pointing(scores, scores == 0) == 0.0
    segs = np.stack([b, ~b])
    assert hungarian_miou(segs, [b, ~b]) == 1.0
    assert hungarian_miou(segs[:1], [b, ~b]) == 0.5  # an unmatched region counts as 0


def test_boundary_f_and_instance_matches_on_known_arrays():
    from textmask.demo.evaluate import boundary, boundary_f, instance_matches

    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    assert boundary(gt).sum() == 4 * 19 and boundary_f(gt, gt) == 1.0
    shifted = np.roll(gt, 1, axis=1)  # one pixel off: within the 1 px reach of a 40 px image
    assert boundary_f(shifted, gt) == 1.0
    far = np.roll(gt, 6, axis=1)  # the left and right edges miss, top and bottom mostly still meet
    assert 0.2 < boundary_f(far, gt) < 0.8
    assert boundary_f(np.zeros_like(gt), gt) == 0.0 and boundary_f(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    a, b = gt.copy(), np.zeros_like(gt)
    b[32:38, 32:38] = True
    assert instance_matches([b, a], [a, b]) == 2 and instance_matches([a | b], [a, b]) == 1
    assert instance_matches([], [a]) == 0 and instance_matches([far], [gt]) == 1  # IoU 0.54 is a match
    assert instance_matches([np.roll(gt, 9, axis=1)], [gt]) == 0  # IoU 0.38 is not


def test_phrase_groups_and_subsets():
    from textmask.demo.evaluate import Scores, phrase_groups
    from textmask.demo.scenes import Scene

    def scene(objects, areas):
        masks = np.zeros((len(objects), 10, 10), bool)
        for m, area in zip(masks, areas):
            m.flat[:area] = True
        return Scene(0, np.zeros((10, 10, 3), np.float32), objects, masks, "")

    def obj(colour, shape):
        return ShapeObject(shape, colour, 0, 0, 1, 0)

    scenes = [scene([obj("red", "circle"), obj("red", "square"), obj("blue", "triangle")], [5, 20, 60]),
              scene([obj("green", "star")], [40])]
    groups = phrase_groups(scenes)
    # phrases in order: red circle, red square, blue triangle, green star
    assert groups["a word shared in the scene"] == [True, True, False, False]
    assert groups["no word shared"] == [False, False, True, True]
    assert groups["only object in the scene"] == [False, False, False, True]
    assert groups["smallest third"] == [True, True, False, False]
    assert groups["largest third"] == [False, False, True, False]
    s = Scores()
    for value in (0.0, 1.0, 1.0, 1.0):  # IoU 0, 0.5, 0.5, 0.5
        gt = np.zeros((2, 2), bool)
        gt[0] = True
        s.add(np.full((2, 2), value), np.full((2, 2), value), gt)
    assert s.subset(groups["no word shared"]).summary()["iou"] == 0.5
    assert s.subset(groups["a word shared in the scene"]).iou == [0.0, 0.5]
    assert len(s.subset(groups["only object in the scene"]).by_threshold) == 1
    with pytest.raises(ValueError):
        s.subset([True])
