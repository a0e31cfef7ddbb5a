"""textmask: text-prompted masks made by the Stable Diffusion model you already have loaded."""

from .errors import CheckpointError, ImageError, PhraseNotFoundError, PromptSyntaxError, TextMaskError
from .masker import DEFAULT_TIMESTEP, MaskResult, TextMasker

__version__ = "0.1.0"
__all__ = [
    "TextMasker",
    "MaskResult",
    "DEFAULT_TIMESTEP",
    "TextMaskError",
    "PromptSyntaxError",
    "PhraseNotFoundError",
    "CheckpointError",
    "ImageError",
]
