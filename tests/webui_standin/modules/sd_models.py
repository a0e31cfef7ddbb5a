"""Stand-in of modules/sd_models.py: the zero-terminal-SNR rescale of ᾱ that processing applies per batch."""

import torch


def rescale_zero_terminal_snr_abar(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift √ᾱ so its last value is 0 and rescale it so its first is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * (first / (first - last))) ** 2
    abar[-1] = 4.8973451890853435e-08  # the webui's floor, so the last σ stays finite
    return abar
