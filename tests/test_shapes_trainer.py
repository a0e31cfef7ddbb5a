"""The Shapes trainer's options (bench/shapes/train_model.py): text encoder, attention init, partial captions, warm start."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "shapes"))

from train_model import Log, token_ids, train_unet  # noqa: E402


def test_frozen_text_without_token_mixing_keeps_the_encoder_fixed_and_padding_caption_free():
    ids = token_ids(["a red circle", "a blue square and a green star"])
    latents = torch.randn(2, 4, 32, 32)
    unet, text, steps = train_unet(latents, ids, minutes=0.001, batch=2, log=Log(), seed=0,
                                   frozen_text=True, token_mixing=False, qk_gain=2.5)
    assert steps >= 1
    assert all(not p.requires_grad for p in text.parameters())
    for name, module in text.named_modules():
        if name.endswith("self_attn.out_proj"):
            assert not module.weight.any() and not module.bias.any()
    with torch.no_grad():
        hidden = text(ids).last_hidden_state
    assert torch.equal(hidden[0, 30:], hidden[1, 30:])  # the EOS padding is the same whatever the caption
    assert not torch.equal(hidden[0, 2], hidden[1, 2])  # "red" and "blue" still differ


def test_previous_token_head_binds_a_colour_to_the_next_word_and_nothing_else():
    ids = token_ids(["a red circle and a blue square", "a blue circle and a red square", "a red square and a red star"])
    _, text, _ = train_unet(torch.randn(1, 4, 32, 32), ids, minutes=0.0, batch=1, log=Log(), seed=0,
                            frozen_text=True, token_mixing=False, previous_token=0.045)
    text.set_attn_implementation("eager")
    with torch.no_grad():
        out = text(ids, output_attentions=True)
    head = out.attentions[0][:, 0]
    assert all(head[:, i, i - 1].min() > 0.95 for i in range(1, ids.shape[1]))  # each token reads the one before
    mixing = [n for n, m in text.named_modules() if n.endswith("self_attn.out_proj") and m.weight.any()]
    assert mixing == ["encoder.layers.0.self_attn.out_proj"]
    assert not text.get_submodule(mixing[0]).weight[:, text.config.hidden_size // 4 :].any()  # head 0 only
    hidden = out.last_hidden_state
    assert (hidden[0, 3] - hidden[1, 3]).abs().max() > 0.1  # "circle" after "red" is not "circle" after "blue"
    assert (hidden[0, 3] - hidden[2, 3]).abs().max() > 0.1  # nor is it "square" after "red"
    # Only colours are carried: "and" after "circle" or "square" is the same, and so is the padding after the
    # last shape (softmax leaves ~1e-5 of the head's attention on the earlier tokens)
    assert torch.allclose(hidden[0, 4], hidden[2, 4], atol=1e-4)
    assert torch.allclose(hidden[0, 8:], hidden[2, 8:], atol=1e-4)
    assert torch.allclose(hidden[0, 8:], hidden[1, 8:], atol=1e-4)


def test_qk_gains_scale_the_cross_and_self_attention_init_apart():
    from diffusers import UNet2DConditionModel
    from train_model import CONFIGS

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**CONFIGS["unet"])
    a = dict(plain.named_parameters())
    ids = token_ids(["a red circle"])
    for cross, self_gain in [(2.5, 1.0), (2.5, 3.0)]:
        unet, _, _ = train_unet(torch.randn(1, 4, 32, 32), ids, minutes=0.0, batch=1, log=Log(), seed=0,
                                qk_gain=cross, self_qk_gain=self_gain)
        checked = 0
        for name, p in unet.named_parameters():
            if ".to_q." in name or ".to_k." in name:
                gain = cross if ".attn2." in name else self_gain
                assert torch.allclose(p, gain * a[name]), name
                checked += 1
            elif ".to_v." in name or ".to_out." in name:
                assert torch.equal(p, a[name]), name
        assert checked == 4 * 7  # q and k weights (no biases) of 7 self- and 7 cross-attention layers


def test_partial_captions_name_a_proper_subset_of_phrases_with_every_instance():
    from train_model import partial_phrases

    from textmask.demo.scenes import caption

    phrases = ["red circle", "blue square", "red circle", "green star"]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        text = caption(partial_phrases(phrases, gen))
        named = {p for p in set(phrases) if p in text}
        assert 1 <= len(named) <= 2  # non-empty, never all three
        assert text.count("red circle") in (0, 2)  # a kept phrase names every one of its objects
        order = [p for p in phrases if p in named]
        assert text == ", ".join(f"a {p}" for p in order[:-1]) + " and " * (len(order) > 1) + f"a {order[-1]}"
        seen.add(frozenset(named))
    assert len(seen) == 6  # every proper non-empty subset of three phrases turns up
    assert caption(partial_phrases(["red circle", "red circle"], gen)) == "a red circle and a red circle"


def test_distractors_add_one_absent_phrase_anywhere():
    from train_model import with_distractor

    scene = ["red circle", "blue square", "red circle"]
    gen = torch.Generator().manual_seed(0)
    places, extras = set(), set()
    for _ in range(200):
        named = with_distractor(["blue square"], scene, gen)
        assert len(named) == 2 and "blue square" in named
        extra = next(p for p in named if p != "blue square")
        assert extra not in scene  # absent from the scene, not just from the named subset
        places.add(named.index(extra))
        extras.add(extra)
    assert places == {0, 1}
    assert {"red square", "blue circle"} & extras  # it may share a colour or a shape with what is there
    named = with_distractor(scene, scene, gen)
    assert [p for p in named if p in scene] == scene  # the true phrases keep their order


def test_distractor_captions_train(tmp_path):
    ids = token_ids(["a red circle and a blue square", "a green star"])
    phrases = [["red circle", "blue square"], ["green star"]]
    unet, _, steps = train_unet(torch.randn(2, 4, 32, 32), ids, minutes=0.002, batch=2, log=Log(), seed=0,
                                frozen_text=True, token_mixing=False, phrases=phrases, distractors=1.0)
    assert steps >= 1


def test_partial_captions_train_from_an_earlier_model(tmp_path):
    from train_model import CONFIGS, save

    from diffusers import AutoencoderKL

    ids = token_ids(["a red circle and a blue square", "a green star"])
    first, text, _ = train_unet(torch.randn(2, 4, 32, 32), ids, minutes=0.0, batch=1, log=Log(), seed=0,
                                frozen_text=True, token_mixing=False, qk_gain=2.5)
    save(tmp_path, AutoencoderKL(**CONFIGS["vae"]), first, text, 1.0, {})
    phrases = [["red circle", "blue square"], ["green star"]]
    unet, text2, steps = train_unet(torch.randn(2, 4, 32, 32), ids, minutes=0.0, batch=1, log=Log(), seed=0,
                                    frozen_text=True, qk_gain=2.5, init_from=tmp_path, phrases=phrases, partial=1.0)
    for (name, p), q in zip(unet.named_parameters(), first.parameters()):
        assert torch.equal(p, q.half().float()), name  # the saved (fp16) weights, and no second Q/K gain
    for p, q in zip(text2.parameters(), text.parameters()):
        assert torch.equal(p, q.half().float())
    unet, _, steps = train_unet(torch.randn(2, 4, 32, 32), ids, minutes=0.002, batch=2, log=Log(), seed=0,
                                frozen_text=True, init_from=tmp_path, phrases=phrases, partial=1.0)
    assert steps >= 1


def test_two_level_unet_reads_the_text_at_32_and_16_only():
    from train_model import TWO_LEVEL_UNET

    ids = token_ids(["a red circle and a blue square"])
    unet, _, _ = train_unet(torch.randn(1, 4, 32, 32), ids, minutes=0.0, batch=1, log=Log(), seed=0, frozen_text=True,
                            token_mixing=False, unet_config=TWO_LEVEL_UNET)
    grids = {}
    hooks = [m.register_forward_hook(lambda m, a, k, out, name=name: grids.setdefault(name, a[0].shape[1]), with_kwargs=True)
             for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        unet(torch.randn(1, 4, 32, 32), 10, torch.randn(1, 77, 64))
    for h in hooks:
        h.remove()
    assert sorted(set(grids.values())) == [16 * 16, 32 * 32]
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn2"] == 16 * 16


def test_unet_channels_and_heads_widen_the_unet_and_keep_its_levels():
    from argparse import Namespace

    from diffusers import UNet2DConditionModel
    from train_model import CONFIGS, unet_config

    assert unet_config(Namespace(two_levels=False, unet_channels=None, unet_heads=None)) == CONFIGS["unet"]
    config = unet_config(Namespace(two_levels=False, unet_channels=[64, 96, 144], unet_heads=8))
    unet = UNet2DConditionModel(**config)
    attn = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    assert (attn.heads, attn.inner_dim) == (8, 64)
    assert [b.resnets[0].out_channels for b in unet.down_blocks] == [64, 96, 144]
    two = unet_config(Namespace(two_levels=True, unet_channels=[64, 128], unet_heads=None))
    assert two["block_out_channels"] == [64, 128] and two["down_block_types"] == ["CrossAttnDownBlock2D"] * 2


def test_a_step_budget_gives_the_same_run_twice():
    ids = token_ids(["a red circle and a blue square", "a green star"])
    latents = torch.randn(2, 4, 32, 32)
    runs = [train_unet(latents, ids, minutes=0.0, batch=2, log=Log(), seed=0, frozen_text=True, token_mixing=False,
                       steps=3) for _ in range(2)]
    assert runs[0][2] == runs[1][2] == 3  # the minutes are ignored
    for (name, p), q in zip(runs[0][0].named_parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q), name
    fresh = train_unet(latents, ids, minutes=0.0, batch=2, log=Log(), seed=0, frozen_text=True, token_mixing=False)[0]
    assert any(not torch.equal(p, q) for p, q in zip(runs[0][0].parameters(), fresh.parameters()))  # 3 steps trained


def test_bad_budget_or_device_is_a_one_line_error_before_any_work(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "shapes" / "train_model.py"
    for bad in (["--unet-steps", "0"], ["--device", "gpu"], ["--unet-channels", "64,96"], ["--unet-channels", "64,96,150"],
                ["--unet-channels", "64,x,96"], ["--unet-heads", "0"], ["--unet-heads", "5"],
                ["--init-from", str(tmp_path), "--unet-heads", "8"]):
        run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out"), *bad],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("train_model.py: error: ")
        assert not (tmp_path / "out").exists()


def test_mmdit_trainer_writes_an_sd3_folder_that_masks(tmp_path, monkeypatch):
    """bench/shapes/train_mmdit.py: a few steps on a few scenes give an SD3 pipeline folder (fp16, no T5, no
    tokenizers) that textmask loads offline, whose transformer learnt (its weights moved), and that masks."""
    import train_mmdit

    from textmask import TextMasker

    out = tmp_path / "mmdit"
    monkeypatch.setattr(sys, "argv", ["train_mmdit.py", "--out", str(out), "--scenes", "8", "--steps", "2",
                                      "--batch", "2", "--threads", str(torch.get_num_threads())])
    train_mmdit.main()
    assert {p.name for p in out.iterdir()} >= {"transformer", "vae", "text_encoder", "text_encoder_2", "scheduler",
                                               "model_index.json", "train_log.json"}
    assert not (out / "text_encoder_3").exists() and not (out / "tokenizer").exists()
    host = TextMasker.from_pretrained(out, resolution=128).host
    fresh = train_mmdit.build_pipeline(0, 2.5).transformer
    trained = dict(host.transformer.named_parameters())
    assert any(not torch.equal(p.half().float(), trained[n].float()) for n, p in fresh.named_parameters())
    out = TextMasker(host).mask(torch.rand(1, 40, 56, 3), "red circle")
    assert out.masks.shape == (1, 40, 56)
