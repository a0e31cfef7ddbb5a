"""Masks from a sampling run: the attention of a sampler's own forwards, kept so words can be masked afterwards
without another UNet forward.

A host wraps each denoiser call of a sampling run in ``SamplingCapture.forward`` (ComfyUI: ``hosts.comfy.
capturing_model``). Of each call only the rows whose text context is the captured prompt's are read:

- every prompt token's cross-attention, summed over layers with AggSD's 1/side weights and over the run's steps
  (DAAM sums over the whole generation), so any word of the prompt has its map afterwards; its heads are averaged,
  as DAAM's are (weighing them as ``attention`` does, per layer, would keep every head's sums: heads times the
  memory);
- at one step, the first at or below the σ of t = 300 (the timestep the ``attention`` method reads), the
  self-attention aggregate that refines the maps and the cross-attention layers' queries, which OVAM re-queries
  for words that are not in the prompt (``trace.Trace``).

A run starts with the first call, and again whenever the sampler's σ schedule changes or σ rises (a new sampling
run); the masks are always those of the last run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from . import defaults, forward, options
from . import mask_prompt as mp
from . import postprocess as pp
from .capture import AttentionLayer, Need, QueryStore, check_self_attention_size, context_matcher
from .errors import CaptureError, PhraseNotFoundError, TextMaskError
from .hosts.contract import Conditioning, Host
from .images import to_batch
from .methods.attention import (CrossAttentionMaps, SelfAttentionAggregate, refine_options, refine_with_self_attention,
                                side_weight)
from .results import MaskResult


class TokenAttention:
    """Capture sink: each of the prompt's ``length`` key tokens' attention, [B, N, length] per grid, summed over
    layers (1/side weights) and forwards. Keys a sampler padded by repeating the context (ComfyUI pads cond and
    uncond to a common length) are folded back onto the prompt's positions."""

    def __init__(self, length: int):
        self.length = length
        self.need = Need(kinds=("cross",))
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # grid (h, w) -> [B, h*w, length]
        self.weights: dict[str, float] = {}  # layer name -> its weight, once

    def __call__(self, layer: AttentionLayer, start: int, probs: torch.Tensor) -> None:
        b, rows, keys = probs.shape
        if keys != self.length:
            if keys % self.length:
                return  # a context that is not this prompt's, repeated: nothing of ours to read
            probs = probs.view(b, rows, keys // self.length, self.length).sum(2)
        acc = self.sums.get(layer.size)
        if acc is None:
            acc = self.sums[layer.size] = torch.zeros(b, layer.tokens, self.length, device=probs.device)
        weight = self.weights.setdefault(layer.name, side_weight(layer))
        acc[:, start : start + rows].add_(probs, alpha=weight)

    def maps(self, groups: Sequence[Sequence[int]]) -> torch.Tensor:
        """Each group's mean token map [B, P, H, W] at the largest grid, normalised (``CrossAttentionMaps``)."""
        cross = CrossAttentionMaps(groups, heads="mean")  # its sums hold the heads' mean
        for grid, flat in self.sums.items():
            cross.sums[grid] = flat @ cross._select(self.length, flat.device)
        cross.weight_total = sum(self.weights.values())
        return cross.aggregate()


@dataclass
class SamplingRun:
    """What one sampling run left: the token sums, and one step's self-attention aggregate and queries."""

    batch: int  # latents sampled (rows of the captured prompt per call)
    latent_size: tuple[int, int]
    schedule: torch.Tensor | None  # the sampler's σ table, where the host passes it
    tokens: TokenAttention
    last_sigma: float = float("inf")
    steps: int = 0  # distinct σ read
    lowest: float = float("inf")
    self_attention: torch.Tensor | None = None  # [B, R², R²]
    self_size: tuple[int, int] | None = None
    kept: bool = False  # whether the step at the refine σ was read (its self-attention and queries kept)
    self_too_large: str | None = None  # why its self-attention was not kept: it would not fit (one line)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)  # cross layer -> [B, N, C]
    layers: dict[str, AttentionLayer] = field(default_factory=dict)

    @property
    def finished(self) -> bool | None:
        """Whether the run reached its schedule's last σ (None where the host passed no schedule)."""
        if self.schedule is None:
            return None
        positive = self.schedule[self.schedule > 0]
        return bool(positive.numel() == 0 or self.lowest <= float(positive.min()) * (1 + 1e-4))


class SamplingCapture:
    """The attention of the sampling runs that read the prompt ``cond`` (one row), for masks afterwards.

    ``refine_sigma``: the σ at or below which the self-attention aggregate and the queries are kept, once per run
    (the host's σ of ``defaults.TIMESTEP``).
    """

    def __init__(self, host: Host, cond: Conditioning, refine_sigma: float):
        if len(cond) != 1:
            raise TextMaskError(f"a sampling capture reads one prompt, got {len(cond)}")
        self.host, self.cond, self.refine_sigma = host, cond, float(refine_sigma)
        self._rows = context_matcher(cond.context)
        self.run: SamplingRun | None = None

    def _block(self, context: torch.Tensor | None, positive: Sequence[bool] | None = None) -> slice | None:
        """The call's rows that read this prompt, as a slice: ComfyUI batches each conditioning's rows together.
        ``positive`` (one flag per row, where the host says): only the rows of the sampler's positive conditioning,
        so the same text as a negative is not read."""
        if context is None or context.dim() != 3:
            return None
        rows = [r for r in self._rows(context).tolist() if positive is None or positive[r]]
        if not rows:
            return None
        end = 0
        while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
            end += 1  # the first contiguous block: a conditioning combined with itself is read once
        return slice(rows[0], rows[end] + 1)

    @staticmethod
    def _continues(run: SamplingRun | None, sigma: float, schedule: torch.Tensor | None) -> bool:
        """Whether a call at ``sigma`` belongs to ``run``: the same σ table, and no σ above the run's last (a sampler
        walks its σ down; a new run starts again from the top)."""
        return (run is not None and (schedule is None) == (run.schedule is None)
                and (schedule is None or schedule is run.schedule or torch.equal(schedule.cpu(), run.schedule))
                and sigma <= run.last_sigma * (1 + 1e-4))

    def _run_for(self, rows: slice, x: torch.Tensor, sigma: float, schedule: torch.Tensor | None) -> SamplingRun:
        run = self.run
        n, size = rows.stop - rows.start, tuple(x.shape[-2:])
        if not self._continues(run, sigma, schedule) or n != run.batch or size != run.latent_size:
            run = self.run = SamplingRun(n, size, None if schedule is None else schedule.detach().float().cpu(),
                                         TokenAttention(self.cond.context.shape[1]))
        return run

    @contextlib.contextmanager
    def forward(self, capture_for: Callable, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None,
                schedule: torch.Tensor | None = None, positive: Sequence[bool] | None = None) -> Iterator[None]:
        """Capture one denoiser call: ``x`` [rows, C, h, w], ``sigma`` [rows], ``context`` [rows, L, D] (the call's
        text contexts), ``schedule`` the run's σ table if the host has it; ``capture_for(latent_size, collectors)``
        makes the model's capture (a UNet's ``AttentionCapture``, an MM-DiT's joint one). Hooks come off when the
        call returns or raises; a call without this prompt's rows runs unhooked, and where it starts a new run, the
        last run is forgotten: that run's images are not this one's (a sampler whose positive is another prompt).
        ``positive``: per row, whether it is the sampler's positive conditioning, where the host tells."""
        rows = self._block(context, positive)
        if rows is None:
            if context is not None and context.dim() == 3 and not self._continues(self.run, float(sigma.max()),
                                                                                    schedule):
                self.run = None
            yield
            return
        s = float(sigma[rows.start])
        run = self._run_for(rows, x, s, schedule)
        run.tokens.need = Need(kinds=("cross",), rows=rows)
        collectors: list = [run.tokens]
        keep = not run.kept and s <= self.refine_sigma * (1 + 1e-4)
        selfagg = None
        if keep:
            queries = QueryStore()
            queries.need = Need(kinds=("cross",), values="queries", rows=rows)
            collectors.append(queries)
            run.self_too_large = self._too_large(size=tuple(x.shape[-2:]))
            if run.self_too_large is None:  # the capture must never fail the artist's sampling run
                selfagg = SelfAttentionAggregate(rows=rows, weighting="layer")  # as the attention method's
                collectors.append(selfagg)
        with capture_for(tuple(x.shape[-2:]), collectors):
            yield
        if keep:  # finished here: the aggregate adds in place, in the sampler's inference mode
            if selfagg is not None:
                run.self_attention, run.self_size = selfagg.result(), selfagg.size
            run.queries, run.layers, run.kept = queries.queries, queries.layers, True
        if s != run.last_sigma:
            run.steps += 1
        run.last_sigma, run.lowest = s, min(run.lowest, s)

    def _too_large(self, size: tuple[int, int]) -> str | None:
        """Why the self-attention of a forward at latent ``size`` cannot be kept (one line), or None."""
        grid = self.host.self_attention_grid(size)
        try:
            if grid is not None:
                check_self_attention_size(grid)
        except TextMaskError as e:
            return str(e)
        return None

    # ---------------------------------------------------------------------------------------------------------
    def _finished_run(self) -> SamplingRun:
        run = self.run
        if run is None:
            raise TextMaskError("no sampling step read this capture's prompt: connect the capture node's conditioning "
                                "to the sampler's positive input, and its MODEL to the sampler")
        if run.steps == 0 or run.finished is False:  # a run starts with its first call; steps count finished ones
            raise TextMaskError("the last sampling run with this capture did not finish (cancelled?); queue it again")
        return run

    def maps(self, phrases: list[str], images: forward.Images, refine: bool = defaults.REFINE,
             refine_mode: str = defaults.REFINE_MODE, refine_steps: int = defaults.REFINE_STEPS) -> torch.Tensor:
        """Each phrase's normalised map [B, P, h, w] (CPU): the run's own for words of the prompt, OVAM's re-query
        of the kept step's queries for any other; refined along that step's self-attention with ``refine``."""
        refine_mode, refine_steps = refine_options(refine_mode, refine_steps)
        run = self._finished_run()
        token_map = self.cond.token_maps[0]
        found, missing = {}, []
        for p in phrases:
            try:
                found[p] = token_map.find(p)
            except PhraseNotFoundError:
                missing.append(p)
        parts = {}
        device = next(iter(run.tokens.sums.values())).device
        with torch.inference_mode():
            if found:
                maps = run.tokens.maps(list(found.values()))
                parts.update({p: maps[:, i : i + 1] for i, p in enumerate(found)})
            if missing:
                shown = missing[0] if len(missing[0]) <= 60 else missing[0][:57] + "..."
                if not self.host.reads_text_as_keys():
                    raise TextMaskError(f"'{shown}' is not in the prompt '{token_map.prompt[:120]}'; on SD3 and Flux "
                                        "a sampling run masks only the prompt's own words")
                if not run.queries:
                    raise TextMaskError(
                        f"'{shown}' is not in the prompt '{token_map.prompt[:120]}', and the run never reached "
                        f"t = {defaults.TIMESTEP}, where the queries that other words are asked of are kept")
                from .trace import Trace

                trace = Trace(self.host, images, run.queries, run.layers)
                try:
                    maps = trace.maps(missing, None, refine_mode, refine_steps)
                except CaptureError as e:
                    raise TextMaskError(f"'{shown}' is not in the prompt '{token_map.prompt[:120]}', and other "
                                        f"words cannot be re-queried here: {e}") from None
                parts.update({p: maps[:, i : i + 1].to(device) for i, p in enumerate(missing)})
            maps = torch.cat([parts[p] for p in phrases], dim=1)
            if refine and run.self_too_large is not None:
                raise TextMaskError(f"this run's {run.self_too_large}")
            if refine and run.self_attention is not None:
                maps = refine_with_self_attention(maps, run.self_attention, run.self_size, refine_mode, refine_steps)
        return maps.float().cpu()

    def mask(self, images, mask_prompt: str, *, negative: str | None = None, refine: bool = defaults.REFINE,
             threshold: float | str = defaults.THRESHOLD, soft: bool = False, blur: float = 0.0, grow: float = 0.0,
             fill_holes: bool = False, invert: bool = False, pamr: bool = defaults.PAMR,
             temporal: float = defaults.TEMPORAL) -> MaskResult:
        """Masks for ``mask_prompt`` on the run's sampled ``images`` (one per latent, any size: each mask matches
        its image), with ``TextMasker.mask``'s prompt language, options and defaults."""
        run = self._finished_run()
        threshold = pp.parse_threshold(threshold)
        refine, soft, fill_holes, invert, pamr = options.flags(refine=refine, soft=soft, fill_holes=fill_holes,
                                                               invert=invert, pamr=pamr)
        expr = mp.with_negative(mp.parse(mask_prompt), negative)
        phrases = mp.phrases(expr)
        pixels = to_batch(images)
        if pixels.shape[0] != run.batch:
            raise TextMaskError(f"{pixels.shape[0]} image(s) given, but the last sampling run made {run.batch} "
                                "latent(s): pass the images decoded from that run")
        f = self.host.geometry.latent_factor
        prepared = forward.Images(pixels, (run.latent_size[0] * f, run.latent_size[1] * f))
        blur, grow = options.blur(blur, prepared.size), options.grow(grow, prepared.size)
        temporal = options.temporal(temporal)
        maps = self.maps(phrases, prepared, refine)
        region = (0, 0, *prepared.size)  # the images are the latents decoded: each covers its whole image
        if pamr:
            maps = pp.edge_refined(maps, prepared.pixels, prepared.working, prepared.size, region, f)
        maps = pp.temporal_smooth(maps, temporal)
        return pp.masks_from_maps(expr, phrases, maps, prepared.size, region, threshold, None, soft=soft, blur=blur,
                                  grow_px=grow, fill=fill_holes, invert_mask=invert)
