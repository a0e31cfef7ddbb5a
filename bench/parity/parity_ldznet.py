"""LD-ZNet parity: textmask's converter and forward against the authors' UNetModel on identical weights and inputs.

    LDZNET_ROOT=/path/to/LD-ZNet python bench/parity/parity_ldznet.py [--write-fixture]

Written against koutilya-pnvr/LD-ZNet@3d28f76 (``ldm_seg/modules/diffusionmodules/ldznet_UNet.py``). Import fix:
the stored snapshot of that repository has every ``==`` replaced by ``***REMOVED***``; this script copies
``ldm_seg`` to a temporary folder and restores them. It needs einops and omegaconf besides textmask's requirements.
The model is the reference's own class, shrunk (``tests/parity_ldznet.py``); its weights are redrawn from a recipe
that the fixture stores, so CI rebuilds them without the reference.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import parity_ldznet as recipe  # noqa: E402
from parity_recipe import spec_arrays, spec_of, weights  # noqa: E402

from common import command_line, relative_difference, write_fixture  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "ldznet.npz"


def import_reference(root: Path, scratch: Path):
    """The reference's UNetModel from a copy of ``ldm_seg`` with its ``==`` restored."""
    shutil.copytree(root / "ldm_seg", scratch / "ldm_seg")
    for path in (scratch / "ldm_seg").rglob("*.py"):
        text = path.read_text()
        if "***REMOVED***" in text:
            path.write_text(text.replace("***REMOVED***", "=="))
    sys.path.insert(0, str(scratch))
    from ldm_seg.modules.diffusionmodules.ldznet_UNet import UNetModel

    return UNetModel


def main() -> None:
    args = command_line(__doc__, "LDZNET_ROOT", "koutilya-pnvr/LD-ZNet")
    with tempfile.TemporaryDirectory() as scratch:
        UNetModel = import_reference(Path(args.reference), Path(scratch))
        torch.manual_seed(0)
        reference = UNetModel(**recipe.REFERENCE_ARGS).eval()
        spec = spec_of(reference.state_dict())
        unet = weights(spec)
        reference.load_state_dict(unet)
        latents, context, features = recipe.inputs()
        # The reference pops one entry per spatial transformer; only LD-ZNet's five (layers 6-10) read theirs.
        slots = [None] * 5 + list(features) + [None] * 6
        with torch.no_grad():
            ref_raw, _ = reference(latents, torch.zeros(1, dtype=torch.long), context, list(slots))
            for k, v in reference.state_dict().items():
                v.add_(0.01)  # the EMA copy recipe.lightning_state_dict writes
            ref_ema, _ = reference(latents, torch.zeros(1, dtype=torch.long), context, list(slots))
    ours = {"raw": recipe.textmask_logits(unet, use_ema=False), "ema": recipe.textmask_logits(unet, use_ema=True)}
    for name, ref in (("raw", ref_raw), ("ema", ref_ema)):
        err = relative_difference(ours[name], ref)
        print(f"{name} weights: logits {tuple(ref.shape)}, max relative difference {err:.1e}")
    print(f"converter: {len(unet)} reference keys mapped")
    if args.write_fixture:
        write_fixture(FIXTURE, **spec_arrays(spec), raw=ref_raw.numpy(), ema=ref_ema.numpy())


if __name__ == "__main__":
    main()
