"""Cross-attention aggregation (DAAM) with optional self-attention refinement (AggSD).

Both collectors are capture sinks: they reduce probability chunks as they arrive, so a
4096×4096 self-attention map never exists for more than one layer at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from .. import defaults, forward
from ..capture import AttentionLayer, Need
from ..errors import TextMaskError
from ..hosts.contract import Conditioning, Host
from ..postprocess import normalize
from ..subject import with_article
from ..tokens import CONTEXT, join_token_maps


def side_weight(layer: AttentionLayer) -> float:
    """AggSD's layer weight: 1 / the side of the layer's grid."""
    return 1.0 / math.sqrt(layer.tokens)


HEAD_WEIGHTINGS = ("information", "mean")


def head_weighting(heads) -> str:
    """``heads``, checked: one line naming the choices otherwise."""
    if heads not in HEAD_WEIGHTINGS:
        raise TextMaskError(f"heads must be one of {', '.join(HEAD_WEIGHTINGS)}, got {heads!r}")
    return heads


def head_information(maps: torch.Tensor) -> torch.Tensor:
    """Each head's information about where a phrase is: log N − the entropy of its map [..., H, N, P] read as a
    distribution over the N pixels, in nats, [..., H, 1, P]; 0 for a uniform map, log N for one pixel."""
    dist = maps.clamp_min(0) / maps.clamp_min(0).sum(-2, keepdim=True).clamp_min(1e-30)
    entropy = -(dist * dist.clamp_min(1e-30).log()).sum(-2, keepdim=True)
    return (math.log(maps.shape[-2]) - entropy).clamp_min(0)


def attribution_grid(cross_sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The grid Ref-Diff reads: the coarsest cross-attention outside the mid block.

    The reference reads the layers at 1/32 of the image, which in SD1/SD2/SDXL at any resolution are exactly
    these (the deepest down/up level; SDXL's mid block shares their grid). Said structurally, the rule also
    holds for UNets with another VAE factor or depth, where 1/32 of the image may be the mid block or nothing.
    """
    def in_mid(name: str) -> bool:  # diffusers "mid_block", ldm/ComfyUI "middle_block"
        return any(part.startswith("mid") for part in name.split("."))

    outside = [s for n, s in cross_sizes.items() if not in_mid(n)] or list(cross_sizes.values())
    return min(outside, key=lambda s: s[0] * s[1])


class CrossAttentionMaps:
    """Sums each phrase's mean token attention over cross-attention layers, weighted per layer, one sum per grid.

    ``heads``: "information" weighs each head's map of a phrase by ``head_information`` within its layer; "mean"
    averages the heads (DAAM, AggSD). Each chunk is reduced to the phrases with one batched product. The head means
    go straight into their grid's sum; per-head maps are kept, and each grid's layers are weighed in one batch when
    the sums are read. Only the sums are resized at the end: resizing is linear, so this equals resizing every
    layer's map, with a few kernels in place of a few per layer.
    """

    def __init__(self, token_groups: Sequence[Sequence[int]], layer_weight: Callable[[AttentionLayer], float] = side_weight,
                 heads: str = defaults.HEADS, need: Need = Need(kinds=("cross",))):
        self.heads = head_weighting(heads)
        self.need = dataclasses.replace(need, values="head_probs" if heads == "information" else "probs")
        self.groups = [list(g) for g in token_groups]
        self.layer_weight = layer_weight
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # grid (h, w) -> [B, h*w, P]
        self.weight_total = 0.0  # each layer's weight, counted once
        self._seen: set[str] = set()
        self._selector: torch.Tensor | None = None
        self._chunks: dict[str, list[torch.Tensor]] = {}  # layer name -> its per-head map chunks [B, H, rows, P]
        self._held: dict[tuple, list] = {}  # (grid, heads) -> [(layer name, weight, per-head maps [B, H, N, P])]
        self._information: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}  # name -> (grid, [B, P])

    def _select(self, keys: int, device: torch.device) -> torch.Tensor:
        # [keys, P] averaging matrix, so a chunk reduces with one matmul.
        if self._selector is None or self._selector.shape[0] != keys or self._selector.device != device:
            sel = torch.zeros(keys, len(self.groups))
            for p, group in enumerate(self.groups):
                sel[group, p] = 1.0 / len(group)
            self._selector = sel.to(device)
        return self._selector

    def __call__(self, layer: AttentionLayer, start: int, probs: torch.Tensor) -> None:
        """Add a chunk of a layer's rows: probs [B, rows, keys] (``heads="mean"``) or [B, H, rows, keys]."""
        weight = self.layer_weight(layer)
        if layer.name not in self._seen:
            self._seen.add(layer.name)
            self.weight_total += weight
        sel = self._select(probs.shape[-1], probs.device)
        if self.heads == "mean":
            acc = self._sum(layer, probs)
            acc[:, start : start + probs.shape[1]].baddbmm_(probs, sel.expand(probs.shape[0], *sel.shape), alpha=weight)
            return
        chunks = self._chunks.setdefault(layer.name, [])
        chunks.append(probs @ sel)
        if start + probs.shape[2] == layer.tokens:  # the layer's last rows (chunks come in order)
            maps = chunks[0] if len(chunks) == 1 else torch.cat(chunks, 2)
            del self._chunks[layer.name]
            self._held.setdefault((layer.size, maps.shape[1]), []).append((layer.name, weight, maps))

    def _sum(self, layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor:
        """The running sum [B, N, P] of the layer's grid, created at the first layer of that size."""
        acc = self.sums.get(layer.size)
        if acc is None:
            acc = self.sums[layer.size] = torch.zeros(probs.shape[0], layer.tokens, len(self.groups), device=probs.device)
        return acc

    def _weigh_heads(self) -> None:
        """Add the held layers into their grids' sums, each head weighed by its information: one batch per grid."""
        for (size, _), held in self._held.items():
            maps = torch.stack([m for _, _, m in held])  # [L, B, H, N, P]
            if maps.shape[-2] > 1:  # a one-pixel grid says nothing about where, nor whether
                information = head_information(maps.mean(-3, keepdim=True))[:, :, 0, 0] / math.log(maps.shape[-2])
                for (name, _, _), layer_information in zip(held, information):
                    self._information[name] = (size, layer_information)
            info = head_information(maps)
            info = info + (info.sum(-3, keepdim=True) == 0)  # no head localises the phrase: their mean
            layer_weights = torch.tensor([w for _, w, _ in held], device=maps.device).view(-1, 1, 1, 1)
            weighed = ((info * maps).sum(-3) / info.sum(-3) * layer_weights).sum(0)  # [B, N, P]
            acc = self.sums.get(size)
            self.sums[size] = weighed if acc is None else acc + weighed
        self._held.clear()

    def presence(self) -> torch.Tensor | None:
        """How surely each phrase is in each image, [B, P] in [0, 1]: the information of its head-averaged map over
        the layer's N pixels, log N − entropy, in units of log N (0 for a map spread evenly, 1 for one pixel), the
        mean over the layers at ``attribution_grid`` of the grids larger than one pixel. None with ``heads="mean"``,
        which keeps no layer's map whole, and where every grid is one pixel.

        Of the signals one forward computes, this one best told Shapes' present phrases from absent ones
        (docs/quality.md, "Absence"); there a phrase's map spreads where the phrase names nothing, and sharpens
        where it names a thing. Each grid's layers are folded into their sums only when the maps are read.
        """
        self._weigh_heads()
        if not self._information:
            return None
        grid = attribution_grid({name: size for name, (size, _) in self._information.items()})
        return torch.stack([v for size, v in self._information.values() if size == grid]).mean(0)

    def total(self, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        """The weighted sum over layers, [B, P, *size]: each grid's sum resized to ``size``."""
        self._weigh_heads()
        if not self.sums:
            raise RuntimeError("no cross-attention was captured")
        out = None
        for grid, flat in self.sums.items():
            m = flat.transpose(1, 2).reshape(flat.shape[0], flat.shape[2], *grid)
            if grid != tuple(size):
                m = F.interpolate(m, size=size, mode=mode, align_corners=False)
            out = m if out is None else out + m
        return out

    def aggregate(self) -> torch.Tensor:
        """[B, P, H, W] at the largest layer size: bicubic upsampling, weights ∝ 1/side, min-max normalised."""
        self._weigh_heads()
        if not self.sums:
            raise RuntimeError("no cross-attention was captured")
        size = max(self.sums, key=lambda s: s[0] * s[1])
        return normalize((self.total(size) / self.weight_total).clamp_min(0))


class SelfAttentionAggregate:
    """DiffSeg's multi-resolution self-attention aggregate [B, R², R²] at the largest self-attention size R.

    As google/diffseg computes it (``weighting="resolution"``): the layers of one resolution are averaged, each
    resolution's key maps are bilinearly upsampled to R×R and renormalised to sum 1, its query rows repeated
    (nearest) onto the R×R grid, and resolution r weighs side_r / Σ sides. ``weighting="layer"`` instead adds
    every layer, normalised, with weight ∝ its side: the langseg report's account of it, which the attention
    method's refinement uses.
    The first self-attention layer of a UNet forward is the largest, which fixes R; R-sized layers are added
    straight into the sum, so the only R²×R² tensor is the sum itself.
    """

    def __init__(self, rows: slice | None = None, weighting: Literal["resolution", "layer"] = "resolution"):
        if weighting not in ("resolution", "layer"):
            raise ValueError(f"unknown weighting {weighting!r}")
        self.need = Need(kinds=("self",), rows=rows)  # rows: the batch rows to aggregate (None: all)
        self.weighting = weighting
        self.size: tuple[int, int] | None = None
        self.sum: torch.Tensor | None = None  # [B, R², R²]: the R-sized layers' probabilities, summed
        # size -> [B, n, n]; [B, n, R²], upsampled layer by layer, where the size does not divide R (odd latents)
        self.smaller: dict[tuple[int, int], torch.Tensor] = {}
        self.layers: dict[tuple[int, int], int] = {}  # size -> layers seen
        self._result: torch.Tensor | None = None

    def __call__(self, layer: AttentionLayer, start: int, probs: torch.Tensor) -> None:
        b, rows, _ = probs.shape
        if self.size is None:
            self.size = layer.size
        if start == 0:  # a layer's first chunk in this forward
            self.layers[layer.size] = self.layers.get(layer.size, 0) + 1
        if layer.size == self.size:
            if self.sum is None:
                n = self.size[0] * self.size[1]
                self.sum = torch.zeros(b, n, n, device=probs.device)
            scale = float(layer.size[0]) if self.weighting == "layer" else 1.0
            self.sum[:, start : start + rows].add_(probs, alpha=scale)  # rows already sum to 1
            return
        acc = self.smaller.get(layer.size)
        if self.weighting == "resolution" or self._upsampled_once(layer.size):
            # Keys are upsampled once, from the size's sum: DiffSeg averages a resolution's layers first, and where
            # the grid divides R, bilinear upsampling spreads every coarse cell over exactly (R/side)² fine cells,
            # so each layer's renormalisation is the same constant and upsampling the sum equals summing theirs.
            if acc is None:
                acc = self.smaller[layer.size] = torch.zeros(b, layer.tokens, layer.tokens, device=probs.device)
            acc[:, start : start + rows].add_(probs)
            return
        if acc is None:
            acc = self.smaller[layer.size] = torch.zeros(b, layer.tokens, self.size[0] * self.size[1],
                                                         device=probs.device)
        acc[:, start : start + rows].add_(upsampled_keys(probs, layer.size, self.size), alpha=float(layer.size[0]))

    def _upsampled_once(self, size: tuple[int, int]) -> bool:
        return self.size[0] % size[0] == 0 and self.size[1] % size[1] == 0

    def _add_rows(self, rows: torch.Tensor, size: tuple[int, int], weight: float) -> None:
        """Add query rows [B, n, R²] of an ``size`` grid onto the R×R query grid (nearest), times ``weight``."""
        r_h, r_w = self.size
        h, w = size
        b, n = rows.shape[0], rows.shape[-1]
        if r_h % h == 0 and r_w % w == 0:
            # Nearest-neighbour query upsampling as a broadcast add: no R²×R² temporary.
            self.sum.view(b, h, r_h // h, w, r_w // w, n).add_(rows.view(b, h, 1, w, 1, n), alpha=weight)
            return
        # Sizes that do not divide (odd latents): each R-grid cell takes its coarse cell's row.
        ri = torch.arange(r_h, device=rows.device) * h // r_h
        ci = torch.arange(r_w, device=rows.device) * w // r_w
        self.sum.add_(rows.index_select(1, (ri[:, None] * w + ci[None, :]).reshape(-1)), alpha=weight)

    def result(self) -> torch.Tensor:
        """The aggregate [B, R², R²], rows summing to 1."""
        if self._result is not None:
            return self._result
        if self.sum is None:
            raise RuntimeError("no self-attention was captured")
        if self.weighting == "resolution":
            total = sum(float(size[0]) for size in self.layers)
            self.sum.mul_(float(self.size[0]) / (total * self.layers[self.size]))
            for size, acc in self.smaller.items():
                keys = upsampled_keys(acc / self.layers[size], size, self.size)
                self._add_rows(keys, size, float(size[0]) / total)
        else:
            total = sum(float(size[0]) * count for size, count in self.layers.items())
            for size, acc in self.smaller.items():
                if self._upsampled_once(size):  # the size's layers summed: their mean, upsampled, times each weight
                    self._add_rows(upsampled_keys(acc, size, self.size), size, float(size[0]) * self.layers[size])
                else:
                    self._add_rows(acc, size, 1.0)
            self.sum.div_(total)
        self.smaller.clear()
        self._result = self.sum
        return self._result


def upsampled_keys(probs: torch.Tensor, size: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Key maps [B, rows, h·w] of an ``size`` grid, bilinearly upsampled to ``target`` and renormalised to sum 1."""
    b, rows, _ = probs.shape
    keys = F.interpolate(probs.reshape(b * rows, 1, *size), size=target, mode="bilinear", align_corners=False)
    keys = keys.reshape(b, rows, -1)
    return keys / keys.sum(-1, keepdim=True).clamp_min(1e-12)


RefineMode = Literal["transpose", "aggsd", "forward", "iseg"]
REFINE_MODES = ("transpose", "aggsd", "forward", "iseg")
MAX_REFINE_STEPS = 100  # iSeg iterates 10; far more only spreads every map over the image
# iSeg's entropy-reduction weight (its VOC setting; 0.1 for COCO).
ISEG_ENTROPY = 0.015


def refine_with_self_attention(
    cross: torch.Tensor, self_attention: torch.Tensor, size: tuple[int, int], mode: RefineMode = "transpose", steps: int = 1
) -> torch.Tensor:
    """Propagate cross-attention maps [B, P, H, W] along self-attention [B, N, N] on an ``size`` grid.

    ``transpose``: AGG = rownorm(SAᵀ)·CA, the mean CA of the pixels attending to each pixel (AggSD's eq. 2,
    with each pixel's weights normalised to sum 1). ``aggsd``: AGG = SAᵀ·CA, eq. 2 as the report writes it.
    ``forward``: AGG = SA·CA, the mean CA of the pixels each pixel attends to (a random-walk step).
    ``iseg``: iSeg's entropy-reduced self-attention (linsun449/iseg.code): SA (a query per row) with each key's
    column scaled to a maximum of 1, plus ``ISEG_ENTROPY``·log10(e·SA) and clamped at 0 (weak links drop out),
    row-normalised, so that each pixel takes the maps of the pixels it attends to, as ``forward`` does; each step
    multiplies, then shifts each map to a minimum of 0 and a sum of 1 (iSeg iterates 10 steps).
    """
    b, p = cross.shape[:2]
    ca = cross if tuple(cross.shape[-2:]) == tuple(size) else F.interpolate(cross, size=size, mode="bicubic", align_corners=False)
    ca = ca.reshape(b, p, -1).transpose(1, 2).float()  # [B, N, P]
    sa = self_attention.float()
    if mode == "transpose":
        # rownorm(SAᵀ)·CA as SAᵀ·CA over SA's column sums: no normalised N×N copy of SAᵀ.
        column_sums = sa.sum(1).clamp_min(1e-12)[..., None]  # [B, N, 1]

        def walk(x: torch.Tensor) -> torch.Tensor:
            return (sa.transpose(1, 2) @ x) / column_sums
    elif mode == "aggsd":
        def walk(x: torch.Tensor) -> torch.Tensor:
            return sa.transpose(1, 2) @ x
    elif mode == "forward":
        def walk(x: torch.Tensor) -> torch.Tensor:
            return sa @ x
    elif mode == "iseg":
        t = sa / sa.amax(1, keepdim=True).clamp_min(1e-12)  # iSeg's trans_mat: SA itself, not SAᵀ
        t = (t + torch.where(t > 0, ISEG_ENTROPY * torch.log10(math.e * t.clamp_min(1e-30)), 0.0)).clamp_min(0)
        t = t / t.sum(2, keepdim=True).clamp_min(1e-12)

        def shifted(x: torch.Tensor) -> torch.Tensor:
            x = x - x.amin(1, keepdim=True)
            return x / x.sum(1, keepdim=True).clamp_min(1e-12)

        ca = shifted(ca)

        def walk(x: torch.Tensor) -> torch.Tensor:
            return shifted(t @ x)
    else:
        raise ValueError(f"unknown refine mode {mode!r}")
    for _ in range(max(1, steps)):
        ca = walk(ca)
    out = ca.transpose(1, 2).reshape(b, p, *size)
    return normalize(out)


def refine_options(mode: str, steps) -> tuple[RefineMode, int]:
    """The refinement's mode and step count, checked: one line naming the choices otherwise."""
    if mode not in REFINE_MODES:
        raise TextMaskError(f"refine_mode must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_REFINE_STEPS:
        raise TextMaskError(f"refine_steps must be a whole number from 1 to {MAX_REFINE_STEPS}, got {steps!r}")
    return mode, steps


def attention_prompt(terms: Sequence[str]) -> str:
    """The phrases listed as one prompt, each as a noun phrase of its own (``subject.with_article``): "the A, the B,
    and the C". MM-DiT hosts read the phrases' maps from it, and it gives joined phrases their pooled embedding
    (``phrase_conditioning``). AggSD's "a photo of A, B, and C" names a medium the image may not have (a painting, a
    render); docs/quality.md measures both."""
    phrases = [with_article(t) for t in terms]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + f", and {phrases[-1]}"


def phrase_conditioning(host: Host, phrases: Sequence[str], prompt: str | None = None
                        ) -> tuple[Conditioning, list[list[int]]]:
    """The conditioning (one row) the phrases' maps are read under, and each phrase's context positions.

    With a ``prompt``: that prompt. Without: each phrase is encoded on its own as a noun phrase ("the red car",
    ``subject.with_article``), and the encodings are joined as one prompt is laid out: the start token once, each
    phrase's tokens through its end token in turn, then the empty prompt's padding up to whole 77-token windows.
    Each phrase's tokens are those it has as a prompt of its own, in a context about as long as the listing's: CLIP
    reads left to right, so in one listing ("the red circle, the blue circle") a phrase's tokens would also carry the
    phrases before it, and sit far from the positions a caption's subject takes. The pooled embedding (SDXL's) is that of ``attention_prompt``. A model whose text runs through every
    block (an MM-DiT: ``reads_text_as_keys`` is False) reads ``attention_prompt`` itself."""
    if prompt is not None and prompt.strip():
        cond = forward.encode_prompts(host, [prompt])
        return cond, [cond.token_maps[0].find(p) for p in phrases]
    if len(phrases) == 1 or not host.reads_text_as_keys():
        cond = forward.encode_prompts(host, [attention_prompt(phrases)])
        return cond, [cond.token_maps[0].find(p) for p in phrases]
    parts = forward.encode_prompts(host, [with_article(p) for p in phrases] + [""])
    pieces, groups, shifts, length = [], [], [], 0
    for k, phrase in enumerate(phrases):
        found = parts.token_maps[k].find(phrase)
        # from the start token (the first phrase's only) through the end token after the phrase, which ends its text
        start, end = (0 if k == 0 else 1), max(found) + 2
        shifts.append(length - start)
        groups.append([t + shifts[-1] for t in found])
        pieces.append(parts.context[k, start:end])
        length += end - start
    padding = parts.context[-1, 2:]  # the empty prompt's tokens after its start and end
    fill = -length % CONTEXT
    pieces.append(padding[torch.arange(fill, device=padding.device) % len(padding)])
    pooled = None if parts.pooled is None else forward.encode_prompts(host, [attention_prompt(phrases)]).pooled
    joined = Conditioning(torch.cat(pieces)[None], [join_token_maps(parts.token_maps[:-1], shifts, length + fill)],
                          pooled)
    return joined, groups


class DAAMHeatMaps:
    """Word heat maps as castorini/daam computes them (``compute_global_heat_map``, then ``compute_word_heat_map``):
    every head's token map of every cross-attention layer, except those at 1/8 of the latent side, is bicubically
    resized to the latent grid and clamped at 0; the maps are averaged over layers and heads, and a phrase's map is
    the mean over its tokens. Result: [B, P, h, w] at the latent size, not normalised.

    DAAM clamps each head's map (bicubic undershoots at sharp edges), so this collector reads every head's
    probabilities; a layer's chunks are kept until the layer is complete, for its tokens only.
    """

    def __init__(self, token_groups: Sequence[Sequence[int]], latent_size: tuple[int, int], rows: slice | None = None):
        self.groups = [list(g) for g in token_groups]
        self.tokens = sorted({t for g in self.groups for t in g})
        self.need = Need(kinds=("cross",), values="head_probs", rows=rows)
        self.latent = tuple(latent_size)
        self.sum: torch.Tensor | None = None  # [B, tokens, h, w]
        self.count = 0  # layer-heads summed
        self._layer: AttentionLayer | None = None
        self._buffer: torch.Tensor | None = None  # [B, heads, tokens, layer's h·w]

    def __call__(self, layer: AttentionLayer, start: int, probs: torch.Tensor) -> None:
        if self.latent[0] == 8 * layer.size[0]:  # DAAM leaves out the maps at 1/8 of the latent side
            return
        if start == 0 or self._layer is None or layer.name != self._layer.name:
            self._flush()
            self._layer = layer
            self._buffer = probs.new_empty(probs.shape[0], probs.shape[1], len(self.tokens), layer.tokens)
        rows = probs.shape[2]
        self._buffer[..., start : start + rows] = probs[..., self.tokens].transpose(-1, -2)

    def _flush(self) -> None:
        layer, buf = self._layer, self._buffer
        self._layer = self._buffer = None
        if layer is None:
            return
        b, heads, t, _ = buf.shape
        maps = F.interpolate(buf.reshape(b * heads * t, 1, *layer.size), size=self.latent, mode="bicubic",
                             align_corners=False).clamp_(min=0)
        total = maps.reshape(b, heads, t, *self.latent).sum(1)
        self.sum = total if self.sum is None else self.sum + total
        self.count += heads

    def result(self) -> torch.Tensor:
        self._flush()
        if self.sum is None:
            raise RuntimeError("no cross-attention was captured")
        mean = self.sum / self.count
        index = {t: i for i, t in enumerate(self.tokens)}
        return torch.stack([mean[:, [index[t] for t in g]].mean(1) for g in self.groups], dim=1)


AGGREGATIONS = ("aggsd", "daam")  # the first is the default: AggSD's layer weighting; DAAM's plain sum


class AttentionDecoder:
    """DAAM word maps from one forward's cross-attention, refined along its self-attention when asked.

    With AggSD's aggregation and the heads weighed by their information, each call also adds its images' phrase
    presence (``CrossAttentionMaps.presence``) to ``presence``, [B, P] over the calls so far."""

    resolution = None
    size_multiple = None

    def __init__(self, cond: Conditioning, groups: list[list[int]], refine: bool, mode: RefineMode, steps: int,
                 aggregation: str = AGGREGATIONS[0], heads: str = defaults.HEADS):
        self.cond, self.groups, self.refine, self.mode, self.steps = cond, groups, refine, mode, steps
        self.aggregation, self.heads = aggregation, heads
        self.measures_presence = aggregation == "aggsd" and heads == "information"
        self.reads_self_attention = refine
        self.presence: torch.Tensor | None = None

    def __call__(self, host: Host, latents: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "daam":
            cross = DAAMHeatMaps(self.groups, tuple(x.shape[-2:]))
        else:
            cross = CrossAttentionMaps(self.groups, heads=self.heads)
        collectors = [cross]
        if self.refine:
            selfagg = SelfAttentionAggregate(weighting="layer")  # AggSD's, which these masks were tuned with
            collectors.append(selfagg)
        forward.eps(host, x, sigma, self.cond.select([0] * x.shape[0]), latents, collectors)
        maps = normalize(cross.result()) if self.aggregation == "daam" else cross.aggregate()
        found = cross.presence() if self.measures_presence else None
        if found is not None:  # every call's or none: each call's grids are the same
            found = found.float().cpu()
            self.presence = found if self.presence is None else torch.cat([self.presence, found])
        if self.refine:
            maps = refine_with_self_attention(maps, selfagg.result(), selfagg.size, self.mode, self.steps)
        return maps.float().cpu()


class AttentionMethod:
    """``attention``: cross-attention aggregated over layers and heads (DAAM), refined with self-attention (AggSD)."""

    name = "attention"
    timestep = defaults.TIMESTEP
    auto_threshold = None  # Otsu per map, a one-thing phrase's strongest regions
    needs_images = False
    needs_weights = False
    options = ("refine", "refine_mode", "refine_steps", "aggregation", "heads")

    def setup(self, host: Host, phrases: Sequence[str], prompt: str | None, *, refine: bool = defaults.REFINE,
              refine_mode: RefineMode = defaults.REFINE_MODE, refine_steps: int = defaults.REFINE_STEPS,
              aggregation: str = AGGREGATIONS[0], heads: str = defaults.HEADS) -> AttentionDecoder:
        if aggregation not in AGGREGATIONS:
            raise TextMaskError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        head_weighting(heads)  # before the forward, not at its first layer
        refine_mode, refine_steps = refine_options(refine_mode, refine_steps)
        cond, groups = phrase_conditioning(host, phrases, prompt)
        return AttentionDecoder(cond, groups, bool(refine), refine_mode, refine_steps, aggregation, heads)
