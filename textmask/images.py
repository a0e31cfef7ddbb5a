"""Image input normalisation and the model's working size."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:
    import PIL.Image

from .errors import ImageError

ImageInput = Union["PIL.Image.Image", np.ndarray, torch.Tensor, str, Path]
MIN_SIDE = 8
# Files with these suffixes are images, for a single file and a folder alike.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# The most pixels a file may have: 8192² (a 16-bit 8K scan). PIL's own bomb guard stops at 89 MP with a warning
# and at 179 MP with an error; textmask refuses earlier, in one line. $TEXTMASK_MAX_PIXELS (or the CLI's
# --max-pixels) raises it for people who mean it.
MAX_PIXELS = 8192 * 8192


_limit: list[int] = []  # set by ``pixel_limit`` for the duration of one command


@contextlib.contextmanager
def pixel_limit(pixels: int | None):
    """Within this context, images may have up to ``pixels`` pixels (None: the limit in force stays)."""
    _limit.append(pixels) if pixels is not None else None
    try:
        yield
    finally:
        if pixels is not None:
            _limit.pop()


def max_pixels() -> int:
    """The pixel limit in force: ``pixel_limit``'s, else $TEXTMASK_MAX_PIXELS, else ``MAX_PIXELS``."""
    import os

    if _limit:
        return _limit[-1]
    value = os.environ.get("TEXTMASK_MAX_PIXELS", "")
    try:
        return max(1, int(value)) if value.strip() else MAX_PIXELS
    except ValueError:
        raise ImageError(f"TEXTMASK_MAX_PIXELS must be a whole number of pixels, got {value!r}") from None


def _scaled(a: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] from any numeric array: integers by their type's range, floats as they are (clipped later)."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        if info.min < 0:  # signed: the non-negative half is the image's range (int16 TIFFs, OpenCV's CV_16S)
            return np.clip(a.astype(np.float32), 0, None) / float(info.max)
        return a.astype(np.float32) / float(info.max)
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise ImageError(f"unsupported image data type {a.dtype}; pass integers or floats")


def _pil_to_array(img) -> np.ndarray:
    # RGBA/LA drop alpha (the mask is about the pixels); palette, 16-bit and gray become RGB in [0, 1].
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        top = a.max()  # "I" holds 8-, 16- or 32-bit data: guessed from its range; "I;16" says its own, dark or not
        scale = 65535.0 if img.mode != "I" or 255 < top <= 65535 else 255.0 if top <= 255 else np.iinfo(np.int32).max
        a = np.clip(a, 0, None) / float(scale)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":  # 32-bit float (TIFF): [0, 1] as it is, anything brighter scaled by its maximum
        a = np.asarray(img, dtype=np.float32)
        finite = a[np.isfinite(a)]
        top = float(finite.max()) if finite.size else 1.0
        a = a / top if top > 1.0 else a
        return np.repeat(a[..., None], 3, axis=-1)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except ValueError as e:  # a closed image, or a mode PIL cannot convert ("La")
        raise ImageError(f"cannot read this PIL image (mode {img.mode}): {str(e).splitlines()[0]}") from None


def unreadable(path: str | Path, error: Exception) -> ImageError:
    """The one-line error for an image file PIL cannot read."""
    return ImageError(f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


@contextlib.contextmanager
def _reading(path: str | Path):
    """Turn what PIL raises while reading ``path`` into textmask's one-line ``ImageError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise unreadable(path, e) from None


def _regular_file(path: str | Path) -> None:
    """Refuse, in one line, a path that is a folder, a pipe, a socket or a device: reading a pipe waits for a writer
    forever, and a device never ends."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return  # missing or unreadable: Image.open says which, in the caller's one line
    if stat.S_ISDIR(mode):
        raise ImageError(f"image {path} is a folder; pass an image file (the CLI takes a folder of images)")
    if not stat.S_ISREG(mode):
        raise ImageError(f"image {path} is not a regular file (a pipe, socket or device); save the image to a file")


def _open(path: str | Path):
    """PIL's image object for ``path`` (a regular file) with its size checked against the pixel limit, before
    decoding."""
    import warnings

    from PIL import Image

    _regular_file(path)

    default = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():  # textmask's own limit, below, replaces PIL's bomb warning and error
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = default
    limit = max_pixels()
    if img.size[0] * img.size[1] > limit:
        w, h = img.size
        img.close()
        raise ImageError(f"image {path} has {w}x{h} pixels, over the limit of {limit:,}; resize it, or raise the limit "
                         "with --max-pixels (or $TEXTMASK_MAX_PIXELS)")
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":  # a phone's MPO JPEG is one photo plus previews; others are frames
        img.close()
        raise ImageError(f"{path} holds {frames} frames (an animation or pages); textmask masks one picture a file: "
                         "save the frames as images (e.g. ffmpeg -i in.gif frames/%04d.png) and pass their folder")
    return img


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file upright (EXIF orientation applied) as float RGB [H, W, 3] in [0, 1]; raises ImageError."""
    from PIL import ImageOps

    with _reading(path), _open(path) as img:
        img.load()
        # A phone photo stores its pixels sideways plus an EXIF tag; viewers, ComfyUI's LoadImage and the webui show
        # it upright, so the mask must be upright too to line up with it.
        return _pil_to_array(ImageOps.exif_transpose(img))


def check_image(path: str | Path) -> tuple[int, int]:
    """Check that a file is an image the masker will read, by reading it as the masker does (``load_image``, whose
    pixel limit applies before decoding, then ``to_batch``), so that a truncated file or NaN pixels fail before a
    folder run starts rather than midway; returns its (H, W) as shown (EXIF orientation applied); raises ImageError.
    The pixels are dropped: a folder's images are checked one at a time."""
    try:
        h, w = to_batch(load_image(path)).shape[-2:]
    except ImageError as e:
        raise ImageError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    return int(h), int(w)


def _as_hwc(x) -> np.ndarray | torch.Tensor:
    from PIL import Image

    if isinstance(x, (str, Path)):
        return load_image(x)
    if isinstance(x, Image.Image):
        return _pil_to_array(x)
    if isinstance(x, np.ndarray):
        a = _scaled(x)
        return a[..., None] if a.ndim == 2 else a
    if isinstance(x, torch.Tensor):
        if x.is_nested or x.layout != torch.strided or x.is_meta:  # no pixels to read as an array
            kind = "nested" if x.is_nested else "meta" if x.is_meta else str(x.layout).removeprefix("torch.")
            raise ImageError(f"a {kind} tensor holds no pixels to read; pass a dense tensor of the image")
        if x.is_complex():
            raise ImageError(f"unsupported image data type {x.dtype}; pass integers or floats")
        if x.is_quantized:  # its float values are the picture
            x = x.dequantize()
        if x.dtype == torch.bool:
            x = x.float()
        elif not x.is_floating_point():  # integers: scaled by their type's range, like arrays
            x = x.float().clamp_min(0) / float(torch.iinfo(x.dtype).max)
        return x[..., None] if x.dim() == 2 else x
    raise ImageError(f"unsupported image type {type(x).__name__}; pass a PIL image, an array, a tensor or a path")


def rgb(image: torch.Tensor) -> torch.Tensor:
    """[..., H, W, C] with 1-4 channels (gray, gray + alpha, RGB, RGBA) -> [..., H, W, 3]: alpha dropped (the mask is
    about the pixels), gray repeated."""
    c = image.shape[-1]
    return image[..., :3] if c >= 3 else image[..., :1].expand(*image.shape[:-1], 3)


def to_batch(images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
    """Normalise images to float [B, 3, H, W] in [0, 1].

    Tensors and arrays follow ComfyUI's IMAGE layout: [B, H, W, C] or [H, W, C], channels 1 to 4 (``rgb``).
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageError("no images given")
    parts = []
    for item in items:
        a = _as_hwc(item)
        t = torch.as_tensor(a).float() if not isinstance(a, torch.Tensor) else a.detach().float().cpu()
        shape = tuple(t.shape)
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[-1] not in (1, 2, 3, 4):
            raise ImageError(f"expected images shaped [B, H, W, C] with 1-4 channels, got {shape}"
                             + ("; channels go last: x.permute(1, 2, 0) of [C, H, W], x.permute(0, 2, 3, 1) of "
                                "[B, C, H, W]" if t.dim() == 4 and t.shape[1] in (1, 3, 4) else ""))
        parts.append(rgb(t))
    sizes = {tuple(p.shape[1:3]) for p in parts}
    if len(sizes) > 1:
        raise ImageError(f"images in one batch must share a size, got {sorted(sizes)}; mask them one call each")
    batch = torch.cat(parts).permute(0, 3, 1, 2).contiguous()
    if batch.shape[0] == 0:
        raise ImageError("the image batch is empty; give at least one image")
    h, w = batch.shape[-2:]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"image of {w}x{h} is too small; both sides need at least {MIN_SIDE} pixels")
    if not torch.isfinite(batch).all():
        raise ImageError("image contains NaN or infinite values")
    check_range(batch)
    return batch.clamp(0, 1)


# Float pixels are [0, 1]; a resampling filter's overshoot is clipped, but values past this band are another
# convention (0-255 floats, or diffusers' [-1, 1]) that clipping would turn into a white or half-black picture.
FLOAT_BAND = (-0.5, 1.5)


def check_range(batch: torch.Tensor) -> None:
    """Refuse pixels [B, 3, H, W] outside ``FLOAT_BAND`` in one line that says how to bring them to [0, 1]."""
    lo, hi = float(batch.min()), float(batch.max())
    if lo < FLOAT_BAND[0] or hi > FLOAT_BAND[1]:
        raise ImageError(f"image values run from {lo:.4g} to {hi:.4g}, but float images are read as [0, 1]: divide "
                         "0-255 values by 255, map [-1, 1] ones with (x + 1) / 2, or pass integers (uint8)")


def working_size(height: int, width: int, resolution: int, multiple: int,
                 max_side: int | None = None) -> tuple[int, int]:
    """The model's input size: about ``resolution``² pixels, the image's aspect, sides a multiple of ``multiple``,
    and no side over ``max_side`` (a model whose positions end there: a long image is then worked on smaller)."""
    scale = resolution / math.sqrt(height * width)
    if max_side is not None:
        scale = min(scale, max_side / max(height, width))
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    if max_side is not None:  # rounding to the multiple may cross the limit
        h, w = min(h, max_side // multiple * multiple), min(w, max_side // multiple * multiple)
    return h, w
