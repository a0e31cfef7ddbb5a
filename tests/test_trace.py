"""Traces (OVAM): masks for any words from one kept forward, without another UNet forward."""

import pytest
import torch

import tiny_models
from textmask import TextMasker, TextMaskError


@pytest.fixture(scope="module")
def masker():
    return TextMasker.from_pipe(tiny_models.sd1_pipe(), resolution=64)


def forwards(masker):
    calls = []
    handle = masker.host.unet.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("refine", [True, False])
def test_under_the_traced_prompt_it_is_the_forwards_attention_mask(masker, refine):
    image = torch.rand(3, 40, 56, 3)
    caption = "a red car next to a tree"
    for kw in (dict(pamr=False), dict(soft=True, blur=1.0), dict()):
        want = masker.mask(image, "red car | tree", prompt=caption, refine=refine, batch_size=3, **kw)
        got = masker.trace(image, prompt=caption, refine=refine, batch_size=3).mask("red car | tree", prompt=caption, **kw)
        assert torch.equal(got.heatmaps, want.heatmaps) and torch.equal(got.masks, want.masks)
    want = masker.mask(image, "red car", negative="tree", prompt=caption, refine=refine, batch_size=3)
    got = masker.trace(image, prompt=caption, refine=refine, batch_size=3).mask("red car", negative="tree",
                                                                                 prompt=caption)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.heatmaps, want.heatmaps)
    # In batches of 2 the trace refines all images at once: float32 sums in another order, as mask() itself differs
    # between batch sizes (7e-5 here).
    want = masker.mask(image, "red car | tree", prompt=caption, refine=refine, batch_size=2, pamr=False)
    got = masker.trace(image, prompt=caption, refine=refine, batch_size=2).mask("red car | tree", prompt=caption, pamr=False)
    torch.testing.assert_close(got.heatmaps, want.heatmaps, atol=2e-4, rtol=0)


def test_new_words_need_no_forward(masker):
    image = torch.rand(2, 40, 56, 3)
    trace = masker.trace(image, prompt="a photo")
    calls, handle = forwards(masker)
    try:
        res = trace.mask("dog | cat AND NOT grass")
        other = trace.mask("bicycle", threshold=0.5, invert=True)
    finally:
        handle.remove()
    assert calls == []  # re-queried through the layers' key projections only
    assert res.masks.shape == other.masks.shape == (2, 40, 56) and set(res.terms) == {"dog", "cat", "grass"}
    assert not torch.equal(res.terms["dog"], res.terms["cat"])


def test_bad_input_is_one_line(masker):
    trace = masker.trace(torch.rand(1, 32, 32, 3))
    with pytest.raises(TextMaskError, match="empty"):
        trace.mask("  ")
    with pytest.raises(TextMaskError, match="refine_mode"):
        trace.mask("cat", refine_mode="sideways")
    with pytest.raises(TextMaskError, match="blur"):
        trace.mask("cat", blur=-1)
    for steps in (0, "two", 1.5):
        with pytest.raises(TextMaskError, match="refine_steps"):
            trace.mask("cat", refine_steps=steps)
    with pytest.raises(TextMaskError, match="prompt must be text"):
        trace.mask("cat", prompt=3)
    with pytest.raises(TextMaskError, match="negative"):
        trace.mask("cat", negative=3)
    with pytest.raises(TextMaskError, match="prompt"):
        masker.trace(torch.rand(1, 32, 32, 3), prompt=3)


def test_a_trace_leaves_the_model_untouched():
    from conftest import unet_untouched

    pipe = tiny_models.sd1_pipe()
    masker = TextMasker.from_pipe(pipe, resolution=64)
    with unet_untouched(pipe.unet):
        trace = masker.trace(torch.rand(1, 32, 32, 3), prompt="a cat")
        trace.mask("cat | dog")
        boom = pipe.unet.mid_block.register_forward_hook(lambda *a: (_ for _ in ()).throw(ValueError("boom")))
        try:
            with pytest.raises(ValueError, match="boom"):  # a forward that fails midway takes its hooks off too
                masker.trace(torch.rand(1, 32, 32, 3))
        finally:
            boom.remove()


def test_layers_off_the_device_are_one_line(masker):
    # A low-VRAM host can leave a layer's weights elsewhere between forwards; its key projection then fails.
    trace = masker.trace(torch.rand(1, 32, 32, 3))
    name, module = masker.host.attention_modules()[1]

    def offloaded(_module, _args):
        raise RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu\nmore detail")

    handle = module.to_k.register_forward_pre_hook(offloaded)
    try:
        with pytest.raises(TextMaskError, match="use mask\\(\\) instead") as info:
            trace.mask("cat")
    finally:
        handle.remove()
    assert "\n" not in str(info.value)
