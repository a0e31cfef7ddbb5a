"""Joint attention capture on tiny random-config MM-DiTs (diffusers' SD3 and Flux transformers): the captured
probabilities equal the model's own attention, read where the model computes it, and the model is untouched."""

import pytest
import torch

from textmask.capture import Need, ProbsStore
from textmask.capture_mmdit import JointAttentionCapture, find_joint_attention_modules
from textmask.errors import CaptureError

LATENT = (8, 12)  # latent (h, w); both models patchify 2x2, so 4x6 image tokens
TEXT = 5


def sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, *LATENT, generator=g),
                  encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g),
                  pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([500.0, 300.0]))
    return model.eval(), inputs


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                   guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(1)
    h, w = LATENT[0] // 2, LATENT[1] // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(hidden_states=torch.randn(2, h * w, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, TEXT, 16, generator=g),
                  pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.5, 0.3]),
                  img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))
    return model.eval(), inputs


def reference(model_kind, monkeypatch):
    """Record every attention call's probabilities where the model computes them: [B, H, S, S] with the sequence
    in the model's own order."""
    seen = []
    if model_kind == "sd3":
        import torch.nn.functional as F

        real = F.scaled_dot_product_attention

        def sdpa(q, k, v, *args, **kwargs):  # [B, H, S, D], image then text
            seen.append(((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
            return real(q, k, v, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    else:
        from diffusers.models.transformers import transformer_flux

        real = transformer_flux.dispatch_attention_fn

        def dispatch(q, k, v, *args, **kwargs):  # [B, S, H, D], text then image
            qh, kh = q.float().transpose(1, 2), k.float().transpose(1, 2)
            seen.append(((qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
            return real(q, k, v, *args, **kwargs)

        monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", dispatch)
    return seen


def split(probs, text_first, text=TEXT):
    """The reference's image query rows: (text part [B, N, L], image part renormalised [B, N, N]), head-averaged."""
    n = probs.shape[-1] - text
    rows = probs[:, :, text:] if text_first else probs[:, :, :n]
    txt = rows[..., :text] if text_first else rows[..., n:]
    img = rows[..., text:] if text_first else rows[..., :n]
    img = img.mean(1)
    return txt.mean(1), img / img.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_joint_probabilities_equal_the_models_attention(kind, monkeypatch):
    model, inputs = sd3() if kind == "sd3" else flux()
    modules = find_joint_attention_modules(model)
    assert len(modules) == (2 if kind == "sd3" else 3)
    with torch.no_grad():
        plain = model(**inputs).sample
    seen = reference(kind, monkeypatch)
    cross, selfs = ProbsStore(("cross",)), ProbsStore(("self",))
    with torch.no_grad(), JointAttentionCapture(model, LATENT, [cross, selfs]) as cap:
        hooked = model(**inputs).sample
    assert torch.equal(plain, hooked)  # read-only
    assert len(seen) == len(modules) and [l.size for l in cap.layers] == [(4, 6)] * (2 * len(modules))
    for (name, _), probs in zip(modules, seen):
        txt, img = split(probs, text_first=kind == "flux")
        torch.testing.assert_close(cross.probs[name], txt, atol=1e-5, rtol=0)
        torch.testing.assert_close(selfs.probs[name + ".self"], img, atol=1e-5, rtol=0)
        assert bool((cross.probs[name].sum(-1) < 1).all())  # the joint normaliser: text gets part of each row


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_hooks_come_off_after_an_exception_and_rows_are_read(kind):
    model, inputs = sd3() if kind == "sd3" else flux()
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with torch.no_grad():
        plain = model(**inputs).sample

    class Boom:
        need = Need(kinds=("cross",), rows=slice(1, 2))

        def __call__(self, layer, start, probs):
            assert probs.shape[0] == 1  # only the asked row
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with JointAttentionCapture(model, LATENT, [Boom()]):
            model(**inputs)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, plain)  # bit-identical after the failed capture


def test_fused_projections_and_unet_are_refused():
    model, _ = sd3()
    model.fuse_qkv_projections()
    with pytest.raises(CaptureError, match="unfuse_qkv_projections"):
        find_joint_attention_modules(model)
    with pytest.raises(CaptureError, match="SD3 or Flux"):
        JointAttentionCapture(torch.nn.Linear(2, 2), LATENT, [])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_rows_picked_by_the_forwards_text_context(kind):
    """A collector's ``context_rows`` picks rows by the text context the transformer was called with (the text
    stream itself changes from block to block): the picked row's probabilities are that row's of a full capture."""
    from textmask.capture import context_matcher

    model, inputs = sd3() if kind == "sd3" else flux()
    full, picked = ProbsStore(("cross",)), ProbsStore(("cross",))
    picked.need = Need(kinds=("cross",), context_rows=context_matcher(inputs["encoder_hidden_states"][1:2]))
    with torch.no_grad(), JointAttentionCapture(model, LATENT, [full, picked]):
        model(**inputs)
    assert set(picked.probs) == set(full.probs)
    for name, probs in picked.probs.items():
        assert probs.shape[0] == 1
        # to float rounding: BLAS may block a one-row product unlike a two-row one (it does on AMD EPYC's kernels)
        torch.testing.assert_close(probs, full.probs[name][1:2], atol=1e-7, rtol=1e-6)
