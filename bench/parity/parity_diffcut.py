"""DiffCut parity: textmask against PaulCouairon/DiffCut's own recursive normalised cut on identical features.

    DIFFCUT_ROOT=/path/to/PaulCouairon/DiffCut python bench/parity/parity_diffcut.py [--write-fixture]

Written against PaulCouairon/DiffCut@aa16df4 (``diffcut/recursive_normalized_cut.py`` and ``tools/utils.py``, imported
as they are; their hard-coded ``.to("cuda")`` is sent to the CPU here). The features are the Shapes model's, read by
``methods.diffcut.encoder_features`` from test scenes at DiffCut's settings, and the reference's ``generate_masks``
labels them at a 128 px mask size (its concept assignment). The harness prints, per scene, the segment counts and
the adjusted Rand index between the two label maps; with ``--write-fixture`` it stores the features and the
reference's labels in tests/fixtures/parity/, which tests/test_parity.py checks in CI without the reference.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import command_line, write_fixture  # noqa: E402
from textmask import defaults, forward  # noqa: E402
from textmask.demo.model import load_demo_masker  # noqa: E402
from textmask.demo.scenes import make_scene, split_seeds  # noqa: E402
from textmask.methods.diffcut import concept_scores, encoder_features, recursive_ncut  # noqa: E402
from textmask.methods.segments import _full_res_labels, encoder_modules  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "diffcut.npz"
SCENES = 6
MASK_SIZE = (128, 128)


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a.reshape(-1), b.reshape(-1)))


def load_reference(root: Path):
    """The reference's DiffCut class, its CUDA transfers sent to the CPU."""
    to = torch.Tensor.to

    def cpu_to(self, *args, **kwargs):
        args = tuple("cpu" if a == "cuda" else a for a in args)
        return to(self, *args, **kwargs)

    torch.Tensor.to = cpu_to
    sys.path.insert(0, str(root))  # for its ``from tools.utils import MaskPooling``
    spec = importlib.util.spec_from_file_location("reference_rnc", root / "diffcut" / "recursive_normalized_cut.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DiffCut()


def scene_features() -> list[np.ndarray]:
    """The encoder features [16, 16, C] of the first test scenes, as textmask's DiffCut forward reads them."""
    masker = load_demo_masker()
    host = masker.host
    modules = encoder_modules(host)
    cond = forward.encode_prompts(host, [""])
    out = []
    for seed in split_seeds("test", SCENES):
        images = forward.prepare_images(host, make_scene(seed).image, None)
        latents = forward.encode(host, images.pixels, images.working)
        x, sigma = forward.add_noise(host, latents, defaults.DIFFCUT_TIMESTEP, 0)
        features = encoder_features(modules, tuple(latents.shape[-2:]))
        with torch.inference_mode(), features:
            forward.eps(host, x, sigma, cond.select([0]), latents)
        out.append(features.output[0].reshape(*features.grid, -1).numpy())
    return out


def ours(features: np.ndarray) -> np.ndarray:
    h, w, c = features.shape
    flat = torch.from_numpy(features).reshape(h * w, c)
    labels = recursive_ncut(flat, defaults.CUT, defaults.CUT_ALPHA)
    return _full_res_labels(concept_scores(flat, labels), (h, w), MASK_SIZE).numpy()


def main() -> None:
    args = command_line(__doc__, "DIFFCUT_ROOT", "PaulCouairon/DiffCut")
    reference = load_reference(Path(args.reference))
    features, labels = scene_features(), []
    for i, f in enumerate(features):
        h, w, c = f.shape
        feats = torch.from_numpy(f).reshape(1, h * w, c)  # tokens, as its generate_masks takes them (1/32 of img_size)
        with torch.no_grad():
            ref = reference.generate_masks(feats, tau=defaults.CUT, mask_size=MASK_SIZE, alpha=defaults.CUT_ALPHA,
                                           img_size=32 * h)
        ref = ref.reshape(MASK_SIZE)
        mine = ours(f)
        labels.append(ref)
        print(f"scene {i}: segments {len(np.unique(mine))} (reference {len(np.unique(ref))}), "
              f"adjusted Rand {adjusted_rand(mine, ref):.3f}")
    if args.write_fixture:
        write_fixture(FIXTURE, features=np.stack(features).astype(np.float32), labels=np.stack(labels).astype(np.int16))


if __name__ == "__main__":
    main()
