"""Ref-Diff parity: textmask's attribution against kodenii/Ref-Diff's own attention code on one identical forward.

    REFDIFF_ROOT=/path/to/Ref-Diff python bench/parity/parity_refdiff.py [--write-fixture]

Written against kodenii/Ref-Diff@41a3c65. Its ``ldm/modules/attention.py`` (``CrossAttention.forward``) keeps, for
the layers whose grid is ``G.attn_w × G.attn_h`` (1/32 of the image), the pre-softmax scores of the subject token,
head-averaged per half of the batch (uncond, cond), extrapolated as uncond + 9·(cond − uncond), min-max normalised,
in ``G.images``; ``get_diffattn`` averages them. This script builds Ref-Diff's own ``UNetModel`` (shrunk,
``tests/parity_refdiff.py``), runs one forward, and compares the mean of ``G.images`` with textmask's attribution
from a capture of the same forward. Import fix: Ref-Diff's ``ldm`` imports matplotlib, which it never calls here;
an empty module stands in where it is missing. The later steps of ``get_diffattn`` (the mean over DDIM steps,
8-bit quantisation, LANCZOS resizing) are not compared: textmask reads one forward at t = 100.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import parity_refdiff as recipe  # noqa: E402
from parity_recipe import spec_arrays, spec_of, weights  # noqa: E402
from common import command_line, relative_difference, stub_missing, write_fixture  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "refdiff.npz"


def main() -> None:
    args = command_line(__doc__, "REFDIFF_ROOT", "kodenii/Ref-Diff")
    stub_missing("matplotlib", "matplotlib.pyplot")
    sys.path.insert(0, args.reference)
    # Ref-Diff's ldm has no __init__.py, so an installed ldm (stable-diffusion-sdkit's) would win: name its folder.
    for name in [m for m in sys.modules if m == "ldm" or m.startswith("ldm.")]:
        del sys.modules[name]
    sys.modules["ldm"] = types.ModuleType("ldm")
    sys.modules["ldm"].__path__ = [str(Path(args.reference) / "ldm")]
    from glog import G
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    assert Path(sys.modules["ldm.modules.attention"].__file__).resolve().is_relative_to(Path(args.reference).resolve())
    torch.manual_seed(0)
    unet = UNetModel(**recipe.UNET_ARGS).eval()
    spec = spec_of(unet.state_dict())
    unet.load_state_dict(weights(spec))
    x, t, context = recipe.inputs()
    G.images, G.index = {}, recipe.SUBJECT
    G.attn_w = G.attn_h = recipe.LATENT // 4
    with torch.no_grad():
        unet(x, t, context=context)
    layers = G.images[G.attn_w]
    reference = torch.from_numpy(np.mean(layers, axis=0)[:, :, 0]).float()
    G.images = {}
    G.attn_w = G.attn_h = -1  # no more storing: textmask's capture runs the same forward
    ours = recipe.textmask_attribution(unet)
    err = relative_difference(ours, reference)
    print(f"attribution {tuple(reference.shape)} from {len(layers)} layers at 1/32 of the image: max relative "
          f"difference {err:.1e}")
    if args.write_fixture:
        write_fixture(FIXTURE, **spec_arrays(spec), attribution=reference.numpy(), layers=np.array(len(layers)))


if __name__ == "__main__":
    main()
