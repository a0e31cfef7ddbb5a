"""TextMasker end to end on tiny models: sizes, batches, methods, bad input, and the model left untouched."""

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, noised, predict_eps, predict_eps_ddpm, state_snapshot
from PIL import Image

import tiny_models
from textmask import ImageError, PhraseNotFoundError, PromptSyntaxError, TextMasker, TextMaskError
from textmask.hosts import diffusers_loading


def images(b=2, h=37, w=53, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,refine", [("attention", False), ("attention", True), ("noise-diff", False)])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (20, 90)])
def test_mask_is_exact_input_size(sd1_masker, method, refine, size):
    out = sd1_masker.mask(images(2, *size), "red car | truck", method=method, refine=refine)
    assert out.masks.shape == out.heatmaps.shape == (2, *size)
    assert set(out.terms) == {"red car", "truck"}
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    assert out.heatmaps.min() >= 0 and out.heatmaps.max() <= 1


def test_input_kinds(sd1_masker):
    rgba = Image.fromarray((np.random.default_rng(0).random((33, 41, 4)) * 255).astype(np.uint8), "RGBA")
    gray = Image.fromarray((np.random.default_rng(1).random((33, 41)) * 255).astype(np.uint8), "L")
    for img in (rgba, gray, np.asarray(rgba), torch.rand(33, 41, 3), [rgba, gray]):
        out = sd1_masker.mask(img, "cat")
        assert out.masks.shape[-2:] == (33, 41)
    assert sd1_masker.mask([rgba, gray], "cat").masks.shape == (2, 33, 41)


def test_rgba_alpha_is_ignored(sd1_masker):
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.zeros((32, 32, 1), np.uint8)], axis=-1)
    a = sd1_masker.mask(Image.fromarray(rgb), "cat").heatmaps
    b = sd1_masker.mask(Image.fromarray(rgba, "RGBA"), "cat").heatmaps
    assert torch.equal(a, b)


def test_bad_images(sd1_masker):
    with pytest.raises(ImageError, match="share a size"):
        sd1_masker.mask([torch.rand(32, 32, 3), torch.rand(40, 32, 3)], "cat")
    with pytest.raises(ImageError, match="too small"):
        sd1_masker.mask(torch.rand(4, 30, 3), "cat")
    with pytest.raises(ImageError, match="channels"):
        sd1_masker.mask(torch.rand(1, 32, 32, 7), "cat")
    with pytest.raises(ImageError, match="no images"):
        sd1_masker.mask([], "cat")
    nan = torch.rand(32, 32, 3)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match="NaN"):
        sd1_masker.mask(nan, "cat")


def test_bad_prompts(sd1_masker):
    img = images(1)
    with pytest.raises(TextMaskError, match="empty"):
        sd1_masker.mask(img, "  ")
    with pytest.raises(PromptSyntaxError, match="column 8"):
        sd1_masker.mask(img, "cat AND")
    with pytest.raises(PhraseNotFoundError, match="'dog' is not in the prompt"):
        sd1_masker.mask(img, "dog", prompt="a photo of a cat")
    with pytest.raises(PhraseNotFoundError):
        sd1_masker.mask(img, "dog", prompt="a photo of a cat", method="noise-diff")
    with pytest.raises(TextMaskError, match="unknown method"):
        sd1_masker.mask(img, "cat", method="magic")
    with pytest.raises(TextMaskError, match="threshold"):
        sd1_masker.mask(img, "cat", threshold=1.5)
    with pytest.raises(TextMaskError, match="timestep"):
        sd1_masker.mask(img, "cat", timestep=1000)


def test_finding_nothing_is_all_zero(sd1_masker):
    img = images(2)
    for kwargs in ({"threshold": 1.0}, {}):
        prompt = "cat" if kwargs else "cat AND NOT cat"
        out = sd1_masker.mask(img, prompt, **kwargs)
        assert out.masks.shape == (2, 37, 53) and out.masks.sum() == 0
        soft = sd1_masker.mask(img, prompt, soft=True, **kwargs)
        assert soft.masks.sum() == 0


def test_prompt_and_caption(sd1_masker):
    img = images(1)
    caption = "a photo of a cat sitting on a red sofa next to a lamp"
    out = sd1_masker.mask(img, "red sofa | lamp", prompt=caption)
    assert out.masks.shape == (1, 37, 53)
    long_caption = " ".join(["a wide landscape"] * 40) + " with a cat"
    out = sd1_masker.mask(img, "cat", prompt=long_caption)
    assert out.heatmaps.max() > 0


def test_negative_equals_and_not(sd1_masker):
    img = images(1)
    a = sd1_masker.mask(img, "cat", negative="sofa")
    b = sd1_masker.mask(img, "cat AND NOT sofa")
    assert torch.equal(a.masks, b.masks) and torch.equal(a.heatmaps, b.heatmaps)


def test_soft_masks_share_support_with_binary(sd1_masker):
    img = images(2)
    hard = sd1_masker.mask(img, "cat | dog")
    soft = sd1_masker.mask(img, "cat | dog", soft=True)
    assert torch.equal(soft.masks > 0, hard.masks > 0)
    assert ((soft.masks > 0) & (soft.masks < 1)).any()


def test_postprocess_options(sd1_masker):
    img = images(1)
    base = sd1_masker.mask(img, "cat").masks
    assert torch.equal(sd1_masker.mask(img, "cat", invert=True).masks, 1 - base)
    assert sd1_masker.mask(img, "cat", grow=3).masks.sum() >= base.sum()
    assert sd1_masker.mask(img, "cat", grow=-3).masks.sum() <= base.sum()
    blurred = sd1_masker.mask(img, "cat", blur=2).masks
    assert ((blurred > 0) & (blurred < 1)).any()
    assert sd1_masker.mask(img, "cat", fill_holes=True).masks.sum() >= base.sum()


def test_deterministic_and_batch_independent(sd1_masker):
    img = images(3)
    # Refinement multiplies [B, N, N] aggregates, where BLAS's blocking differs with B (1e-4 on this random model).
    a = sd1_masker.mask(img, "cat", seed=7, batch_size=1, refine=False)
    b = sd1_masker.mask(img, "cat", seed=7, batch_size=3, refine=False)
    torch.testing.assert_close(a.heatmaps, b.heatmaps, atol=1e-5, rtol=0)
    c = sd1_masker.mask(img, "cat", seed=8, refine=False)
    assert not torch.equal(a.heatmaps, c.heatmaps)


def test_terms_share_one_forward(sd1_pipe):
    masker = TextMasker.from_pipe(sd1_pipe, resolution=64)
    calls = []
    handle = sd1_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        masker.mask(images(2), "a | b AND NOT c | (d OR e)", refine=True)
        assert len(calls) == 1
        calls.clear()
        masker.mask(images(2), "a | b | c", method="noise-diff")
        assert len(calls) == 1  # [∅, a, b, c] for both images in one batch
    finally:
        handle.remove()


def test_a_compiled_unet_masks_through_its_eager_module(sd1_pipe):
    """A pipeline whose UNet is torch.compile'd masks as the uncompiled one does: textmask's forward runs the
    compiled module's eager original (the same weights), whose hooks fire."""
    import copy

    compiled = copy.copy(sd1_pipe)
    compiled.unet = torch.compile(sd1_pipe.unet, backend="eager")
    try:
        ours = TextMasker.from_pipe(compiled, resolution=64).mask(images(1), "red car", refine=True)
    finally:
        torch._dynamo.reset()
    plain = TextMasker.from_pipe(sd1_pipe, resolution=64).mask(images(1), "red car", refine=True)
    assert torch.equal(ours.heatmaps, plain.heatmaps) and float(plain.heatmaps.std()) > 0


def test_model_bit_identical_after_masking(sd1_pipe):
    unet = sd1_pipe.unet
    masker = TextMasker.from_pipe(sd1_pipe, resolution=64)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = state_snapshot(unet)
    masker.mask(images(2), "cat | dog", refine=True)
    masker.mask(images(1), "cat", method="noise-diff")

    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted

    # An interrupt between batches and an exception inside the forward both leave the model as it was.
    masker.host.check_interrupt = interrupt
    with pytest.raises(Interrupted):
        masker.mask(images(2), "cat")
    del masker.host.check_interrupt
    boom = unet.mid_block.register_forward_hook(lambda *a: (_ for _ in ()).throw(Interrupted()))
    with pytest.raises(Interrupted):
        masker.mask(images(2), "cat", refine=True)
    boom.remove()
    assert_unchanged(before, state_snapshot(unet))
    with torch.no_grad():
        assert torch.equal(before_out, unet(x, t, encoder_hidden_states=ctx).sample)


def test_sdxl_pooled_path(sdxl_pipe):
    masker = TextMasker.from_pipe(sdxl_pipe, resolution=64)
    host = masker.host
    cond = host.encode_prompts(["a photo of a cat"])
    assert cond.context.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    x = torch.randn(1, 4, 32, 32)
    lat = torch.zeros_like(x)
    with torch.no_grad():
        eps = predict_eps(host, x, 300, cond, lat)
        cond.pooled = cond.pooled + 1
        eps_other = predict_eps(host, x, 300, cond, lat)
    assert not torch.allclose(eps, eps_other)  # the pooled embedding reaches the UNet
    out = masker.mask(images(2), "cat | dog", refine=True)
    assert out.masks.shape == (2, 37, 53)


def test_inpainting_unet():
    pipe = tiny_models.Pipe(tiny_models.unet_sd1(in_channels=9), tiny_models.vae(), tiny_models.text_encoder())
    masker = TextMasker.from_pipe(pipe, resolution=64)
    for method in ("attention", "noise-diff"):
        assert masker.mask(images(1), "cat", method=method).masks.shape == (1, 37, 53)


def test_v_prediction_converts_to_epsilon(sd1_pipe):
    eps_host = diffusers_loading.from_pipe(sd1_pipe)
    v_host = diffusers_loading.from_pipe(sd1_pipe, prediction_type="v_prediction")
    cond = eps_host.encode_prompts(["cat"])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        raw = predict_eps_ddpm(eps_host, x, 400, cond, x)
        eps = predict_eps_ddpm(v_host, x, 400, cond, x)
    a = float(eps_host.alphas_cumprod[400])
    torch.testing.assert_close(eps, a**0.5 * raw + (1 - a) ** 0.5 * x)


def test_from_pretrained_folder(tmp_path, sd1_pipe):
    for name in ("unet", "vae", "text_encoder"):
        getattr(sd1_pipe, name).save_pretrained(tmp_path / name)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    masker = TextMasker.from_pretrained(tmp_path, resolution=64)
    assert masker.host.prediction_type == "v_prediction"
    assert masker.mask(images(1), "cat").masks.shape == (1, 37, 53)
    from textmask.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        TextMasker.from_pretrained(tmp_path / "vae")


def test_folder_and_pipe_schedules(tmp_path, sd1_pipe):
    """A folder's scheduler config sets the training schedule (here zero terminal SNR, as v-prediction finetunes ship
    it), whatever sampler it names; a flow-matching scheduler, which is neither DDPM's nor EDM's, is refused in one
    line."""
    import json

    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from textmask.errors import CheckpointError
    from textmask.schedule import ddpm_alphas_cumprod

    for name in ("unet", "vae", "text_encoder"):
        getattr(sd1_pipe, name).save_pretrained(tmp_path / name)
    zsnr = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True)
    zsnr.save_pretrained(tmp_path / "scheduler")
    host = TextMasker.from_pretrained(tmp_path, resolution=64).host
    assert host.prediction_type == "v_prediction"
    torch.testing.assert_close(host.alphas_cumprod[:-1], ddpm_alphas_cumprod(zero_snr=True)[:-1], rtol=1e-5, atol=1e-7)
    assert float(host.alphas_cumprod[-1]) == 2**-24  # zero terminal SNR, kept finite
    flow = FlowMatchEulerDiscreteScheduler()
    try:
        sd1_pipe.scheduler = zsnr  # DDIM leaves ᾱ = 0 at the end
        assert float(diffusers_loading.from_pipe(sd1_pipe).alphas_cumprod[-1]) == 2**-24
        with torch.no_grad():
            latents = diffusers_loading.from_pipe(sd1_pipe, resolution=32).sample("cat", "", 1, steps=2, cfg=2.0, seed=0)
        assert torch.isfinite(latents).all()
        sd1_pipe.scheduler = flow
        with pytest.raises(CheckpointError, match="FlowMatchEulerDiscreteScheduler has neither a DDPM noise schedule"):
            diffusers_loading.from_pipe(sd1_pipe)
    finally:
        sd1_pipe.scheduler = None  # the session's pipe, as the fixture made it
    flow.save_pretrained(tmp_path / "scheduler")
    with pytest.raises(CheckpointError, match="has neither a DDPM noise schedule") as e:
        TextMasker.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    for broken in ("{not json", json.dumps({"beta_schedule": "no-such-schedule"})):
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(broken)
        with pytest.raises(CheckpointError, match="cannot read .*scheduler_config.json") as e:
            TextMasker.from_pretrained(tmp_path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_edm_model_matches_diffusers_preconditioning(sd1_pipe, prediction):
    """An EDM pipeline (Playground v2.5 is ε-parametrised, CosXL v) is read at SD's noise levels: noising, c_in, c_noise
    and the output's conversion to ε agree with diffusers' own EDM scheduler at the matched σ."""
    from diffusers import EDMDPMSolverMultistepScheduler

    from textmask.schedule import ddpm_alphas_cumprod

    sched = EDMDPMSolverMultistepScheduler(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, prediction_type=prediction)
    try:
        sd1_pipe.scheduler = sched
        host = diffusers_loading.from_pipe(sd1_pipe, resolution=64)
    finally:
        sd1_pipe.scheduler = None
    assert host.edm.sigma_data == 0.5 and host.prediction_type == prediction
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)  # the host's latents are in units of σ_data
    noise = torch.randn(latents.shape, generator=g)
    cond = host.encode_prompts(["a red car", "a cat"])
    for t in (20, 300, 900):
        sigma = torch.tensor(0.5 * ((1 - float(ddpm_alphas_cumprod()[t])) / float(ddpm_alphas_cumprod()[t])) ** 0.5)
        with torch.no_grad():
            eps = predict_eps(host, noised(host, latents, noise, t), t, cond, latents)
            x = latents * 0.5 + sigma * noise  # EDM's own noising of the same image and noise
            out = sd1_pipe.unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma).expand(2),
                                encoder_hidden_states=cond.context).sample
            expected = (x - sched.precondition_outputs(x, out, sigma)) / sigma
        torch.testing.assert_close(eps, expected, atol=2e-5, rtol=1e-4)


def test_edm_folder_masks_and_samples(tmp_path, sd1_pipe):
    """A Playground-style diffusers folder: an EDM scheduler config and a VAE with per-channel latent statistics."""
    from diffusers import EDMDPMSolverMultistepScheduler

    from textmask.schedule import EDMSchedule

    for name in ("unet", "text_encoder"):
        getattr(sd1_pipe, name).save_pretrained(tmp_path / name)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.5, 1.0, 0.5]
    vae = sd1_pipe.vae
    saved = dict(vae.config)
    try:
        vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=0.5)
        vae.save_pretrained(tmp_path / "vae")
    finally:
        vae.register_to_config(**{k: saved.get(k) for k in ("latents_mean", "latents_std", "scaling_factor")})
    EDMDPMSolverMultistepScheduler(sigma_data=0.5, sigma_max=80.0).save_pretrained(tmp_path / "scheduler")
    masker = TextMasker.from_pretrained(tmp_path, resolution=64)
    host = masker.host
    assert host.edm == EDMSchedule(0.002, 80.0, 0.5) and host.prediction_type == "epsilon"
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = host.vae.encode(pixels * 2 - 1).latent_dist.mean
        expected = (raw - torch.tensor(mean).view(1, -1, 1, 1)) * 0.5 / torch.tensor(std).view(1, -1, 1, 1) / 0.5
        torch.testing.assert_close(host.encode_images(pixels), expected)
        latents = host.sample("a cat", "", 1, steps=3, cfg=2.0, seed=0)
    side = 64 // host.geometry.latent_factor
    assert latents.shape == (1, 4, side, side) and torch.isfinite(latents).all()
    result = masker.mask(torch.rand(2, 40, 56, 3), "red car", refine=True)
    assert result.masks.shape == (2, 40, 56) and torch.isfinite(result.heatmaps).all()


def test_tiny_autoencoder_as_the_pipelines_vae():
    """diffusers' AutoencoderTiny (TAESD), a common stand-in VAE, returns latents, not a distribution: they are used
    as diffusers' pipelines use them (scaling factor 1)."""
    from diffusers import AutoencoderTiny

    pipe = tiny_models.sd1_pipe()
    torch.manual_seed(0)
    pipe.vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    masker = TextMasker.from_pipe(pipe, resolution=64)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(masker.host.encode_images(pixels), pipe.vae.encode(pixels * 2 - 1).latents)
    out = masker.mask(torch.rand(2, 50, 70, 3), "red car", refine=True)
    assert out.masks.shape == (2, 50, 70) and torch.isfinite(out.heatmaps).all()


def test_refiner_and_transformer_pipelines_are_refused_in_one_line(sdxl_pipe):
    """An SDXL refiner pipeline has no first text encoder (text_encoder=None); PixArt's has no UNet."""
    from textmask.errors import CheckpointError

    refiner = tiny_models.Pipe(sdxl_pipe.unet, sdxl_pipe.vae, None, sdxl_pipe.text_encoder_2)
    with pytest.raises(CheckpointError, match="no text_encoder in this model") as e:
        TextMasker.from_pipe(refiner, resolution=64)
    assert "\n" not in str(e.value)

    class PixArtLike:  # a DDPM-scheduled pipeline whose denoiser is a transformer (PixArt-α)
        transformer, vae, text_encoder, scheduler = sdxl_pipe.unet, sdxl_pipe.vae, sdxl_pipe.text_encoder, None

    with pytest.raises(CheckpointError, match="PixArtLike runs a transformer textmask does not know"):
        TextMasker.from_pipe(PixArtLike(), resolution=64)


def test_ip_adapter_unet_is_refused_in_one_line():
    """diffusers' load_ip_adapter() makes the UNet's forward require image embeddings (encoder_hid_dim_type
    "ip_image_proj"); without them diffusers fails deep inside with a TypeError, so the host says what to do."""
    import copy

    from textmask.errors import CaptureError

    pipe = tiny_models.sd1_pipe()
    unet = copy.deepcopy(pipe.unet)
    ctx, widths = unet.config.cross_attention_dim, unet.config.block_out_channels
    ip = {}
    for j, name in enumerate(n for n in unet.attn_processors if n.endswith("attn2.processor")):
        level = int(name.split(".")[1]) if not name.startswith("mid_block") else -1
        width = widths[-1] if level < 0 else (widths[::-1] if name.startswith("up_blocks") else widths)[level]
        ip[f"{2 * j + 1}.to_k_ip.weight"] = torch.zeros(width, ctx)  # diffusers' numbering: odd ids, attn2 only
        ip[f"{2 * j + 1}.to_v_ip.weight"] = torch.zeros(width, ctx)
    image_proj = {"proj.weight": torch.zeros(4 * ctx, 16), "proj.bias": torch.zeros(4 * ctx),
                  "norm.weight": torch.ones(ctx), "norm.bias": torch.zeros(ctx)}
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}], low_cpu_mem_usage=False)
    pipe.unet = unet
    masker = TextMasker.from_pipe(pipe, resolution=64)
    with pytest.raises(CaptureError, match="IP-Adapter loaded") as e:
        masker.mask(torch.rand(1, 64, 64, 3), "red car")
    assert "\n" not in str(e.value)
    assert all(not m._forward_hooks for m in unet.modules())  # the capture came off


def test_phrases_are_encoded_apart_and_joined(sdxl_pipe):
    """Without a prompt each phrase is encoded on its own ("the car") and the encodings joined as one prompt is laid
    out: the start token once, each phrase's tokens through its end token, the empty prompt's padding to whole
    windows. A phrase's context never carries another's words; the pooled embedding is the listing's."""
    from textmask.methods.attention import attention_prompt, phrase_conditioning

    host = TextMasker.from_pipe(sdxl_pipe, resolution=64).host
    phrases = ["red car", "car", "sky"]
    cond, groups = phrase_conditioning(host, phrases)
    parts = host.encode_prompts(["the red car", "the car", "the sky"])
    empty = host.encode_prompts([""]).context[0]
    # [start, the, red, car, end] [the, car, end] [the, sky, end], then 66 of the empty prompt's padding
    want = torch.cat([parts.context[0, :5], parts.context[1, 1:4], parts.context[2, 1:4], empty[2:68]])
    assert torch.equal(cond.context[0], want)
    assert groups == [[2, 3], [6], [9]]  # "car" is read in its own part, not inside "the red car"
    assert all(cond.token_maps[0].find(p) == g for p, g in zip(["sky", "red car"], [groups[2], groups[0]]))
    assert torch.equal(cond.pooled, host.encode_prompts([attention_prompt(phrases)]).pooled)
    # the same phrase, beside other phrases, has the same context
    other, other_groups = phrase_conditioning(host, ["blue boat", "sky"])
    assert torch.equal(other.context[0, other_groups[1]], cond.context[0, groups[2]])
    # as long as the listing, give or take a window, however many phrases there are
    many = [f"w{i}" for i in range(300)]
    listing = host.encode_prompts([attention_prompt(many)]).context.shape[1]
    assert cond.context.shape[1] == 77 and phrase_conditioning(host, many)[0].context.shape[1] <= listing + 77
    # one phrase, or a caption: that text alone
    one, _ = phrase_conditioning(host, ["sky"])
    assert torch.equal(one.context, host.encode_prompts(["the sky"]).context)
    caption, found = phrase_conditioning(host, phrases, "a red car on a road under the sky")
    assert caption.context.shape[1] == 77 and found[2] == caption.token_maps[0].find("sky")


def test_context_positions_point_at_the_phrase(sd1_masker):
    host = sd1_masker.host
    text = " ".join(["hill"] * 80) + " tiny zebra"
    token_map, windows = host._windows(text)
    flat = sum(([49406] + w + [49407] + [49407] * (75 - len(w)) for w in windows), [])
    assert len(flat) == token_map.context_length
    tokens = host.tokenizer.convert_ids_to_tokens([flat[p] for p in token_map.find("tiny zebra")])
    assert tokens == ["tiny</w>", "zebra</w>"]


def test_noise_difference_blurs_away_pixel_noise():
    from textmask.methods import noise_difference

    gen = torch.Generator().manual_seed(0)
    null = torch.randn(1, 4, 32, 32, generator=gen)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 8:20] = True
    jitter = 0.2 * torch.randn(1, 1, 4, 32, 32, generator=gen)  # white, like half-precision rounding
    text = null.unsqueeze(1) + 0.3 * inside + jitter
    hits = {}
    for sigma in (0.0, 1.0):
        maps = noise_difference(text, null, sigma=sigma)
        assert maps.shape == (1, 1, 32, 32) and maps.min() == 0 and maps.max() == 1
        top = maps.flatten().topk(int(inside.sum())).indices
        hits[sigma] = inside.flatten()[top].float().mean().item()
    assert hits[1.0] > hits[0.0] + 0.1, hits  # the object's pixels rank first more often once blurred


def test_console_progress_stays_quiet_for_quick_work(capsys):
    from textmask.hosts.contract import HostDefaults

    quiet, shown = HostDefaults(), HostDefaults()
    shown.show_progress = True
    assert shown.progress(1, "one step").disable and quiet.progress(5, "off").disable
    with shown.progress(5, "quick") as bar:  # done well within the delay: nothing drawn, nothing to clear
        assert not bar.disable
        bar.update(5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("offload", ["sequential", "model"])
def test_accelerate_cpu_offload(offload):
    """enable_sequential_cpu_offload parks the weights on meta, enable_model_cpu_offload on the CPU, until each call:
    masks come out as without offload, and accelerate's hooks stay as they were."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    pipe = tiny_models.sd1_pipe()
    image = images(1)
    methods = [dict(refine=True), dict(method="noise-diff")]
    plain = [TextMasker.from_pipe(pipe, resolution=64).mask(image, "cat | dog", **kw).heatmaps for kw in methods]
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # what diffusers' enable_*_cpu_offload call
        if offload == "sequential":
            cpu_offload(module, execution_device=torch.device("cpu"))
        else:
            cpu_offload_with_hook(module, execution_device=torch.device("cpu"))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)

    def forward():
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=ctx).sample

    before, hooks = forward(), state_snapshot(pipe.unet)["hooks"]  # the weights themselves may sit on meta
    masker = TextMasker.from_pipe(pipe, resolution=64)
    for kw, expected in zip(methods, plain):
        assert torch.equal(masker.mask(image, "cat | dog", **kw).heatmaps, expected)
    assert state_snapshot(pipe.unet)["hooks"] == hooks and torch.equal(forward(), before)


def test_sdxl_vae_loads_in_float32_beside_a_float16_unet(tmp_path, sdxl_pipe, sd1_pipe):
    """SDXL's VAE overflows in float16; its config's force_upcast keeps the VAE this host loads in float32."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(sdxl_pipe, name).save_pretrained(tmp_path / "xl" / name)
        if name != "text_encoder_2":
            getattr(sd1_pipe, name).save_pretrained(tmp_path / "sd1" / name)
    xl = TextMasker.from_pretrained(tmp_path / "xl", dtype=torch.float16, resolution=64)
    assert (xl.host.dtype, xl.host.vae.dtype, xl.host.text_encoder_2.dtype) == (torch.float16, torch.float32, torch.float16)
    assert xl.host.encode_images(torch.rand(1, 3, 64, 64)).dtype == torch.float16  # latents leave in the UNet's dtype
    assert TextMasker.from_pretrained(tmp_path / "sd1", dtype=torch.float16).host.vae.dtype == torch.float16
    out = xl.mask(images(1), "cat")
    assert out.masks.shape == (1, 37, 53) and torch.isfinite(out.heatmaps).all()
