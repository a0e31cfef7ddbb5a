"""Forge (stable-diffusion-webui-forge since its 2024-08 backend) against its own model classes, from $FORGE_ROOT.

Forge is not on PyPI, so the tests that run its code skip without a checkout; the dispatch test always runs.
"""

import dataclasses
import sys
import types

import pytest
import torch

import forge_env
from conftest import noised, predict_eps
from textmask import TextMasker
from textmask.errors import TextMaskError
from textmask.hosts.select import webui_host as make_host
from textmask.hosts.forge import ForgeHost


def test_forge_backend_models_get_the_forge_host():
    """A KModel (it has a predictor) inside forge_objects means Forge's own backend, not its ComfyUI-era one."""
    unet = types.SimpleNamespace(channel_mult=(1, 2), in_channels=4)
    kmodel = types.SimpleNamespace(diffusion_model=unet, predictor=types.SimpleNamespace(prediction_type="v_prediction"),
                                   computation_dtype=torch.float16)
    objects = types.SimpleNamespace(unet=types.SimpleNamespace(model=kmodel, load_device=torch.device("cpu")))
    host = make_host(types.SimpleNamespace(forge_objects=objects, is_sdxl=False))
    assert isinstance(host, ForgeHost)
    assert host.dtype == torch.float16 and host.geometry.resolution == 768 and host.geometry.size_multiple == 16


needs_forge = pytest.mark.skipif(forge_env.forge_root() is None, reason="no Forge: set FORGE_ROOT to a checkout")


@pytest.fixture(scope="module")
def engine():
    forge_env.setup()
    return forge_env.make_engine("sd15")


def small_host(engine) -> ForgeHost:
    host = make_host(engine)
    host.geometry = dataclasses.replace(host.geometry, resolution=64)  # the tiny UNet
    return host


def unet_output(engine):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return engine.forge_objects.unet.model.diffusion_model(x, torch.tensor([300.0]), context=ctx)


def hook_counts(engine):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in engine.forge_objects.unet.model.modules()]


@needs_forge
def test_masks_for_a_batch_at_the_image_size(engine):
    host = small_host(engine)
    assert isinstance(host, ForgeHost)
    before, hooks = unet_output(engine), hook_counts(engine)
    for method in ("attention", "noise-diff"):
        out = TextMasker(host).mask(torch.rand(2, 37, 53, 3), "red car | truck", method=method, refine=True)
        assert out.masks.shape == (2, 37, 53) and out.heatmaps.shape == (2, 37, 53)
        assert 0 < float(out.heatmaps.std())
    assert hook_counts(engine) == hooks
    assert torch.equal(before, unet_output(engine))  # the model is unchanged


@needs_forge
def test_epsilon_is_the_unets_own(engine):
    """ε from the host equals the raw UNet's output on the k-diffusion input Forge's KModel feeds it."""
    host = small_host(engine)
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car"])
        z0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        x = noised(host, z0, noise, 400)
        eps = predict_eps(host, x, 400, cond, z0)
        predictor = engine.forge_objects.unet.model.predictor
        sigma = predictor.sigma(torch.tensor([400.0]))
        torch.testing.assert_close(x, z0 + sigma * noise)
        raw = engine.forge_objects.unet.model.diffusion_model(
            x / (sigma**2 + 1) ** 0.5, predictor.timestep(sigma).float(), context=cond.context)
    torch.testing.assert_close(eps, raw, atol=1e-5, rtol=1e-5)


@needs_forge
def test_zero_terminal_snr_noises_as_forge_samples(engine, monkeypatch):
    """Forge swaps in the zero-terminal-SNR σ table only while it samples: the host noises at that table's σ."""
    import sys

    from backend.modules.k_prediction import rescale_zero_terminal_snr_sigmas

    predictor = engine.forge_objects.unet.model.predictor
    table = predictor.sigmas.clone()
    z0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = noised(small_host(engine), z0, noise, 400)
    monkeypatch.setattr(sys.modules["modules.shared"].opts, "sd_noise_schedule", "Zero Terminal SNR", raising=False)
    sigma = rescale_zero_terminal_snr_sigmas(table.clone())[400]
    torch.testing.assert_close(noised(small_host(engine), z0, noise, 400), z0 + sigma * noise)
    assert not torch.allclose(plain, z0 + sigma * noise) and torch.equal(predictor.sigmas, table)
    monkeypatch.setattr(sys.modules["modules.shared"].opts, "sd_noise_schedule", "Default")
    monkeypatch.setattr(engine.model_config, "ztsnr", True, raising=False)  # a ztsnr checkpoint, whatever the setting
    torch.testing.assert_close(noised(small_host(engine), z0, noise, 400), z0 + sigma * noise)


@needs_forge
def test_token_positions_follow_forges_chunking(engine):
    """Forge's emphasis syntax and 75-token chunks put the words where its text engine puts them."""
    host = small_host(engine)
    text = "(a red car:1.2), " + " ".join(["hills"] * 80) + " and a tiny zebra"
    chunks, _ = engine.text_processing_engine.tokenize_line(text)
    flat = [t for chunk in chunks for t in chunk.tokens]
    tm = host._token_map(text)
    assert tm.context_length == len(flat) == 154
    tok = engine.text_processing_engine.tokenizer
    assert tok.convert_ids_to_tokens([flat[p] for p in tm.find("tiny zebra")]) == ["tiny</w>", "zebra</w>"]
    assert tok.convert_ids_to_tokens([flat[p] for p in tm.find("red car")]) == ["red</w>", "car</w>"]
    assert all(p >= 77 for p in tm.find("zebra"))


@needs_forge
def test_interrupt_leaves_the_model_as_it_was(engine):
    import modules.shared

    host = small_host(engine)
    before, hooks = unet_output(engine), hook_counts(engine)
    modules.shared.state.interrupted = True
    try:
        with pytest.raises(BaseException):
            TextMasker(host).mask(torch.rand(3, 32, 32, 3), "car", refine=True)
    finally:
        modules.shared.state.interrupted = False
    assert hook_counts(engine) == hooks
    assert torch.equal(before, unet_output(engine))


@needs_forge
def test_sdxl_and_inpainting_engines():
    """SDXL's pooled vector reaches the UNet as ``y``; a 9-channel UNet gets (empty mask, image latents) concatenated."""
    forge_env.setup()
    for kind, channels in (("sdxl", 4), ("sd15", 9), ("sdxl", 9)):
        engine = forge_env.make_engine(kind, in_channels=channels)
        host = small_host(engine)
        assert host.is_sdxl == (kind == "sdxl") and host.geometry.in_channels == channels
        before = hook_counts(engine)
        out = TextMasker(host).mask(torch.rand(1, 40, 56, 3), "red car", refine=True)
        assert out.masks.shape == (1, 40, 56) and float(out.heatmaps.std()) > 0
        assert hook_counts(engine) == before


@needs_forge
def test_continuous_edm_predictor_noises_at_sds_noise_level():
    """A continuous EDM predictor (an object patch here) takes log-σ timesteps: 300 would be σ = e^1200 and empty
    masks. The host noises at the σ with SD's signal-to-noise ratio at that timestep, in units of σ_data."""
    forge_env.setup()
    from backend.modules.k_prediction import PredictionContinuousEDM

    engine = forge_env.make_engine("sd15")
    sd_sigma = float(engine.forge_objects.unet.model.predictor.sigma(torch.tensor([300.0])))
    edm = PredictionContinuousEDM(sigma_data=0.5, prediction_type="v_prediction", sigma_min=0.002, sigma_max=120.0)
    engine.forge_objects.unet.add_object_patch("predictor", edm)
    host = small_host(engine)
    with torch.inference_mode():
        z0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(noised(host, z0, noise, 300), z0 + 0.5 * sd_sigma * noise)
        out = TextMasker(host).mask(torch.rand(1, 40, 56, 3), "red car", method="noise-diff")
    assert torch.isfinite(out.heatmaps).all() and 0 < float(out.masks.mean()) < 1


@needs_forge
def test_default_sampler_is_forges_own_dpmpp_2m(engine, monkeypatch):
    """OVDiff's support images in the webuis come from ``textmask.sampling``: the same steps as the webui's own
    k-diffusion ``sample_dpmpp_2m`` on the same denoiser and σ."""
    pytest.importorskip("torchsde")
    pytest.importorskip("torchdiffeq")
    try:
        import torchvision  # noqa: F401  (k_diffusion.utils imports it; the sampler never uses it)
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        for name, module in [("torchvision", stub), ("torchvision.transforms", stub.transforms),
                             ("torchvision.transforms.functional", stub.transforms.functional)]:
            monkeypatch.setitem(sys.modules, name, module)
    k_sampling = pytest.importorskip("k_diffusion.sampling")  # Forge's copy of k-diffusion
    from textmask import forward, sampling

    host = small_host(engine)
    sigmas = sampling.timestep_sigmas(host, 6)
    cond = forward.encode_prompts(host, ["a cat"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def denoise(x, sigma):
        return host.denoise(x, sigma, cond, None).float()

    ours = sampling.dpmpp_2m(denoise, x, sigmas)
    theirs = k_sampling.sample_dpmpp_2m(denoise, x, sigmas, disable=True)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


# ---- Forge's Flux (backend.nn.flux): flow matching, joint attention, T5 -------------------------------------------
@pytest.fixture(scope="module")
def flux_engine():
    forge_env.setup()
    return forge_env.make_flux_engine()


def small_flux_host(engine):
    from textmask.hosts.forge import ForgeFluxHost

    host = make_host(engine)
    assert isinstance(host, ForgeFluxHost)
    host.geometry = dataclasses.replace(host.geometry, resolution=64)  # the tiny transformer
    return host


def flux_output(engine):
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(1, 4, 8, 12, generator=g), torch.randn(1, 256, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return engine.forge_objects.unet.model.diffusion_model(x, torch.tensor([0.4]), context=ctx, y=y,
                                                               guidance=torch.tensor([3.5]))


@needs_forge
def test_flux_masks_at_the_image_size_and_the_model_is_unchanged(flux_engine):
    host = small_flux_host(flux_engine)
    assert host.geometry.latent_factor == 8 and host.geometry.size_multiple == 16 and host.geometry.in_channels == 4
    before, hooks = flux_output(flux_engine), hook_counts(flux_engine)
    images = torch.rand(2, 37, 53, 3)
    for method in ("attention", "noise-diff"):
        out = TextMasker(host).mask(images, "red car | truck", method=method, refine=True)
        assert out.masks.shape == (2, 37, 53) and out.heatmaps.shape == (2, 37, 53) and float(out.heatmaps.std()) > 0
    segments = TextMasker(host).segments(images)  # DiffSeg on the joint attention's image part
    assert segments.labels.shape == (2, 37, 53)
    referred = TextMasker(host).refer(images, "the car on the left")
    assert referred.masks.shape == (2, 37, 53)
    assert hook_counts(flux_engine) == hooks
    assert torch.equal(before, flux_output(flux_engine))


@needs_forge
def test_flux_capture_equals_forges_own_attention(flux_engine, monkeypatch):
    """The captured probabilities are the softmax Forge's attention computes (after its rotary embedding, text
    first), image-query rows, within 1e-5; the text part shares each row's normaliser with the image part."""
    import backend.nn.flux as forge_flux

    from textmask.capture import ProbsStore

    host = small_flux_host(flux_engine)
    seen, real = [], forge_flux.attention_function

    def attention(q, k, v, heads, *args, **kwargs):
        seen.append(((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
        return real(q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(forge_flux, "attention_function", attention)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car", "a truck"])
        text = cond.context.shape[1]
        cross, selfs = ProbsStore(("cross",)), ProbsStore(("self",))
        with host.attention_capture((8, 12), [cross, selfs]) as cap:
            host.denoise(x, torch.tensor([0.8, 1.5]), cond, None)
    names = [l.name for l in cap.layers if l.kind == "cross"]
    assert names == ["double_blocks.0", "single_blocks.0"] and len(seen) == 2
    for name, probs in zip(names, seen):
        rows = probs[:, :, text:]
        txt, img = rows[..., :text].mean(1), rows[..., text:].mean(1)
        torch.testing.assert_close(cross.probs[name], txt, atol=1e-5, rtol=0)
        torch.testing.assert_close(selfs.probs[name + ".self"], img / img.sum(-1, keepdim=True), atol=1e-5, rtol=0)
        assert bool((cross.probs[name].sum(-1) < 1).all())


@needs_forge
def test_flux_denoise_is_the_flow_models_x0(flux_engine):
    """x = z + σ·ε reaches the transformer as x_s = (1 − s)·z + s·ε at s = σ / (1 + σ), with Forge's default
    distilled guidance, and comes back as x₀ = x_s − s·v."""
    host = small_flux_host(flux_engine)
    g = torch.Generator().manual_seed(2)
    z, eps, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([1.5])
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car"])
        x0 = host.denoise(z + sigma * eps, sigma, cond, None)
        s = 1.5 / 2.5
        x_s = (1 - s) * z + s * eps
        v = flux_engine.forge_objects.unet.model.diffusion_model(x_s, torch.tensor([s]), context=cond.context,
                                                                 y=cond.pooled, guidance=torch.tensor([3.5])).float()
    torch.testing.assert_close(x0, x_s - s * v, atol=1e-5, rtol=1e-5)


@needs_forge
def test_flux_token_positions_follow_forges_t5_engine(flux_engine):
    host = small_flux_host(flux_engine)
    text = "(a red car:1.2) beside a tiny zebra"
    tokens = host._t5_tokens(text)
    tm = host._token_map(tokens)
    assert tm.context_length == len(tokens) == 256  # Forge pads T5 to 256
    pieces = flux_engine.text_processing_engine_t5.tokenizer.convert_ids_to_tokens
    assert "".join(pieces([tokens[p] for p in tm.find("red car")])).replace("▁", " ").strip() == "red car"
    assert "".join(pieces([tokens[p] for p in tm.find("tiny zebra")])).replace("▁", " ").strip() == "tiny zebra"
    with pytest.raises(TextMaskError, match="BREAK"):
        host._t5_tokens("red car BREAK truck")


@needs_forge
def test_flux_failures_and_interrupts_leave_no_hooks(flux_engine):
    import modules.shared

    host = small_flux_host(flux_engine)
    before, hooks = flux_output(flux_engine), hook_counts(flux_engine)
    modules.shared.state.interrupted = True
    try:
        with pytest.raises(BaseException):
            TextMasker(host).mask(torch.rand(1, 32, 32, 3), "car", refine=True)
    finally:
        modules.shared.state.interrupted = False
    block = flux_engine.forge_objects.unet.model.diffusion_model.single_blocks[0]

    def fail(*_):
        raise RuntimeError("out of memory")

    handle = block.linear2.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError):
            TextMasker(host).mask(torch.rand(1, 32, 32, 3), "car", refine=True)
    finally:
        handle.remove()
    assert hook_counts(flux_engine) == hooks
    assert torch.equal(before, flux_output(flux_engine))
    for method in ("traces", "ld-znet"):
        with pytest.raises(TextMaskError, match="MM-DiT"):
            (host.attention_modules if method == "traces" else host.transformer_modules)()


@needs_forge
def test_flux_samples_with_its_guidance_and_schnell_with_cfg(flux_engine):
    """OVDiff's support images: Flux.1-dev samples one pass per step at its distilled guidance, schnell-like
    models under classifier-free guidance (two rows per step)."""
    forge_env.setup()
    schnell = forge_env.make_flux_engine(distilled=False)
    for engine, rows in ((flux_engine, 1), (schnell, 2)):
        host = small_flux_host(engine)
        seen = []
        real = host.denoise
        host.denoise = lambda x, *a: seen.append(x.shape[0]) or real(x, *a)
        with torch.inference_mode():
            latents = host.sample("a red car", "", 2, steps=3, cfg=4.0, seed=0)
        assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
        assert seen == [2 * rows] * 3
        out = TextMasker(small_flux_host(engine)).mask(torch.rand(1, 40, 56, 3), "red car", refine=True)
        assert out.masks.shape == (1, 40, 56)
