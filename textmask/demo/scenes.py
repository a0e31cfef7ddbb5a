"""Deterministic synthetic scenes: coloured shapes on textured backgrounds, with exact masks and captions.

Every scene is a pure function of its seed. Masks are the objects' visible pixels (pixel centres inside
the shape, minus whatever is drawn above it); images are antialiased by 4x4 supersampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from skimage.draw import polygon2mask

SIZE = 128
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.12, 0.68, 0.20),
    "blue": (0.14, 0.30, 0.88),
    "yellow": (0.95, 0.83, 0.10),
}
SPLITS = {"train": (0, 1_000_000), "val": (1_000_000, 1_000_500), "test": (2_000_000, 2_000_500)}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float  # circumradius in pixels
    angle: float  # radians

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"

    def polygon(self, vertices: int = 96) -> np.ndarray:
        """Outline as (x, y) vertices; circles are approximated by ``vertices`` points."""
        if self.shape == "circle":
            k, radii = vertices, None
        elif self.shape == "square":
            k, radii = 4, None
        elif self.shape == "triangle":
            k, radii = 3, None
        else:  # five-pointed star, inner radius 0.45 of the outer
            k, radii = 10, [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
        t = self.angle + 2 * math.pi * np.arange(k) / k
        r = self.radius * (np.asarray(radii) if radii is not None else 1.0)
        return np.stack([self.cx + r * np.cos(t), self.cy + r * np.sin(t)], axis=1)

    def area(self) -> float:
        """Analytic area in pixels²."""
        r = self.radius
        if self.shape == "circle":
            return math.pi * r * r
        if self.shape == "square":
            return 2 * r * r
        if self.shape == "triangle":
            return 3 * math.sqrt(3) / 4 * r * r
        return 5 * r * (0.45 * r) * math.sin(math.pi / 5)  # 10 triangles between outer and inner points

    def raster(self, size: int, scale: int = 1) -> np.ndarray:
        """Boolean [size*scale]² mask: pixel centres inside the shape."""
        n = size * scale
        if self.shape == "circle":
            c = (np.arange(n) + 0.5) / scale
            return (c[None, :] - self.cx) ** 2 + (c[:, None] - self.cy) ** 2 <= self.radius**2
        # polygon2mask takes (row, col) vertices in pixel-index space, whose pixel i spans [i-0.5, i+0.5)
        poly = self.polygon() * scale - 0.5
        return polygon2mask((n, n), poly[:, ::-1])


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    objects: list[ShapeObject]
    masks: np.ndarray  # [N, H, W] bool, visible pixels of each object
    caption: str
    relations: list[tuple[str, int]] = field(default_factory=list)  # (referring phrase, object index)

    def phrase_mask(self, phrase: str) -> np.ndarray:
        """Union of the visible masks of every object named ``phrase`` ("red circle")."""
        hits = [m for o, m in zip(self.objects, self.masks) if o.phrase == phrase]
        return np.any(hits, axis=0) if hits else np.zeros(self.image.shape[:2], bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted textured background: smooth noise, stripes and/or grain."""
    base = rng.uniform(0.25, 0.75, 3) * 0.5 + 0.5 * rng.uniform(0.3, 0.7)  # desaturated
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32).copy()
    kinds = rng.choice(["smooth", "stripes", "grain"], size=rng.integers(1, 3), replace=False)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for kind in kinds:
        if kind == "smooth":
            coarse = rng.normal(0, 1, (5, 5, 1)).astype(np.float32)
            from scipy.ndimage import zoom

            img += 0.10 * zoom(coarse, (size / 5, size / 5, 1), order=3)[:size, :size]
        elif kind == "stripes":
            theta, period = rng.uniform(0, math.pi), rng.uniform(8, 24)
            wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
            img += 0.07 * wave[..., None] * rng.uniform(0.5, 1.0, 3)
        else:
            img += rng.normal(0, 0.035, (size, size, 1)).astype(np.float32)
    return img


def _objects(rng: np.random.Generator, size: int) -> list[ShapeObject]:
    count = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15]))
    objects: list[ShapeObject] = []
    for _ in range(50):
        if len(objects) == count:
            break
        # Repeat a shape or a colour often, so a single word rarely identifies one object.
        shape = objects[int(rng.integers(len(objects)))].shape if objects and rng.random() < 0.35 else str(rng.choice(SHAPES))
        colour = objects[int(rng.integers(len(objects)))].colour if objects and rng.random() < 0.35 else str(rng.choice(list(COLOURS)))
        radius = float(rng.uniform(0.09, 0.22) * size)
        cx, cy = rng.uniform(radius, size - radius, 2)
        obj = ShapeObject(shape, colour, float(cx), float(cy), radius, float(rng.uniform(0, 2 * math.pi)))
        # Allow light overlap only: centres at least 0.9 of the summed radii apart.
        if all(math.hypot(o.cx - obj.cx, o.cy - obj.cy) > 0.9 * (o.radius + obj.radius) for o in objects):
            objects.append(obj)
    return objects


def caption(phrases: list[str]) -> str:
    """The caption naming these object phrases in order: "a red circle, a blue square and a green star"."""
    parts = [f"a {p}" for p in phrases]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relations(objects: list[ShapeObject], masks: np.ndarray) -> list[tuple[str, int]]:
    """Unambiguous referring phrases for objects that share a shape (left/right, larger/smaller)."""
    out = []
    for shape in SHAPES:
        idx = [i for i, o in enumerate(objects) if o.shape == shape]
        if len(idx) != 2:
            continue
        a, b = idx
        left, right = sorted(idx, key=lambda i: objects[i].cx)
        if abs(objects[a].cx - objects[b].cx) > 0.5 * (objects[a].radius + objects[b].radius):
            out += [(f"the {shape} on the left", left), (f"the {shape} on the right", right)]
        big, small = sorted(idx, key=lambda i: -masks[i].sum())
        if masks[big].sum() > 1.6 * max(1, masks[small].sum()):
            out += [(f"the larger {shape}", big), (f"the smaller {shape}", small)]
    return out


def make_scene(seed: int, size: int = SIZE) -> Scene:
    """The scene of ``seed``: same seed, same pixels, masks and text."""
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    objects = _objects(rng, size)
    masks = np.zeros((len(objects), size, size), bool)
    s = SUPERSAMPLE
    for i, obj in enumerate(objects):
        fine = obj.raster(size, s)
        coverage = fine.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
        shade = np.asarray(COLOURS[obj.colour], np.float32) * rng.uniform(0.9, 1.05)
        image = image * (1 - coverage) + shade * coverage
        own = obj.raster(size)
        masks[:i] &= ~own  # drawn on top: earlier objects lose these pixels
        masks[i] = own
    image = np.clip(image, 0, 1).astype(np.float32)
    return Scene(seed, image, objects, masks, caption([o.phrase for o in objects]), _relations(objects, masks))


def split_seeds(split: str, count: int | None = None) -> range:
    """Seeds of a fixed split ("train", "val", "test"), optionally the first ``count``."""
    lo, hi = SPLITS[split]
    return range(lo, hi if count is None else min(hi, lo + count))
