"""Every option's bounds, checked here for every face (API, CLI, ComfyUI nodes, webui script, app).

Each check returns the value in its canonical type or raises a ``TextMaskError`` whose one line names the option,
its range and what was given. The bounds are documented in the README's options table.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from .errors import TextMaskError

# The working resolution's bounds, in pixels. The self-attention aggregate that refine, segments and refer keep is
# (side / 8)⁴ floats: 1 GiB at 1024 px, 16 GiB at 2048 px, so 2048 is the most any of them can hold.
MIN_RESOLUTION, MAX_RESOLUTION = 32, 2048
SEED_MODULUS = 2**63  # seeds are taken modulo this: every torch generator takes them, image i adding i
MAX_TAU = 100.0
MAX_CUT = 2.0  # a normalised cut lies in [0, 2]
MAX_CFG = 100.0
MAX_SUPPORT_IMAGES, MAX_STEPS = 1024, 1000
MAX_BATCH = 4096
MAX_TEMPORAL = 64.0  # frames; wider smoothing than this would average a clip's motion away


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(str(value).strip())
        except ValueError:
            raise TextMaskError(f"{name} must be a number, got {value!r}") from None
    try:
        value = float(value)
    except OverflowError:  # an int beyond a float's range
        raise TextMaskError(f"{name} must be a number of sensible size, got one of {len(str(value))} digits") from None
    if not math.isfinite(value):
        raise TextMaskError(f"{name} must be a finite number, got {value}")
    return value


def _integer(name: str, value: Any) -> int:
    number = _number(name, value)
    if number != int(number):
        raise TextMaskError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def in_range(name: str, value: Any, lo: float, hi: float, *, integer: bool = False, unit: str = "") -> float | int:
    """``value`` as a finite number (an int with ``integer``) in [lo, hi]; raises TextMaskError otherwise."""
    number = _integer(name, value) if integer else _number(name, value)
    if not lo <= number <= hi:
        shown = (lambda v: f"{int(v)}" if integer or float(v).is_integer() else f"{v:g}")
        raise TextMaskError(f"{name} must be in [{shown(lo)}, {shown(hi)}]{unit}, got {value!r}")
    return number


def diagonal(size: tuple[int, int]) -> int:
    """The diagonal of an image of ``size`` = (H, W), in whole pixels."""
    return math.ceil(math.hypot(*size))


def blur(value: Any, size: tuple[int, int]) -> float:
    """The feather's σ in pixels: 0 up to the image's diagonal."""
    return in_range("blur", value, 0, diagonal(size), unit=" pixels (up to the image's diagonal)")


def grow(value: Any, size: tuple[int, int]) -> float:
    """Pixels to grow (negative: shrink) the mask by: at most the image's diagonal either way."""
    d = diagonal(size)
    return in_range("grow", value, -d, d, unit=" pixels (the image's diagonal either way)")


def min_presence(value: Any) -> float:
    """The presence below which a phrase selects nothing, in [0, 1] (``CrossAttentionMaps.presence``); 0 is off."""
    return in_range("min_presence", value, 0.0, 1.0)


def temporal(value: Any) -> float:
    """σ, in frames, of the Gaussian that smooths a batch's maps over neighbouring frames: 0 (off) to 64."""
    return in_range("temporal", value, 0, MAX_TEMPORAL, unit=" frames (0 = off)")


def resolution(value: Any) -> int | None:
    """The working resolution in pixels, or None (the model's native one); 0 also means native (ComfyUI's)."""
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0):
        return None
    return in_range("resolution", value, MIN_RESOLUTION, MAX_RESOLUTION, integer=True, unit=" pixels")


def flag(name: str, value: Any) -> bool:
    """A switch: True or False (numpy's booleans and the integers 0 and 1 too); "no" or "false" is refused rather than
    read as true."""
    if isinstance(value, int) and value in (0, 1) or type(value).__name__ in ("bool", "bool_"):  # numpy's too
        return bool(value)
    raise TextMaskError(f"{name} must be True or False, got {value!r}")


def flags(**values: Any) -> tuple[bool, ...]:
    """``flag`` of each named value, in order."""
    return tuple(flag(name, value) for name, value in values.items())


def timestep(value: Any) -> int:
    """A noise level: a whole timestep in [0, 999]."""
    return in_range("timestep", value, 0, 999, integer=True)


def seed(value: Any) -> int:
    """A seed: any whole number, taken modulo 2⁶³ (so 2**70 and -1 are usable, and the same every time)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value % SEED_MODULUS  # exact at any size, where a float would round or overflow
    return _integer("seed", value) % SEED_MODULUS


def tau(value: Any) -> float:
    """DiffSeg's KL merge threshold: positive (lower gives more segments)."""
    number = in_range("tau", value, 0, MAX_TAU)
    if number <= 0:
        raise TextMaskError(f"tau must be in (0, {MAX_TAU:g}], got {value!r}")
    return number


SEGMENTERS = ("diffcut", "diffseg")


def segmenter(value: Any) -> str:
    """How segments are found: "diffcut" or "diffseg"."""
    if not isinstance(value, str) or value.strip().lower() not in SEGMENTERS:
        raise TextMaskError(f"segmenter must be one of {', '.join(SEGMENTERS)}, got {value!r}")
    return value.strip().lower()


def cut(value: Any) -> float:
    """DiffCut's stopping threshold on the normalised cut, in (0, 2] (the cut's range; higher gives more segments)."""
    number = in_range("cut", value, 0, MAX_CUT)
    if number <= 0:
        raise TextMaskError(f"cut must be in (0, {MAX_CUT:g}], got {value!r}")
    return number


def cfg(value: Any) -> float:
    """A guidance scale in [0, 100]."""
    return in_range("cfg", value, 0, MAX_CFG)


def alpha(value: Any) -> float:
    """Ref-Diff's weight of the generative score against CLIP's, in [0, 1]."""
    return in_range("alpha", value, 0, 1)


def names(value: Any, what: str = "names", one: str = "name") -> list[str]:
    """A list of words (named segments' names, OVDiff's classes), stripped: at least one, none empty, no two the
    same but for case; ``what`` and ``one`` name them in the errors."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise TextMaskError(f"{what} must be a list of words, e.g. ['sky', 'person'], not {type(value).__name__} "
                            f"{str(value)[:40]!r}")
    words = [readable(what, n).strip() for n in value]
    if not words or any(not n for n in words):
        raise TextMaskError(f"give at least one {one}, and no empty {what}")
    hidden = [n for n in words if not visible(n)]
    if hidden:
        raise TextMaskError(f"the {one} {hidden[0]!r} is only invisible characters; type words")
    lower = [n.lower() for n in words]
    dupes = sorted({n for n in words if lower.count(n.lower()) > 1})
    if dupes:
        raise TextMaskError(f"duplicate {what}: {', '.join(dupes)}")
    return words


def text(name: str, value: Any) -> str | None:
    """An optional text option (the caption to condition on): a string a tokenizer can read (``readable``), or
    None."""
    if value is not None and not isinstance(value, str):
        raise TextMaskError(f"{name} must be text or None, got {type(value).__name__} {str(value)[:40]!r}")
    return value if value is None else readable(name, value)


def visible(text: str) -> bool:
    """Whether ``text`` has a character one can see: not only spaces, controls or format characters (U+200B zero
    width space, U+FEFF, U+202E, ...), which a tokenizer reads as bytes no picture holds."""
    return any(unicodedata.category(c)[0] not in "CZ" for c in text)


def expression(value: Any) -> str:
    """A referring expression: readable text with something visible in it."""
    if not isinstance(value, str) or not visible(readable("the referring expression", value)):
        raise TextMaskError("the referring expression is empty")
    return value


def readable(name: str, value: str) -> str:
    """``value`` if every character of it is one (UTF-8 encodable); a lone surrogate, which is what Python makes of a
    byte that was not UTF-8 on a command line (or a JSON "\\ud800"), is refused naming its column."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextMaskError(f"{name} holds a byte that is not UTF-8 text at column {e.start + 1} (a terminal or file "
                            "in another encoding?); retype it, or save the text as UTF-8") from None
    return value


def latents_fit(image_size: tuple[int, int], latent_size: tuple[int, int], latent_factor: int) -> None:
    """Latents of (h, w) cells are of an image of ``image_size`` = (H, W) pixels at some scale, within a cell a side
    (VAE Encode floors each side to whole cells, a latent upscale scales the floored ones); one line otherwise:
    latents of another image would mask the wrong pixels."""
    (big_h, big_w), (h, w), f = image_size, latent_size, latent_factor
    lowest, highest = max((h - 1) * f / big_h, (w - 1) * f / big_w), min((h + 1) * f / big_h, (w + 1) * f / big_w)
    if lowest >= highest:
        raise TextMaskError(f"latents of {w}x{h} cells ({w * f}x{h * f} pixels) are not of this {big_w}x{big_h} "
                            "image at any scale; give the image's own latents (VAE Encode of it), or none")


def latents(value: Any, images: int, geometry) -> Any:
    """Latents given in place of encoding ``images`` images: a tensor [1 or images, C, h, w] with the model's latent
    channels (``geometry``: the host's ``Geometry``), ``MIN_RESOLUTION`` to ``MAX_RESOLUTION`` pixels a side."""
    import torch

    channels = 4 if geometry.in_channels == 9 else geometry.in_channels  # an inpainting UNet's latents are SD's 4
    if not isinstance(value, torch.Tensor) or value.is_nested or value.layout != torch.strided or value.is_meta \
            or not value.is_floating_point() or value.dim() != 4 or value.shape[0] not in (1, images) \
            or value.shape[1] != channels:
        dense = isinstance(value, torch.Tensor) and not value.is_nested
        got = f"{tuple(value.shape)} {value.dtype}" if dense else type(value).__name__
        batch = "1" if images == 1 else f"{images} or 1"
        raise TextMaskError(f"latents must be a float tensor [{batch}, {channels}, h, w] of this model's latent "
                            f"space for {images} image(s), got {got}")
    side = max(value.shape[-2:]) * geometry.latent_factor
    if side > MAX_RESOLUTION:
        raise TextMaskError(f"latents of {value.shape[-1]}x{value.shape[-2]} cells cover {side} pixels a side, over "
                            f"{MAX_RESOLUTION}; mask the image at a resolution up to {MAX_RESOLUTION} instead")
    limit = geometry.max_side
    if limit is not None and side > limit:
        raise TextMaskError(f"latents of {value.shape[-1]}x{value.shape[-2]} cells cover {side} pixels a side, "
                            f"past what this model's positions cover ({limit}); encode the image at {limit} pixels "
                            "a side or less")
    multiple = geometry.latent_multiple
    if value.shape[-2] % multiple or value.shape[-1] % multiple:
        raise TextMaskError(f"latents of {value.shape[-1]}x{value.shape[-2]} cells do not split into this model's "
                            f"{multiple}x{multiple} patches; encode the image at sides a multiple of "
                            f"{multiple * geometry.latent_factor} pixels")
    short = min(value.shape[-2:]) * geometry.latent_factor
    if short < MIN_RESOLUTION:
        raise TextMaskError(f"latents of {value.shape[-1]}x{value.shape[-2]} cells cover only {short} pixels a side, "
                            f"under {MIN_RESOLUTION}; encode the image at {MIN_RESOLUTION} pixels a side or more, or "
                            "leave the latent unconnected")
    return value


def count(name: str, value: Any, hi: int) -> int:
    """A whole number of things, 1 to ``hi``."""
    return in_range(name, value, 1, hi, integer=True)


def batch_size(value: Any) -> int:
    """Images (or windows) to a forward: 1 or more."""
    return count("batch_size", value, MAX_BATCH)


def device(value: Any):
    """A torch device this machine can compute on, as ``torch.device``: one line for a name torch does not know, for
    ``meta``, and for a device type it knows but has no such device for (cuda:3 on one GPU, xpu on a CUDA build)."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise TextMaskError(f"unknown device {value!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "meta":
        raise TextMaskError(f"device '{value}' holds shapes, not values: textmask cannot compute on it; use cpu, cuda "
                            "or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}.get(dev.type)
    if available is None:  # a type torch names (xpu, hpu, ...) but may not be built with: try one tensor
        try:
            torch.empty(0, device=dev)
            available = True
        except Exception:  # noqa: BLE001 - each backend fails in its own way (AssertionError, RuntimeError)
            available = False
    if not available:
        raise TextMaskError(f"device '{value}' is not available on this machine (torch {torch.__version__})")
    return dev
