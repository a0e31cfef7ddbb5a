"""Image input normalisation and the model's working size."""

from __future__ import annotations

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


def _pil_to_array(img) -> np.ndarray:
    # RGBA/LA drop alpha (the mask is about the pixels); palette, 16-bit and gray become 8-bit RGB.
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        a = a / (65535.0 if a.max() > 255 else 255.0)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file upright (EXIF orientation applied) as float RGB [H, W, 3] in [0, 1]; raises ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            # A phone photo stores its pixels sideways plus an EXIF tag; viewers, ComfyUI's LoadImage and the
            # webui show it upright, so the mask must be upright too to line up with it.
            return _pil_to_array(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # ValueError: e.g. a malformed EXIF block
        raise ImageError(f"cannot read image {path}: {e}") from None


def check_image(path: str | Path) -> None:
    """Check that a file is a readable image without decoding its pixels; raises ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
            w, h = img.size
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"image {path} of {w}x{h} is too small; both sides need at least {MIN_SIDE} pixels")


def _as_hwc(x) -> np.ndarray | torch.Tensor:
    from PIL import Image

    if isinstance(x, (str, Path)):
        return load_image(x)
    if isinstance(x, Image.Image):
        return _pil_to_array(x)
    if isinstance(x, np.ndarray):
        a = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return a[..., None] if a.ndim == 2 else a
    if isinstance(x, torch.Tensor):
        return x[..., None] if x.dim() == 2 else x
    raise ImageError(f"unsupported image type {type(x).__name__}; pass a PIL image, an array, a tensor or a path")


def to_batch(images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
    """Normalise images to float [B, 3, H, W] in [0, 1].

    Tensors and arrays follow ComfyUI's IMAGE layout: [B, H, W, C] or [H, W, C], channels 1, 3 or 4.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ImageError("no images given")
    parts = []
    for item in items:
        a = _as_hwc(item)
        t = torch.as_tensor(a).float() if not isinstance(a, torch.Tensor) else a.detach().float().cpu()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[-1] not in (1, 2, 3, 4):
            raise ImageError(f"expected images shaped [B, H, W, C] with 1-4 channels, got {tuple(t.shape)}")
        c = t.shape[-1]
        t = t[..., :3] if c >= 3 else t[..., :1].expand(*t.shape[:-1], 3)  # drop alpha; gray -> RGB
        parts.append(t)
    sizes = {tuple(p.shape[1:3]) for p in parts}
    if len(sizes) > 1:
        raise ImageError(f"images in one batch must share a size, got {sorted(sizes)}; mask them one call each")
    batch = torch.cat(parts).permute(0, 3, 1, 2).contiguous()
    h, w = batch.shape[-2:]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"image of {w}x{h} is too small; both sides need at least {MIN_SIDE} pixels")
    if not torch.isfinite(batch).all():
        raise ImageError("image contains NaN or infinite values")
    return batch.clamp(0, 1)


def working_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The model's input size: about ``resolution``² pixels, the image's aspect, sides a multiple of ``multiple``."""
    scale = resolution / math.sqrt(height * width)
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    return h, w
