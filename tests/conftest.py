import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def sd1_pipe():
    return tiny_models.sd1_pipe()


@pytest.fixture(scope="session")
def sdxl_pipe():
    return tiny_models.sdxl_pipe()


@pytest.fixture(scope="session")
def sd1_masker(sd1_pipe):
    from textmask import TextMasker

    return TextMasker.from_pipe(sd1_pipe, resolution=64)


def state_snapshot(module: torch.nn.Module) -> dict:
    """Everything a hook or patch could leave behind: parameters, buffers and hook dictionaries."""
    hooks = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), type(m.forward))
        for name, m in module.named_modules()
    }
    tensors = {k: v.clone() for k, v in module.state_dict().items()}
    return {"hooks": hooks, "tensors": tensors}


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["hooks"] == after["hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k in before["tensors"]:
        assert torch.equal(before["tensors"][k], after["tensors"][k]), k


@contextlib.contextmanager
def unet_untouched(unet: torch.nn.Module):
    """Asserts on exit that a diffusers UNet's forward is bit-identical and no hook or tensor changed."""
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = state_snapshot(unet)
    yield
    assert_unchanged(before, state_snapshot(unet))
    with torch.no_grad():
        assert torch.equal(before_out, unet(x, t, encoder_hidden_states=ctx).sample)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny SD1-style single-file checkpoint in the original LDM layout (.safetensors and .ckpt) plus its configs."""
    pytest.importorskip("ldm")
    from safetensors.torch import save_file

    import ldm_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    sd = ldm_checkpoint.ldm_state_dict()
    save_file(sd, d / "tiny.safetensors")
    torch.save(sd, d / "tiny.ckpt")
    ldm_checkpoint.write_configs(d / "config")
    return d, sd


def noised(host, z0: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """x = z0 + σ·noise at the host's σ of ``timestep``, as the core noises (float32)."""
    return z0.float() + host.sigma(timestep).float().to(z0.device).view(-1, 1, 1, 1) * noise.float()


def predict_eps(host, x: torch.Tensor, timestep: int, cond, image_latents: torch.Tensor) -> torch.Tensor:
    """ε of one host forward at ``timestep`` for x = z + σ·ε, through the core's forward engine."""
    from textmask import forward

    sigma = host.sigma(timestep).float().to(x.device).expand(x.shape[0])
    return forward.eps(host, x.float(), sigma, cond, image_latents)


def predict_eps_ddpm(host, x_t: torch.Tensor, timestep: int, cond, image_latents: torch.Tensor) -> torch.Tensor:
    """``predict_eps`` for x_t at SD's DDPM scale (√ᾱ·z + √(1−ᾱ)·ε), the input a DDPM UNet takes."""
    a = float(host.alphas_cumprod[timestep])
    return predict_eps(host, x_t.float() / a**0.5, timestep, cond, image_latents)
