"""The contract's default sampler (``textmask.sampling``), which the webuis use for OVDiff's support images:
DPM-Solver++(2M) against diffusers' own scheduler on the same model, per-image seeds, and the webui host."""

import pytest
import torch

import tiny_models
from textmask import TextMasker, forward, sampling
from textmask.schedule import image_noise


@pytest.fixture(scope="module")
def host():
    return TextMasker.from_pipe(tiny_models.sd1_pipe(), resolution=64).host


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_dpmpp_2m_matches_diffusers_scheduler(host, steps):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, linspace spacing) is the same solver in VP
    form; started from the same noise it lands on the same latents."""
    cfg, seed = 5.0, 3
    expected = host.sample("a cat", "", 2, steps=steps, cfg=cfg, seed=seed)  # diffusers' scheduler
    sigmas = sampling.timestep_sigmas(host, steps)
    assert sigmas[-1] == 0 and bool((sigmas[:-1].diff() < 0).all())
    # diffusers starts from unit-variance noise at t = 999; in x = z + σ·ε units that is ε·√(1 + σ_max²)
    x = image_noise((4, 32, 32), seed, 2) * float((1 + sigmas[0].double() ** 2).sqrt())
    both = forward.encode_prompts(host, ["", "a cat"]).select([0, 0, 1, 1])

    def guided(x, sigma):
        uncond, cond = host.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both, None).float().chunk(2)
        return uncond + cfg * (cond - uncond)

    got = sampling.dpmpp_2m(guided, x, sigmas)
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 1e-5 * scale


def test_sample_is_per_image_seeded_and_interruptible(host, monkeypatch):
    both = sampling.sample(host, "a cat", "blurry", 2, steps=3, cfg=4.0, seed=10)
    one = sampling.sample(host, "a cat", "blurry", 1, steps=3, cfg=4.0, seed=11)
    assert both.shape == (2, 4, 32, 32) and both.dtype == host.dtype
    assert (both[1:] - one).abs().max() < 1e-5 * one.abs().max()  # image i is seeded seed + i, whatever the batch
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(host, "check_interrupt", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sampling.sample(host, "a cat", "", 1, steps=3, cfg=4.0, seed=0)


def test_non_finite_sampling_is_an_error(host, monkeypatch):
    from textmask.errors import TextMaskError

    monkeypatch.setattr(host, "denoise", lambda x, sigma, cond, latents: torch.full_like(x, float("nan")))
    with pytest.raises(TextMaskError, match="sampled latents came out NaN"):
        sampling.sample(host, "a cat", "", 1, steps=2, cfg=4.0, seed=0)
