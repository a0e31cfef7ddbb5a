"""One home for textmask's defaults: every face (API, CLI, ComfyUI, webui, app) reads them from here."""

from __future__ import annotations

import os
from pathlib import Path

# The mask method every face starts on: cross-attention maps, no weights beyond the host's model.
METHOD = "attention"
# Otsu's threshold per image and phrase, keeping only the strongest regions of a phrase that names one thing.
THRESHOLD = "auto"
# No presence gate: its scale is the model's, so a phrase naming nothing still gets a mask until a user sets one.
MIN_PRESENCE = 0.0

# t=300 of 1000: ᾱ≈0.52 under SD's schedule, so the latent still shows every object's outline while the UNet must
# lean on the text to explain the noise; at t≈100 the maps sharpen but small objects fade, past t≈500 the layout
# itself dissolves (see docs/quality.md for the sweep).
TIMESTEP = 300
# Ref-Diff reads attention while decoding from low noise.
REFER_TIMESTEP = 100
# Ref-Diff's weight of the generative score against CLIP's, where a CLIP model is given: the two count equally.
REFER_ALPHA = 0.5
# The middle of LD-ZNet's training range [300, 500); the reference draws t from that range for each forward.
LDZNET_TIMESTEP = 400
# LD-ZNet's prompt at inference: the first of the reference's training templates.
LDZNET_TEMPLATE = "a photo of a {}."
# OVDiff's feature forward: the reference reads its features at t=200 under the empty prompt.
OVDIFF_TIMESTEP = 200
# OVDiff's support set, the reference's: images per class, sampler steps, guidance.
OVDIFF_IMAGES = 32
OVDIFF_STEPS = 30
OVDIFF_CFG = 8.0
# K-means parts per class and region, the reference's K.
OVDIFF_PARTS = 32

# DiffSeg's KL merge threshold (the paper's and google/diffseg's τ).
TAU = 1.1

# Segments by DiffCut's normalised cuts: on Shapes val it finds the objects where DiffSeg at its τ finds one segment
# per scene (Hungarian mIoU with PAMR 0.58 against 0.27, docs/quality.md).
SEGMENTER = "diffcut"
# DiffCut's reference settings: cut while the normalised cut is under 0.5, affinities to the 10th power, features
# from a forward at t=50 under the empty prompt.
CUT = 0.5
CUT_ALPHA = 10.0
DIFFCUT_TIMESTEP = 50

# Self-attention refinement (AggSD) of the attention method: on in every face. It costs about 0.3 of a UNet forward
# and raises IoU on Shapes from 0.31 to 0.41 (docs/quality.md); pass refine=False for the raw cross-attention maps.
REFINE = True
# AggSD's row-normalised SAᵀ·CA, one step: one step beats two on Shapes, and the paper's form ties the random walk.
REFINE_MODE = "transpose"
REFINE_STEPS = 1

# Each cross-attention head's map of a phrase weighted by its information (log N − its entropy over the layer's N
# pixels; after NERVE's entropy-weighted heads): heads that localise the phrase count, diffuse ones hardly. On Shapes
# val IoU 0.564 -> 0.602, AUC 0.899 -> 0.959, while a wrong phrase lands on an object more often (docs/quality.md);
# heads="mean" is DAAM's and AggSD's head average.
HEADS = "information"

# PAMR edge refinement of every mask method's maps (postprocess.pamr), on a grid twice the latent's: on Shapes val
# IoU goes 0.369 -> 0.486 (attention), 0.197 -> 0.378 (noise-diff), 0.768 -> 0.802 (ld-znet), for about 1% of a
# UNet forward at 512 px on the CPU (docs/quality.md); pass pamr=False for the maps without it.
PAMR = True

# Smoothing over neighbouring frames (σ in frames) is for video batches only: off, so images stay independent.
TEMPORAL = 0.0

# Masks are computed this many images to a UNet forward.
BATCH_SIZE = 4


def cache_dir() -> Path:
    """textmask's cache folder: $TEXTMASK_CACHE, else ~/.cache/textmask (the CLIP vocabulary, OVDiff prototypes)."""
    return Path(os.environ.get("TEXTMASK_CACHE", Path.home() / ".cache" / "textmask"))
