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

# t=300 of 1000 (ᾱ≈0.52 under SD's schedule): the latent still shows every outline while the UNet must lean on the
# text to explain the noise (the sweep: docs/quality.md).
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

# Segments by DiffCut's normalised cuts: they find a scene's objects where DiffSeg at its τ merges them
# (docs/quality.md).
SEGMENTER = "diffcut"
# DiffCut's reference settings: cut while the normalised cut is under 0.5, affinities to the 10th power, features
# from a forward at t=50 under the empty prompt.
CUT = 0.5
CUT_ALPHA = 10.0
DIFFCUT_TIMESTEP = 50

# Self-attention refinement (AggSD) of the attention method, on in every face: AggSD's step for real checkpoints,
# whose self-attention is sharper than Shapes' (docs/quality.md); refine=False gives the raw cross-attention maps.
REFINE = True
# AggSD's row-normalised SAᵀ·CA, one step: the paper's form (the other modes, measured: the Shapes model card).
REFINE_MODE = "transpose"
REFINE_STEPS = 1

# Each cross-attention head's map of a phrase weighted by its information (log N − its entropy over the layer's N
# pixels; after NERVE's entropy-weighted heads), so heads that localise the phrase count and diffuse ones hardly
# (docs/quality.md); heads="mean" is DAAM's and AggSD's head average.
HEADS = "information"

# PAMR edge refinement of every mask method's maps (postprocess.pamr), on a grid twice the latent's, so masks follow
# the image's edges rather than the attention grid, for about 1% of a forward (docs/quality.md); pamr=False skips it.
PAMR = True

# Smoothing over neighbouring frames (σ in frames) is for video batches only: off, so images stay independent.
TEMPORAL = 0.0

# Masks are computed this many images to a UNet forward.
BATCH_SIZE = 4


def cache_dir() -> Path:
    """textmask's cache folder: $TEXTMASK_CACHE, else ~/.cache/textmask (the CLIP vocabulary, OVDiff prototypes)."""
    return Path(os.environ.get("TEXTMASK_CACHE", Path.home() / ".cache" / "textmask"))
