"""User-facing errors: each carries one line that the CLI and host UIs print as-is."""

import sys


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


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's message cut to its first line and ``limit`` characters, or its type's name where it has none:
    what a one-line error quotes of a library's multi-line one."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def describe(error: BaseException) -> str:
    """One line for an unexpected error: out of memory, a file system error, or its type and first line."""
    torch = sys.modules.get("torch")  # not imported here: an interrupted import of it may be what failed
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", ())
    if (oom and isinstance(error, oom)) or "out of memory" in str(error).lower():
        return "out of memory; try a smaller --resolution, --dtype fp16, or --offload"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
