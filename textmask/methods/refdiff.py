"""Ref-Diff: referring-expression masks from the host model (Ni et al.; kodenii/Ref-Diff).

1. The subject token ("the man on the left" -> "man") is found by ``textmask.subject``.
2. Attribution: head-averaged cross-attention scores (pre-softmax, as the reference) on the layers at 1/32
   of the image (SD's deepest down/up level), extrapolated from the unconditional towards the conditional
   forward (uncond + 9·(cond − uncond), the reference's factor), the subject's column, min-max per layer,
   averaged.
3. Proposals: DiffSeg segments, each with its neighbours, and thresholds of the attribution at 5 %…95 %.
4. Score: mean attribution inside minus outside (eq. 9); with a CLIP model, mixed with the cosine
   similarity of each masked, position-weighted proposal to the expression: α·s_G + (1−α)·s_D.
"""

from __future__ import annotations

import torch

from .. import defaults, forward, options
from .. import postprocess as pp
from ..capture import Need
from ..clip import clip_scorer
from ..hosts.contract import Host
from ..results import ReferResult
from ..subject import subject as find_subject
from .attention import SelfAttentionAggregate, attribution_grid
from .diffseg import diffseg

GUIDANCE = 9.0  # the reference's extrapolation factor from uncond towards cond
THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]  # 5 % … 95 %
MIN_AREA = 0.01  # proposals below 1 % of the image are dropped


class SubjectColumn:
    """Collector: per cross-attention layer, the subject's column of the head-averaged scores (pre-softmax)."""

    need = Need(kinds=("cross",), values="logits")

    def __init__(self, positions: list[int]):
        self.positions = positions
        self.maps: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def __call__(self, layer, start, scores) -> None:
        out = self.maps.get(layer.name)
        if out is None:
            out = self.maps[layer.name] = torch.zeros(scores.shape[0], layer.tokens, device=scores.device)
            self.sizes[layer.name] = layer.size
        out[:, start : start + scores.shape[1]] = scores[:, :, self.positions].mean(-1)


def attribution(columns: SubjectColumn, guidance: float = GUIDANCE) -> torch.Tensor:
    """Extrapolated, per-layer min-max, layer-averaged subject maps [b, h, w] on Ref-Diff's layers.

    Rows alternate uncond/cond; only the layers at ``attribution_grid`` are read.
    """
    size = attribution_grid(columns.sizes)
    maps = []
    for name, flat in columns.maps.items():
        if columns.sizes[name] != size:
            continue
        uncond, cond = flat[0::2], flat[1::2]
        m = uncond + guidance * (cond - uncond)
        maps.append(pp.normalize(m.reshape(m.shape[0], *size)))
    return torch.stack(maps).mean(0)


def neighbours(labels: torch.Tensor) -> set[tuple[int, int]]:
    """Pairs of segment labels that touch horizontally or vertically."""
    pairs = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        diff = a != b
        for x, y in zip(a[diff].tolist(), b[diff].tolist()):
            pairs.add((min(x, y), max(x, y)))
    return pairs


def proposals(labels: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    """Candidate masks [P, h, w]: segments, segments joined with each neighbour and with all, attribution thresholds."""
    count = int(labels.max()) + 1
    segs = [labels == k for k in range(count)]
    out = list(segs)
    touching = neighbours(labels)
    for a, b in sorted(touching):
        out.append(segs[a] | segs[b])
    for k in range(count):
        around = [b if a == k else a for a, b in touching if k in (a, b)]
        if len(around) > 1:
            out.append(torch.stack([segs[k]] + [segs[j] for j in around]).any(0))
    for t in THRESHOLDS:
        out.append(attr > t)
    props = torch.stack(out)
    area = props.flatten(1).float().mean(1)
    # Neither everything nor specks: eq. 9 rewards tiny high-attribution cores, which the reference filters too.
    keep = (area >= MIN_AREA) & (area < 1.0)
    return props[keep] if keep.any() else props[area.argmax()][None]


def generative_scores(props: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    """Mean attribution inside each proposal minus the mean outside (Ref-Diff eq. 9): proposals [K, h, w] in
    {0, 1} and attribution [h, w] give [K]."""
    inside = props.float()
    outside = 1 - inside
    return (inside * attr).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1) - (
        outside * attr
    ).flatten(1).sum(1) / outside.flatten(1).sum(1).clamp_min(1)


def positional_weight(expression: str, h: int, w: int) -> torch.Tensor:
    """The reference's soft ramp for left/right (and top/bottom): 1 at that side, 0 beyond two thirds."""
    words = set(expression.lower().replace("-", " ").split())
    weight = torch.ones(h, w)
    if "left" in words or "right" in words:
        ramp = torch.cat([torch.linspace(1, 0, w * 2 // 3), torch.zeros(w - w * 2 // 3)])
        weight = weight * (ramp if "left" in words else ramp.flip(0))[None, :]
    if "top" in words or "bottom" in words:
        ramp = torch.cat([torch.linspace(1, 0, h * 2 // 3), torch.zeros(h - h * 2 // 3)])
        weight = weight * (ramp if "top" in words else ramp.flip(0))[:, None]
    return weight


def combine(gen: torch.Tensor, disc: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """α·s_G + (1−α)·s_D over proposals, each score min-max normalised first so the scales agree."""
    if disc is None:
        return gen
    norm = lambda s: (s - s.min()) / (s.max() - s.min()).clamp_min(1e-8)  # noqa: E731
    return alpha * norm(gen) + (1 - alpha) * norm(disc)


def refer(
    host: Host, images, expression: str, *, clip=None, alpha: float = defaults.REFER_ALPHA, tau: float = defaults.TAU,
    timestep: int | None = defaults.REFER_TIMESTEP, seed: int = 0, resolution: int | None = None, batch_size: int = 1,
    use_spacy: bool = False,
) -> ReferResult:
    """The mask of the object a referring expression names, per image, at the exact input size."""
    timestep = options.timestep(defaults.REFER_TIMESTEP if timestep is None else timestep)
    expression = options.expression(expression)
    alpha, tau, seed = options.alpha(alpha), options.tau(tau), options.seed(seed)
    batch_size = options.batch_size(batch_size)
    head = find_subject(expression, use_spacy=use_spacy)
    scorer = clip_scorer(clip, host.device)
    images = forward.prepare_images(host, images, resolution, self_attention=True)
    height, width = images.size
    cond = forward.encode_prompts(host, ["", expression])
    positions = cond.token_maps[1].occurrences(head)[0]  # the first noun phrase's head
    masks, heats = [], []
    with torch.inference_mode():
        for rows in forward.batches(host, len(images), batch_size, "refer"):
            latents = forward.encode(host, images.pixels[rows], images.working)
            x, sigma = forward.add_noise(host, latents, timestep, seed + rows.start)
            b = latents.shape[0]
            columns = SubjectColumn(positions)  # cross-attention scores of both rows
            selfagg = SelfAttentionAggregate(rows=slice(1, None, 2))  # self-attention of the conditional rows only
            forward.eps(host, x.repeat_interleave(2, 0), sigma.repeat_interleave(2, 0), cond.select([0, 1] * b),
                        latents.repeat_interleave(2, 0), [columns, selfagg])  # [uncond, cond] rows per image
            attr = attribution(columns)
            sa = selfagg.result()
            for i in range(b):
                labels, _ = diffseg(sa[i], selfagg.size, threshold=tau)
                grid_attr = pp.normalize(pp.resize(attr[i : i + 1].float().cpu(), selfagg.size))[0]
                props = proposals(labels.cpu(), grid_attr)
                score = generative_scores(props, grid_attr)
                if scorer is not None:
                    image = images.pixels[rows.start + i]
                    full = pp.resize(props.float(), (height, width)) > 0.5
                    weighted = image * positional_weight(expression, height, width)
                    disc = scorer.scores(weighted, full, [expression, head])
                    score = combine(score, disc, alpha)
                best = props[int(score.argmax())].float()
                masks.append((pp.resize(best[None], (height, width))[0] > 0.5).float())
                heats.append(pp.resize(grid_attr[None], (height, width))[0].clamp(0, 1))
    return ReferResult(torch.stack(masks), torch.stack(heats), head)
