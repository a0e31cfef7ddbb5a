"""OVDiff prototypes: per class, foreground and background feature prototypes (class mean, one mean per
support image, K-means parts), built once per vocabulary and cached as safetensors keyed by the model's
weights fingerprint, the class prompt and the settings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import defaults, forward, options
from ..errors import TextMaskError
from ..hosts.contract import Host
from . import support
from .classes import is_stuff, parse_class
from .features import FEATURE_SIZE, FEATURE_TIMESTEP, extract

FORMAT = "textmask-ovdiff-prototypes"
VERSION = "2"  # raised whenever the same settings would give other prototypes, so older caches are rebuilt
KINDS = ("mean", "instances", "kmeans")
STUFF_SIMILARITY = 0.85
MAX_KMEANS_POINTS = 20000  # K-means runs on a deterministic subsample of the support pixels
FEATURE_BATCH = 4  # support images to a feature forward
AGGREGATE_BUDGET = 256 << 20  # bytes of fp32 self-attention aggregates in one feature forward (64 MiB each at SD1.5 512 px)


@dataclass(frozen=True)
class Settings:
    """Everything besides the model and the class that changes a prototype."""

    images: int = defaults.OVDIFF_IMAGES
    steps: int = defaults.OVDIFF_STEPS
    cfg: float = defaults.OVDIFF_CFG
    seed: int = 0
    kmeans: int = defaults.OVDIFF_PARTS
    tau: float = defaults.TAU
    prompt: str = support.PROMPT
    negative: str = support.NEGATIVE
    feature_timestep: int = FEATURE_TIMESTEP
    feature_size: int = FEATURE_SIZE
    resolution: int | None = None  # support images' side in pixels; None: the model's native resolution


@dataclass
class ClassPrototypes:
    """One class's prototypes; each tensor is [K, D] (K may be 0: a stuff class has no background ones)."""

    name: str
    stuff: bool
    fg: dict[str, torch.Tensor]
    bg: dict[str, torch.Tensor]

    def foreground(self) -> torch.Tensor:
        return torch.cat([self.fg[k] for k in KINDS])

    def background(self) -> torch.Tensor:
        return torch.cat([self.bg[k] for k in KINDS]) if not self.stuff else self.fg["mean"].new_zeros(0, self.fg["mean"].shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.fg.values(), *self.bg.values()])


@dataclass
class Prototypes:
    """A vocabulary's prototypes plus the host that built them (its features are the ones to match)."""

    classes: list[ClassPrototypes]
    host: Host | None = field(default=None, repr=False)
    settings: Settings = field(default_factory=Settings)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 20,
           device: torch.device | str | None = None) -> torch.Tensor:
    """K-means centres [min(k, N), D] of ``points`` [N, D], deterministic (k-means++ init from ``seed``), computed
    on ``device`` (default: the points') and returned on the points' device."""
    # In torch, not scipy's kmeans2: its k-means++ init on a class's support features took longer than the
    # sampling (CHANGELOG, 2026-11-23), where these matrix products run on the device.
    if len(points) == 0:
        return points.new_zeros(0, points.shape[1])
    gen = torch.Generator().manual_seed(seed)
    if len(points) > MAX_KMEANS_POINTS:
        idx = torch.randperm(len(points), generator=gen)[:MAX_KMEANS_POINTS]
        points = points[idx.sort().values]
    x = points.to(device or points.device).float()  # the draws stay on the CPU generator, wherever x is
    k = min(k, len(x))
    norms = (x * x).sum(1)

    def dist2(i: int) -> torch.Tensor:  # squared distance of every point to point i
        return (norms - 2 * (x @ x[i]) + norms[i]).clamp_min(0)

    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    nearest = dist2(chosen[0])
    for _ in range(1, k):  # k-means++: the next centre is drawn with probability ∝ squared distance
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)  # all points on the centres
        chosen.append(int(torch.multinomial(weights.cpu(), 1, generator=gen)))
        nearest = torch.minimum(nearest, dist2(chosen[-1]))
    centres = x[chosen]
    for _ in range(iterations):  # Lloyd's steps; an emptied cluster keeps its centre
        assign = ((centres * centres).sum(1) - 2 * (x @ centres.T)).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres.to(points.device)


def _prototypes(per_image: list[torch.Tensor], k: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Class mean, one mean per support image, and K-means parts of the pooled features (run on ``device``)."""
    per_image = [f for f in per_image if len(f)]
    if not per_image:
        return {}
    pooled = torch.cat(per_image)
    # K-means on the GPU where it has room (seconds on the CPU at this width), else on the CPU.
    need = 4 * min(len(pooled), MAX_KMEANS_POINTS) * pooled.shape[1] * 4  # points and products, fp32
    if device.type != "cuda" or torch.cuda.mem_get_info(device)[0] < need:
        device = torch.device("cpu")
    return {"mean": pooled.mean(0, keepdim=True), "instances": torch.stack([f.mean(0) for f in per_image]),
            "kmeans": kmeans(pooled, k, seed, device=device)}


@torch.inference_mode()
def build_class(host: Host, name: str, stuff: bool, settings: Settings, bar=None) -> ClassPrototypes:
    """Sample the support set, split foreground / background, extract features and reduce to prototypes."""
    images = support.sample_support(host, name, settings.images, steps=settings.steps, cfg=settings.cfg,
                                    seed=settings.seed, resolution=settings.resolution,
                                    on_image=(lambda: bar.update(1)) if bar else None)
    empty = forward.encode_prompts(host, [""])
    fg_feats, bg_feats = [], []
    # Several images to a feature forward: on a GPU a forward costs its kernel launches, whatever the batch.
    side = images[0].latents.shape[-2] * images[0].latents.shape[-1]
    batch = max(1, min(FEATURE_BATCH, AGGREGATE_BUDGET // (side * side * 4)))

    def features(rows: slice):
        latents = torch.stack([img.latents for img in images[rows]]).to(host.device, host.dtype)
        feats, selfagg = extract(host, latents, empty, settings.seed + rows.start, with_segments=True)  # row i: seed + i
        return feats, selfagg.result(), selfagg.size

    for rows, (feats, aggregate, grid) in forward.halving_batches(host, len(images), batch, features):
        for i, img in enumerate(images[rows]):
            fg, bg = support.split_foreground(aggregate[i], grid, img.attribution, settings.tau)
            size = (settings.feature_size, settings.feature_size)
            fg = F.interpolate(fg[None, None].float(), size=size, mode="nearest")[0, 0].bool()
            bg = F.interpolate(bg[None, None].float(), size=size, mode="nearest")[0, 0].bool()
            flat = feats[i].reshape(feats.shape[1], -1).T  # [64*64, D]
            # Only the chosen pixels' features leave the device: 32 images' full features would not fit a small GPU.
            fg_feats.append(flat[fg.reshape(-1).to(flat.device)].cpu())
            bg_feats.append(flat[bg.reshape(-1).to(flat.device)].cpu())
        del feats, aggregate  # this batch's tensors go before the next forward
    fg_protos = _prototypes(fg_feats, settings.kmeans, settings.seed, host.device)
    if not fg_protos:
        raise TextMaskError(f"OVDiff found no foreground for '{name}' in {len(images)} support images; try more images")
    bg_protos = {} if stuff else _prototypes(bg_feats, settings.kmeans, settings.seed, host.device)
    d = fg_protos["mean"].shape[1]
    empty_kinds = {k: torch.zeros(0, d) for k in KINDS}
    return ClassPrototypes(name, stuff, fg_protos, bg_protos or empty_kinds)


def stuff_filter(protos: Sequence[ClassPrototypes], threshold: float = STUFF_SIMILARITY) -> list[torch.Tensor]:
    """Per class, its background prototypes minus those too close (cosine > threshold) to a stuff class's
    foreground prototypes. Stuff classes have none."""
    stuff_fg = [F.normalize(c.foreground().float(), dim=-1) for c in protos if c.stuff]
    stuff_fg = torch.cat(stuff_fg) if stuff_fg else None
    out = []
    for c in protos:
        bg = c.background().float()
        if stuff_fg is not None and len(bg):
            sim = F.normalize(bg, dim=-1) @ stuff_fg.T
            bg = bg[sim.max(-1).values <= threshold]
        out.append(bg)
    return out


# ---- fingerprint and cache -----------------------------------------------------------------------------
@torch.inference_mode()
def fingerprint(host: Host) -> str:
    """A hash of what the model computes (not its file name): text encoder, VAE and UNet outputs on fixed
    probes. Weight patches applied through the module call (LoRA, low-VRAM) change it too."""
    g = torch.Generator().manual_seed(1234)
    multiple = host.geometry.size_multiple
    side = multiple * max(1, -(-64 // multiple))  # >= 64 px: every level keeps > 1 cell
    pixels = torch.rand(1, 3, side, side, generator=g)
    latents = host.encode_images(pixels.to(host.device))
    cond = forward.encode_prompts(host, ["textmask fingerprint: a red fox on green grass"])
    sigma = host.sigma(500).float().to(latents.device)
    x = torch.randn(latents.shape, generator=g).to(latents.device).float() * sigma + latents.float()
    eps = forward.eps(host, x, sigma, cond, latents)
    h = hashlib.sha256()
    for t in (cond.context, latents, eps):
        t = t.float().cpu()
        q = torch.round(t / t.abs().amax().clamp_min(1e-8) * 1000).to(torch.int16)  # robust to backend noise
        h.update(q.numpy().tobytes())
    sampler = host.sampler_identity()  # only where it says something, so other models' cached prototypes stay valid
    h.update(repr((type(host).__name__, tuple(latents.shape)) + ((sampler,) if sampler else ())).encode())
    return h.hexdigest()[:32]


def cache_key(model_fingerprint: str, name: str, stuff: bool, settings: Settings) -> str:
    blob = json.dumps({"v": VERSION, "model": model_fingerprint, "class": name, "stuff": stuff,
                       "settings": asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def default_cache_dir() -> Path:
    return defaults.cache_dir() / "ovdiff"


def cache_folder(path: str | Path | None) -> Path:
    """The cache folder ``path`` names, the default where it is None; one line where it is empty (Path("") would be
    the current folder) or a file."""
    if path is None:
        return default_cache_dir()
    if not str(path).strip():
        raise TextMaskError(f"the prototype cache path is empty; name a folder, or leave it out for the default "
                            f"{default_cache_dir()}")
    if Path(path).exists() and not Path(path).is_dir():
        raise TextMaskError(f"prototype cache {path} is a file; name a folder")
    return Path(path)


def writable_folder(path: str | Path | None) -> Path:
    """The cache folder ``path`` names (``cache_folder``), checked as one prototypes can be written to before any is
    built (and made only when one is)."""
    from ..outputs import OutputError, check_folder

    try:
        return check_folder(cache_folder(path), "prototype cache")
    except OutputError as e:
        if path is not None:
            raise
        raise OutputError(f"{e}; set TEXTMASK_CACHE to a writable folder, or pass a cache folder") from None


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def save_class(proto: ClassPrototypes, path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"{side}.{k}": v.to(torch.float16).contiguous() for side, d in (("fg", proto.fg), ("bg", proto.bg)) for k, v in d.items()}
    meta = {**meta, "format": FORMAT, "version": VERSION, "class": proto.name, "stuff": str(proto.stuff),
            "checksum": _checksum(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_class(path: Path) -> tuple[ClassPrototypes, dict[str, str]] | None:
    """A cached class, or None when the file is missing, unreadable or fails its checksum (never trusted)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if meta.get("format") != FORMAT or meta.get("checksum") != _checksum(tensors):
        return None
    try:
        fg = {k: tensors[f"fg.{k}"].float() for k in KINDS}
        bg = {k: tensors[f"bg.{k}"].float() for k in KINDS}
    except KeyError:
        return None
    return ClassPrototypes(meta["class"], meta["stuff"] == "True", fg, bg), meta


def build_prototypes(host: Host, classes: Sequence[str], *, images: int = defaults.OVDIFF_IMAGES,
                     steps: int = defaults.OVDIFF_STEPS, cfg: float = defaults.OVDIFF_CFG, seed: int = 0,
                     kmeans_parts: int = defaults.OVDIFF_PARTS, overrides: dict[str, bool] | None = None,
                     cache_dir: str | Path | None = None, use_cache: bool = True,
                     resolution: int | None = None) -> Prototypes:
    """Prototypes for each class, reusing cached ones; adding a class never recomputes the others."""
    specs = [parse_class(c) for c in options.names(classes, "class names", "class name")]
    names = [n for n, _ in specs]
    if not names or any(not n for n in names):
        raise TextMaskError("give at least one class name, and no empty names")
    if len({n.lower() for n in names}) != len(names):
        raise TextMaskError("duplicate class names")
    images = options.count("images", images, options.MAX_SUPPORT_IMAGES)
    steps = options.count("steps", steps, options.MAX_STEPS)
    cfg, seed, resolution = options.cfg(cfg), options.seed(seed), options.resolution(resolution)
    if host.geometry.in_channels not in (4, 16):  # SD's 4 or SD3's and Flux's 16 latent channels, nothing more
        raise TextMaskError("OVDiff samples its support images, which needs a non-inpainting model; "
                            "build the prototypes with the base model of this inpainting checkpoint")
    if overrides is not None and not isinstance(overrides, dict):
        raise TextMaskError(f"overrides must be a dict of class name to is-stuff, e.g. {{'sky': True}}, got "
                            f"{type(overrides).__name__}")
    overrides = {k.lower(): v for k, v in (overrides or {}).items()}
    multiple = host.geometry.size_multiple
    if resolution is not None and (resolution <= 0 or resolution % multiple):
        raise TextMaskError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    side = forward.check_square_side(host, resolution) // host.geometry.latent_factor
    forward.check_self_attention(host, (side, side))  # the feature forward's DiffSeg reads it, after all the sampling
    settings = Settings(images=images, steps=steps, cfg=cfg, seed=seed, kmeans=kmeans_parts, resolution=resolution)
    cache = writable_folder(cache_dir)
    model_fp = fingerprint(host)
    out = []
    with host.progress(len(names), "ovdiff classes") as classes_bar:
        for name, flag in specs:
            stuff = is_stuff(name, flag if flag is not None else overrides.get(name.lower()))
            path = cache / f"{cache_key(model_fp, name, stuff, settings)}.safetensors"
            cached = load_class(path) if use_cache else None
            if cached is None:
                host.check_interrupt()
                with host.progress(images, f"ovdiff {name}") as bar:
                    proto = build_class(host, name, stuff, settings, bar)
                save_class(proto, path, {"model": model_fp, "settings": json.dumps(asdict(settings), sort_keys=True)})
                # keep what the cache holds (fp16), so a first build and a cache hit segment identically
                stored = {side: {k: v.half().float() for k, v in d.items()} for side, d in (("fg", proto.fg), ("bg", proto.bg))}
                cached = (ClassPrototypes(proto.name, proto.stuff, stored["fg"], stored["bg"]), {})
            out.append(cached[0])
            classes_bar.update(1)
    return Prototypes(out, host, settings)


def list_cache(cache_dir: str | Path | None = None) -> list[dict[str, str]]:
    """Every readable cached class: its name, stuff flag, model fingerprint, settings, size and path."""
    cache = cache_folder(cache_dir)
    rows = []
    for path in sorted(cache.glob("*.safetensors")):
        loaded = load_class(path)
        if loaded is None:
            rows.append({"class": "?", "path": str(path), "status": "corrupt (rebuilt on next use)"})
            continue
        proto, meta = loaded
        rows.append({"class": proto.name, "stuff": str(proto.stuff), "model": meta.get("model", "?"),
                     "settings": meta.get("settings", ""), "bytes": str(path.stat().st_size), "path": str(path),
                     "status": "ok"})
    return rows
