"""User-facing errors: each carries one line that the CLI and host UIs print as-is."""


# Non-finite values mean a broken encoder or a setting that divides by zero, never "nothing here": an empty mask
# would hide it, so they stop the mask with the likely cause.
NONFINITE_HINT = ("run the model in float32 or bfloat16, or use an fp16-fixed VAE; in Forge, set the emphasis "
                  "option to 'No norm' (its normalisation divides by the conditioning's mean, 0 on some checkpoints)")


class TextMaskError(ValueError):
    """Base for every error caused by bad input; its message is one readable line."""


class PromptSyntaxError(TextMaskError):
    """The mask prompt does not parse; the message names the column."""

    def __init__(self, message: str, column: int):
        super().__init__(f"mask prompt syntax error at column {column}: {message}")
        self.column = column


class PhraseNotFoundError(TextMaskError):
    """A phrase of the mask prompt does not occur in the conditioning prompt."""


class CheckpointError(TextMaskError):
    """A checkpoint is missing, corrupt, or of an unknown architecture."""


class ImageError(TextMaskError):
    """An input image cannot be used (unreadable, too small, mixed sizes in one batch)."""


class CaptureError(TextMaskError):
    """Attention cannot be captured from this model (e.g. fused projections or a compiled UNet)."""
