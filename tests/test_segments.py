"""DiffSeg segments and named segments: planted attention structure, KL properties, and the API end to end."""

import pytest
import torch

from textmask import TextMaskError
from textmask.methods.diffseg import anchor_grid, close_fp16, diffseg, fp16_sum, merge_once, symmetric_kl, symmetric_kl_fp16_pairs


def planted_attention(labels: torch.Tensor, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Self-attention where every pixel attends uniformly to its own block (plus a little noise)."""
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    g = torch.Generator().manual_seed(seed)
    a = same + noise * torch.rand(same.shape, generator=g)
    return a / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("blocks", [2, 3, 5])
def test_recovers_planted_blocks(blocks):
    h = w = 32
    labels = torch.zeros(h, w, dtype=torch.long)
    for k in range(1, blocks):
        labels[:, k * w // blocks:] = k  # vertical stripes
    labels[24:, :8] = blocks - 1 if blocks > 2 else 1
    found, maps = diffseg(planted_attention(labels), (h, w))
    assert len(maps) == len(labels.unique())
    # the partition is the same up to renaming
    pairs = {(int(a), int(b)) for a, b in zip(labels.reshape(-1), found.reshape(-1))}
    assert len(pairs) == len(labels.unique())


def test_symmetric_kl():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 20, generator=g).softmax(-1)
    y = torch.rand(4, 20, generator=g).softmax(-1)
    d = symmetric_kl(x, y)
    ref = torch.stack([torch.stack([0.5 * ((a * (a / b).log()).sum() + (b * (b / a).log()).sum()) for b in y]) for a in x])
    torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(symmetric_kl(y, x), d.T, atol=1e-6, rtol=0)  # symmetric
    assert symmetric_kl(x, x).diagonal().abs().max() < 1e-5 and (d >= -1e-6).all()


@pytest.mark.parametrize("n", [5, 37, 1000, 4096, 5000])
def test_fp16_sum_adds_in_fp16(n):
    # Every length (remainders, one or two halvings) gives a sum of fp16 values, within fp16's rounding of n steps.
    values = torch.rand(3, n, generator=torch.Generator().manual_seed(n)).half().float() / 64
    total = fp16_sum(values)
    assert torch.equal(total, total.half().float())
    torch.testing.assert_close(total, values.double().sum(-1).float(), rtol=n * 2**-11, atol=0)


def test_close_fp16_is_the_pairwise_fp16_distance():
    # The estimate-then-recheck decisions equal the fp16 distance of every pair, here with many pairs near τ.
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 64, generator=g) * 2).softmax(-1)
    y = (torch.rand(50, 64, generator=g) * 2).softmax(-1)
    tau = float(symmetric_kl(x, y).median())
    pairs = symmetric_kl_fp16_pairs(x.repeat_interleave(50, 0), y.repeat(6, 1)).reshape(6, 50)
    assert torch.equal(close_fp16(x, y, tau), pairs < torch.tensor(tau).half().float())
    y[0, 0] = 1e-9  # fp16 rounds it to zero: the reference's log is -inf, that row is close to nothing
    assert not close_fp16(x, y / y.sum(-1, keepdim=True), 10.0)[:, 0].any()


def test_merging_is_monotone_in_tau():
    g = torch.Generator().manual_seed(1)
    maps = (torch.rand(40, 64, generator=g) * 3).softmax(-1)
    counts = [len(merge_once(maps, tau)) for tau in (0.01, 0.1, 0.3, 1.0, 10.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 40 and counts[-1] == 1


def test_merging_averages_each_greedy_group():
    a = torch.tensor([0.7, 0.2, 0.1])
    b = torch.tensor([0.1, 0.2, 0.7])
    maps = torch.stack([a, torch.tensor([0.68, 0.22, 0.1]), b, torch.tensor([0.12, 0.2, 0.68])])
    merged = merge_once(maps, 0.05)  # 0 takes 1, then 2 takes 3
    torch.testing.assert_close(merged, torch.stack([maps[:2].mean(0), maps[2:].mean(0)]))


def test_refinement_is_the_row_normalised_transpose_walk():
    from textmask.methods import refine_with_self_attention
    from textmask.postprocess import normalize

    g = torch.Generator().manual_seed(2)
    sa = (torch.rand(1, 16, 16, generator=g) * 3).softmax(-1)
    ca = torch.rand(1, 2, 4, 4, generator=g)
    walk = sa.transpose(1, 2) / sa.transpose(1, 2).sum(-1, keepdim=True)  # AggSD eq. 2, written out
    expected = normalize((walk @ ca.reshape(1, 2, 16).transpose(1, 2)).transpose(1, 2).reshape(1, 2, 4, 4))
    torch.testing.assert_close(refine_with_self_attention(ca, sa, (4, 4)), expected, atol=1e-5, rtol=0)
    forward = normalize((sa @ ca.reshape(1, 2, 16).transpose(1, 2)).transpose(1, 2).reshape(1, 2, 4, 4))
    torch.testing.assert_close(refine_with_self_attention(ca, sa, (4, 4), mode="forward"), forward, atol=1e-5, rtol=0)


def test_anchor_grid():
    idx = anchor_grid((64, 64))  # google/diffseg's: rows and columns 1, 5, ..., 61
    assert len(idx) == 256 and sorted(set((idx // 64).tolist())) == list(range(1, 62, 4))
    assert sorted(set((idx % 64).tolist())) == list(range(1, 62, 4))
    assert sorted(set((anchor_grid((40, 24)) // 24).tolist())) == [4 + 2 * k for k in range(16)]  # step 39 // 15, centred
    assert len(anchor_grid((8, 8))) == 64  # never more anchors than pixels


def test_segments_api(sd1_masker):
    res = sd1_masker.segments(torch.rand(2, 37, 53, 3), segmenter="diffseg", tau=0.5)
    assert res.labels.shape == (2, 37, 53)
    for lab, masks in zip(res.labels, res.masks):
        assert masks.shape[1:] == (37, 53)
        assert torch.equal(masks.sum(0), torch.ones(37, 53))  # a partition
        areas = masks.sum((1, 2))
        assert torch.equal(areas, areas.sort(descending=True).values)  # largest first
        assert torch.equal(masks.argmax(0), lab)
    assert len(sd1_masker.segments(torch.rand(1, 37, 53, 3), segmenter="diffseg", kmeans=True).masks) == 1


def test_named_segments_api(sd1_masker):
    res = sd1_masker.semantic(torch.rand(2, 37, 53, 3), ["sky", "red car", "road"])
    assert res.masks.shape == (2, 3, 37, 53) and res.labels.shape == (2, 37, 53)
    assert (res.masks.sum(1) <= 1).all()  # names never overlap
    for i in range(3):
        assert torch.equal(res.masks[:, i], (res.labels == i + 1).float())


@pytest.mark.parametrize("names,match", [([], "at least one"), (["car", " "], "empty"), (["car", "Car"], "duplicate")])
def test_named_segments_bad_names(sd1_masker, names, match):
    with pytest.raises(TextMaskError, match=match):
        sd1_masker.semantic(torch.rand(1, 32, 32, 3), names)


def test_bad_tau(sd1_masker):
    with pytest.raises(TextMaskError, match="tau"):
        sd1_masker.segments(torch.rand(1, 32, 32, 3), tau=0)
