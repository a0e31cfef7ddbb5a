"""textmask: text-prompted masks made by the Stable Diffusion model you already have loaded."""

from . import defaults
from .errors import CheckpointError, ImageError, PhraseNotFoundError, PromptSyntaxError, TextMaskError

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
_LAZY = {"TextMasker": "masker", "MaskResult": "results", "SegmentsResult": "results", "LabelsResult": "results",
         "ReferResult": "results"}


def __getattr__(name: str):
    # torch loads on first use, not on import: the CLI answers --help and Ctrl-C at once.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'textmask' has no attribute {name!r}")
