"""TextMasker: the API every face calls. Each task composes the forward engine (``textmask.forward``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from . import defaults, forward, options
from . import mask_prompt as mp
from . import postprocess as pp
from .errors import TextMaskError
from .hosts.contract import Host
from .images import ImageInput
from .methods import get_method
from .results import LabelsResult, MaskResult, ReferResult, SegmentsResult


class TextMasker:
    """Masks from words, made by an already-loaded Stable Diffusion model (any host of ``textmask.hosts``)."""

    def __init__(self, host: Host):
        self.host = host

    @classmethod
    def from_single_file(cls, path: str | Path, **kwargs) -> "TextMasker":
        """Load an SD1/SD2/SDXL (.safetensors or .ckpt) or SD3/Flux (.safetensors) checkpoint, offline."""
        from .hosts import diffusers_loading

        return cls(diffusers_loading.from_single_file(path, **kwargs))

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "TextMasker":
        """Load a diffusers-format model folder, offline."""
        from .hosts import diffusers_loading

        return cls(diffusers_loading.from_pretrained(directory, **kwargs))

    @classmethod
    def from_pipe(cls, pipe, **kwargs) -> "TextMasker":
        """Reuse the modules of an existing diffusers pipeline."""
        from .hosts import diffusers_loading

        return cls(diffusers_loading.from_pipe(pipe, **kwargs))

    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def mask(
        self,
        images: ImageInput | Sequence[ImageInput],
        mask_prompt: str,
        *,
        method: str = defaults.METHOD,
        negative: str | None = None,
        prompt: str | None = None,
        refine: bool | None = None,
        threshold: float | str = defaults.THRESHOLD,
        soft: bool = False,
        blur: float = 0.0,
        grow: float = 0.0,
        fill_holes: bool = False,
        invert: bool = False,
        timestep: int | None = None,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = defaults.BATCH_SIZE,
        latents: torch.Tensor | None = None,
        pamr: bool = defaults.PAMR,
        temporal: float = defaults.TEMPORAL,
        min_presence: float = defaults.MIN_PRESENCE,
        **method_options: Any,
    ) -> MaskResult:
        """Mask what ``mask_prompt`` names in each image; see README for the prompt language.

        ``refine`` (attention only; default on) refines the word maps along self-attention. ``method_options`` go
        to the method: ``ldznet`` (an LDZNet or the path of its .safetensors) and ``template`` for ``ld-znet``,
        ``refine_mode``, ``refine_steps``, ``aggregation`` ("aggsd" or "daam") and ``heads`` ("information" or
        "mean") for ``attention``. ``images`` are any of ``images.to_batch``'s inputs (one size per call); ``blur``
        (Gaussian σ) and ``grow`` (negative shrinks) are in pixels of the input image. ``latents``
        (the host's latent space, one per image) replace encoding the images; the host's ``latent_region`` says
        which pixels they cover. ``pamr`` (default on) refines every map along the image's own edges
        (``postprocess.pamr``, on a grid twice the latent's) before thresholding. ``temporal`` (σ in frames, default 0 =
        off) smooths the maps over neighbouring images of the batch, for the frames of a video, and the presence.
        ``MaskResult.presence`` says how surely each phrase is in each image (``attention``;
        ``CrossAttentionMaps.presence``); a phrase below ``min_presence`` (default 0 = off) selects nothing, its term
        empty in the mask prompt's logic.
        """
        chosen = get_method(method)
        soft, fill_holes, invert, pamr = options.flags(soft=soft, fill_holes=fill_holes, invert=invert, pamr=pamr)
        refine = None if refine is None else options.flag("refine", refine)
        if refine is not None and "refine" in chosen.options:
            method_options["refine"] = refine
        unknown = sorted(set(method_options) - set(chosen.options))
        if unknown:
            raise TextMaskError(f"method '{method}' takes no option {', '.join(unknown)}"
                                + (f"; its options: {', '.join(chosen.options)}" if chosen.options else ""))
        threshold = pp.parse_threshold(threshold)
        timestep = options.timestep(chosen.timestep if timestep is None else timestep)
        seed, batch_size = options.seed(seed), options.batch_size(batch_size)
        prompt = options.text("prompt", prompt)
        expr = mp.with_negative(mp.parse(mask_prompt), negative)
        phrases = mp.phrases(expr)
        if latents is not None and chosen.needs_images:
            raise TextMaskError(f"method '{method}' encodes the images itself; pass images, not latents")
        min_presence = options.min_presence(min_presence)
        decoder = chosen.setup(self.host, phrases, prompt, **method_options)
        if not decoder.measures_presence:  # fail before the forward, not after it
            pp.presence_gate(None, min_presence)
        images = forward.prepare_images(self.host, images, resolution or decoder.resolution,
                                        max(self.host.geometry.size_multiple, decoder.size_multiple or 0),
                                        self_attention=decoder.reads_self_attention)
        blur, grow = options.blur(blur, images.size), options.grow(grow, images.size)
        temporal = options.temporal(temporal)
        region = (0, 0, *images.size)
        if latents is not None:
            options.latents(latents, len(images), self.host.geometry)
            latents = latents.expand(len(images), -1, -1, -1)
            region = self.host.latent_region(images.size, tuple(latents.shape[-2:]))
        parts = []
        for rows in forward.batches(self.host, len(images), batch_size, f"textmask {method}"):
            z = latents[rows].to(self.host.device, self.host.dtype) if latents is not None else \
                forward.encode(self.host, images.pixels[rows], images.working)
            x, sigma = forward.add_noise(self.host, z, timestep, seed + rows.start)
            parts.append(decoder(self.host, z, x, sigma))
        maps = torch.cat(parts)
        if pamr:
            maps = pp.edge_refined(maps, images.pixels, images.working, images.size, region,
                                   self.host.geometry.latent_factor)
        maps = pp.temporal_smooth(maps, temporal)
        presence = decoder.presence
        if presence is not None:
            presence = pp.over_frames(presence, temporal)  # as the maps are, so a gated phrase does not blink
        result = pp.masks_from_maps(expr, phrases, maps, images.size, region, threshold,
                                    chosen.auto_threshold, soft=soft, blur=blur, grow_px=grow, fill=fill_holes,
                                    invert_mask=invert, present=pp.presence_gate(presence, min_presence))
        if presence is not None:
            result.presence = {p: presence[:, i].contiguous() for i, p in enumerate(phrases)}
        return result

    def trace(self, images, *, prompt: str = "", refine: bool = defaults.REFINE, timestep: int = defaults.TIMESTEP,
              seed: int = 0, resolution: int | None = None, batch_size: int = defaults.BATCH_SIZE):
        """One forward whose attention is kept, so ``trace.mask("any words")`` needs no further UNet forward
        (OVAM; ``textmask.trace``). ``prompt``: the text the forward runs under (the image's caption, or empty)."""
        from .trace import trace

        return trace(self.host, images, prompt=prompt, refine=refine, timestep=timestep, seed=seed,
                     resolution=resolution, batch_size=batch_size)

    def segments(self, images, *, segmenter: str = defaults.SEGMENTER, tau: float = defaults.TAU,
                 cut: float = defaults.CUT, kmeans: bool = False, timestep: int | None = None, seed: int = 0,
                 resolution: int | None = None, batch_size: int = 1, pamr: bool = defaults.PAMR) -> SegmentsResult:
        """Segment everything: a label map and one mask per segment, largest first, per image. DiffCut (``cut``) by
        default; DiffSeg with ``segmenter="diffseg"`` (``tau``, ``kmeans``)."""
        from .methods.segments import segment_everything

        return segment_everything(self.host, images, segmenter=segmenter, tau=tau, cut=cut, kmeans=kmeans,
                                  timestep=timestep, seed=seed, resolution=resolution, batch_size=batch_size, pamr=pamr)

    def named_segments(self, images, names: Sequence[str], *, segmenter: str = defaults.SEGMENTER,
                       tau: float = defaults.TAU, cut: float = defaults.CUT, timestep: int | None = None, seed: int = 0,
                       resolution: int | None = None, batch_size: int = 1, pamr: bool = defaults.PAMR) -> LabelsResult:
        """Named segments: the segments (as ``segments``) labelled with ``names`` (or background); one mask per name."""
        from .methods.segments import named_segments

        return named_segments(self.host, images, names, segmenter=segmenter, tau=tau, cut=cut, timestep=timestep,
                              seed=seed, resolution=resolution, batch_size=batch_size, pamr=pamr)

    def semantic(self, images, names: Sequence[str], **kwargs) -> LabelsResult:
        """Deprecated name of ``named_segments``."""
        warnings.warn("TextMasker.semantic is now TextMasker.named_segments", DeprecationWarning, stacklevel=2)
        return self.named_segments(images, names, **kwargs)

    def refer(self, images, expression: str, *, clip=None, alpha: float = defaults.REFER_ALPHA,
              tau: float = defaults.TAU, timestep: int | None = defaults.REFER_TIMESTEP, seed: int = 0,
              resolution: int | None = None,
              batch_size: int = 1, use_spacy: bool = False) -> ReferResult:
        """The mask of the one object (or, for "every"/"all", the objects) a referring expression names.

        The subject ("the red car on the left" -> "red car"; ``textmask.subject.subject_phrase``) is masked with
        ``attention`` (at its timestep, with PAMR edges), and that mask is split into instances. An expression that
        orders things ("the man on the left", "the larger square", "the second car from the right", "every chair";
        ``textmask.relations``) picks among them by its relation, and its subject is encoded on its own, as
        ``attention`` encodes any phrase: the mask must hold every instance of the subject for the relation to
        choose from. Any other expression conditions the subject on the whole expression, whose other words are all
        that can tell one instance from another, and takes the instance whose map is higher inside than outside by
        the most (Ref-Diff's generative score). With ``clip``
        (a local transformers CLIP folder, or a scorer with ``scores(image, proposals, texts)``) an expression
        without a relation goes to Ref-Diff, its paper's setting: its proposals scored by attribution and by CLIP,
        weighed by ``alpha``, with ``tau`` and ``timestep`` for its proposals and forward, and ``use_spacy`` to find
        its head noun.
        """
        from . import relations
        from .clip import check_clip
        from .methods.refdiff import generative_scores, refer
        from .subject import subject_phrase

        options.expression(expression)
        # checked on both paths, though only Ref-Diff's reads them
        options.alpha(alpha), options.tau(tau), options.flag("use_spacy", use_spacy), check_clip(clip)
        options.timestep(defaults.REFER_TIMESTEP if timestep is None else timestep)
        relation = relations.parse(expression)
        if relation is None and clip is not None:
            res = refer(self.host, images, expression, clip=clip, alpha=alpha, tau=tau, timestep=timestep, seed=seed,
                        resolution=resolution, batch_size=batch_size, use_spacy=use_spacy)
            res.instances = [relations.instances(m) for m in res.masks]
            return res
        phrase = subject_phrase(expression)
        # every region above Otsu's: the relation, or the generative score, chooses among them
        out = self.mask(images, phrase, prompt=expression if relation is None else None, threshold="otsu", seed=seed,
                        resolution=resolution, batch_size=batch_size)
        heat = out.terms[phrase].clamp(0, 1)
        # "every" keeps every part; one of several keeps parts of a tenth of the largest or more (no fragments)
        share = 0.0 if relation is not None and relation.every else relations.MIN_SHARE
        candidates = [relations.instances(m, share) for m in out.masks]
        if relation is None:
            chosen = [c[int(generative_scores(c, h).argmax())] if len(c) else torch.zeros(h.shape, dtype=torch.bool)
                      for c, h in zip(candidates, heat)]
        else:
            chosen = [relations.choose(c, relation) for c in candidates]
        return ReferResult(torch.stack(chosen).float(), heat, phrase, candidates)

    def build_prototypes(self, classes: Sequence[str], *, images: int = defaults.OVDIFF_IMAGES,
                         steps: int = defaults.OVDIFF_STEPS, cfg: float = defaults.OVDIFF_CFG,
                         seed: int = 0, overrides: dict[str, bool] | None = None, cache_dir: str | Path | None = None,
                         resolution: int | None = None):
        """OVDiff: sample support images per class with this model and keep feature prototypes (cached)."""
        from .ovdiff import build_prototypes

        return build_prototypes(self.host, classes, images=images, steps=steps, cfg=cfg, seed=seed,
                                overrides=overrides, cache_dir=cache_dir, resolution=resolution)

    def ovdiff(self, images, prototypes, *, classes: Sequence[str] | None = None, clip=None, seed: int = 0,
               resolution: int | None = None, batch_size: int = 4) -> LabelsResult:
        """OVDiff: a label map and one mask per class by nearest-prototype matching (``clip``: optional pre-filter)."""
        from .ovdiff import label

        return label(prototypes, images, host=self.host, classes=classes, clip=clip, seed=seed,
                     resolution=resolution, batch_size=batch_size)

    def load_ldznet(self, path: str | Path):
        """Load LD-ZNet weights (textmask safetensors) onto this host's device."""
        from .ldznet.inference import load_on_host

        return load_on_host(path, self.host)
