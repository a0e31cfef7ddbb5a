"""LD-ZNet: model structure, the attention pool's maths, weights I/O, the official checkpoint's conversion,
and the API / CLI end to end on tiny models."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import state_snapshot
from ldznet_reference import FEATURE_TRANSFORMERS, UNET_CONFIG, reference_state_dict
from PIL import Image

import tiny_models
from textmask import TextMasker
from textmask.errors import CheckpointError, TextMaskError
from textmask.ldznet import LDZNet, convert_reference, feature_positions, load_ldznet, save_ldznet, znet_config
from textmask.ldznet.model import TRAIN_RESOLUTION, AttentionPool2d
from textmask.ldznet.weights import read_reference_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_feature_layers_are_sd1_layers_6_to_10():
    names, picked = feature_positions(tiny_models.unet_sd15_topology())
    assert len(names) == 16
    assert [i + 1 for i in picked] == [6, 7, 8, 9, 10]
    assert [names[i] for i in picked] == ["down_blocks.2.attentions.1", "mid_block.attentions.0",
                                          "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]


def test_feature_layers_sdxl_shape():
    names, picked = feature_positions(tiny_models.unet_sdxl())
    assert [names[i] for i in picked] == ["down_blocks.2.attentions.0", "mid_block.attentions.0",
                                          "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]


def test_sd14_trainable_parameter_count():
    cfg = json.loads((ROOT / "textmask/configs/sd1/unet/config.json").read_text())
    with torch.device("meta"):
        model = LDZNet(znet_config(cfg))
    n = model.trainable_parameters()
    print(f"LD-ZNet (SD1.4 configuration) trainable parameters: {n / 1e6:.1f}M; paper: 925M")
    assert abs(n / 1e6 - 925) < 10
    pools = sum(p.numel() for p in model.pools.parameters())
    c = 1280  # qkv and c_proj per pool, plus embeddings over 12² + 1 tokens (four pools) and 6² + 1 (the mid one)
    assert pools == 5 * (4 * c * c + 4 * c) + c * (4 * 145 + 37)


def test_attention_pool_matches_direct_formula():
    torch.manual_seed(0)
    pool = AttentionPool2d(spatial=4, channels=16, head_channels=4)
    x = torch.randn(2, 16, 4, 4)
    out = pool(x)
    assert out.shape == (2, 17, 16)
    # Direct computation: tokens = [mean, pixels] + pos; per head softmax(q k^T / sqrt(d)) v; then c_proj.
    tokens = torch.cat([x.flatten(2).mean(-1, keepdim=True), x.flatten(2)], -1) + pool.positional_embedding
    qkv = torch.einsum("oc,bct->bot", pool.qkv_proj.weight[..., 0], tokens) + pool.qkv_proj.bias[:, None]
    q, k, v = qkv.chunk(3, 1)
    heads = []
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q[:, sl], k[:, sl]) / 2.0, -1)
        heads.append(torch.einsum("bts,bcs->bct", w, v[:, sl]))
    expected = torch.einsum("oc,bct->bot", pool.c_proj.weight[..., 0], torch.cat(heads, 1)) + pool.c_proj.bias[:, None]
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    assert pool(torch.randn(1, 16, 3, 5)).shape == (1, 16, 16)  # other grids interpolate the embedding


def test_set_train_resolution_resamples_only_changed_grids_and_keeps_their_trainable_flag():
    model = LDZNet(znet_config(UNET_CONFIG), upsample_steps=3)
    grids = [pool.positional_embedding for pool in model.pools]
    model.set_train_resolution(model.train_resolution)
    assert all(pool.positional_embedding is g for pool, g in zip(model.pools, grids))  # same size: untouched
    grids[0].requires_grad_(False)
    model.set_train_resolution(2 * model.train_resolution)
    resized = [pool.positional_embedding for pool in model.pools]
    assert all(r is not g and r.shape[-1] > g.shape[-1] for r, g in zip(resized, grids))
    assert [r.requires_grad for r in resized] == [g.requires_grad for g in grids] == [False] + [True] * (len(grids) - 1)
    assert model.train_resolution == 2 * TRAIN_RESOLUTION


def test_head_upsamples_to_image_resolution():
    model = LDZNet(znet_config(UNET_CONFIG), upsample_steps=3)
    feats = [torch.randn(1, 64, 4, 4) for _ in range(4)]
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny_models.CTX), feats)
    assert out.shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="reads 4 host feature maps"):
        model(torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny_models.CTX), feats[:2])


def test_init_from_host_unet_copies_matching_weights():
    unet = tiny_models.unet_sd1()
    model = LDZNet.from_unet(unet, upsample_steps=1)
    copied = model.init_from_unet(unet)
    assert "down_blocks.0.resnets.0.conv1.weight" in copied and "conv_out.weight" not in copied
    assert torch.equal(model.unet.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert not torch.equal(model.unet.conv_out.weight, unet.conv_out.weight[:1])


# ---- weights ------------------------------------------------------------------------------------------
def test_convert_reference_layout_prefers_ema():
    sd = reference_state_dict()
    model = convert_reference(sd, UNET_CONFIG)
    state = model.state_dict()
    ema = lambda k: sd["model_ema." + ("diffusion_model." + k).replace(".", "")]  # noqa: E731
    assert torch.equal(state["pools.0.positional_embedding"], ema("input_blocks.3.1.attentionpool2D.positional_embedding"))
    assert torch.equal(state["pools.1.qkv_proj.weight"], ema("middle_block.1.attentionpool2D.qkv_proj.weight"))
    assert torch.equal(state["unet.up_blocks.0.attentions.1.transformer_blocks.0.attn3.to_k.weight"],
                       ema("output_blocks.1.1.transformer_blocks.0.attn3.to_k.weight"))
    assert torch.equal(state["unet.mid_block.attentions.0.transformer_blocks.0.norm_sd.bias"],
                       ema("middle_block.1.transformer_blocks.0.norm_sd.bias"))
    assert torch.equal(state["head.10.weight"], ema("final.10.weight"))
    assert torch.equal(state["unet.conv_out.weight"], ema("out.2.weight"))
    raw = convert_reference(sd, UNET_CONFIG, use_ema=False).state_dict()
    assert torch.equal(raw["head.10.weight"], sd["model.diffusion_model.final.10.weight"])
    assert len(FEATURE_TRANSFORMERS) == len(model.pools)


def test_convert_reference_errors_list_keys():
    sd = reference_state_dict(ema=False)
    sd["model.diffusion_model.extra_layer.weight"] = torch.zeros(1)
    sd["something_else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="something_else"):
        convert_reference(sd, UNET_CONFIG)
    del sd["something_else"]
    with pytest.raises(CheckpointError, match="extra_layer"):
        convert_reference(sd, UNET_CONFIG)
    sd = reference_state_dict(ema=False)
    del sd["model.diffusion_model.middle_block.1.attentionpool2D.c_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): pools.1.c_proj.bias"):
        convert_reference(sd, UNET_CONFIG)


def test_reference_ckpt_is_read_weights_only(tmp_path):
    sd = reference_state_dict()
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "ok.ckpt")
    assert set(read_reference_checkpoint(tmp_path / "ok.ckpt")) == set(sd)

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"state_dict": sd, "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="never runs its code") as e:
        read_reference_checkpoint(tmp_path / "evil.ckpt")
    assert "weights_only" not in str(e.value)  # torch's advice would run the file's code
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cannot read broken.ckpt"):
        read_reference_checkpoint(tmp_path / "broken.ckpt")


def test_safetensors_roundtrip_and_errors(tmp_path):
    model = LDZNet.from_unet(tiny_models.unet_sd1(), upsample_steps=1, train_resolution=64)
    path = save_ldznet(model, tmp_path / "z.safetensors")
    loaded = load_ldznet(path)
    assert loaded.architecture == "custom-32" and loaded.train_resolution == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="convert it first"):
        load_ldznet(tmp_path / "x.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read LD-ZNet weights bad.safetensors"):
        load_ldznet(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an LD-ZNet file"):
        load_ldznet(tmp_path / "other.safetensors")


def test_an_ld_znet_file_whose_config_or_tensors_do_not_fit_is_one_line(tmp_path):
    """Metadata no LD-ZNet fits (empty, not an object, unknown UNet keys, negative steps) and tensors of other shapes
    are textmask's one line, not the library error of whichever step met them first."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_ldznet(LDZNet.from_unet(tiny_models.unet_sd1(), upsample_steps=1, train_resolution=64),
                       tmp_path / "z.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["config"])
    first = sorted(state)[0]
    cases = {"empty": ({**meta, "config": "{}"}, state), "list": ({**meta, "config": "[1]"}, state),
             "unet-keys": ({**meta, "config": json.dumps({**spec, "unet": {"bogus": 1}})}, state),
             "steps": ({**meta, "config": json.dumps({**spec, "upsample_steps": -1})}, state),
             "shape": (meta, {**state, first: torch.zeros(3, 3)})}
    for name, (metadata, tensors) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        with pytest.raises(CheckpointError) as e:
            load_ldznet(tmp_path / f"{name}.safetensors")
        assert f"{name}.safetensors" in str(e.value) and "\n" not in str(e.value), name


# ---- API ----------------------------------------------------------------------------------------------
def images(n, h=50, w=70):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(n))


def test_mask_api_sizes_batches_and_model_untouched(sd1_pipe):
    masker = TextMasker.from_pipe(sd1_pipe, resolution=64)
    z = LDZNet.from_unet(sd1_pipe.unet, upsample_steps=1, train_resolution=64).eval()
    unet = sd1_pipe.unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = state_snapshot(unet)
    res = masker.mask(images(3), "cat | dog AND NOT grass", method="ld-znet", ldznet=z, batch_size=2)
    assert res.masks.shape == (3, 50, 70) and set(res.terms) == {"cat", "dog", "grass"}
    single = masker.mask(images(3)[1:2], "cat | dog AND NOT grass", method="ld-znet", ldznet=z, seed=1)
    assert torch.allclose(single.heatmaps[0], res.heatmaps[1], atol=1e-5)  # batching does not change a mask
    boom = unet.mid_block.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        masker.mask(images(1), "cat", method="ld-znet", ldznet=z)
    boom.remove()
    after = state_snapshot(unet)
    assert after["hooks"] == before["hooks"]
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    with torch.no_grad():
        assert torch.equal(before_out, unet(x, t, encoder_hidden_states=ctx).sample)


def test_mask_api_errors(sd1_pipe, sdxl_pipe, tmp_path):
    masker = TextMasker.from_pipe(sd1_pipe, resolution=64)
    with pytest.raises(TextMaskError, match="needs LD-ZNet weights"):
        masker.mask(images(1), "cat", method="ld-znet")
    z = LDZNet.from_unet(sd1_pipe.unet, upsample_steps=1, train_resolution=64)
    xl = TextMasker.from_pipe(sdxl_pipe, resolution=64)
    with pytest.raises(CheckpointError, match="for custom-32 .* the loaded model is custom-64"):
        xl.mask(images(1), "cat", method="ld-znet", ldznet=z)
    with pytest.raises(TextMaskError, match="needs exactly one '{}'"):
        masker.mask(images(1), "cat", method="ld-znet", ldznet=z, template="a photo")
    with pytest.raises(TextMaskError, match="ldznet must be an LD-ZNet or the path of its .safetensors, got int"):
        masker.mask(images(1), "cat", method="ld-znet", ldznet=123)


def test_nothing_found_is_all_zero(sd1_pipe):
    masker = TextMasker.from_pipe(sd1_pipe, resolution=64)
    z = LDZNet.from_unet(sd1_pipe.unet, upsample_steps=1, train_resolution=64)
    with torch.no_grad():
        z.head[-1].bias.fill_(-20.0)  # a model confident that nothing matches
    res = masker.mask(images(2), "unicorn", method="ld-znet", ldznet=z)
    assert res.masks.shape == (2, 50, 70) and res.masks.max() == 0


# ---- CLI ----------------------------------------------------------------------------------------------
def test_cli_convert_and_segment(tmp_path, tiny_checkpoint):
    from textmask.cli import main

    d, _ = tiny_checkpoint
    torch.save({"state_dict": reference_state_dict()}, tmp_path / "LDZNet_txt2mask.ckpt")
    out = tmp_path / "ldznet.safetensors"
    cfg = tmp_path / "cfg"
    (cfg / "unet").mkdir(parents=True)
    (cfg / "unet" / "config.json").write_text(json.dumps(UNET_CONFIG))
    assert main(["convert-ldznet", str(tmp_path / "LDZNet_txt2mask.ckpt"), str(out), "--config", str(cfg)]) == 0
    assert load_ldznet(out).architecture == "custom-32"
    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((31, 45, 3)) * 255).astype(np.uint8)).save(img)
    model = ["--checkpoint", str(d / "tiny.safetensors"), "--config", str(d / "config"), "--resolution", "64"]
    code = main(["mask", str(img), "red car", "--out", str(tmp_path / "m.png"), "--method", "ld-znet",
                 "--ldznet", str(out), "--heatmap", str(tmp_path / "h.png"), *model])
    assert code == 0 and Image.open(tmp_path / "m.png").size == (45, 31)
    assert main(["mask", str(img), "car", "--out", str(tmp_path / "m2.png"), "--ldznet", str(out), *model]) == 2
    assert main(["convert-ldznet", str(tmp_path / "missing.ckpt"), str(out)]) == 2
    assert math.isfinite(out.stat().st_size)


def test_cli_convert_with_a_config_that_is_not_a_unets_is_one_line(tmp_path, capsys):
    """--config whose config.json is not JSON, not an object, or another model's: one line, exit 2, no output."""
    from textmask.cli import main

    torch.save({"state_dict": reference_state_dict()}, tmp_path / "ref.ckpt")
    texts = {"not-json": "{unet", "a-list": "[1, 2]",
             "sd3": json.dumps({"_class_name": "SD3Transformer2DModel", "caption_projection_dim": 16})}
    for name, text in texts.items():
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "config.json").write_text(text)
        code = main(["convert-ldznet", str(tmp_path / "ref.ckpt"), str(tmp_path / "out.safetensors"),
                     "--config", str(tmp_path / name)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("textmask: error: ") and "\n" not in err, (name, err)
        assert not (tmp_path / "out.safetensors").exists()


def test_ld_znet_without_diffusers_is_one_line(tmp_path, monkeypatch):
    """A webui whose pinned packages diffusers does not fit: ld-znet says what is missing, in one line."""
    import sys

    model = LDZNet.from_unet(tiny_models.unet_sd1(), upsample_steps=1, train_resolution=64)
    path = save_ldznet(model, tmp_path / "z.safetensors")
    monkeypatch.setitem(sys.modules, "diffusers.models.unets", None)  # importing it raises ImportError
    with pytest.raises(CheckpointError, match="ld-znet needs the diffusers package") as e:
        load_ldznet(path)
    assert "\n" not in str(e.value)
