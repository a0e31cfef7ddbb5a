"""DiffCut: normalised cuts of planted features, the encoder features it reads, and segments/named segments with it."""

import pytest
import torch

from conftest import unet_untouched
from textmask import TextMaskError
from textmask.errors import CaptureError
from textmask.capture import find_attention_modules
from textmask.methods.diffcut import (affinity, bipartition, concept_scores, encoder_features, encoder_self_attention,
                                      pooled_rows, pooled_tokens, recursive_ncut)
from textmask.methods.segments import encoder_modules, segment_names


def planted_features(labels: torch.Tensor, channels: int = 16, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Features [N, C]: one random non-negative direction per label (as activations after a ReLU), plus a little
    noise. Opposite directions would make many affinities underflow to zero, which keeps nodes out of the cuts."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.rand(int(labels.max()) + 1, channels, generator=g) ** 4
    return directions[labels.reshape(-1)] + noise * torch.randn(labels.numel(), channels, generator=g)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a.reshape(-1), b.reshape(-1))}
    return len(pairs) == len(a.unique()) == len(b.unique())


def test_bipartition_splits_two_blocks_cheaply():
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[:, 10:] = 1
    part, value = bipartition(affinity(planted_features(labels), 10.0))
    assert same_partition(part.long(), labels.reshape(-1))
    assert -1e-6 <= value < 0.05  # two unrelated blocks: almost nothing is cut (float32)
    uniform = torch.ones(64, 64)
    assert bipartition(uniform)[1] > 0.9  # a graph with no structure costs about as much to cut anywhere


@pytest.mark.parametrize("count", [2, 3, 5])
def test_recursive_ncut_recovers_planted_segments(count):
    labels = torch.zeros(16, 16, dtype=torch.long)
    for k in range(1, count):
        labels[:, k * 16 // count:] = k
    if count > 2:
        labels[12:, :4] = count - 1  # a piece of one segment away from its stripe
    features = planted_features(labels)
    found = recursive_ncut(features, 0.5, 10.0)
    assert len(found.unique()) == count
    # The least similar pair takes part in the first cut only (as in the reference); every other node is placed right.
    cut = ~(affinity(features, 10.0) == 0).any(1)
    assert int((~cut).sum()) == 2 and same_partition(found[cut], labels.reshape(-1)[cut])
    assert torch.equal(found, recursive_ncut(features, 0.5, 10.0))  # deterministic
    scores = concept_scores(features, found)
    assert scores.shape == (count, 256) and torch.equal(scores.argmax(0)[cut], found[cut])


def test_threshold_orders_the_number_of_segments():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(64, 8, generator=g)
    counts = [len(recursive_ncut(features, t, 10.0).unique()) for t in (0.05, 0.5, 1.5)]
    assert counts[0] <= counts[1] <= counts[2] and counts[2] > counts[0]


def test_segment_names_take_the_highest_contrast_or_background():
    segments = torch.zeros(8, 8, dtype=torch.long)
    segments[:, 4:] = 1
    segments[6:, :] = 2
    cross = torch.zeros(2, 8, 8)
    cross[0][segments == 1] = 1.0  # the first name lights segment 1
    cross[1] += 0.5  # the second lights everything alike: it names nothing
    cross[1][segments == 2] = 0.6
    assert segment_names(cross, segments, 4).tolist() == [0, 1, 2, 0]  # segment 3 has no pixel here: background
    whole = torch.zeros(8, 8, dtype=torch.long)
    assert segment_names(cross, whole, 1).tolist() == [0]  # one segment over everything: nothing is higher inside


def test_encoder_features_read_the_last_coarsest_encoder_self_attention(sd1_pipe):
    unet = sd1_pipe.unet
    modules = find_attention_modules(unet)
    kept = {}
    encoder = encoder_self_attention(modules)
    assert encoder and all(n.startswith("down_blocks") and n.endswith("attn1") for n, _ in encoder)
    handles = [m.to_out[0].register_forward_hook(lambda mod, a, out, n=n: kept.__setitem__(n, out.clone()))
               for n, m in encoder]
    x, t, ctx = torch.randn(1, 4, 8, 6), torch.tensor([300]), torch.randn(1, 77, unet.config.cross_attention_dim)
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    coarsest = min(v.shape[1] for v in kept.values())
    expected = [n for n, v in kept.items() if v.shape[1] == coarsest][-1]
    with unet_untouched(unet):
        features = encoder_features(modules, (8, 6))
        with features, torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)
        with pytest.raises(RuntimeError, match="boom"):
            with encoder_features(modules, (8, 6)):
                raise RuntimeError("boom")  # the hooks come off on an exception too
    assert features.name == expected and expected.startswith("down_blocks")
    assert torch.equal(features.output, kept[expected])
    assert features.grid[0] * features.grid[1] == coarsest and features.grid[0] < 8


def test_pooled_rows_average_blocks_of_queries_and_keys():
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 64 * 48, 64 * 48, generator=g)
    pooled, grid = pooled_rows(attention, (64, 48), 32)
    assert grid == (32, 24) and pooled.shape == (2, 32 * 24, 32 * 24)
    block = attention[1].reshape(64, 48, 64, 48)[2:4, 4:6, 6:8, 0:2].mean()  # query block (1, 2), key block (3, 0)
    assert torch.allclose(pooled[1, 1 * 24 + 2, 3 * 24 + 0], block)
    small = torch.rand(1, 16 * 12, 16 * 12, generator=g)
    assert pooled_rows(small, (16, 12), 32)[0] is small
    tokens = torch.rand(1, 70 * 33, 5, generator=g)  # sides that do not divide: adaptive blocks, 3 to a side here
    pooled, grid = pooled_tokens(tokens, (70, 33), 32)
    assert grid == (24, 11) and pooled.shape == (1, 24 * 11, 5)
    assert torch.allclose(pooled[0, 0], tokens[0].reshape(70, 33, 5)[:3, :3].mean((0, 1)))


def test_mmdit_hosts_have_no_encoder_features():
    class MMDiT:
        def attention_modules(self):
            raise CaptureError("this model is an MM-DiT")

    assert encoder_modules(MMDiT()) == []


def test_segments_api_with_each_segmenter(sd1_masker):
    image = torch.rand(2, 37, 53, 3)
    cut = sd1_masker.segments(image)
    seg = sd1_masker.segments(image, segmenter="diffseg", tau=0.5, pamr=False)
    for res in (cut, seg):
        assert res.labels.shape == (2, 37, 53)
        for lab, masks in zip(res.labels, res.masks):
            assert torch.equal(masks.sum(0), torch.ones(37, 53)) and torch.equal(masks.argmax(0), lab)
    assert torch.equal(sd1_masker.segments(image).labels, cut.labels)  # deterministic
    many = sd1_masker.segments(image[:1], cut=1.9, pamr=False)
    few = sd1_masker.segments(image[:1], cut=0.05, pamr=False)
    assert len(many.masks[0]) >= len(few.masks[0])
    with pytest.raises(TextMaskError, match="kmeans"):
        sd1_masker.segments(image, kmeans=True)  # K-means is DiffSeg's step
    assert len(sd1_masker.segments(image[:1], segmenter="diffseg", kmeans=True).masks) == 1


def test_named_segments_with_diffcut(sd1_masker):
    res = sd1_masker.named_segments(torch.rand(2, 37, 53, 3), ["sky", "red car"])
    assert res.masks.shape == (2, 2, 37, 53) and (res.masks.sum(1) <= 1).all()
    for i in range(2):
        assert torch.equal(res.masks[:, i], (res.labels == i + 1).float())


@pytest.mark.parametrize("kwargs,match", [({"segmenter": "kmeans"}, "segmenter must be one of"),
                                          ({"segmenter": 3}, "segmenter"), ({"segmenter": None}, "segmenter"),
                                          ({"cut": 0}, "cut"),
                                          ({"cut": 3}, "cut"), ({"cut": float("nan")}, "cut")])
def test_bad_segmenter_settings(sd1_masker, kwargs, match):
    with pytest.raises(TextMaskError, match=match) as e:
        sd1_masker.segments(torch.rand(1, 32, 32, 3), **kwargs)
    assert "\n" not in str(e.value)


def test_large_working_sizes_cut_at_most_diffcuts_grid(sd1_masker, monkeypatch):
    import textmask.methods.segments as segments

    grids, cut = [], []
    real_pool, real_cut = segments.pooled_tokens, segments.recursive_ncut
    monkeypatch.setattr(segments, "pooled_tokens", lambda t, g, most: grids.append(g) or real_pool(t, g, most))
    monkeypatch.setattr(segments, "recursive_ncut", lambda f, *a: cut.append(f.shape[0]) or real_cut(f, *a))
    # A strip whose coarsest encoder grid is wider than 32 (cheap for the tiny UNet): pooled to 32 at most.
    res = sd1_masker.segments(torch.rand(1, 40, 600, 3), resolution=200, pamr=False)
    assert res.labels.shape == (1, 40, 600)
    (h, w), = grids
    assert w > 32 and cut[0] < h * w and cut[0] == -(-h // -(-w // 32)) * -(-w // -(-w // 32))
