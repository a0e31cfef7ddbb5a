"""iSeg parity: textmask's ``refine_mode="iseg"`` against linsun449/iseg.code's own entropy-reduced walk.

    ISEG_ROOT=/path/to/iseg.code python bench/parity/parity_iseg.py [--write-fixture]

Written against linsun449/iseg.code@2e8fb32. The reference's own path from one self-attention layer's scores to
the refined maps runs as it is: ``StableDiffusion.get_attention_map`` (``base/stable_difusion.py``: the softmax
over keys and its layout, [batch, heads, keys, query rows, query columns]) and ``iSeg.get_att_map``
(``wsss/iSeg.py``, its default branch: the entropy-reduced self-attention of heads 1 and 2 of its one 64×64 layer,
``--iter`` steps, each shifted to a minimum of 0 and a sum of 1, then min-max). Both are called as functions on
stand-in objects: ``attention_maps`` holds the layer's scores (heads 1 and 2 the log of the self-attention, so that
its softmax gives that matrix back), ``process_cross_att`` hands over the cross-attention maps as they are, and
``test_mask_size`` is 64, where its final bilinear resize is the identity (the resize to 512 is measured apart).
textmask's ``refine_with_self_attention(..., mode="iseg")`` gets the same softmax and maps. Inputs: what textmask's
attention method hands its refinement (``SelfAttentionAggregate(weighting="layer")`` and AggSD's cross maps) when
the Shapes model masks three test scenes at 256 px (a 64×64 grid, the reference's hard-coded one), and the fixture's
self-attention (tests/parity_iseg.py) with the Shapes model's cross maps of its scene. Each at 1 and 10 steps and
at both of the reference's entropy weights (0.015 for VOC, textmask's; 0.1 for COCO). Besides the difference, it
prints textmask's given the matrix in the reference's memory layout (keys first), and against the reference's walk
on SAᵀ. Import fix: cv2, texttable and pytorch_lightning, imported but not called here, are empty modules where
missing (cv2 with a version string, which ``util/attn.py`` reads); the installed diffusers is imported before the
checkout, which holds its own copy, goes on the path. With ``--write-fixture`` it stores the fixture's cross maps
and the reference's maps in tests/fixtures/parity/, which tests/test_parity.py checks in CI without the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import parity_iseg as recipe
from common import command_line, relative_difference, stub_missing, write_fixture

from textmask.demo.model import load_demo_masker
from textmask.demo.scenes import make_scene, split_seeds
from textmask.methods import attention
from textmask.postprocess import resize

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "iseg.npz"
LAYER = "up_blocks[3].attentions[1].transformer_blocks[0].attn1"  # its one self-attention layer at 64×64
SCENES = 3
STEPS = (1, 10)
ENTROPY = {"VOC": 0.015, "COCO": 0.1}  # wsss/arguments.py's --ent per dataset


def load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_reference(root: Path):
    """(``StableDiffusion.get_attention_map``, ``iSeg.get_att_map``) of the checkout."""
    import diffusers  # noqa: F401  (the installed one, before the checkout's own copy is on the path)
    import transformers  # noqa: F401

    stub_missing("cv2", "texttable", "pytorch_lightning")
    if not hasattr(sys.modules["cv2"], "__version__"):
        sys.modules["cv2"].__version__ = "4.0.0"
    sys.path[:0] = [str(root), str(root / "wsss")]  # for its ``base.``, ``util.``, ``data.`` and ``featurecluster``
    stable = load("stable_difusion", root / "base" / "stable_difusion.py")  # base/iSeg.py imports it by that name
    wsss = load("reference_iseg", root / "wsss" / "iSeg.py")
    return stable.StableDiffusion.get_attention_map, wsss.iSeg.get_att_map


def layer_scores(logits: torch.Tensor) -> torch.Tensor:
    """The 64×64 layer's scores [1, 3 heads, N, N] from ``logits`` [N, N] (a query per row): heads 1 and 2, the ones
    the reference averages, hold them; head 0 is uniform."""
    return torch.stack([torch.zeros_like(logits), logits, logits])[None]


def reference_refined(reference, scores: torch.Tensor, cross: torch.Tensor, steps: int, entropy: float,
                      mask_size: int = recipe.SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reference's refined maps [P, mask_size, mask_size], the self-attention [N, N] it read) from the
    layer's ``scores`` and cross maps [P, 64, 64]."""
    get_attention_map, get_att_map = reference
    _, self_maps = get_attention_map(types.SimpleNamespace(attention_maps={LAYER: scores}))
    config = types.SimpleNamespace(no_use_self_ers=True, ent=entropy, iter=steps, test_mask_size=mask_size)
    flat = cross.reshape(cross.shape[0], -1).T[None]  # [1, N, P], a pixel per row, as its process_cross_att gives
    stand_in = types.SimpleNamespace(config=config, process_cross_att=lambda maps: flat)
    with torch.no_grad():
        maps, _ = get_att_map(stand_in, {}, self_maps)
    read = self_maps[64][:, [1, 2]].mean(1).flatten(-2, -1).permute(0, 2, 1)[0]  # its trans_mat before scaling
    return maps, read


def transposed_reference(reference, probs: torch.Tensor, cross: torch.Tensor, steps: int,
                         entropy: float) -> torch.Tensor:
    """The reference's get_att_map given ``probs`` in the other layout (query rows first): its walk on probsᵀ."""
    _, get_att_map = reference
    n = probs.shape[0]
    config = types.SimpleNamespace(no_use_self_ers=True, ent=entropy, iter=steps, test_mask_size=recipe.SIDE)
    flat = cross.reshape(cross.shape[0], -1).T[None]
    stand_in = types.SimpleNamespace(config=config, process_cross_att=lambda maps: flat)
    layout = probs.reshape(1, 1, n, recipe.SIDE, recipe.SIDE).expand(1, 3, -1, -1, -1)
    with torch.no_grad():
        maps, _ = get_att_map(stand_in, {}, {64: layout})
    return maps


def ours(probs: torch.Tensor, cross: torch.Tensor, steps: int, entropy: float) -> torch.Tensor:
    """textmask's iSeg refinement at entropy weight ``entropy`` (the module's ISEG_ENTROPY, set for the call)."""
    kept = attention.ISEG_ENTROPY
    attention.ISEG_ENTROPY = entropy
    try:
        side = (recipe.SIDE, recipe.SIDE)
        return attention.refine_with_self_attention(cross[None], probs[None], side, mode="iseg", steps=steps)[0]
    finally:
        attention.ISEG_ENTROPY = kept


@functools.cache
def masker():
    return load_demo_masker()


def refinement_inputs(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(self-attention [N, N], cross maps [P, 64, 64]) as textmask's attention method hands them to its refinement
    when the Shapes model masks test scene ``index`` at 256 px with its objects' phrases."""
    scene = make_scene(split_seeds("test", index + 1)[index])
    calls = []
    real = attention.refine_with_self_attention

    def record(cross, self_attention, size, mode="transpose", steps=1):
        calls.append((self_attention[0].clone(), cross[0].clone(), tuple(size)))
        return real(cross, self_attention, size, mode, steps)

    attention.refine_with_self_attention = record
    try:
        masker().mask(scene.image, " | ".join(o.phrase for o in scene.objects), resolution=4 * recipe.SIDE,
                      refine_mode="iseg", refine_steps=10, pamr=False)
    finally:
        attention.refine_with_self_attention = real
    (probs, cross, size), = calls
    assert size == (recipe.SIDE, recipe.SIDE) and cross.shape[-2:] == size, (size, cross.shape)
    return probs, cross


def compare(reference, logits: torch.Tensor, cross: torch.Tensor) -> dict[str, np.ndarray]:
    """Print textmask against the reference at every step count and entropy weight, on self-attention
    softmax(``logits``); the reference's maps."""
    scores = layer_scores(logits)
    probs = logits.softmax(-1)
    its_layout = probs.T.contiguous().T  # the same values in the reference's memory layout: keys, then queries
    out = {}
    for label, entropy in ENTROPY.items():
        for steps in STEPS:
            ref, read = reference_refined(reference, scores, cross, steps, entropy)
            mine = ours(probs, cross, steps, entropy)
            same_layout = ours(its_layout, cross, steps, entropy)
            swapped = transposed_reference(reference, probs, cross, steps, entropy)
            print(f"  {label} ({entropy}), {steps:>2} steps: max relative difference "
                  f"{relative_difference(mine, ref):.1e} (self-attention read {float((read - probs).abs().max()):.0e}; "
                  f"in its memory layout "
                  f"{relative_difference(same_layout, ref):.1e}); against its walk on SAᵀ "
                  f"{relative_difference(mine, swapped):.1e}")
            out[f"{label}_{steps}"] = ref.numpy()
    # Outside the walk: the reference resizes to its test_mask_size (512) before its min-max, textmask after.
    ref512, _ = reference_refined(reference, scores, cross, 10, ENTROPY["VOC"], mask_size=512)
    mine512 = resize(ours(probs, cross, 10, ENTROPY["VOC"]), (512, 512))
    print(f"  resized to 512 px after 10 steps (VOC), min-max before the resize against after: max |difference| "
          f"{float((mine512 - ref512).abs().max()):.1e}")
    return out


def main() -> None:
    args = command_line(__doc__, "ISEG_ROOT", "linsun449/iseg.code")
    reference = load_reference(Path(args.reference))
    for i in range(SCENES):
        probs, cross = refinement_inputs(i)
        print(f"Shapes test scene {i} at 256 px: {cross.shape[0]} maps, self-attention {tuple(probs.shape)}")
        compare(reference, probs.clamp_min(1e-38).log(), cross)  # its softmax gives the matrix back
    logits = recipe.self_attention_logits()
    _, cross = refinement_inputs(recipe.SCENE)
    print(f"fixture: tests/parity_iseg.py's self-attention of test scene {recipe.SCENE}, the Shapes model's cross maps")
    stored = compare(reference, logits, cross)
    if args.write_fixture:
        write_fixture(FIXTURE, cross=cross.numpy(), **stored)


if __name__ == "__main__":
    main()
