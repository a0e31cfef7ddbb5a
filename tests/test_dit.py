"""SD3 and Flux (flow-matching MM-DiTs) through the diffusers host, on tiny random-config pipelines built offline
(CLIP from small configs, T5 from a small config with the T5 tokenizer that ships with textmask)."""

import pytest
import torch

from textmask import TextMasker, forward
from textmask.errors import CaptureError
from textmask.hosts.diffusers_dit import DiffusersDiTHost
from textmask.methods.refdiff import refer as refdiff_refer
from textmask.tokenizer import clip_tokenizer, t5_tokenizer, tokenize


from textmask.hosts.diffusers_dit import clip_pipeline_tokenizer as pipeline_clip_tokenizer  # noqa: E402


def clip(hidden=32, projection=True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=hidden, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5(d_model):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2)).eval()


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=4,
                         layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609).eval()


@pytest.fixture(scope="module")
def sd3_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                                        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae(), text_encoder=clip(), tokenizer=pipeline_clip_tokenizer(), text_encoder_2=clip(),
                                    tokenizer_2=pipeline_clip_tokenizer(), text_encoder_3=t5(64), tokenizer_3=t5_tokenizer())


@pytest.fixture(scope="module")
def flux_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=clip(projection=False),
                        tokenizer=pipeline_clip_tokenizer(), text_encoder_2=t5(32), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)


@pytest.fixture(params=["sd3", "flux"])
def pipe(request, sd3_pipe, flux_pipe):
    return sd3_pipe if request.param == "sd3" else flux_pipe


def transformer_output(pipe):
    host = DiffusersDiTHost(pipe, resolution=64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        return host.denoise(x, torch.tensor([1.5]), host.encode_prompts(["a cat"]), x)


def test_masks_match_odd_sizes_and_batches_and_leave_the_model_untouched(pipe):
    masker = TextMasker.from_pipe(pipe, resolution=64)
    assert isinstance(masker.host, DiffusersDiTHost) and masker.host.geometry.size_multiple == 16
    before = transformer_output(pipe)
    images = torch.rand(3, 37, 53, 3, generator=torch.Generator().manual_seed(0))
    for method, kw in (("attention", {}), ("attention", {"refine": False}), ("noise-diff", {})):
        result = masker.mask(images, "red car | truck", method=method, **kw)
        assert result.masks.shape == (3, 37, 53) and result.heatmaps.shape == (3, 37, 53)
        assert torch.isfinite(result.heatmaps).all()
    one = masker.mask(images[:1], "red car")
    assert one.masks.shape == (1, 37, 53)
    for segmenter in ("diffcut", "diffseg"):  # both on the joint attention's image-to-image part
        segments = masker.segments(images[:2], segmenter=segmenter)
        assert segments.labels.shape == (2, 37, 53) and all(m.shape[-2:] == (37, 53) for m in segments.masks)
    named = masker.named_segments(images[:2], ["car", "tree"])
    assert named.masks.shape == (2, 2, 37, 53) and named.labels.shape == (2, 37, 53)
    for expression in ("the car on the left", "black horse jumping"):  # a relation; the best instance
        referred = masker.refer(images[:2], expression)
        assert referred.masks.shape == (2, 37, 53) and torch.isfinite(referred.heatmaps).all()
    referred = refdiff_refer(masker.host, images[:2], "black horse jumping")  # Ref-Diff's scores (logits)
    assert referred.masks.shape == (2, 37, 53) and torch.isfinite(referred.heatmaps).all()
    assert torch.equal(before, transformer_output(pipe))  # read-only, and no hook left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pipe.transformer.modules())


def test_the_transformer_sees_the_flow_matching_point(pipe):
    """x = z + σ·ε reaches the transformer as x_s = (1 − s)·z + s·ε at s = σ / (1 + σ) (flow matching's forward
    process, as FlowMatchEulerDiscreteScheduler.scale_noise writes it), and textmask's t is read at SD's σ."""
    host = DiffusersDiTHost(pipe, resolution=64)
    from textmask.schedule import DDPMDenoiser, ddpm_alphas_cumprod

    assert torch.equal(host.sigma(300), DDPMDenoiser(ddpm_alphas_cumprod()).sigma(300))
    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    x, sigma = forward.add_noise(host, z, 300, seed=5)
    eps = (x - z) / sigma.view(-1, 1, 1, 1)
    s = float(sigma[0] / (1 + sigma[0]))
    seen = {}
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            host.denoise(x, sigma, host.encode_prompts(["a cat", "a dog"]), z)
    finally:
        handle.remove()
    expected = (1 - s) * z + s * eps

    def unpacked(got):
        if host.is_flux:  # packed 2x2 patches
            return got.view(got.shape[0], 2, 3, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, 16, 4, 6)
        return got

    if host.is_flux:
        assert torch.allclose(seen["timestep"], torch.full((2,), s), atol=1e-6)
        assert torch.equal(seen["guidance"], torch.full((2,), 3.5))
    else:
        assert torch.allclose(seen["timestep"], torch.full((2,), 1000 * s), atol=1e-3)
    torch.testing.assert_close(unpacked(seen["hidden_states"]), expected, atol=1e-5, rtol=1e-5)
    # DiffSeg's forward: the clean latent itself under t's embedding.
    x, sigma = forward.without_noise(host, z, 300)
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            host.denoise(x, sigma, host.encode_prompts(["", ""]), z)
    finally:
        handle.remove()
    torch.testing.assert_close(unpacked(seen["hidden_states"]), z, atol=1e-5, rtol=1e-5)


def test_t5_positions_past_clips_window(sd3_pipe, flux_pipe):
    words = " ".join(f"word{i}" for i in range(60))  # far more than CLIP's 75 tokens
    text = f"{words} a lighthouse"
    t5 = tokenize(t5_tokenizer(), text)
    start = text.index("lighthouse")
    expected = [j for j, (a, b) in enumerate(t5.spans) if a < start + len("lighthouse") and b > start]
    assert expected and expected[0] > 77
    sd3 = DiffusersDiTHost(sd3_pipe)._token_map(text)
    assert sd3.find("lighthouse") == [77 + j for j in expected]  # only T5 reaches it; SD3's T5 starts at 77
    assert DiffusersDiTHost(flux_pipe)._token_map(text).find("lighthouse") == expected  # Flux: T5 alone
    both = DiffusersDiTHost(sd3_pipe)._token_map("a lighthouse").find("lighthouse")
    clip_ids = tokenize(clip_tokenizer(), "a lighthouse").ids
    assert both[: len(clip_ids) - 1] == list(range(2, len(clip_ids) + 1))  # CLIP after BOS, then T5
    assert all(p >= 77 for p in both[len(clip_ids) - 1 :])


def test_phrases_share_one_listing_prompt(pipe):
    """An MM-DiT runs its text through every block, so its phrases are not joined: one "the A, and the B" prompt."""
    from textmask.methods.attention import phrase_conditioning

    host = TextMasker.from_pipe(pipe, resolution=64).host
    assert not host.reads_text_as_keys()
    cond, groups = phrase_conditioning(host, ["red car", "sky"])
    assert torch.equal(cond.context, host.encode_prompts(["the red car, and the sky"]).context)
    assert groups == [cond.token_maps[0].find("red car"), cond.token_maps[0].find("sky")]


def test_presence_is_measured_on_the_joint_attention(pipe):
    # The MM-DiT's token grid is one grid, so presence is its layers' mean; the gate works as on a UNet.
    masker = TextMasker.from_pipe(pipe, resolution=64)
    images = torch.rand(2, 40, 36, 3)
    out = masker.mask(images, "red car | sky")
    assert list(out.presence) == ["red car", "sky"]
    for score in out.presence.values():
        assert score.shape == (2,) and torch.isfinite(score).all() and ((score > 0) & (score < 1)).all()
    none = masker.mask(images, "red car | sky", min_presence=1.0)
    assert none.masks.shape == (2, 40, 36) and not none.masks.any()


def test_unet_only_paths_refuse_in_one_line(sd3_pipe):
    masker = TextMasker.from_pipe(sd3_pipe, resolution=64)
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(CaptureError, match="LD-ZNet's weights are for SD1") as e:
        masker.host.transformer_modules()
    assert "\n" not in str(e.value)
    with pytest.raises(CaptureError, match="MM-DiT"):
        masker.trace(image)  # before its forward, not at the mask after it


def test_image_conditioned_flux_is_refused_in_one_line(flux_pipe):
    """Flux Fill's transformer takes the image and mask channels too (384, not 64): refused before any forward."""
    import copy

    from textmask.errors import CheckpointError

    fill = copy.copy(flux_pipe)
    fill.transformer = type(flux_pipe.transformer).from_config({**flux_pipe.transformer.config, "in_channels": 384})
    with pytest.raises(CheckpointError, match="takes 384 input channels, not the VAE's 64") as e:
        TextMasker.from_pipe(fill)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["sd3", "sd3-without-t5", "flux"])
def test_folders_load_offline(kind, sd3_pipe, flux_pipe, tmp_path):
    """A saved pipeline folder, with its tokenizer folders removed (textmask ships them), loads through
    TextMasker.from_pretrained; SD3 without text_encoder_3/ runs without T5 (its positions are then CLIP's only)."""
    import shutil

    pipe = flux_pipe if kind == "flux" else sd3_pipe
    pipe.save_pretrained(tmp_path)
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3") + (("text_encoder_3",) if kind == "sd3-without-t5" else ()):
        shutil.rmtree(tmp_path / folder, ignore_errors=True)
    masker = TextMasker.from_pretrained(tmp_path, resolution=64)
    assert isinstance(masker.host, DiffusersDiTHost)
    assert masker.mask(torch.rand(1, 37, 53, 3), "car").masks.shape == (1, 37, 53)
    positions = masker.host._token_map("a car").find("car")
    if kind == "flux":  # T5 alone, from position 0
        spans = tokenize(t5_tokenizer(), "a car").spans
        assert positions == [j for j, (a, b) in enumerate(spans) if a < 5 and b > 2]
    else:  # SD3: CLIP's positions, and T5's from 77 only where T5 is there
        assert min(positions) < 77 and (max(positions) >= 77) == (kind == "sd3")
    loaded, saved = masker.host.transformer.state_dict(), pipe.transformer.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_ovdiff_samples_support_images_with_the_flow_model(pipe, tmp_path, monkeypatch):
    """OVDiff's prototypes from support images sampled through the flow-matching denoiser, its attribution picked
    by the class prompt's rows, then a label map at every image's size."""
    from textmask.ovdiff import support

    monkeypatch.setenv("TEXTMASK_CACHE", str(tmp_path))
    read = []
    real_call = support.AttributionSum.__call__
    monkeypatch.setattr(support.AttributionSum, "__call__",
                        lambda self, layer, start, probs: read.append(probs.shape[0]) or real_call(self, layer, start, probs))
    masker = TextMasker.from_pipe(pipe, resolution=64)
    prototypes = masker.build_prototypes(["cat", "grass"], images=2, steps=2, cfg=2.0)
    assert read and set(read) == {2}  # the class prompt's rows of every sampler forward, never the negative's
    result = masker.ovdiff(torch.rand(2, 37, 53, 3), prototypes)
    assert result.masks.shape == (2, 2, 37, 53) and result.labels.shape == (2, 37, 53)


def test_sampling_uses_the_pipelines_flow_scheduler(pipe, monkeypatch):
    """``sample`` steps a copy of the pipeline's FlowMatchEulerDiscreteScheduler (the pipeline's own is untouched);
    image i starts from noise seeded seed + i, so an image does not depend on the batch it is sampled in."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    host = DiffusersDiTHost(pipe, resolution=64)
    steps = []
    real = FlowMatchEulerDiscreteScheduler.step
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    before = pipe.scheduler.timesteps
    with torch.no_grad():
        two = host.sample("a cat", "", 2, steps=3, cfg=2.0, seed=5)
        one = host.sample("a cat", "", 1, steps=3, cfg=2.0, seed=6)
    assert two.shape == (2, 16, 8, 8) and torch.isfinite(two).all() and len(steps) == 6
    torch.testing.assert_close(two[1:], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(two[0], two[1])
    assert pipe.scheduler.timesteps is before


@pytest.mark.parametrize("offload", [[], ["--offload", "model"], ["--offload"]])
def test_cli_masks_with_an_sd3_folder(sd3_pipe, tmp_path, offload):
    """``textmask mask --checkpoint DIR`` on an SD3 folder, resident and under both offloads."""
    import numpy as np
    from PIL import Image

    from textmask.cli import main

    folder = tmp_path / "sd3"
    sd3_pipe.save_pretrained(folder)
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((37, 53, 3)) * 255).astype("uint8")).save(image)
    out = tmp_path / "mask.png"
    assert main(["mask", str(image), "red car", "--out", str(out), "--checkpoint", str(folder), "--resolution", "64",
                 *offload]) == 0
    assert Image.open(out).size == (53, 37)


def test_a_long_image_fits_sd3s_position_table_and_a_larger_sample_is_one_line(sd3_pipe, tmp_path):
    """SD3's positions end at pos_embed_max_size patches (here 32: 512 px): a long image is worked on smaller, its
    mask still at its own size, and support images past the table are refused before any sampling."""
    from textmask.errors import TextMaskError

    masker = TextMasker.from_pipe(sd3_pipe)
    assert masker.host.geometry.max_side == 32 * 2 * 8
    wide = forward.prepare_images(masker.host, torch.rand(1, 8, 700, 3))
    assert max(wide.working) <= 512
    assert masker.mask(torch.rand(1, 8, 700, 3), "car").masks.shape == (1, 8, 700)
    with pytest.raises(TextMaskError, match="past what this model's positions cover") as e:
        masker.build_prototypes(["cat"], images=1, steps=1, resolution=1024, cache_dir=tmp_path)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_host_keywords_are_checked_not_dropped(kind, sd3_pipe, flux_pipe):
    """A loader keyword is used or refused: a typo, or a resolution the faces would refuse, is one line (it gave
    all-zero masks), and max_sequence_length reaches the host."""
    from textmask.errors import TextMaskError

    pipe = sd3_pipe if kind == "sd3" else flux_pipe
    with pytest.raises(TextMaskError, match="unknown option resolutoin for this model; it takes resolution"):
        TextMasker.from_pipe(pipe, resolutoin=64)
    for bad in (7, -64, 100000):
        with pytest.raises(TextMaskError, match="resolution must be in"):
            TextMasker.from_pipe(pipe, resolution=bad)
    assert TextMasker.from_pipe(pipe, max_sequence_length=8).host.max_sequence_length == 8


def test_latents_that_do_not_split_into_patches_are_one_line(pipe):
    from textmask.errors import TextMaskError

    masker = TextMasker.from_pipe(pipe, resolution=64)
    with pytest.raises(TextMaskError, match="do not split into this model's 2x2 patches") as e:
        masker.mask(torch.rand(1, 72, 72, 3), "car", latents=torch.randn(1, 16, 9, 9))
    assert "\n" not in str(e.value)


def test_pipelines_missing_parts_or_mixing_models_are_one_line(sd3_pipe, flux_pipe, tmp_path):
    """A text encoder or tokenizer missing, or parts of different models, are refused when the pipeline is taken;
    a pipeline without a scheduler masks, and says it cannot sample OVDiff's support images."""
    import copy

    from textmask.errors import CheckpointError

    def variant(pipe, **parts):
        other = copy.copy(pipe)
        for name, module in parts.items():
            setattr(other, name, module)
        return other

    cases = [(variant(sd3_pipe, text_encoder=None), "no text_encoder"),
             (variant(flux_pipe, tokenizer_2=None), "no tokenizer_2"),
             (variant(sd3_pipe, text_encoder_3=t5(32)), "T5 width of 32, the transformer reads 64"),
             (variant(flux_pipe, text_encoder=clip(hidden=16, projection=False)), "pooled text width of 16"),
             (variant(sd3_pipe, vae=variant_vae(4)), "the VAE's latents \\(4 channels\\)")]
    for pipe, message in cases:
        with pytest.raises(CheckpointError, match=message) as e:
            TextMasker.from_pipe(pipe, resolution=64)
        assert "\n" not in str(e.value)
    masker = TextMasker.from_pipe(variant(flux_pipe, scheduler=None), resolution=64)
    assert masker.mask(torch.rand(1, 32, 32, 3), "car").masks.shape == (1, 32, 32)
    with pytest.raises(CheckpointError, match="no scheduler; OVDiff samples"):
        masker.build_prototypes(["cat"], images=1, steps=1, cache_dir=tmp_path)


def variant_vae(channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=channels, norm_num_groups=4,
                         layers_per_block=1).eval()


def test_prototypes_of_another_model_are_one_line(sd3_pipe, flux_pipe, tmp_path):
    """Prototypes hold one model's features: another model's of another width are refused in one line."""
    from textmask.errors import TextMaskError

    flux = TextMasker.from_pipe(flux_pipe, resolution=64)
    protos = flux.build_prototypes(["cat"], images=1, steps=1, cache_dir=tmp_path)
    sd3 = TextMasker.from_pipe(sd3_pipe, resolution=64)
    with pytest.raises(TextMaskError, match="built with another model") as e:
        sd3.ovdiff(torch.rand(1, 32, 32, 3), protos)
    assert "\n" not in str(e.value)


def test_a_phrase_past_the_encoders_window_is_named_as_such(sd3_pipe):
    """A phrase the prompt holds but the text encoders cut off is not reported as missing from the prompt."""
    from textmask.errors import PhraseNotFoundError

    masker = TextMasker.from_pipe(sd3_pipe, resolution=64, max_sequence_length=8)
    prompt = " ".join(f"word{i}" for i in range(120)) + " lighthouse"
    with pytest.raises(PhraseNotFoundError, match="comes after the tokens the model's text encoders read"):
        masker.mask(torch.rand(1, 32, 32, 3), "lighthouse", prompt=prompt)


def test_the_pipelines_scheduler_shift_is_part_of_the_prototype_cache_key(sd3_pipe):
    """OVDiff samples with the pipeline's flow scheduler, so its shift keys the prototype cache."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    from textmask.ovdiff.prototypes import fingerprint

    other = copy.copy(sd3_pipe)
    other.scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
    with torch.inference_mode():
        plain = fingerprint(TextMasker.from_pipe(sd3_pipe, resolution=64).host)
        assert fingerprint(TextMasker.from_pipe(sd3_pipe, resolution=64).host) == plain
        assert fingerprint(TextMasker.from_pipe(other, resolution=64).host) != plain


def test_latents_past_sd3s_position_table_are_one_line(sd3_pipe):
    from textmask.errors import TextMaskError

    masker = TextMasker.from_pipe(sd3_pipe, resolution=64)
    with pytest.raises(TextMaskError, match="past what this model's positions cover \\(512\\)") as e:
        masker.mask(torch.rand(1, 64, 528, 3), "car", latents=torch.randn(1, 16, 8, 66))
    assert "\n" not in str(e.value)
