"""TextMasker: text-prompted masks from the host's own UNet, VAE and text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from . import mask_prompt as mp
from . import postprocess as pp
from .capture import AttentionCapture
from .errors import TextMaskError
from .hosts.base import Conditioning, Host, iter_chunks
from .images import ImageInput, to_batch, working_size
from .latents import encode_and_noise
from .ldznet.inference import DEFAULT_TIMESTEP as LDZNET_TIMESTEP
from .methods import METHODS, CrossAttentionMaps, SelfAttentionAggregate, noise_difference, refine_with_self_attention

# t=300 of 1000: ᾱ≈0.52 under SD's schedule, so the latent still shows every object's outline while the
# UNet must lean on the text to explain the noise; at t≈100 the maps sharpen but small objects fade from
# them, past t≈500 the layout itself dissolves. The Shapes sweep (bench/shapes_eval.py --sweep, 25 scenes) leans
# slightly to small t (AUC 0.88, 0.87, 0.86, 0.85, 0.84, 0.82 for t = 100…600); t=300 is kept for real images' small
# objects, 0.02 AUC from the best (see MODEL_CARD.md).
DEFAULT_TIMESTEP = 300
# Refinement (see refine_with_self_attention): AggSD's row-normalised SAᵀ·CA, one step. The Shapes sweep gave
# IoU/AUC transpose-1 0.37/0.91, transpose-2 0.36/0.89, forward-1 0.38/0.91, forward-2 0.36/0.89: one step beats
# two, and the two forms are within noise of each other, so the paper's form is kept.
REFINE_MODE = "transpose"
REFINE_STEPS = 1


@dataclass
class MaskResult:
    """Masks and heatmaps at the input images' exact size."""

    masks: torch.Tensor  # [B, H, W] in [0, 1], 1 = selected (inpaint)
    heatmaps: torch.Tensor  # [B, H, W], the combined soft map before thresholding
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # phrase -> [B, H, W] normalised heatmap


def attention_prompt(terms: Sequence[str]) -> str:
    """The AggSD prompt template: "a photo of A, B, and C" (commas separate the words' maps)."""
    if len(terms) == 1:
        return f"a photo of {terms[0]}"
    return "a photo of " + ", ".join(terms[:-1]) + f", and {terms[-1]}"


class TextMasker:
    """Masks from words, made by an already-loaded Stable Diffusion model."""

    def __init__(self, host: Host):
        self.host = host

    @classmethod
    def from_single_file(cls, path: str | Path, **kwargs) -> "TextMasker":
        """Load an SD1/SD2/SDXL .safetensors (or .ckpt) checkpoint through the diffusers host, offline."""
        from .hosts.diffusers import DiffusersHost

        return cls(DiffusersHost.from_single_file(path, **kwargs))

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "TextMasker":
        """Load a diffusers-format model folder, offline."""
        from .hosts.diffusers import DiffusersHost

        return cls(DiffusersHost.from_pretrained(directory, **kwargs))

    @classmethod
    def from_pipe(cls, pipe, **kwargs) -> "TextMasker":
        """Reuse the modules of an existing diffusers pipeline."""
        from .hosts.diffusers import DiffusersHost

        return cls(DiffusersHost.from_pipe(pipe, **kwargs))

    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def mask(
        self,
        images: ImageInput | Sequence[ImageInput],
        mask_prompt: str,
        *,
        negative: str | None = None,
        prompt: str | None = None,
        method: Literal["attention", "noise-diff", "ld-znet"] = "attention",
        refine: bool = False,
        threshold: float | str = "auto",
        soft: bool = False,
        blur: float = 0.0,
        grow: float = 0.0,
        fill_holes: bool = False,
        invert: bool = False,
        timestep: int | None = None,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 4,
        latents: torch.Tensor | None = None,
        ldznet=None,
        template: str | None = None,
    ) -> MaskResult:
        """Mask what ``mask_prompt`` names in each image; see README for the prompt language.

        ``latents`` (the host's latent space, one per image) replaces encoding the images; the host's
        ``latent_region`` says which pixels they cover (ComfyUI's VAE Encode crops to multiples of 8).
        ``method="ld-znet"`` needs ``ldznet`` (an LDZNet or the path of its .safetensors) and reads each phrase
        through ``template`` (default "a photo of a {}."); its "auto" threshold is 0.5 on the sigmoid.
        """
        if method not in METHODS:
            raise TextMaskError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
        if timestep is None:
            timestep = LDZNET_TIMESTEP if method == "ld-znet" else DEFAULT_TIMESTEP
        if not 0 <= int(timestep) < 1000:
            raise TextMaskError(f"timestep must be in [0, 999], got {timestep}")
        threshold = pp.parse_threshold(threshold)
        if method == "ld-znet":
            return self._mask_ldznet(images, mask_prompt, negative, ldznet, template, threshold, soft, blur, grow,
                                     fill_holes, invert, timestep, seed, resolution, batch_size, latents)
        expr = mp.with_negative(mp.parse(mask_prompt), negative)
        terms = mp.phrases(expr)
        pixels = to_batch(images)
        height, width = pixels.shape[-2:]
        size = working_size(height, width, resolution or self.host.resolution, self.host.size_multiple)

        region = (0, 0, height, width)
        if latents is not None:
            if latents.dim() != 4 or latents.shape[0] not in (1, pixels.shape[0]):
                raise TextMaskError(f"latents of shape {tuple(latents.shape)} do not match {pixels.shape[0]} image(s)")
            latents = latents.expand(pixels.shape[0], -1, -1, -1)
            region = getattr(self.host, "latent_region", lambda hw, lhw: (0, 0, *hw))((height, width), latents.shape[-2:])

        cond = self._conditioning(method, terms, prompt)
        heat_parts = []
        with self.host.progress(pixels.shape[0], "textmask") as bar:
            for rows in iter_chunks(pixels.shape[0], batch_size):
                self.host.check_interrupt()
                given = latents[rows] if latents is not None else None
                heat_parts.append(
                    self._heatmaps(pixels[rows], size, method, cond, refine, timestep, seed + rows.start, given)
                )
                bar.update(rows.stop - rows.start)
        low = torch.cat(heat_parts)  # [B, P, h, w] normalised
        return self._finish(expr, terms, low, (height, width), region, threshold, soft, blur, grow, fill_holes, invert)

    def segments(self, images, *, tau: float = 1.1, kmeans: bool = False, timestep: int = DEFAULT_TIMESTEP,
                 seed: int = 0, resolution: int | None = None, batch_size: int = 1):
        """Segment everything (DiffSeg): a label map and one mask per segment, largest first, per image."""
        from .segments import segment_everything

        return segment_everything(self.host, images, tau=tau, kmeans=kmeans, timestep=timestep, seed=seed,
                                  resolution=resolution, batch_size=batch_size)

    def semantic(self, images, names: Sequence[str], *, tau: float = 1.1, timestep: int = DEFAULT_TIMESTEP,
                 seed: int = 0, resolution: int | None = None, batch_size: int = 1):
        """Named segments: DiffSeg segments labelled with ``names`` (or background); one mask per name."""
        from .segments import named_segments

        return named_segments(self.host, images, names, tau=tau, timestep=timestep, seed=seed,
                              resolution=resolution, batch_size=batch_size)

    def refer(self, images, expression: str, *, clip=None, alpha: float = 0.5, tau: float = 1.1,
              timestep: int | None = None, seed: int = 0, resolution: int | None = None, batch_size: int = 1,
              use_spacy: bool = False):
        """Ref-Diff: the mask of the object a referring expression names ("the man on the left").

        ``clip`` (optional) is a local transformers CLIP folder, or a scorer with ``scores(image, proposals, texts)``.
        """
        from .referring import REFER_TIMESTEP, refer

        return refer(self.host, images, expression, clip=clip, alpha=alpha, tau=tau,
                     timestep=REFER_TIMESTEP if timestep is None else timestep, seed=seed, resolution=resolution,
                     batch_size=batch_size, use_spacy=use_spacy)

    def build_prototypes(self, classes: Sequence[str], *, images: int = 32, steps: int = 30, cfg: float = 8.0,
                         seed: int = 0, overrides: dict[str, bool] | None = None, cache_dir: str | Path | None = None,
                         resolution: int | None = None):
        """OVDiff: sample support images per class with this model and keep feature prototypes (cached)."""
        from .ovdiff import build_prototypes

        return build_prototypes(self.host, classes, images=images, steps=steps, cfg=cfg, seed=seed,
                                overrides=overrides, cache_dir=cache_dir, resolution=resolution)

    def ovdiff(self, images, prototypes, *, classes: Sequence[str] | None = None, clip=None, seed: int = 0,
               resolution: int | None = None, batch_size: int = 4):
        """OVDiff: a label map and one mask per class by nearest-prototype matching (``clip``: optional pre-filter)."""
        from .ovdiff import segment

        if isinstance(clip, (str, Path)):
            from .referring import ClipScorer

            clip = ClipScorer(clip, device=self.host.device)
        return segment(prototypes, images, host=self.host, classes=classes, clip=clip, seed=seed, resolution=resolution,
                       batch_size=batch_size)

    def load_ldznet(self, path: str | Path):
        """Load LD-ZNet weights (textmask safetensors) onto this host's device."""
        from .ldznet import load_ldznet

        dtype = self.host.dtype if self.host.device.type != "cpu" else torch.float32
        return load_ldznet(path, device=self.host.device, dtype=dtype)

    # ---------------------------------------------------------------------------------------------
    def _mask_ldznet(self, images, mask_prompt, negative, ldznet, template, threshold, soft, blur, grow, fill_holes,
                     invert, timestep, seed, resolution, batch_size, latents) -> MaskResult:
        from .ldznet.inference import DEFAULT_TEMPLATE, ldznet_probabilities

        if ldznet is None:
            raise TextMaskError("method 'ld-znet' needs LD-ZNet weights (ldznet=..., --ldznet PATH)")
        if latents is not None:
            raise TextMaskError("method 'ld-znet' encodes the images itself; pass images, not latents")
        model = self.load_ldznet(ldznet) if isinstance(ldznet, (str, Path)) else ldznet
        expr = mp.with_negative(mp.parse(mask_prompt), negative)
        terms = mp.phrases(expr)
        pixels = to_batch(images)
        height, width = pixels.shape[-2:]
        multiple = max(self.host.size_multiple, 64)
        size = working_size(height, width, resolution or model.train_resolution, multiple)
        parts = []
        with self.host.progress(pixels.shape[0], "textmask ld-znet") as bar:
            for rows in iter_chunks(pixels.shape[0], batch_size):
                self.host.check_interrupt()
                parts.append(ldznet_probabilities(self.host, model, pixels[rows], size, terms,
                                                  template=template or DEFAULT_TEMPLATE, timestep=timestep,
                                                  seed=seed + rows.start))
                bar.update(rows.stop - rows.start)
        low = torch.cat(parts)
        threshold = 0.5 if threshold == "auto" else threshold  # calibrated probabilities, not attention scores
        return self._finish(expr, terms, low, (height, width), (0, 0, height, width), threshold, soft, blur, grow,
                            fill_holes, invert)

    def _conditioning(self, method: str, terms: list[str], prompt: str | None) -> tuple[Conditioning, list[list[int]]]:
        """Encode the prompts one method needs, with each term's token positions (attention only)."""
        if method == "attention":
            cond = self.host.encode_prompts([prompt if prompt is not None and prompt.strip() else attention_prompt(terms)])
            groups = [cond.token_maps[0].find(t) for t in terms]
            return cond, groups
        if prompt is not None and prompt.strip():
            token_map = self.host.encode_prompts([prompt]).token_maps[0]
            for t in terms:
                token_map.find(t)  # the same "not in the prompt" contract as the attention method
        return self.host.encode_prompts([""] + list(terms)), []

    def _heatmaps(self, pixels, size, method, cond_groups, refine, timestep, seed, latents=None) -> torch.Tensor:
        """Resize, encode and noise one batch of images (unless latents are given), then decode the method's maps."""
        cond, groups = cond_groups
        latents, noisy = encode_and_noise(self.host, pixels, size, timestep, seed, latents)
        return method_heatmaps(self.host, method, latents, noisy, timestep, cond, groups, refine)

    def _finish(self, expr, terms, low, size, region, threshold, soft, blur, grow, fill_holes, invert) -> MaskResult:
        t = pp.thresholds(low, threshold)  # Otsu on the attention-resolution map, per image and phrase
        top, left, h, w = region
        heat = pp.resize(low, (h, w)).clamp(0, 1)  # [B, P, h, w] over the pixels the latents cover
        if (h, w) != tuple(size):
            heat = torch.nn.functional.pad(heat, (left, size[1] - w - left, top, size[0] - h - top))  # nothing outside
        index = {term.lower(): i for i, term in enumerate(terms)}
        ramps = pp.soft_threshold(heat, t)
        ramp = mp.evaluate(expr, lambda p: ramps[:, index[p.lower()]])
        combined = mp.evaluate(expr, lambda p: heat[:, index[p.lower()]])
        masks = pp.ramp_to_mask(ramp, soft)
        masks = pp.postprocess(masks, fill=fill_holes, grow_px=grow, invert_mask=invert, blur_px=blur)
        return MaskResult(
            masks=masks.contiguous(),
            heatmaps=combined.contiguous(),
            terms={term: heat[:, i].contiguous() for i, term in enumerate(terms)},
        )


def method_heatmaps(
    host: Host,
    method: str,
    latents: torch.Tensor,
    noisy: torch.Tensor,
    timestep: int,
    cond: Conditioning,
    groups: list[list[int]],
    refine: bool,
) -> torch.Tensor:
    """One batched UNet forward and the method's decoding: normalised maps [B, P, h, w] on the CPU."""
    b = latents.shape[0]
    latent_size = tuple(latents.shape[-2:])
    if method == "attention":
        cross = CrossAttentionMaps(groups)
        selfagg = SelfAttentionAggregate() if refine else None

        def sink(layer, start, probs):
            (cross if layer.kind == "cross" else selfagg)(layer, start, probs)

        want = (lambda l: True) if refine else (lambda l: l.kind == "cross")
        with AttentionCapture(host.attention_modules(), latent_size, probs=want, sink=sink):
            host.predict_noise(noisy, timestep, cond.select([0] * b), latents)
        maps = cross.aggregate()
        if selfagg is not None:
            maps = refine_with_self_attention(maps, selfagg.result(), selfagg.size, REFINE_MODE, REFINE_STEPS)
        return maps.float().cpu()

    # noise-diff: rows ordered image-major, [∅, phrase 1, …, phrase P] for each image.
    n = len(cond)
    rows = [i for _ in range(b) for i in range(n)]
    eps = host.predict_noise(
        noisy.repeat_interleave(n, 0), timestep, cond.select(rows), latents.repeat_interleave(n, 0)
    )
    eps = eps.reshape(b, n, *eps.shape[1:])
    return noise_difference(eps[:, 1:], eps[:, 0]).float().cpu()

