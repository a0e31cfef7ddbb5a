"""Evaluate LD-ZNet weights on a PhraseCut (or RefCOCO-format) split with the CLIPSeg protocol.

    python -m train.evaluate --base MODEL --ldznet ldznet.safetensors --data PHRASECUT_DIR --split test
"""

from __future__ import annotations

import argparse
import json

import torch

from textmask import defaults, options
from textmask.cli import checked, whole
from textmask.ldznet import load_ldznet
from textmask.ldznet.inference import ldznet_logits

from .data import ReferringDataset, load_split
from .metrics import FixedIntervalMetrics, refcoco_scores
from .train_ldznet import MOST, collate, load_host, number


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="SD checkpoint file, diffusers folder, or 'shapes'")
    ap.add_argument("--ldznet", required=True, help="LD-ZNet .safetensors")
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="phrasecut", choices=["phrasecut", "refcoco"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--resolution", type=number("resolution", 64, 4096, integer=True), default=None,
                    help="default: the model's training resolution")
    ap.add_argument("--timestep", type=checked(options.timestep, whole), default=defaults.LDZNET_TIMESTEP)
    ap.add_argument("--batch-size", type=number("batch-size", 1, 4096, integer=True), default=8)
    ap.add_argument("--limit", type=number("limit", 1, MOST, integer=True), default=None, help="evaluate only the first N samples")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the scores here")
    return ap.parse_args(argv)


@torch.inference_mode()
def evaluate(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    host = load_host(args.base, device, dtype)
    model = load_ldznet(args.ldznet, device=device, dtype=torch.float32)
    samples = load_split(args.data, args.split, args.format)[: args.limit]
    size = args.resolution or model.train_resolution
    if size % host.geometry.size_multiple:
        raise ValueError(f"--resolution must be a multiple of {host.geometry.size_multiple} for this base model, got "
                         f"{size}")
    loader = torch.utils.data.DataLoader(ReferringDataset(samples, size=size, train=False), batch_size=args.batch_size,
                                         collate_fn=collate)
    metrics, probs_all, targets_all = FixedIntervalMetrics(), [], []
    for i, batch in enumerate(tqdm(loader, desc="evaluate")):
        logits = ldznet_logits(host, model, batch["pixels"].to(device), batch["prompt"], args.timestep, i * args.batch_size)
        probs = torch.sigmoid(logits.float())
        target = batch["mask"]
        if probs.shape[-2:] != target.shape[-2:]:
            probs = torch.nn.functional.interpolate(probs, target.shape[-2:], mode="bilinear", align_corners=False)
        for p, t in zip(probs.cpu().numpy(), target.numpy()):
            metrics.add(p, t)
            if args.format == "refcoco":
                probs_all.append(p)
                targets_all.append(t)
    scores = metrics.value()
    if args.format == "refcoco":
        scores.update({f"refcoco_{k}": v for k, v in refcoco_scores(probs_all, targets_all).items()})
    return scores


def main(argv=None) -> None:
    from textmask.errors import TextMaskError
    from textmask.outputs import Outputs

    args = parse_args(argv)
    with Outputs() as outputs:
        try:
            json_path = outputs.file(args.json, "--json") if args.json else None  # before any work
            s = evaluate(args)
        except (FileNotFoundError, ValueError, TextMaskError) as e:
            raise SystemExit(f"evaluate: error: {e}") from None
        if json_path is not None:
            outputs.stage(json_path).write_text(json.dumps(s, indent=1))
            try:
                outputs.commit()
            except TextMaskError as e:
                raise SystemExit(f"evaluate: error: {e}") from None
    print(f"samples {s['samples']}  mIoU@0.3 {s['miou_0.3']:.4f}  IoU_FG@0.3 {s['fgiou_0.3']:.4f}  "
          f"IoU_FG@0.5 {s['fgiou_0.5']:.4f}  AP {s['ap']:.4f}  best mIoU {s['miou_best']:.4f} "
          f"(t={s['miou_best_t']:.2f})  best IoU_FG {s['fgiou_best']:.4f} (t={s['fgiou_best_t']:.2f})")
    if "refcoco_miou" in s:
        print(f"RefCOCO mIoU {s['refcoco_miou']:.4f}  oIoU {s['refcoco_oiou']:.4f}")


if __name__ == "__main__":
    main()
