"""Checkpoint reading, architecture detection on real-shaped state dicts, and the offline single-file loader."""

import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from textmask import TextMasker
from textmask.checkpoint import detect_architecture, read_state_dict
from textmask.errors import CheckpointError
from textmask.hosts import diffusers_loading
from textmask.hosts.diffusers import CONFIGS

ldm = pytest.importorskip("ldm")

SD_UNET = dict(image_size=32, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
               channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=1, legacy=False)


def ldm_unet_meta(arch: str, in_channels: int = 4) -> dict:
    """Full-size SD1/SD2 UNet state dict from Stability's own module, on the meta device (no memory)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    extra = dict(num_heads=8, context_dim=768) if arch == "sd1" else dict(
        num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
    with torch.device("meta"):
        unet = UNetModel(in_channels=in_channels, **SD_UNET, **extra)
    return {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}


def sdxl_meta() -> dict:
    """The SDXL base keys that identify it, with their real shapes."""
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    sd = {"model.diffusion_model.input_blocks.0.0.weight": m(320, 4, 3, 3),
          "model.diffusion_model.label_emb.0.0.weight": m(1280, 2816),
          "conditioner.embedders.1.model.text_projection": m(1280, 1280)}
    for block, width, depth in [("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2), ("input_blocks.7.1", 1280, 10),
                                ("input_blocks.8.1", 1280, 10), ("middle_block.1", 1280, 10), ("output_blocks.0.1", 1280, 10),
                                ("output_blocks.3.1", 640, 2), ("output_blocks.5.1", 640, 2)]:
        for i in range(depth):
            sd[f"model.diffusion_model.{block}.transformer_blocks.{i}.attn2.to_k.weight"] = m(width, 2048)
    return sd


def test_detect_real_shapes():
    assert detect_architecture(ldm_unet_meta("sd1")).name == "sd1"
    sd2 = detect_architecture(ldm_unet_meta("sd2"))
    assert sd2.name == "sd2" and sd2.prediction_type == "v_prediction"
    inpaint = detect_architecture(ldm_unet_meta("sd1", in_channels=9))
    assert inpaint.inpainting and inpaint.prediction_type == "epsilon"
    assert detect_architecture(ldm_unet_meta("sd2", in_channels=9)).prediction_type == "epsilon"
    assert detect_architecture(ldm_unet_meta("sd2"), prediction_type="epsilon").prediction_type == "epsilon"
    assert detect_architecture(ldm_unet_meta("sd2", in_channels=9)).resolution == 512
    xl = sdxl_meta()
    assert detect_architecture(xl).name == "sdxl" and detect_architecture(xl).prediction_type == "epsilon"
    assert detect_architecture(xl).resolution == 1024
    xl["v_pred"] = torch.empty(0)
    assert detect_architecture(xl).prediction_type == "v_prediction"
    assert detect_architecture(xl).resolution == 1024
    # A v-prediction SD1 fine-tune works at the size ComfyUI, A1111 and Forge give it, which cannot tell SD1 from SD2.
    assert detect_architecture(ldm_unet_meta("sd1"), prediction_type="v_prediction").resolution == 768


def test_sd2_base_is_epsilon_and_edm_checkpoints_are_detected():
    """SD2's 512 px base models are ε and its 768 px models v, told apart as ComfyUI and Forge tell them: the std of the
    last transformer's first norm bias. SDXL checkpoints with an EDM schedule are read from ComfyUI's markers:
    Playground v2.5 (ε-parametrised, σ_data 0.5) and CosXL (v, σ_data 1, its σ range in the file)."""
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(0)
    for std, expected in ((0.2, "v_prediction"), (0.02, "epsilon")):
        sd = ldm_unet_meta("sd2")
        sd[key] = torch.randn(1024, generator=g) * std
        assert detect_architecture(sd).prediction_type == expected
        assert detect_architecture(sd).resolution == (768 if expected == "v_prediction" else 512)
        assert detect_architecture(sd, prediction_type="v_prediction").prediction_type == "v_prediction"
    xl = sdxl_meta()
    assert detect_architecture(xl).edm is None
    xl.update({"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)})
    playground = detect_architecture(xl)
    assert playground.edm == (0.002, 80.0, 0.5) and playground.prediction_type == "epsilon"
    xl = sdxl_meta()
    xl.update({"edm_vpred.sigma_max": torch.tensor([120.0]), "edm_vpred.sigma_min": torch.tensor([0.001])})
    cosxl = detect_architecture(xl)
    assert cosxl.edm == (pytest.approx(0.001), 120.0, 1.0) and cosxl.prediction_type == "v_prediction"


def test_zero_snr_checkpoint_gets_the_rescaled_schedule(tiny_checkpoint, tmp_path):
    """A "v_pred" + "ztsnr" checkpoint (NoobAI-style v-prediction finetunes) is noised and converted to ε under SD's
    schedule rescaled to zero terminal SNR, as diffusers' own rescaling gives it."""
    from diffusers import DDPMScheduler

    d, sd = tiny_checkpoint
    save_file({**sd, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, tmp_path / "zsnr.safetensors")
    host = diffusers_loading.from_single_file(tmp_path / "zsnr.safetensors", config=d / "config")
    assert host.architecture.zero_snr and host.prediction_type == "v_prediction"
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_betas_zero_snr=True).alphas_cumprod.double()
    torch.testing.assert_close(host.alphas_cumprod[:-1], reference[:-1], rtol=1e-5, atol=1e-7)  # theirs is fp32
    assert 0 < float(host.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR, kept finite
    plain = diffusers_loading.from_single_file(d / "tiny.safetensors", config=d / "config")
    assert not plain.architecture.zero_snr and float(plain.alphas_cumprod[-1]) > 1e-3
    out = TextMasker(host).mask(torch.rand(1, 30, 45, 3), "cat", method="noise-diff", timestep=999)
    assert torch.isfinite(out.heatmaps).all()


def test_edm_checkpoint_loads_with_its_schedule_and_latent_statistics(tiny_checkpoint, tmp_path):
    """A single file with Playground v2.5's markers: EDM at σ_data 0.5, and its VAE normalises each latent channel
    by the file's edm_mean / edm_std at scale 0.5, as Playground's pipeline does."""
    from textmask.schedule import EDMSchedule

    d, sd = tiny_checkpoint
    mean, std = torch.tensor([0.5, -1.0, 0.25, 2.0]), torch.tensor([4.0, 2.0, 1.0, 8.0])
    save_file({**sd, "edm_mean": mean.view(1, 4, 1, 1), "edm_std": std.view(1, 4, 1, 1)}, tmp_path / "pg.safetensors")
    host = diffusers_loading.from_single_file(tmp_path / "pg.safetensors", config=d / "config")
    assert host.edm == EDMSchedule(0.002, 80.0, 0.5) and host.prediction_type == "epsilon"
    assert host.vae.config.scaling_factor == 0.5 and host.vae.config.latents_mean == mean.tolist()
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = host.vae.encode(pixels * 2 - 1).latent_dist.mean
        torch.testing.assert_close(host.encode_images(pixels), (raw - mean.view(1, 4, 1, 1)) / std.view(1, 4, 1, 1))
    plain = diffusers_loading.from_single_file(d / "tiny.safetensors", config=d / "config")
    assert plain.edm is None and plain.vae.config.latents_mean is None  # the shipped config is left as it was
    out = TextMasker(host).mask(torch.rand(1, 30, 45, 3), "cat", refine=True)
    assert out.masks.shape == (1, 30, 45) and torch.isfinite(out.heatmaps).all()


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_shipped_unet_configs_match_real_checkpoints(arch):
    """The shipped diffusers configs build UNets whose keys and shapes equal the converted real layout."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = json.loads((CONFIGS / arch / "unet" / "config.json").read_text())
    converted = convert_ldm_unet_checkpoint(ldm_unet_meta(arch), config)
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_shipped_vae_config_matches_real_checkpoint():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        parts = {"encoder": Encoder(**dd), "decoder": Decoder(**dd), "quant_conv": torch.nn.Conv2d(8, 8, 1),
                 "post_quant_conv": torch.nn.Conv2d(4, 4, 1)}
    sd = {f"first_stage_model.{n}.{k}": v for n, mod in parts.items() for k, v in mod.state_dict().items()}
    config = json.loads((CONFIGS / "sd1" / "vae" / "config.json").read_text())
    converted = convert_ldm_vae_checkpoint(sd, config)
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_unknown_and_unsupported_architectures():
    with pytest.raises(CheckpointError, match="unknown architecture: no SD1/SD2/SDXL UNet weights .* found$"):
        detect_architecture({"foo.weight": torch.empty(2)})
    # Files users often pick by mistake: the error says what they look like.
    for what, key in (("a LoRA", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
                      ("a LoRA", "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"),
                      ("a VAE alone", "encoder.down.0.block.0.conv1.weight"),
                      ("a UNet alone", "input_blocks.0.0.weight"), ("a UNet alone", "down_blocks.0.resnets.0.conv1.weight")):
        with pytest.raises(CheckpointError, match=f"this looks like {what}, not a whole checkpoint") as e:
            detect_architecture({key: torch.empty(2)})
        assert "\n" not in str(e.value)
    refiner = {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(384, 4, 3, 3, device="meta"),
               "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(768, 1280, device="meta")}
    with pytest.raises(CheckpointError, match="refiner"):
        detect_architecture(refiner)
    depth = ldm_unet_meta("sd2", in_channels=5)
    with pytest.raises(CheckpointError, match="5 input channels"):
        detect_architecture(depth)


def test_single_file_loads_real_layout(tiny_checkpoint):
    """Weights loaded through the real loader reproduce the original ldm modules' outputs."""
    from ldm.modules.diffusionmodules.model import Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    d, sd = tiny_checkpoint
    for name in ("tiny.safetensors", "tiny.ckpt"):
        host = diffusers_loading.from_single_file(d / name, config=d / "config")
        unet = UNetModel(image_size=16, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                         attention_resolutions=[1, 2], channel_mult=(1, 2), num_heads=8, use_spatial_transformer=True,
                         transformer_depth=1, context_dim=32, legacy=False).eval()
        unet.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")})
        x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), torch.tensor([500])
        with torch.no_grad():
            ours = host.unet(x, t, encoder_hidden_states=ctx).sample
            theirs = unet(x, t, context=ctx)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

        enc = Encoder(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
                      num_res_blocks=1, attn_resolutions=[], dropout=0.0).eval()
        enc.load_state_dict({k[len("first_stage_model.encoder."):]: v for k, v in sd.items() if k.startswith("first_stage_model.encoder.")})
        quant = torch.nn.Conv2d(8, 8, 1)
        quant.load_state_dict({"weight": sd["first_stage_model.quant_conv.weight"], "bias": sd["first_stage_model.quant_conv.bias"]})
        img = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            mean_ref = quant(enc(img * 2 - 1))[:, :4] * 0.18215
            torch.testing.assert_close(host.encode_images(img), mean_ref, atol=1e-4, rtol=1e-4)

        te = tiny_models.text_encoder()
        ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
        with torch.no_grad():
            torch.testing.assert_close(host.text_encoder(ids).last_hidden_state, te(ids).last_hidden_state)


def test_single_file_fp16(tiny_checkpoint, tmp_path):
    d, sd = tiny_checkpoint
    save_file({k: v.half() for k, v in sd.items()}, tmp_path / "half.safetensors")
    masker = TextMasker.from_single_file(tmp_path / "half.safetensors", config=d / "config", dtype=torch.bfloat16)
    assert masker.host.dtype == torch.bfloat16
    out = masker.mask(torch.rand(1, 30, 45, 3), "cat")
    assert out.masks.shape == (1, 30, 45) and torch.isfinite(out.heatmaps).all()


def test_read_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_state_dict(bad)
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_state_dict(truncated)
    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps(print))  # a pickle that would call a function
    old_protocol = tmp_path / "old.ckpt"
    old_protocol.write_bytes(pickle.dumps(print, protocol=2))  # torch names the function it would call
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 4)
    for path, detail in [(hostile, "or is not a checkpoint"), (old_protocol, "it would load print"),
                         (noise, "or is not a checkpoint")]:
        with warnings.catch_warnings(record=True) as shown:  # torch's pickle-protocol notes stay quiet
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError, match="holds more than tensors") as e:
                read_state_dict(path)
        assert not shown, [str(w.message) for w in shown]
        message = str(e.value)
        assert "\n" not in message and detail in message and "reads only tensors" in message, message
        assert "weights_only" not in message  # torch's advice to turn it off would run the file's code
    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"x": torch.ones(2)}, "global_step": 5}, nested)
    assert set(read_state_dict(nested)) == {"x"}
    other = tmp_path / "weights.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        read_state_dict(other)


def test_loader_errors_are_one_line(tmp_path, tiny_checkpoint):
    d, sd = tiny_checkpoint
    save_file({"foo": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="unknown architecture") as e:
        TextMasker.from_single_file(tmp_path / "foreign.safetensors")
    assert "\n" not in str(e.value)
    broken = {k: v for k, v in sd.items() if "output_blocks.1" not in k}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as e:
        TextMasker.from_single_file(tmp_path / "broken.safetensors", config=d / "config")
    assert "\n" not in str(e.value)


def test_a_folder_given_as_a_checkpoint_file_is_named_as_one(tmp_path):
    from textmask.checkpoint import read_state_dict

    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file; load a diffusers folder with") as e:
        read_state_dict(tmp_path)
    assert "\n" not in str(e.value)
