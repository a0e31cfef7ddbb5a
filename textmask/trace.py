"""A trace of one forward's attention, to mask any words afterwards without another UNet forward (OVAM).

>>> trace = masker.trace(image, prompt="a cat on a sofa")
>>> trace.mask("cat").masks, trace.mask("cushion").masks      # no further UNet forward

The trace keeps each cross-attention layer's projected queries and the self-attention aggregate of one hooked
forward. A phrase's map is then softmax(q·kᵀ) of those queries against keys that each layer's own ``to_k`` makes
from a new prompt (so LoRA and low-VRAM patches apply), aggregated and refined exactly as ``attention`` does
(Marcos-Manchón et al., OVAM). Asked under the prompt the trace ran with, it is exactly that forward's ``attention``
map; for any other prompt it is OVAM's approximation, because the queries stay those the traced prompt produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import defaults, forward, options
from . import mask_prompt as mp
from . import postprocess as pp
from .capture import AttentionLayer, QueryStore, attention_probs, attention_scale
from .errors import TextMaskError
from .hosts.contract import Host
from .methods.attention import (CrossAttentionMaps, SelfAttentionAggregate, phrase_conditioning, refine_options,
                                refine_with_self_attention)
from .results import MaskResult


@dataclass
class Trace:
    """What one traced forward keeps: per cross-attention layer its queries [B, N, C] (on the host's device) and
    the layer, the self-attention aggregate [B, R², R²] on its R×R grid when traced with ``refine``, and the
    images' geometry."""

    host: Host
    images: forward.Images
    queries: dict[str, torch.Tensor]
    layers: dict[str, AttentionLayer]
    self_attention: torch.Tensor | None = None
    self_size: tuple[int, int] | None = None

    def maps(self, phrases: list[str], prompt: str | None = None, refine_mode: str = defaults.REFINE_MODE,
             refine_steps: int = defaults.REFINE_STEPS, heads: str = defaults.HEADS) -> torch.Tensor:
        """Each phrase's normalised map [B, P, h, w] (CPU), keys from ``prompt`` (default: the phrases' own
        encodings, joined, as ``mask`` reads them: ``phrase_conditioning``), its heads weighed as ``heads`` says
        (``CrossAttentionMaps``), refined along the traced self-attention if the trace kept it."""
        return self._maps(options.names(phrases, "phrases", "phrase"), prompt, refine_mode, refine_steps, heads)[0]

    def _maps(self, phrases, prompt, refine_mode, refine_steps, heads) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``maps``, and each phrase's presence [B, P] (CPU; None where ``CrossAttentionMaps.presence`` is)."""
        refine_mode, refine_steps = refine_options(refine_mode, refine_steps)
        if prompt is not None and not isinstance(prompt, str):
            raise TextMaskError(f"prompt must be text, got {type(prompt).__name__}")
        cond, groups = phrase_conditioning(self.host, phrases, prompt)
        cross = CrossAttentionMaps(groups, heads=heads)
        first = next(iter(self.queries.values()))
        g = self.host.geometry  # the model loaded, as before a forward
        self.host.prepare((first.shape[0], g.in_channels, *(s // g.latent_factor for s in self.images.working)))
        modules = dict(self.host.attention_modules())
        with torch.inference_mode():
            for name, q in self.queries.items():
                layer, module = self.layers[name], modules[name]
                context = cond.context.to(q.device, q.dtype).expand(q.shape[0], -1, -1)
                try:  # the module's own call: patched weights apply, .weight is never read
                    k = module.to_k(context)
                except RuntimeError as e:
                    raise TextMaskError(
                        "this host keeps the UNet's layers off the device between forwards (low-VRAM or CPU "
                        f"offload), so a trace cannot re-query them; use mask() instead ({str(e).splitlines()[0]})"
                    ) from None
                for start, chunk in attention_probs(q, k, layer.heads, attention_scale(module, layer, q),
                                                    per_head=cross.need.values == "head_probs"):
                    cross(layer, start, chunk)
            maps = cross.aggregate()
            presence = cross.presence()
            if self.self_attention is not None:
                maps = refine_with_self_attention(maps, self.self_attention, self.self_size, refine_mode,
                                                  int(refine_steps))
        return maps.float().cpu(), None if presence is None else presence.float().cpu()

    def mask(self, mask_prompt: str, *, negative: str | None = None, prompt: str | None = None,
             threshold: float | str = defaults.THRESHOLD, soft: bool = False, blur: float = 0.0, grow: float = 0.0,
             fill_holes: bool = False, invert: bool = False, pamr: bool = defaults.PAMR,
             refine_mode: str = defaults.REFINE_MODE, refine_steps: int = defaults.REFINE_STEPS,
             heads: str = defaults.HEADS, min_presence: float = defaults.MIN_PRESENCE) -> MaskResult:
        """Masks for ``mask_prompt`` from the traced forward, with ``TextMasker.mask``'s prompt language, options
        and defaults (``negative``: what to take out, as there); ``prompt`` is the text whose keys the queries meet
        (default: as ``mask``'s, ``phrase_conditioning``)."""
        from . import options

        threshold = pp.parse_threshold(threshold)
        soft, fill_holes, invert, pamr = options.flags(soft=soft, fill_holes=fill_holes, invert=invert, pamr=pamr)
        expr = mp.with_negative(mp.parse(mask_prompt), negative)
        phrases = mp.phrases(expr)
        blur, grow = options.blur(blur, self.images.size), options.grow(grow, self.images.size)
        min_presence = options.min_presence(min_presence)
        if heads != "information":  # fail before re-querying, not after
            pp.presence_gate(None, min_presence)
        maps, presence = self._maps(phrases, prompt, refine_mode, refine_steps, heads)
        region = (0, 0, *self.images.size)
        if pamr:
            maps = pp.edge_refined(maps, self.images.pixels, self.images.working, self.images.size, region,
                                   self.host.geometry.latent_factor)
        result = pp.masks_from_maps(expr, phrases, maps, self.images.size, region, threshold, None, soft=soft,
                                    blur=blur, grow_px=grow, fill=fill_holes, invert_mask=invert,
                                    present=pp.presence_gate(presence, min_presence))
        if presence is not None:
            result.presence = {p: presence[:, i].contiguous() for i, p in enumerate(phrases)}
        return result


def trace(host: Host, images, *, prompt: str = "", refine: bool = defaults.REFINE, timestep: int = defaults.TIMESTEP,
          seed: int = 0, resolution: int | None = None, batch_size: int = defaults.BATCH_SIZE) -> Trace:
    """One hooked forward per batch of ``images`` under ``prompt`` (noised to ``timestep`` as ``mask`` does),
    keeping what ``Trace.mask`` needs."""
    from . import options

    if not isinstance(prompt, str):
        raise TextMaskError(f"prompt must be text, got {type(prompt).__name__}")
    timestep, seed, batch_size = options.timestep(timestep), options.seed(seed), options.batch_size(batch_size)
    refine = options.flag("refine", refine)
    host.attention_modules()  # a model whose attention a trace cannot re-query (an MM-DiT) is refused before a forward
    images = forward.prepare_images(host, images, resolution, host.geometry.size_multiple,  # as mask() prepares them
                                    self_attention=refine)
    cond = forward.encode_prompts(host, [prompt])
    stores, aggregates = [], []
    with torch.inference_mode():
        for rows in forward.batches(host, len(images), batch_size, "textmask trace"):
            z = forward.encode(host, images.pixels[rows], images.working)
            x, sigma = forward.add_noise(host, z, timestep, seed + rows.start)
            store = QueryStore()
            selfagg = SelfAttentionAggregate(weighting="layer") if refine else None  # as the attention method's
            forward.eps(host, x, sigma, cond.select([0] * x.shape[0]), z, [store] + ([selfagg] if selfagg else []))
            stores.append(store)
            if selfagg is not None:
                aggregates.append(selfagg.result())  # finished here: it adds in place, inside inference mode
                size = selfagg.size
        queries = {name: torch.cat([st.queries[name] for st in stores]) for name in stores[0].queries}
        if not refine:
            return Trace(host, images, queries, stores[0].layers)
        return Trace(host, images, queries, stores[0].layers, torch.cat(aggregates), size)
