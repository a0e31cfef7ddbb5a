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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import postprocess as pp
from .capture import AttentionCapture
from .errors import CheckpointError, TextMaskError
from .hosts.base import Host, iter_chunks
from .images import to_batch, working_size
from .latents import encode_and_noise
from .methods.attention import SelfAttentionAggregate
from .methods.diffseg import diffseg
from .subject import subject as find_subject

REFER_TIMESTEP = 100  # a lightly noised latent: Ref-Diff reads attention while decoding from low noise
GUIDANCE = 9.0  # the reference's extrapolation factor from uncond towards cond
THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]  # 5 % … 95 %
MIN_AREA = 0.01  # proposals below 1 % of the image are dropped
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@dataclass
class ReferResult:
    masks: torch.Tensor  # [B, H, W] in {0, 1}
    heatmaps: torch.Tensor  # [B, H, W] attribution of the subject, min-max normalised
    subject: str


class SubjectColumn:
    """Capture sink: per cross-attention layer, the subject's column of the head-averaged scores."""

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
    """Mean attribution inside each proposal minus the mean outside (Ref-Diff eq. 9)."""
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


def masked_crops(image: torch.Tensor, props: torch.Tensor, size: int) -> torch.Tensor:
    """Each proposal's pixels (the rest black), cropped to its box and resized: [P, 3, size, size] in [0, 1]."""
    crops = []
    for mask in props:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        crop = (image * mask)[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        crops.append(F.interpolate(crop[None].float(), size=(size, size), mode="bicubic", align_corners=False)[0])
    return torch.stack(crops).clamp(0, 1)


def _features(out) -> torch.Tensor:
    """Projected CLIP features: a tensor in transformers 4, the output's pooler_output in transformers 5."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScorer:
    """Discriminative scores from a local transformers CLIP model: masked proposal crops against the text."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load a CLIP model from {path}: {str(e).splitlines()[0]}") from None
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)

    def _text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Normalised CLIP text embeddings [T, D], tokenised with the shipped BPE."""
        from .tokenizer import clip_tokenizer

        tok = clip_tokenizer()
        ids = [[49406] + tok(t, add_special_tokens=False)["input_ids"][:75] + [49407] for t in texts]
        ids = torch.tensor([r + [49407] * (77 - len(r)) for r in ids], device=self.device)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids)), dim=-1)

    @torch.no_grad()
    def scores(self, image: torch.Tensor, props: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each proposal's crop [P] to the mean of the texts' embeddings."""
        text = self._text_embeds(texts).mean(0)
        pixels = ((masked_crops(image, props, self.size) - CLIP_MEAN) / CLIP_STD).to(self.device)
        embeds = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return (embeds @ F.normalize(text, dim=0)).float().cpu()

    @torch.no_grad()
    def image_text_probs(self, image: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP's softmax over ``texts`` for a whole image [3, H, W] in [0, 1] (logit scale 100)."""
        text = self._text_embeds(texts)
        full = torch.ones(1, *image.shape[-2:])
        pixels = ((masked_crops(image, full, self.size) - CLIP_MEAN) / CLIP_STD).to(self.device)
        embeds = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return (100 * embeds @ text.T).softmax(-1)[0].float().cpu()


def combine(gen: torch.Tensor, disc: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """α·s_G + (1−α)·s_D over proposals, each score min-max normalised first so the scales agree."""
    if disc is None:
        return gen
    norm = lambda s: (s - s.min()) / (s.max() - s.min()).clamp_min(1e-8)  # noqa: E731
    return alpha * norm(gen) + (1 - alpha) * norm(disc)


def refer(
    host: Host, images, expression: str, *, clip=None, alpha: float = 0.5, tau: float = 1.1,
    timestep: int = REFER_TIMESTEP, seed: int = 0, resolution: int | None = None, batch_size: int = 1,
    use_spacy: bool = False,
) -> ReferResult:
    """The mask of the object a referring expression names, per image, at the exact input size."""
    if not expression or not expression.strip():
        raise TextMaskError("the referring expression is empty")
    if not 0.0 <= alpha <= 1.0:
        raise TextMaskError(f"alpha must be in [0, 1], got {alpha}")
    head = find_subject(expression, use_spacy=use_spacy)
    # ``clip`` is a local CLIP folder, or any object with scores(image, proposals, texts) (a host's own CLIP).
    scorer = ClipScorer(clip) if isinstance(clip, (str, Path)) else clip
    pixels = to_batch(images)
    height, width = pixels.shape[-2:]
    size = working_size(height, width, resolution or host.resolution, host.size_multiple)
    cond = host.encode_prompts(["", expression])
    positions = cond.token_maps[1].occurrences(head)[0]  # the first noun phrase's head
    masks, heats = [], []
    with torch.inference_mode(), host.progress(pixels.shape[0], "refer") as bar:
        for rows in iter_chunks(pixels.shape[0], batch_size):
            host.check_interrupt()
            latents, noisy = encode_and_noise(host, pixels[rows], size, timestep, seed + rows.start)
            b = latents.shape[0]
            noisy = noisy.repeat_interleave(2, 0)  # [uncond, cond] rows per image
            columns = SubjectColumn(positions)
            selfagg = SelfAttentionAggregate()

            def sink(layer, start, values, selfagg=selfagg, columns=columns):
                (selfagg if layer.kind == "self" else columns)(layer, start, values)

            # Self-attention only for the conditional rows (odd); cross-attention scores for both.
            with AttentionCapture(host.attention_modules(), tuple(latents.shape[-2:]), probs=lambda l: True, sink=sink,
                                  logits=lambda l: l.kind == "cross", rows=lambda l: slice(1, None, 2) if l.kind == "self" else None):
                host.predict_noise(noisy, timestep, cond.select([0, 1] * b), latents.repeat_interleave(2, 0))
            attr = attribution(columns)
            sa = selfagg.result()  # conditional rows only
            for i in range(b):
                labels, _ = diffseg(sa[i], selfagg.size, threshold=tau)
                grid_attr = pp.normalize(pp.resize(attr[i : i + 1].float().cpu(), selfagg.size))[0]
                props = proposals(labels.cpu(), grid_attr)
                score = generative_scores(props, grid_attr)
                if scorer is not None:
                    image = pixels[rows.start + i]
                    full = pp.resize(props.float(), (height, width)) > 0.5
                    weighted = image * positional_weight(expression, height, width)
                    disc = scorer.scores(weighted, full, [expression, head])
                    score = combine(score, disc, alpha)
                best = props[int(score.argmax())].float()
                masks.append((pp.resize(best[None], (height, width))[0] > 0.5).float())
                heats.append(pp.resize(grid_attr[None], (height, width))[0].clamp(0, 1))
                bar.update(1)
    return ReferResult(torch.stack(masks), torch.stack(heats), head)

