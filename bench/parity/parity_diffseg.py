"""DiffSeg parity: textmask against google/diffseg's own segmentor on identical self-attention.

    DIFFSEG_ROOT=/path/to/google/diffseg python bench/parity/parity_diffseg.py [--write-fixture]

Written against google/diffseg@77ea596 (``diffseg/segmentor.py``, imported as is; it needs tensorflow and
scikit-learn, so run this in an environment that has them besides textmask's own requirements). The inputs are
``tests/parity_inputs.py``'s: per-layer self-attention at SD1's 64/32/16/8 sides, from Shapes test scenes. Step by
step it prints how far textmask is from the reference (aggregate, first-iteration decisions, maps after each
iteration, final labels) and with ``--write-fixture`` stores the reference's outputs in tests/fixtures/parity/,
which tests/test_parity.py checks in CI without the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import parity_inputs as inputs  # noqa: E402
from textmask.methods.diffseg import anchor_grid, close_fp16, diffseg, merge_once  # noqa: E402
from textmask.methods.segments import _full_res_labels  # noqa: E402

TAU, POINTS = 1.1, 16
from common import command_line, write_fixture  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "diffseg.npz"
SAMPLE = np.random.default_rng(0).integers(0, 4096, (2, 2000))  # aggregate entries kept in the fixture


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a.reshape(-1), b.reshape(-1)))


def reference_steps(seg, agg: np.ndarray):
    """The reference's first-iteration decisions [256, 4096] and its maps after each iteration."""
    import tensorflow as tf

    attns = agg.reshape(64, 64, 64, 64)
    anchors = attns[seg.grid[:, 0], seg.grid[:, 1]][:, None]
    flat = attns.reshape(1, 4096, 64, 64)
    decisions = np.concatenate([
        (seg.KL(tf.cast(anchors[i * 16:(i + 1) * 16], tf.float16), tf.cast(flat, tf.float16))
         < seg.kl_threshold[0]).numpy() for i in range(16)])
    counts, maps = [], None
    for it in range(3):
        maps = seg.mask_merge(it, attns if it == 0 else maps, seg.kl_threshold, grid=seg.grid)
        counts.append(int(np.isfinite(maps.reshape(len(maps), -1)).all(1).sum()))
    return decisions, counts


def labels_from_decisions(agg: torch.Tensor, decisions: np.ndarray) -> np.ndarray:
    """textmask's merging and labelling after a given first iteration: isolates everything but its fp16 step."""
    close = torch.from_numpy(decisions).float()
    maps = (close @ agg) / close.sum(-1, keepdim=True).clamp_min(1.0)
    maps = maps[close.sum(-1) > 0]
    for _ in range(2):
        maps = merge_once(maps, TAU)
    return _full_res_labels(maps, (64, 64), (512, 512)).numpy()


def main() -> None:
    args = command_line(__doc__, "DIFFSEG_ROOT", "google/diffseg")
    sys.path.insert(0, args.reference)
    from diffseg.segmentor import DiffSeg

    seg = DiffSeg(kl_threshold=[TAU] * 3, refine=False, num_points=POINTS)
    assert np.array_equal(seg.grid[:, 0] * 64 + seg.grid[:, 1], anchor_grid((64, 64), POINTS).numpy())
    print("anchor grid: identical (rows and columns 1, 5, ..., 61)")
    fixture = {"sample": SAMPLE}
    for index in inputs.SCENES:
        probs = inputs.layer_probs(index)
        per_res = inputs.per_resolution(probs)
        ref_agg = seg.aggregate_weights([per_res[64][None][0], per_res[32], per_res[16], per_res[8]])
        ref_agg = ref_agg.reshape(4096, 4096)
        ours_agg = inputs.aggregate(probs).double().numpy()
        agg_err = np.abs(ours_agg - ref_agg).max() / np.abs(ref_agg).max()
        decisions, counts = reference_steps(seg, ref_agg)
        flat = torch.from_numpy(ref_agg)
        mine = close_fp16(flat[anchor_grid((64, 64), POINTS)], flat, TAU).numpy()
        ref_labels = seg.generate_masks(ref_agg.reshape(64, 64, 64, 64), seg.kl_threshold, seg.grid)
        _, maps = diffseg(torch.from_numpy(ours_agg).float(), (64, 64), threshold=TAU, points=POINTS)
        ours = _full_res_labels(maps, (64, 64), (512, 512)).numpy()
        given = labels_from_decisions(torch.from_numpy(ref_agg).float(), decisions)
        print(f"scene {index}: aggregate max rel. diff {agg_err:.1e}; first-iteration decisions differing "
              f"{int((decisions != mine).sum())} of {decisions.size}; reference maps per iteration {counts}; "
              f"segments reference {len(np.unique(ref_labels))} textmask {len(np.unique(ours))}; "
              f"adjusted Rand {adjusted_rand(ref_labels, ours):.4f}; after the reference's first iteration "
              f"{adjusted_rand(ref_labels, given):.4f}")
        refined = DiffSeg(kl_threshold=[TAU] * 3, refine=True, num_points=POINTS)
        ref_kmeans = refined.generate_masks(ref_agg.reshape(64, 64, 64, 64), refined.kl_threshold, refined.grid)
        _, maps = diffseg(torch.from_numpy(ours_agg).float(), (64, 64), threshold=TAU, points=POINTS, kmeans=True)
        ours_kmeans = _full_res_labels(maps, (64, 64), (512, 512)).numpy()
        print(f"  with K-means: segments reference {len(np.unique(ref_kmeans))} textmask "
              f"{len(np.unique(ours_kmeans))}; adjusted Rand {adjusted_rand(ref_kmeans, ours_kmeans):.4f}")
        fixture[f"labels_{index}"] = ref_labels.astype(np.uint8)
        fixture[f"kmeans_{index}"] = ref_kmeans.astype(np.uint8)
        fixture[f"aggregate_{index}"] = ref_agg[SAMPLE[0], SAMPLE[1]]
        fixture[f"decisions_{index}"] = np.packbits(decisions.astype(bool), axis=-1)
        fixture[f"counts_{index}"] = np.array(counts)
    if args.write_fixture:
        write_fixture(FIXTURE, **fixture)


if __name__ == "__main__":
    main()
