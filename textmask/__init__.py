"""textmask: text-prompted masks made by the Stable Diffusion model you already have loaded."""

from . import defaults
from .errors import CheckpointError, ImageError, PhraseNotFoundError, PromptSyntaxError, TextMaskError
from .masker import TextMasker
from .results import LabelsResult, MaskResult, ReferResult, SegmentsResult

DEFAULT_TIMESTEP = defaults.TIMESTEP  # the attention and noise-diff forwards' noise level

__version__ = "0.1.0"
__all__ = [
    "TextMasker",
    "MaskResult",
    "SegmentsResult",
    "LabelsResult",
    "ReferResult",
    "DEFAULT_TIMESTEP",
    "defaults",
    "TextMaskError",
    "PromptSyntaxError",
    "PhraseNotFoundError",
    "CheckpointError",
    "ImageError",
]
