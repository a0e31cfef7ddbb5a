"""textmask against the authors' reference code, through fixtures that bench/parity/ wrote from the reference
(the reference itself is not needed here). DiffSeg: google/diffseg@77ea596's segmentor on identical
self-attention (tests/parity_inputs.py), step by step. DiffCut: PaulCouairon/DiffCut@aa16df4's recursive normalised
cut on the Shapes model's encoder features."""

from pathlib import Path

import numpy as np
import pytest
import torch

import parity_inputs as inputs
from parity_recipe import load_spec, weights
from textmask import defaults
from textmask.methods.diffcut import concept_scores, recursive_ncut
from textmask.methods.diffseg import anchor_grid, close_fp16, diffseg, merge_once
from textmask.methods.segments import _full_res_labels

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity"
TAU = 1.1


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """The adjusted Rand index of two labelings (Hubert and Arabie)."""
    _, a = np.unique(a.reshape(-1), return_inverse=True)
    _, b = np.unique(b.reshape(-1), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array(a.size))
    expected = rows * cols / total
    return float((index - expected) / (0.5 * (rows + cols) - expected))


@pytest.fixture(scope="module")
def fixture():
    return np.load(FIXTURES / "diffseg.npz")


def test_anchor_grid_is_the_references():
    rows = anchor_grid((64, 64)).reshape(16, 16) // 64
    assert rows[:, 0].tolist() == list(range(1, 62, 4)) and (anchor_grid((64, 64)) % 64)[:16].tolist() == list(range(1, 62, 4))
    assert anchor_grid((8, 8)).numel() == 64  # grids smaller than 16 take every row and column


@pytest.mark.parametrize("scene", inputs.SCENES)
def test_diffseg_matches_the_reference(fixture, scene):
    probs = inputs.layer_probs(scene)
    ours = inputs.aggregate(probs)
    # 1. Aggregation: per-resolution means, keys upsampled and renormalised, resolutions weighted by side.
    sample = fixture["sample"]
    expected = fixture[f"aggregate_{scene}"]
    got = ours[torch.from_numpy(sample[0]), torch.from_numpy(sample[1])].double().numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # 2. The first iteration's fp16 decisions, added in the reference's order; an aggregate entry that rounds to
    # the other side of an fp16 step (the aggregates agree to 4e-7, not exactly) may still flip one in a million.
    decisions = np.unpackbits(fixture[f"decisions_{scene}"], axis=-1).astype(bool)
    mine = close_fp16(ours[anchor_grid((64, 64))], ours, TAU).numpy()
    assert (mine != decisions).sum() <= 2
    # 3. From the reference's first iteration on (merging with taken maps, upsampling, argmax), exactly its labels.
    close = torch.from_numpy(decisions).float()
    maps = ((close @ ours) / close.sum(-1, keepdim=True).clamp_min(1.0))[close.sum(-1) > 0]
    counts = [len(maps)]
    for _ in range(2):
        maps = merge_once(maps, TAU)
        counts.append(len(maps))
    reference = fixture[f"labels_{scene}"]
    assert counts == fixture[f"counts_{scene}"].tolist()
    assert adjusted_rand(_full_res_labels(maps, (64, 64), (512, 512)).numpy(), reference) == pytest.approx(1.0, abs=1e-12)
    # 4. End to end: the same number of segments and the same partition.
    _, maps = diffseg(ours, (64, 64), threshold=TAU)
    labels = _full_res_labels(maps, (64, 64), (512, 512)).numpy()
    assert len(np.unique(labels)) == len(np.unique(reference))
    assert adjusted_rand(labels, reference) >= 0.999
    # 5. The reference's optional refinement: scikit-learn's K-means from the merged maps.
    _, maps = diffseg(ours, (64, 64), threshold=TAU, kmeans=True)
    labels = _full_res_labels(maps, (64, 64), (512, 512)).numpy()
    reference = fixture[f"kmeans_{scene}"]
    assert len(np.unique(labels)) == len(np.unique(reference)) and adjusted_rand(labels, reference) >= 0.999



# ---- AggSD (the langseg report; no public code): its equations on hand-computed tensors -------------------------
def test_diffcut_matches_the_reference():
    data = np.load(FIXTURES / "diffcut.npz")
    for features, reference in zip(data["features"], data["labels"]):
        h, w, c = features.shape
        flat = torch.from_numpy(features).reshape(h * w, c)
        labels = recursive_ncut(flat, defaults.CUT, defaults.CUT_ALPHA)
        ours = _full_res_labels(concept_scores(flat, labels), (h, w), reference.shape).numpy()
        assert len(np.unique(ours)) == len(np.unique(reference)) > 1
        assert adjusted_rand(ours, reference) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("mode, expected", [
    ("aggsd", [1.0, (0.55 - 0.25) / 0.45, 0.0]),  # eq. 2: SAᵀ·CA = [0.7, 0.55, 0.25]
    ("transpose", [1.0, (0.55 / 0.9 - 0.25 / 1.2) / (0.7 / 0.9 - 0.25 / 1.2), 0.0]),  # over SA's column sums
    ("forward", [1.0, 0.5, 0.0]),  # SA·CA = [0.75, 0.45, 0.15]
])
def test_refinement_is_aggsd_eq2(mode, expected):
    from textmask.methods.attention import refine_with_self_attention

    sa = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]])
    ca = torch.tensor([1.0, 0.5, 0.0]).reshape(1, 1, 1, 3)  # one phrase on a 1×3 grid
    out = refine_with_self_attention(ca, sa, (1, 3), mode=mode)  # min-max normalised, as every map
    assert torch.allclose(out.reshape(-1), torch.tensor(expected), atol=1e-6)


# ---- iSeg (linsun449/iseg.code@2e8fb32): the entropy-reduced self-attention walk ------------------------------
def test_iseg_refinement_is_the_references_entropy_reduced_walk():
    # linsun449/iseg.code (wsss/iSeg.py, get_att_map), written out entry by entry for one and two steps. Its
    # trans_mat is SA with a query per row: base/stable_difusion.py stores self-attention keys first, and
    # get_att_map's permute puts the queries back in the rows.
    from textmask.methods.attention import ISEG_ENTROPY, refine_with_self_attention

    sa = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    t = np.array([[sa[i, j] / sa[:, j].max() for j in range(3)] for i in range(3)])  # SA, columns to a max of 1
    t = np.array([[max(0.0, x + ISEG_ENTROPY * np.log10(np.e * x)) if x > 0 else 0.0 for x in row] for row in t])
    t = t / t.sum(1, keepdims=True)
    ca = np.array([1.0, 0.5, 0.0])
    for steps in (1, 2):
        x = (ca - ca.min()) / (ca - ca.min()).sum()
        for _ in range(steps):
            x = t @ x
            x = (x - x.min()) / (x - x.min()).sum()
        want = (x - x.min()) / (x.max() - x.min())
        got = refine_with_self_attention(torch.tensor(ca, dtype=torch.float32).reshape(1, 1, 1, 3),
                                         torch.tensor(sa, dtype=torch.float32)[None], (1, 3), mode="iseg", steps=steps)
        assert np.allclose(got.reshape(-1).numpy(), want, atol=1e-6)
    assert not np.allclose(t, sa)  # the entropy term changes the walk (SA's rows already sum to 1)


def test_iseg_refinement_matches_the_reference(monkeypatch):
    """iSeg's own ``get_attention_map`` and ``get_att_map`` (bench/parity/parity_iseg.py) on the self-attention of
    tests/parity_iseg.py (a 64×64 grid, as the reference hard-codes) and the Shapes model's cross maps of its scene,
    at 1 and 10 steps and at both of its entropy weights: 0.015 (VOC, textmask's) and 0.1 (COCO)."""
    import parity_iseg as recipe

    from textmask.methods import attention

    stored = np.load(FIXTURES / "iseg.npz")
    logits, cross = recipe.self_attention_logits(), torch.from_numpy(stored["cross"])
    assert attention.ISEG_ENTROPY == 0.015
    for dataset, entropy in [("VOC", 0.015), ("COCO", 0.1)]:
        monkeypatch.setattr(attention, "ISEG_ENTROPY", entropy)
        for steps in (1, 10):
            ours = recipe.textmask_refined(logits, cross, steps)
            reference = torch.from_numpy(stored[f"{dataset}_{steps}"])
            assert ours.shape == reference.shape == (len(cross), recipe.SIDE, recipe.SIDE)
            assert (ours - reference).abs().max() <= 1e-5, (dataset, steps)


# ---- LD-ZNet (koutilya-pnvr/LD-ZNet@3d28f76): converter and forward -------------------------------------------
@pytest.mark.parametrize("copy", ["raw", "ema"])
def test_ldznet_matches_the_reference(copy):
    """The reference's own (shrunk) UNetModel, its weights redrawn from the fixture's recipe and saved the way
    Lightning saves them; textmask converts them and runs them on the same inputs."""
    import parity_ldznet as recipe

    spec, stored = load_spec(FIXTURES / "ldznet.npz")
    logits = recipe.textmask_logits(weights(spec), use_ema=copy == "ema")
    reference = torch.from_numpy(stored[copy])
    assert logits.shape == reference.shape == (1, 1, 384, 384)
    assert (logits - reference).abs().max() <= 1e-5 * reference.abs().max()


# ---- DAAM (castorini/daam@09564e0): word heat maps ------------------------------------------------------------
def test_daam_word_maps_match_the_reference():
    """DAAM's own heat-map code on per-head attention (bench/parity/parity_daam.py) against
    ``aggregation="daam"``'s collector fed the same heads in query chunks."""
    import parity_daam as recipe

    stored = np.load(FIXTURES / "daam.npz")
    reference = torch.from_numpy(stored["maps"])
    ours = recipe.textmask_maps([list(map(int, g)) for g in stored["groups"]])
    assert ours.shape == reference.shape == (1, len(recipe.WORDS), 64, 64)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_daam_aggregation_through_a_real_capture(sd1_masker):
    """``aggregation="daam"`` end to end: per-head probabilities from the hooked forward, masks at the image size."""
    image = torch.rand(1, 40, 56, 3)
    daam = sd1_masker.mask(image, "red car | truck", aggregation="daam", refine=False)
    aggsd = sd1_masker.mask(image, "red car | truck", refine=False)
    assert daam.masks.shape == aggsd.masks.shape == (1, 40, 56)
    assert not torch.equal(daam.heatmaps, aggsd.heatmaps)
    with pytest.raises(Exception, match="aggregation must be one of aggsd, daam"):
        sd1_masker.mask(image, "car", aggregation="mean")


# ---- OVAM (vpulab/ovam@12afd87): the trace's re-query -------------------------------------------------------
def test_trace_requery_matches_ovam():
    """OVAM's own hooker and re-query (``CrossAttentionDAAMBlock``) on the forward textmask traced
    (bench/parity/parity_ovam.py): each layer's re-queried attention is the reference's sum over heads divided by
    the heads, and textmask's collector with OVAM's layer weights gives the reference's aggregate."""
    import parity_ovam as recipe

    from textmask import TextMasker

    spec, stored = load_spec(FIXTURES / "ovam.npz")
    pipe, _ = recipe.pipe(spec)
    trace = recipe.textmask_trace(TextMasker.from_pipe(pipe, resolution=recipe.RESOLUTION))
    layers, _ = recipe.requery(trace)
    tokens = stored["tokens"].tolist()  # <SoT>, the prompt's words, <EoT> of the 77 keys in the softmax
    assert list(layers) == stored["names"].tolist()
    reference, offset = torch.from_numpy(stored["layers"]), 0
    for name, probs in layers.items():  # [1, N, 77] head-averaged, against the reference's head sum [T, N]
        layer = trace.layers[name]
        expected = reference[:, offset : offset + layer.tokens]
        offset += layer.tokens
        ours = probs[0, :, tokens].T * layer.heads
        assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max(), name
    assert offset == reference.shape[1]
    aggregate = recipe.ovam_aggregate(trace, layers, tokens)[0]
    expected = torch.from_numpy(stored["aggregate"])
    assert aggregate.shape == expected.shape == (len(tokens), 16, 16)
    assert (aggregate - expected).abs().max() <= 1e-5 * expected.abs().max()


# ---- Ref-Diff (kodenii/Ref-Diff@41a3c65): the generative attribution of one forward --------------------------
def test_refdiff_attribution_matches_the_reference():
    """Ref-Diff's own CrossAttention code kept the subject's extrapolated pre-softmax scores of the layers at 1/32
    of the image (bench/parity/parity_refdiff.py); textmask's capture of the same forward, on Stability's ldm UNet
    with the same weights, gives the same attribution."""
    pytest.importorskip("ldm")
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    import parity_refdiff as recipe

    spec, stored = load_spec(FIXTURES / "refdiff.npz")
    unet = UNetModel(**recipe.UNET_ARGS).eval()
    unet.load_state_dict(weights(spec))  # strict: the same ldm key layout as Ref-Diff's copy
    ours = recipe.textmask_attribution(unet)
    reference = torch.from_numpy(stored["attribution"])
    assert ours.shape == reference.shape == (recipe.LATENT // 4, recipe.LATENT // 4)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_refdiff_proposal_score_and_positional_ramp_are_the_references():
    """Eq. 9 as ``calc_diffattn`` computes it (mean inside minus mean outside), and ``apply_position``'s ramp: from
    1 at the named side down to 0 over two thirds of the width, 0 beyond (hand-computed for a width of 9)."""
    from textmask.methods.refdiff import generative_scores, positional_weight

    attr = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = (0.9 + 0.8 + 0.7) / 3 - (0.1 + 0.2 + 0.0) / 3
    assert generative_scores(mask[None], attr).item() == pytest.approx(expected, abs=1e-6)
    left = positional_weight("the dog on the left", 2, 9)[0]
    assert torch.allclose(left, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(positional_weight("the right one", 2, 9)[0], left.flip(0))


# ---- PAMR (PaulCouairon/DiffCut@aa16df4's tools/pamr.py, from visinf/1-stage-wseg): edge refinement --------------
def test_pamr_matches_the_reference():
    """The reference's PAMR at textmask's dilations and iterations (bench/parity/parity_pamr.py) on what
    ``edge_refined`` hands ``pamr`` for Shapes test scenes: three scenes, the first again with a block of one colour
    (zero local deviation), a non-square crop and a strip narrower than the largest dilation."""
    from textmask.postprocess import pamr

    stored = np.load(FIXTURES / "pamr.npz")
    assert {"flat", "crop_128x80", "strip_12x128"} <= set(stored["cases"].tolist())
    for name in stored["cases"]:
        maps, image = torch.from_numpy(stored[f"maps_{name}"]), torch.from_numpy(stored[f"image_{name}"])
        reference = torch.from_numpy(stored[f"reference_{name}"])
        ours = pamr(maps[None], image[None])[0]
        assert ours.shape == reference.shape == maps.shape, name
        assert (ours - reference).abs().max() <= 1e-5, name
