"""Ref-Diff: proposals and scores on planted structure, the CLIP path, and the API end to end."""

import pytest
import torch

import tiny_models
from textmask import TextMasker, TextMaskError
from textmask.methods.refdiff import (
    combine, generative_scores, neighbours, positional_weight, proposals)


def test_generative_score_picks_the_planted_region():
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[2:7, 2:7], labels[9:14, 8:15], labels[:, 15] = 1, 2, 3
    attr = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    attr[9:14, 8:15] = 0.85 + 0.1 * torch.rand(5, 7, generator=torch.Generator().manual_seed(1))  # the referred object
    props = proposals(labels, attr)
    best = props[int(generative_scores(props, attr).argmax())]
    assert torch.equal(best, labels == 2)


def test_proposals_and_neighbours():
    labels = torch.tensor([[0, 0, 1], [2, 2, 1], [2, 2, 1]])
    assert neighbours(labels) == {(0, 1), (0, 2), (1, 2)}
    attr = torch.linspace(0, 1, 9).reshape(3, 3)
    props = proposals(labels, attr)
    as_sets = {tuple(p.reshape(-1).tolist()) for p in props}
    for k in range(3):
        assert tuple((labels == k).reshape(-1).tolist()) in as_sets
    assert tuple(((labels == 0) | (labels == 1)).reshape(-1).tolist()) in as_sets
    assert tuple((attr > 0.5).reshape(-1).tolist()) in as_sets
    assert not any(all(p) or not any(p) for p in as_sets)  # neither empty nor everything
    specks = proposals(torch.zeros(20, 20, dtype=torch.long).index_fill_(1, torch.tensor([19]), 1), torch.zeros(20, 20))
    assert (specks.flatten(1).float().mean(1) >= 0.01).all()


def test_combine_and_positional_weight():
    gen, disc = torch.tensor([0.1, 0.5, 0.3]), torch.tensor([0.9, 0.2, 0.4])
    torch.testing.assert_close(combine(gen, None, 0.5), gen)
    torch.testing.assert_close(combine(gen, disc, 1.0), torch.tensor([0.0, 1.0, 0.5]))
    assert int(combine(gen, disc, 0.0).argmax()) == 0
    left = positional_weight("the man on the left", 10, 30)
    assert left[0, 0] == 1 and left[0, -1] == 0 and (left[:, :-1] >= left[:, 1:]).all()
    assert torch.equal(positional_weight("the man on the right", 10, 30), left.flip(1))
    assert torch.equal(positional_weight("the man", 10, 30), torch.ones(10, 30))
    assert positional_weight("top cake", 12, 5)[-1].sum() == 0


@pytest.fixture(scope="module")
def masker():
    return TextMasker.from_pipe(tiny_models.sd1_pipe(), resolution=64)


def test_refer_api(masker):
    res = masker.refer(torch.rand(2, 37, 53, 3), "the red car on the left")
    assert res.subject == "red car"
    assert res.masks.shape == res.heatmaps.shape == (2, 37, 53)
    assert set(res.masks.unique().tolist()) <= {0.0, 1.0} and res.masks.sum() > 0


def test_refdiff_uses_one_forward_for_cond_and_uncond(masker):
    from textmask.methods.refdiff import refer

    calls = []
    handle = masker.host.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        res = refer(masker.host, torch.rand(1, 37, 53, 3), "the dog")
    finally:
        handle.remove()
    assert calls == [2]  # uncond and cond rows of the one image, batched
    assert res.subject == "dog" and res.masks.shape == res.heatmaps.shape == (1, 37, 53)


def test_refer_without_relation_or_clip_takes_the_subjects_best_instance(masker):
    # One forward, conditioned on the expression; the chosen mask is one of the instances of the subject's mask.
    calls = []
    handle = masker.host.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    images = torch.rand(2, 37, 53, 3)
    try:
        res = masker.refer(images, "the black dog")
    finally:
        handle.remove()
    assert calls == [1, 1]  # one forward per image (refer's batch size is 1), conditional rows only
    assert res.subject == "black dog"
    union = masker.mask(images, "black dog", prompt="the black dog").masks
    for i in range(2):
        chosen = res.masks[i].bool()
        assert any(torch.equal(chosen, c) for c in res.instances[i])
        assert not (chosen & ~union[i].bool()).any()


def test_refer_with_clip(masker, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    res = masker.refer(torch.rand(1, 37, 53, 3), "the cat on the right", clip=tmp_path / "clip", alpha=0.3)
    assert res.masks.shape == (1, 37, 53)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(TextMaskError, match="cannot load a CLIP model"):
        masker.refer(torch.rand(1, 32, 32, 3), "the cat", clip=tmp_path / "empty")


@pytest.mark.parametrize("expression,match", [("left", "no noun"), ("  ", "empty"), ("bottom right", "no noun")])
def test_bad_expressions(masker, expression, match):
    with pytest.raises(TextMaskError, match=match):
        masker.refer(torch.rand(1, 32, 32, 3), expression)


def test_bad_alpha(masker):
    with pytest.raises(TextMaskError, match="alpha"):
        masker.refer(torch.rand(1, 32, 32, 3), "the cat", alpha=2)


def test_segments_and_refer_leave_the_model_untouched():
    from conftest import unet_untouched
    from textmask.methods.refdiff import refer

    pipe = tiny_models.sd1_pipe()
    masker = TextMasker.from_pipe(pipe, resolution=64)
    unet = pipe.unet
    with unet_untouched(unet):
        masker.segments(torch.rand(1, 32, 32, 3))
        masker.semantic(torch.rand(1, 32, 32, 3), ["cat", "dog"])
        masker.refer(torch.rand(1, 32, 32, 3), "the cat on the left")
        refer(masker.host, torch.rand(1, 32, 32, 3), "the cat")

        class Boom(Exception):
            pass

        boom = unet.mid_block.register_forward_hook(lambda *a: (_ for _ in ()).throw(Boom()))
        try:
            for call in (lambda: masker.segments(torch.rand(1, 32, 32, 3)),
                         lambda: refer(masker.host, torch.rand(1, 32, 32, 3), "the cat")):
                with pytest.raises(Boom):
                    call()
        finally:
            boom.remove()


def test_attribution_grid_is_sds_one_thirty_second_level_said_structurally():
    from textmask.methods.refdiff import attribution_grid

    def sizes(names_and_sides):
        return {f"{n}.attn2": (s, s) for n, s in names_and_sides}

    sd1_512 = sizes([("down_blocks.0.attentions.0", 64), ("down_blocks.1.attentions.0", 32),
                     ("down_blocks.2.attentions.0", 16), ("mid_block.attentions.0", 8), ("up_blocks.1.attentions.0", 16),
                     ("up_blocks.3.attentions.2", 64)])
    assert attribution_grid(sd1_512) == (16, 16)  # 512 / 32
    comfy_sd1_1024 = sizes([("input_blocks.1.1", 128), ("input_blocks.7.1", 32), ("middle_block.1", 16),
                            ("output_blocks.5.1", 32)])
    assert attribution_grid(comfy_sd1_1024) == (32, 32)  # 1024 / 32, not the mid block's 16
    sdxl_1024 = sizes([("down_blocks.1.attentions.0", 64), ("down_blocks.2.attentions.1", 32),
                       ("mid_block.attentions.0", 32), ("up_blocks.0.attentions.0", 32)])
    assert attribution_grid(sdxl_1024) == (32, 32)
    shapes_128 = sizes([("down_blocks.0.attentions.0", 32), ("down_blocks.1.attentions.0", 16),
                        ("mid_block.attentions.0", 8), ("up_blocks.2.attentions.1", 32)])
    assert attribution_grid(shapes_128) == (16, 16)  # 128 / 32 = 4 exists nowhere; the mid block's 8 is not it
    assert attribution_grid(sizes([("mid_block.attentions.0", 8)])) == (8, 8)  # a UNet with nothing else
