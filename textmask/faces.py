"""What the one-box faces share (the webui scripts, the app): one mask per image from a mask prompt, by any method.

``attention``, ``noise-diff`` and ``ld-znet`` read the prompt language (``|``, AND, NOT) through
``TextMasker.mask``. ``refer`` takes the whole prompt as one referring expression ("the man on the left").
``named segments`` and ``ovdiff`` label every pixel with one of a list of names and select the prompt's phrases,
combined by the same language: the names are the prompt's phrases plus ``names``, the other things in the picture
that compete for its pixels. Every method's mask is then grown, inverted and blurred alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import mask_prompt as mp
from . import defaults, options
from . import postprocess as pp
from .errors import TextMaskError
from .methods import METHODS
from .ovdiff.classes import parse_class
from .results import MaskResult

REFER, NAMED, OVDIFF = "refer", "named segments", "ovdiff"
FACE_METHODS = (*METHODS, REFER, NAMED, OVDIFF)


def name_list(text: str | Sequence[str] | None) -> list[str]:
    """Comma- or newline-separated names (or a list of them), stripped, blanks dropped."""
    if text is None:
        return []
    if not isinstance(text, (str, list, tuple)) or not all(isinstance(n, str) for n in text):
        raise TextMaskError(f"names must be comma-separated text or a list of words, got {type(text).__name__} "
                            f"{str(text)[:40]!r}")
    parts = text.replace("\n", ",").split(",") if isinstance(text, str) else list(text)
    return [p.strip() for p in parts if p and p.strip()]


def mask_any(masker, image, prompt: str, *, method: str = defaults.METHOD, negative: str | None = None,
             names: str | Sequence[str] | None = None, ldznet: Any = None, refine: bool | None = None,
             threshold: float | str = defaults.THRESHOLD, soft: bool = False, blur: float = 0.0, grow: float = 0.0,
             invert: bool = False, seed: int = 0, ovdiff_images: int = defaults.OVDIFF_IMAGES,
             cache_dir: str | Path | None = None, min_presence: float = defaults.MIN_PRESENCE) -> MaskResult:
    """The ``MaskResult`` of ``prompt`` on ``image`` (one image, or a batch of one size) by ``method``.

    ``threshold`` and ``soft`` shape the attention methods' maps; the segment methods' masks are already binary.
    ``min_presence`` (``attention`` only; 0 = off) empties the phrases whose presence score is below it.
    ``ovdiff`` builds (or reuses from ``cache_dir``) prototypes of ``ovdiff_images`` support images per name,
    sampled by the host.
    """
    if not prompt or not str(prompt).strip():
        raise TextMaskError("type what to mask")
    # checked for every method, though only the attention methods read threshold, soft and refine
    pp.parse_threshold(threshold)
    soft, invert = options.flags(soft=soft, invert=invert)
    refine = None if refine is None else options.flag("refine", refine)
    negative = options.text("the negative mask prompt", negative)
    if method in (REFER, NAMED, OVDIFF):  # they measure no presence
        pp.presence_gate(None, options.min_presence(min_presence))
    if method in METHODS:
        kwargs: dict[str, Any] = {"ldznet": ldznet} if method == "ld-znet" else {}
        return masker.mask(image, prompt, method=method, negative=negative, refine=refine, threshold=threshold,
                           soft=soft, blur=blur, grow=grow, invert=invert, seed=seed, min_presence=min_presence,
                           **kwargs)
    if method == REFER:
        if negative and negative.strip():
            raise TextMaskError("refer selects the one object its expression names; leave the negative mask prompt "
                                "empty (it works with attention, noise-diff and ld-znet)")
        res = masker.refer(image, prompt, seed=seed)
        masks, heat, terms = res.masks, res.heatmaps, {res.subject: res.heatmaps}
    elif method in (NAMED, OVDIFF):
        expr = mp.with_negative(mp.parse(prompt), negative)
        selected = mp.phrases(expr)
        vocabulary = selected + [n for n in name_list(names) if n.lower() not in {p.lower() for p in selected}]
        if method == NAMED:  # a name's stuff/thing kind ("sky:stuff") is OVDiff's; named segments read the name
            kept = {}
            for n in vocabulary:
                kept.setdefault(parse_class(n)[0].lower(), parse_class(n)[0])
            res = masker.named_segments(image, list(kept.values()), seed=seed)
        else:
            prototypes = masker.build_prototypes(vocabulary, images=ovdiff_images, seed=seed, cache_dir=cache_dir)
            res = masker.ovdiff(image, prototypes, seed=seed)
        index = {n.lower(): i for i, n in enumerate(res.names)}
        per_name = res.masks.float()
        masks = mp.evaluate(expr, lambda p: per_name[:, index[parse_class(p)[0].lower()]])  # "sky:stuff" is sky
        heat, terms = masks, {n: per_name[:, i] for i, n in enumerate(res.names)}
    else:
        raise TextMaskError(f"unknown method {method!r}; choose one of {', '.join(FACE_METHODS)}")
    size = tuple(masks.shape[-2:])
    masks = pp.postprocess(masks.float(), grow_px=options.grow(grow, size), invert_mask=invert,
                           blur_px=options.blur(blur, size))
    return MaskResult(masks=masks.contiguous(), heatmaps=heat.float().contiguous(), terms=terms)
