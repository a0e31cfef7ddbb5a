"""PAMR parity: textmask's edge refinement against Araslanov & Roth's PAMR as PaulCouairon/DiffCut ships it.

    DIFFCUT_ROOT=/path/to/PaulCouairon/DiffCut python bench/parity/parity_pamr.py [--write-fixture]

Written against PaulCouairon/DiffCut@aa16df4 (``tools/pamr.py``, a copy of visinf/1-stage-wseg's
``models/mods/pamr.py``, imported as it is; the ``.to("cuda")`` of its kernels is sent to the CPU while it is
built). Both run at textmask's settings (dilations 1, 2, 4, 8, 12, 24; 10 iterations) on what ``edge_refined``
hands ``pamr`` while the Shapes model masks test scenes at 128 px: its maps on a grid twice the latent's and the
image resized to that grid. The cases: three scenes (64×64), the first again with a block painted one colour
(384 pixels of zero local deviation), a 128×80 crop (80×48) and a 12×128 strip (16×208: narrower than the largest
dilation). The harness prints, per case, the end-to-end difference, both float32 results against the reference
run in float64, and the steps: the neighbour weights (they hold the colour differences, the local deviation, the
border padding and the softmax) and the first iteration; with ``--write-fixture`` it stores the inputs and the
reference's output in tests/fixtures/parity/, which tests/test_parity.py checks in CI without the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import command_line, relative_difference, write_fixture

from textmask import postprocess
from textmask.demo.model import load_demo_masker
from textmask.demo.scenes import make_scene, split_seeds
from textmask.postprocess import PAMR_DILATIONS, PAMR_ITERATIONS, pamr

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "pamr.npz"
SCENES = 3
# (top, left, h, w) of the block painted one colour in the first scene's image: its top-left 16×24 pixels see only
# that colour at every dilation (replicated at the border), so their local deviation is 0.
FLAT = (0, 0, 40, 48)
CROPS = {"crop_128x80": (3, 0, 128, 24, 80), "strip_12x128": (4, 60, 12, 0, 128)}  # scene, top, h, left, w


def load_reference(root: Path):
    """The reference's ``PAMR`` class; its kernels are made on the CPU (the module's ``.to("cuda")``)."""
    spec = importlib.util.spec_from_file_location("reference_pamr", root / "tools" / "pamr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    to = torch.Tensor.to

    def cpu_to(self, *args, **kwargs):
        return to(self, *("cpu" if a == "cuda" else a for a in args), **kwargs)

    def build(dtype=torch.float32):
        torch.Tensor.to = cpu_to
        try:
            return module.PAMR(num_iter=PAMR_ITERATIONS, dilations=list(PAMR_DILATIONS)).to(dtype)
        finally:
            torch.Tensor.to = to

    return build


@functools.cache
def masker():
    return load_demo_masker()


def edge_refined_inputs(image: np.ndarray, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [1, P, h, w], image [1, 3, h, w]) as ``edge_refined`` hands them to ``pamr`` when the Shapes model
    masks ``image`` with ``phrases``."""
    calls = []
    real = postprocess.pamr

    def record(maps, guide, *args, **kwargs):
        calls.append((maps.clone(), guide.clone()))
        return real(maps, guide, *args, **kwargs)

    postprocess.pamr = record
    try:
        masker().mask(image, " | ".join(phrases), pamr=True)
    finally:
        postprocess.pamr = real
    (maps, guide), = calls
    return maps, guide


def cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (maps [1, P, H, W], image [1, 3, H, W])."""
    scenes = [make_scene(seed) for seed in split_seeds("test", 5)]
    out = {}
    for i in range(SCENES):
        out[f"scene{i}"] = edge_refined_inputs(scenes[i].image, [o.phrase for o in scenes[i].objects])
    maps, guide = out["scene0"]
    top, left, h, w = FLAT
    flat = guide.clone()
    flat[..., top : top + h, left : left + w] = flat[..., top : top + h, left : left + w].mean((-2, -1), keepdim=True)
    out["flat"] = (maps, flat)
    for name, (i, top, h, left, w) in CROPS.items():
        crop = np.ascontiguousarray(scenes[i].image[top : top + h, left : left + w])
        out[name] = edge_refined_inputs(crop, [o.phrase for o in scenes[i].objects])
    return out


def steps(reference, maps: torch.Tensor, guide: torch.Tensor) -> None:
    """Print textmask's neighbour weights (as ``pamr`` hands them to ``_propagated``) and its first iteration
    against the reference's: max |difference| of each."""
    with torch.no_grad():
        ref_std = reference.aff_std(guide)
        ref_weight = (-reference.aff_x(guide) / (1e-8 + 0.1 * ref_std)).mean(1, keepdim=True).softmax(2)
        ref_step = (reference.aff_m(maps) * ref_weight).sum(2)  # the body of its loop, once
    weights = []
    real = postprocess._propagated

    def record(x, weight, dilations):
        weights.append(weight)
        return real(x, weight, dilations)

    postprocess._propagated = record
    try:
        step = pamr(maps, guide, iterations=1)
    finally:
        postprocess._propagated = real
    same = real(maps, ref_weight, list(PAMR_DILATIONS))
    flat = int((ref_std == 0).all(1).sum())
    print(f"  weights [{weights[0].shape[2]} neighbours] {float((weights[0] - ref_weight).abs().max()):.1e} "
          f"({flat} pixels with σ = 0); first iteration {float((step - ref_step).abs().max()):.1e}, on the "
          f"reference's weights {float((same - ref_step).abs().max()):.1e}")


def main() -> None:
    args = command_line(__doc__, "DIFFCUT_ROOT", "PaulCouairon/DiffCut")
    build = load_reference(Path(args.reference))
    reference, reference64 = build(), build(torch.float64)
    stored, names = {}, []
    for name, (maps, guide) in cases().items():
        with torch.no_grad():
            ref = reference(guide, maps)  # its bilinear resize of the maps to the image's size is the identity here
            exact = reference64(guide.double(), maps.double())
        ours = pamr(maps, guide)
        print(f"{name}: {tuple(maps.shape[1:])}, max relative difference {relative_difference(ours, ref):.1e} "
              f"(against the reference in float64: textmask {relative_difference(ours.double(), exact):.1e}, "
              f"the reference {relative_difference(ref.double(), exact):.1e})")
        steps(reference, maps, guide)
        names.append(name)
        stored.update({f"maps_{name}": maps[0].numpy(), f"image_{name}": guide[0].numpy(),
                       f"reference_{name}": ref[0].numpy()})
    if args.write_fixture:
        write_fixture(FIXTURE, cases=np.array(names), **stored)


if __name__ == "__main__":
    main()
