"""CLIP as a discriminative scorer (Ref-Diff's proposal score, OVDiff's class pre-filter), on the host's device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CheckpointError
from .tokens import BOS, CONTEXT, EOS, WINDOW

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


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


def folder_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a local transformers CLIP folder, in words, or None when nothing does."""
    if not str(path).strip() or not Path(path).is_dir():
        return "is not a folder"
    if not (Path(path) / "config.json").is_file():
        return "has no config.json"
    return None


def check_clip(clip: Any) -> None:
    """``clip`` is None, a local CLIP folder or a scorer with ``scores``: one line otherwise, before any model loads."""
    if clip is None or (not isinstance(clip, (str, Path)) and callable(getattr(clip, "scores", None))):
        return
    if not isinstance(clip, (str, Path)):
        raise CheckpointError(f"clip must be a local transformers CLIP folder or a scorer with scores(), got "
                              f"{type(clip).__name__}")
    problem = folder_problem(clip)
    if problem:
        raise CheckpointError(f"clip '{clip}' {problem}; name a local transformers CLIP folder")


class ClipScorer:
    """Discriminative scores from a local transformers CLIP model: masked proposal crops against the text."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel

        check_clip(path)
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
        ids = [[BOS] + tok(t, add_special_tokens=False)["input_ids"][:WINDOW] + [EOS] for t in texts]
        ids = torch.tensor([r + [EOS] * (CONTEXT - len(r)) for r in ids], device=self.device)
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


def clip_scorer(clip: Any, device: torch.device) -> Any:
    """A scorer from what a caller passes: None, a local CLIP folder (loaded on ``device``, the host's), or an
    object with ``scores(image, proposals, texts)`` (a host's own CLIP) used as it is."""
    if isinstance(clip, (str, Path)):
        return ClipScorer(clip, device=device)  # which checks the folder
    check_clip(clip)
    return clip
