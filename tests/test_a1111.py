"""The A1111 / Forge extension against the webui's own model classes (Stability's ldm UNetModel, from
stable-diffusion-sdkit) and the smallest stand-in of the ``modules`` API it touches (tests/webui_standin:
``scripts.Script``, ``processing.process_images``, ``shared.sd_model`` and ``shared.opts``, the zero-SNR rescale in
``sd_models``, ``launch.run_pip``), whose signatures mirror the webui's source (modules/scripts.py,
modules/processing.py, modules/shared.py, modules/sd_models.py, launch.py)."""

import importlib.util
import re
import tempfile
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ldm")
pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "webui_standin"

import forge_env  # noqa: E402
from conftest import predict_eps_ddpm  # noqa: E402
import webui_model  # noqa: E402

from textmask import TextMasker  # noqa: E402
from textmask.capture import AttentionCapture, ProbsStore  # noqa: E402
from textmask import postprocess as pp  # noqa: E402
from textmask.errors import CaptureError, TextMaskError  # noqa: E402
from textmask.hosts.a1111 import A1111Host
from textmask.hosts.select import webui_host as make_host  # noqa: E402


@pytest.fixture(scope="module")
def webui():
    """Import scripts/text_mask.py the way the webui does: by path, with ``modules`` importable."""
    # Forge's tests (with $FORGE_ROOT) import Forge's own ``modules`` and ``launch``: set them aside while the
    # stand-in is in use
    def webui_module(k: str) -> bool:
        return k in ("modules", "launch") or k.startswith("modules.")

    others = {k: sys.modules.pop(k) for k in list(sys.modules) if webui_module(k)}
    sys.path.insert(0, str(STANDIN))
    try:
        spec = importlib.util.spec_from_file_location("text_mask_script", ROOT / "scripts" / "text_mask.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import modules.processing
        import modules.shared

        yield module, modules.shared, modules.processing
    finally:
        sys.path.remove(str(STANDIN))
        if others:
            for k in [k for k in sys.modules if webui_module(k)]:
                del sys.modules[k]
            sys.modules.update(others)


def small_host(model) -> A1111Host:
    host = A1111Host(model)
    host.geometry = dataclasses.replace(host.geometry, resolution=64)  # the tests' tiny UNets
    return host


def unet_output(model):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, webui_model.CTX, generator=g)
    with torch.no_grad():
        return model.model.diffusion_model(x, torch.tensor([300]), context=ctx)


def hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_host_masks_on_webui_models(kind):
    model = webui_model.sd_model(kind)
    host = small_host(model)
    assert host.v_prediction == (kind == "sd2") and host.is_sdxl == (kind == "sdxl")
    res = TextMasker(host).mask(torch.rand(2, 37, 53, 3), "red car | truck", refine=True)
    assert res.masks.shape == (2, 37, 53)
    if kind == "sdxl":
        assert model.vectors_seen and model.vectors_seen[0][0] == 2  # the pooled vector rode along per row
    # The finest self-attention grid the host reads from the UNet's structure is the one a forward runs.
    store = ProbsStore(kinds=("self",))
    with AttentionCapture(host.attention_modules(), (8, 8), [store]):
        unet_output(model)
    assert host.self_attention_grid((8, 8)) == max((l.size for l in store.layers.values()), key=lambda s: s[0] * s[1])


def test_masks_are_deterministic_and_leave_the_global_rng_alone():
    host = small_host(webui_model.sd_model("sd1"))
    image = torch.rand(1, 40, 40, 3)
    torch.manual_seed(123)
    first = TextMasker(host).mask(image, "car").heatmaps
    after = torch.rand(3)
    torch.manual_seed(123)
    second = TextMasker(host).mask(image, "car").heatmaps
    assert torch.equal(first, second) and torch.equal(after, torch.rand(3))


def test_model_untouched_after_an_exception_inside_the_forward():
    model = webui_model.sd_model("sd1")
    before, counts = unet_output(model), hooks(model)
    boom = model.model.diffusion_model.middle_block.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        TextMasker(small_host(model)).mask(torch.rand(1, 40, 40, 3), "car", refine=True)
    boom.remove()
    assert hooks(model) == counts and torch.equal(before, unet_output(model))


def test_inpainting_checkpoint_gets_c_concat():
    model = webui_model.sd_model("sd1", in_channels=9)
    res = TextMasker(small_host(model)).mask(torch.rand(1, 40, 40, 3), "car")
    assert res.masks.shape == (1, 40, 40)


def test_v_prediction_is_converted_to_epsilon():
    model = webui_model.sd_model("sd2")
    host = small_host(model)
    cond = host.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        eps = predict_eps_ddpm(host, x, 500, cond, x)
        v = model.apply_model(x, torch.tensor([500]), {"c_crossattn": [cond.context]})
    a = float(model.alphas_cumprod[500])
    assert torch.allclose(eps, a**0.5 * v + (1 - a) ** 0.5 * x, atol=1e-5)


def test_token_positions_follow_the_webui_chunks():
    model = webui_model.sd_model("sd1")
    host = small_host(model)
    words = " ".join(f"w{i}" for i in range(40))  # past one 75-token chunk: w<n> is two tokens
    token_map = host.encode_prompts([f"{words} red car"]).token_maps[0]
    chunks, _ = model.cond_stage_model.tokenize_line(f"{words} red car")
    flat = [t for c in chunks for t in c.tokens]
    ids = model.cond_stage_model.tokenizer("red car", add_special_tokens=False)["input_ids"]
    pos = token_map.find("red car")
    assert [flat[p] for p in pos] == ids and pos[0] > 77  # in the second chunk, after its BOS


def test_unhookable_unets_give_a_clear_message(webui):
    model = webui_model.sd_model("sd1")
    host = small_host(model)
    import modules.sd_unet

    modules.sd_unet.current_unet = object()
    try:
        with pytest.raises(CaptureError, match="TensorRT"):
            host.attention_modules()
    finally:
        modules.sd_unet.current_unet = None
    model.model.diffusion_model._tome_info = {"ratio": 0.5}
    with pytest.raises(CaptureError, match="ToMe"):
        host.attention_modules()


def test_forge_goes_through_the_comfy_adapter():
    import comfy_env

    if comfy_env.comfy_root() is None:
        pytest.skip("no ComfyUI")
    comfy_env.setup()
    from textmask.hosts.comfy import ComfyHost

    class ForgeObjects:
        unet, clip, vae = comfy_env.make_model("sd15"), comfy_env.make_clip("sd15"), comfy_env.make_vae()

    class ForgeModel:
        forge_objects = ForgeObjects()

    host = make_host(ForgeModel())
    assert isinstance(host, ComfyHost)
    assert TextMasker(host).mask(torch.rand(1, 40, 40, 3), "car", resolution=64).masks.shape == (1, 40, 40)


# ---- the script ----------------------------------------------------------------------------------------
ARGS = dict(prompt="red car", negative="", method="attention", ldznet="", refine=True, threshold="auto", blur=0.0,
            grow=0, invert=False, soft=False, show=True, names="", support=32, min_presence=0.0)


def init_image(w=53, h=37, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def test_dropdown_script_sets_image_mask(webui, monkeypatch):
    script_mod, shared, processing = webui
    model = webui_model.sd_model("sd1")
    monkeypatch.setattr(shared, "sd_model", model)
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    before, counts = unet_output(model), hooks(model)
    script = script_mod.TextMaskScript()
    assert script.title() == "Text Mask" and script.show(True) and not script.show(False)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], seed=5)
    processed = script.run(p, *ARGS.values())  # positional, as script_args through the API
    call = processing.calls[-1]
    assert call["image_mask"].size == (53, 37) and call["image_mask"].mode == "L"
    assert call["latent_mask"] is None and call["mask_round"] is True
    assert len(processed.images) == 1 + 2  # the result, then the mask and the heatmap
    soft = dict(ARGS, soft=True, show=False)
    processed = script.run(processing.StableDiffusionProcessingImg2Img(init_images=[init_image()]), *soft.values())
    assert processing.calls[-1]["mask_round"] is False and len(processed.images) == 1
    assert hooks(model) == counts and torch.equal(before, unet_output(model))


@pytest.mark.parametrize("mode", ["replace", "add", "subtract"])
def test_inpaint_accordion_combines_with_the_painted_mask(webui, monkeypatch, mode):
    script_mod, shared, processing = webui
    model = webui_model.sd_model("sd1")
    monkeypatch.setattr(shared, "sd_model", model)
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    script = script_mod.TextMaskInpaint()
    assert script.show(True) is script_mod.scripts.AlwaysVisible and script.section == "inpaint"
    image = init_image()
    painted = np.zeros((37, 53), np.uint8)
    painted[5:20, 10:40] = 255
    p = processing.StableDiffusionProcessingImg2Img(init_images=[image], mask=Image.fromarray(painted), seed=0)
    script.process(p, True, mode, *ARGS.values())
    ours = TextMasker(small_host(model)).mask(np.asarray(image, np.float32) / 255, "red car", refine=True).masks[0]
    expected = pp.combine(ours, torch.from_numpy(painted / 255.0).float(), mode)
    got = torch.from_numpy(np.asarray(p.image_mask, np.float32) / 255)
    assert p.image_mask.size == (53, 37) and torch.allclose(got, expected, atol=1 / 255 + 1e-6)
    untouched = processing.StableDiffusionProcessingImg2Img(init_images=[image], mask=Image.fromarray(painted))
    script.process(untouched, False, mode, *ARGS.values())  # disabled: the painted mask stays
    assert np.array_equal(np.asarray(untouched.image_mask), painted)


@pytest.mark.parametrize("method, prompt, extra", [
    ("refer", "the red car on the left", {}),
    ("named segments", "red car | sky", {"names": "road, tree"}),
    ("ovdiff", "red car", {"names": "sky", "support": 2}),
])
def test_every_method_from_the_dropdown_and_the_accordion(webui, monkeypatch, tmp_path, method, prompt, extra):
    """Referring expressions, named segments and OVDiff (support images from the webui model's own sampling) work
    in both entries, give the mask the API gives, and leave the model as it was."""
    from textmask.faces import mask_any

    script_mod, shared, processing = webui
    model = webui_model.sd_model("sd1")
    monkeypatch.setattr(shared, "sd_model", model)
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    monkeypatch.setattr(script_mod, "ovdiff_cache", lambda: str(tmp_path))  # the webui's models/ovdiff
    before, counts = unet_output(model), hooks(model)
    args = dict(ARGS, method=method, prompt=prompt, grow=2, **extra)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], seed=7)
    processed = script_mod.TextMaskScript().run(p, *args.values())
    mask = processing.calls[-1]["image_mask"]
    assert mask.size == (53, 37) and len(processed.images) == 3
    image = np.asarray(init_image(), np.float32) / 255
    expected = mask_any(TextMasker(small_host(model)), image, prompt, method=method, names=extra.get("names"),
                        grow=2, seed=7, ovdiff_images=extra.get("support", 32), cache_dir=tmp_path).masks[0]
    assert np.array_equal(np.asarray(mask), (expected.numpy() * 255 + 0.5).astype(np.uint8))
    if method == "ovdiff":  # one cached prototype file per name, reused by the second call above
        assert len(list(tmp_path.glob("*.safetensors"))) == 2
    painted = np.zeros((37, 53), np.uint8)
    painted[:, :10] = 255
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], mask=Image.fromarray(painted), seed=7)
    script_mod.TextMaskInpaint().process(p, True, "add", *args.values())
    got = np.asarray(p.image_mask)
    assert p.image_mask.size == (53, 37) and np.array_equal(got, np.maximum(painted, np.asarray(mask)))
    assert hooks(model) == counts and torch.equal(before, unet_output(model))


def test_refer_takes_no_negative_and_unknown_methods_are_named(webui, monkeypatch):
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()])
    with pytest.raises(Exception, match="leave the negative mask prompt empty"):
        script_mod.TextMaskScript().run(p, *dict(ARGS, method="refer", negative="wheels").values())
    with pytest.raises(Exception, match="unknown method 'sam'; choose one of attention, .*refer, named segments, ovdiff"):
        script_mod.TextMaskScript().run(p, *dict(ARGS, method="sam").values())
    with pytest.raises(TextMaskError, match="min_presence needs a presence score"):
        script_mod.TextMaskScript().run(p, *dict(ARGS, method="refer", min_presence=0.5).values())


def test_minimum_presence_empties_the_mask_and_older_requests_keep_working(webui, monkeypatch):
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    painted = np.zeros((37, 53), np.uint8)
    painted[:, :10] = 255
    for mode, want in (("replace", np.zeros_like(painted)), ("add", painted)):  # nothing scores 1: nothing added
        p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], mask=Image.fromarray(painted))
        script_mod.TextMaskInpaint().process(p, True, mode, *dict(ARGS, min_presence=1.0).values())
        assert np.array_equal(np.asarray(p.image_mask), want)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()])
    script_mod.TextMaskScript().run(p, *list(ARGS.values())[:-3])  # a request from before names, support, presence
    assert np.asarray(processing.calls[-1]["image_mask"]).any()


def test_scripts_mask_with_the_model_processing_will_load(webui, monkeypatch):
    """Forge loads the selected checkpoint only once processing starts: the script loads it first, the same way."""
    import modules.sd_models

    script_mod, shared, processing = webui
    model = webui_model.sd_model("sd1")
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    monkeypatch.setattr(shared, "sd_model", None)  # A1111 with no checkpoint: a one-line error, nothing else
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()])
    with pytest.raises(TextMaskError, match="no model is loaded"):
        script_mod.TextMaskScript().run(p, *ARGS.values())
    reloads = []
    monkeypatch.setattr(modules.sd_models, "forge_model_reload", lambda: reloads.append(1) or (model, True), raising=False)
    script_mod.TextMaskScript().run(p, *ARGS.values())
    script_mod.TextMaskInpaint().process(p, True, "replace", *ARGS.values())
    assert len(reloads) == 2 and processing.calls[-1]["image_mask"].size == (53, 37)


@pytest.mark.skipif(forge_env.forge_root() is None, reason="no Forge: set FORGE_ROOT to a checkout")
@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_scripts_on_a_forge_engine(webui, monkeypatch, kind):
    """The script end to end on Forge's own engine classes (SD1.5 and Flux): the checkpoint Forge loads at the start
    of processing, a mask at the init image's size from both entries, and the engine's model as it was."""
    import modules.sd_models

    from textmask.hosts.forge import ForgeFluxHost, ForgeHost

    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "opts", shared.opts)  # forge_env.setup() sets its own; the stand-in's comes back
    forge_env.setup()
    engine = forge_env.make_engine("sd15") if kind == "sd15" else forge_env.make_flux_engine()
    monkeypatch.setattr(modules.sd_models, "forge_model_reload", lambda: (engine, False), raising=False)
    monkeypatch.setattr(shared, "sd_model", None)  # Forge has loaded nothing before the first generation

    make_host = script_mod.webui_host

    def forge_host(model):
        host = make_host(model)
        assert isinstance(host, ForgeHost if kind == "sd15" else ForgeFluxHost)
        host.geometry = dataclasses.replace(host.geometry, resolution=64)  # the tiny model
        return host

    monkeypatch.setattr(script_mod, "webui_host", forge_host)
    model = engine.forge_objects.unet.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.randn(1, 32, generator=g)
    extra = {} if kind == "sd15" else {"y": y, "guidance": torch.tensor([3.5])}
    t = torch.tensor([300.0 if kind == "sd15" else 0.3])
    with torch.no_grad():
        before = model(x, t, context=ctx, **extra)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], seed=3)
    script_mod.TextMaskScript().run(p, *ARGS.values())
    assert processing.calls[-1]["image_mask"].size == (53, 37)
    painted = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], mask=Image.new("L", (53, 37)))
    script_mod.TextMaskInpaint().process(painted, True, "add", *dict(ARGS, method="noise-diff").values())
    assert painted.image_mask.size == (53, 37) and np.asarray(painted.image_mask).any()
    with torch.no_grad():
        assert torch.equal(before, model(x, t, context=ctx, **extra))


def test_noise_follows_the_webuis_schedule_settings(webui, monkeypatch):
    """Processing re-derives ᾱ from its original and the settings only once it samples, after the script masks."""
    import modules.sd_models

    _, shared, _ = webui
    model = webui_model.sd_model("sd1")
    original = model.alphas_cumprod.clone()
    model.alphas_cumprod_original = original
    model.alphas_cumprod = modules.sd_models.rescale_zero_terminal_snr_abar(original)  # the last generation's
    stale = model.alphas_cumprod.clone()
    assert torch.equal(A1111Host(model).alphas_cumprod, original.double())  # the setting is back to Default
    monkeypatch.setattr(shared.opts, "sd_noise_schedule", "Zero Terminal SNR")
    monkeypatch.setattr(shared.opts, "use_downcasted_alpha_bar", True)
    zero_snr = A1111Host(model).alphas_cumprod
    assert torch.equal(zero_snr, modules.sd_models.rescale_zero_terminal_snr_abar(original.half()).double())
    assert float(zero_snr[-1]) < 1e-7 and not torch.equal(zero_snr, original.double())
    assert torch.equal(model.alphas_cumprod, stale) and torch.equal(model.alphas_cumprod_original, original)


def test_ui_builds_under_gradio(webui):
    import gradio as gr

    script_mod, _, _ = webui
    with gr.Blocks():
        dropdown = script_mod.TextMaskScript().ui(True)
        accordion = script_mod.TextMaskInpaint().ui(True)
    assert len(dropdown) == len(ARGS) and len(accordion) == len(ARGS) + 2


def test_installer_installs_only_what_is_missing(webui):
    import launch

    launch.installed.clear()
    launch.installed.update({"diffusers", "transformers", "safetensors", "accelerate", "tqdm"})
    launch.pip_calls.clear()
    spec = importlib.util.spec_from_file_location("textmask_install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    installed = [cmd.split(" --constraint ")[0] for cmd, _ in launch.pip_calls]
    assert installed == ['install "scipy>=1.10"', 'install "scikit-image>=0.22"', 'install "scikit-learn>=1.3"']
    # Every installed distribution is pinned for pip, so nothing the webui has is upgraded or replaced.
    assert all(" --constraint " in cmd for cmd, _ in launch.pip_calls)


def test_installer_never_upgrades_what_the_webui_pinned(webui, monkeypatch, capsys):
    import importlib.metadata

    import launch

    launch.installed.clear()
    launch.installed.update({"transformers", "safetensors", "accelerate", "tqdm", "scipy", "scikit-image",
                             "scikit-learn"})
    launch.pip_calls.clear()
    seen = {}

    def run_pip(command, desc=None, live=False):
        path = command.split(" --constraint ")[1].strip('"')
        seen["constraints"] = Path(path).read_text().splitlines()
        raise RuntimeError("ResolutionImpossible: diffusers needs huggingface-hub>=0.23")  # as the webui's run() raises

    monkeypatch.setattr(launch, "run_pip", run_pip)
    spec = importlib.util.spec_from_file_location("textmask_install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    torch_pin = f"torch=={importlib.metadata.version('torch')}"
    assert torch_pin in seen["constraints"]  # the webui's torch (and everything else) stays as it is
    out = capsys.readouterr().out
    assert out.strip() == ("textmask: skipped diffusers>=0.27: it does not fit this webui's installed packages "
                           "(ResolutionImpossible: diffusers needs huggingface-hub>=0.23)")
    assert not list(Path(tempfile.gettempdir()).glob("textmask-constraints-*"))  # the constraints file is gone


def test_the_vae_gets_its_own_dtype(webui, monkeypatch):
    """--no-half-vae keeps the webui's VAE float32 beside a half UNet: images go in at the VAE's dtype."""
    import modules.devices

    model = webui_model.sd_model("sd1")
    model.model.diffusion_model.to(torch.bfloat16)
    model.cond_stage_model.to(torch.bfloat16)
    monkeypatch.setattr(modules.devices, "dtype_unet", torch.bfloat16)
    host = small_host(model)
    assert (host.dtype, host.vae_dtype) == (torch.bfloat16, torch.float32)
    assert host.encode_images(torch.rand(1, 3, 32, 32)).dtype == torch.bfloat16  # latents leave in the UNet's dtype
    monkeypatch.setattr(modules, "devices", None)  # outside the webui: the modules' own dtypes
    assert (host.dtype, host.vae_dtype) == (torch.bfloat16, torch.float32)
    # A whole mask where the two differ (a half UNet needs the webui's CUDA autocast, so here the VAE is the half one)
    model = webui_model.sd_model("sd1")
    model.first_stage_model.to(torch.bfloat16)
    res = TextMasker(small_host(model)).mask(torch.rand(1, 40, 40, 3), "car", refine=True)
    assert res.masks.shape == (1, 40, 40) and torch.isfinite(res.heatmaps).all()


def test_device_is_the_webuis_while_the_unet_waits_elsewhere(webui, monkeypatch):
    """--medvram/--lowvram keep the UNet on the CPU until its forward: the compute device is the webui's own."""
    import modules.devices

    model = webui_model.sd_model("sd1")
    model.model.to("meta")  # stands for weights parked off the compute device
    monkeypatch.setattr(modules.devices, "dtype_unet", torch.float16)  # e.g. fp8 storage computing in float16
    host = A1111Host(model)
    assert host.device == torch.device("cpu") and host.dtype == torch.float16 and host.vae_dtype == torch.float32


@pytest.mark.parametrize("prompt, phrase", [("car AND (", "syntax"), ("", "type what to mask")])
def test_a_failing_accordion_stops_the_generation_with_its_message(webui, monkeypatch, prompt, phrase):
    """The webui catches an always-on script's exception and would go on to regenerate the whole picture; the
    accordion makes the sampler call raise its message instead, which the webui shows and the API returns."""
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()])
    try:  # as the webui's ScriptRunner.process runs always-on scripts
        script_mod.TextMaskInpaint().process(p, True, "replace", *dict(ARGS, prompt=prompt).values())
    except Exception as e:  # noqa: BLE001
        caught = e
    assert phrase in str(caught)
    with pytest.raises(type(caught), match=phrase.replace("(", r"\(")):
        p.sample(conditioning=None, unconditional_conditioning=None, seeds=[0], subseeds=[0], subseed_strength=0,
                 prompts=[""])


def test_init_images_are_read_as_textmask_reads_images_and_one_at_a_time(webui, monkeypatch):
    """A 16-bit init image is scaled, not clipped to white by convert("RGB"); several init images, which the webui
    would all inpaint with one image_mask, are one line before any work."""
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    eight = np.asarray(init_image().convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray(eight * 257)  # the same picture at 16 bits (mode I;16)
    p8 = processing.StableDiffusionProcessingImg2Img(init_images=[Image.fromarray(eight.astype(np.uint8))])
    p16 = processing.StableDiffusionProcessingImg2Img(init_images=[sixteen])
    args = {k: v for k, v in ARGS.items() if k != "show"}
    m8, _ = script_mod.compute_masks(p8, **args)
    m16, _ = script_mod.compute_masks(p16, **args)
    assert torch.equal(m8[0], m16[0])
    two = processing.StableDiffusionProcessingImg2Img(init_images=[init_image(), init_image()])
    with pytest.raises(TextMaskError, match="send one init image per request") as e:
        script_mod.TextMaskScript().run(two, *ARGS.values())
    assert "\n" not in str(e.value)


def _refused(script_mod, p, mode, args):
    """Run the accordion as the webui's ScriptRunner does; the message it raised, which the sampler call raises too."""
    with pytest.raises(TextMaskError) as e:
        script_mod.TextMaskInpaint().process(p, True, mode, *args.values())
    with pytest.raises(TextMaskError, match=re.escape(str(e.value))):
        p.sample(conditioning=None, unconditional_conditioning=None, seeds=[0], subseeds=[0], subseed_strength=0,
                 prompts=[""])
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_mask_that_leaves_nothing_to_inpaint_repaints_nothing(webui, monkeypatch):
    """Finding nothing gives an all-zero mask; with "Only masked" (the API's default) the webui would then find no
    region, switch to img2img and repaint the whole picture, so such a mask goes with "Whole picture", which keeps
    every pixel. A mask that selects something keeps the request's inpaint area."""
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    nothing = dict(ARGS, min_presence=1.0)  # no phrase scores 1
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()])
    assert p.inpaint_full_res is True
    processed = script_mod.TextMaskScript().run(p, *nothing.values())
    mask = processing.calls[-1]["image_mask"]
    assert mask.size == (53, 37) and not np.asarray(mask).any() and len(processed.images) == 3
    assert p.inpaint_full_res is False
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()])
    script_mod.TextMaskScript().run(p, *ARGS.values())
    assert np.asarray(processing.calls[-1]["image_mask"]).any() and p.inpaint_full_res is True
    painted = np.zeros((37, 53), np.uint8)
    painted[:, :10] = 255
    for mode, args in (("replace", nothing), ("subtract", dict(nothing, invert=True))):  # the text mask: none or all
        p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], mask=Image.fromarray(painted))
        script_mod.TextMaskInpaint().process(p, True, mode, *args.values())
        assert not np.asarray(p.image_mask).any() and p.inpaint_full_res is False
    # The webui halves a mask to 0 or 1 unless it is soft, then inverts it with "Inpaint not masked"
    for value, soft, invert, inpaints in [(0.4, False, 0, False), (0.4, True, 0, True), (0.8, False, 1, False),
                                          (0.8, True, 1, True), (0.0, False, 1, True), (1.0, True, 1, False)]:
        p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], inpainting_mask_invert=invert)
        script_mod.apply_mask(p, torch.full((37, 53), value), soft)
        assert p.image_mask.size == (53, 37) and p.inpaint_full_res is inpaints, (value, soft, invert)


def test_a_bad_accordion_mode_is_refused_before_any_work(webui, monkeypatch):
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", lambda model: pytest.fail("masked before the mode was checked"))
    painted = Image.fromarray(np.full((37, 53), 255, np.uint8))
    for mode in ("Add", "", None, "intersect"):
        p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], mask=painted)
        assert "mask mode must be replace, add or subtract" in _refused(script_mod, p, mode, ARGS)
        assert p.image_mask is painted


def test_the_painted_mask_is_read_as_the_webui_reads_it(webui, monkeypatch):
    """An RGBA mask that is not wholly opaque (Gradio's sketch, an API mask) is its alpha channel, as the webui's
    create_binary_mask reads it; an opaque one is its gray levels."""
    script_mod, _, _ = webui
    alpha = np.zeros((37, 53), np.uint8)
    alpha[5:20, 10:40] = 255
    sketch = Image.fromarray(np.dstack([np.zeros((37, 53, 3), np.uint8), alpha]), mode="RGBA")  # black, painted in alpha
    assert torch.equal(script_mod.from_pil(sketch, (53, 37)), torch.from_numpy(alpha / 255.0).float())
    opaque = Image.fromarray(np.dstack([np.dstack([alpha] * 3), np.full((37, 53), 255, np.uint8)]), mode="RGBA")
    assert torch.equal(script_mod.from_pil(opaque, (53, 37)), torch.from_numpy(alpha / 255.0).float())


def test_masks_share_the_seed_the_generation_samples_with(webui, monkeypatch):
    """A random seed (-1) is fixed before the mask is made (the dropdown) or read from the seeds the webui fixed (the
    accordion), so a mask remade with the seed in the image's infotext is the same mask."""
    from textmask.faces import mask_any

    script_mod, shared, processing = webui
    model = webui_model.sd_model("sd1")
    monkeypatch.setattr(shared, "sd_model", model)
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    image = np.asarray(init_image(), np.float32) / 255

    def api_mask(seed):
        return mask_any(TextMasker(small_host(model)), image, "red car", refine=True, seed=seed).masks[0]

    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], seed=-1)
    script_mod.TextMaskScript().run(p, *ARGS.values())
    assert p.seed != -1
    got = torch.from_numpy(np.asarray(processing.calls[-1]["image_mask"], np.float32) / 255)
    assert torch.allclose(got, api_mask(p.seed % 2**31), atol=1 / 255 + 1e-6)
    p = processing.StableDiffusionProcessingImg2Img(init_images=[init_image()], seed=-1)
    p.all_seeds = [1234, 1235]  # as process_images fixes them before the scripts' process()
    script_mod.TextMaskInpaint().process(p, True, "replace", *ARGS.values())
    got = torch.from_numpy(np.asarray(p.image_mask, np.float32) / 255)
    assert torch.allclose(got, api_mask(1234), atol=1 / 255 + 1e-6)
    assert not torch.equal(api_mask(1234), api_mask(2**31 - 1))  # the seed does change this mask


@pytest.mark.parametrize("images", [[], None])
def test_no_init_image_is_one_line(webui, monkeypatch, images):
    script_mod, shared, processing = webui
    monkeypatch.setattr(shared, "sd_model", webui_model.sd_model("sd1"))
    monkeypatch.setattr(script_mod, "webui_host", small_host)
    with pytest.raises(TextMaskError, match="needs an init image"):
        script_mod.TextMaskScript().run(processing.StableDiffusionProcessingImg2Img(init_images=images),
                                        *ARGS.values())
